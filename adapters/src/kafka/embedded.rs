//! The embedded broker of `sluice up`: librdkafka's in-process mock cluster.
//!
//! It speaks the real Kafka protocol on loopback TCP, so every Kafka client
//! (kcat, confluent-kafka, `sluice`'s own) can use it, but it keeps data in
//! memory only: nothing survives the process. It is `!Send`, so it lives on
//! its own thread and is driven through a small command channel.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use rdkafka::mocking::MockCluster;

use super::KafkaError;

enum Command {
    CreateTopic { name: String, partitions: i32, reply: std_mpsc::Sender<Result<(), KafkaError>> },
    Stop,
}

/// A running embedded broker; dropping it stops the broker.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: std_mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a single-broker mock cluster on an ephemeral loopback port.
    pub fn start() -> Result<EmbeddedBroker, KafkaError> {
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (commands, rx) = std_mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("embedded-broker".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KafkaError::Embedded(e.to_string())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // The cluster lives exactly as long as this loop.
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Command::CreateTopic { name, partitions, reply } => {
                            let r = cluster
                                .create_topic(&name, partitions, 1)
                                .map_err(|e| KafkaError::Embedded(format!("create {name}: {e}")));
                            let _ = reply.send(r);
                        }
                        Command::Stop => break,
                    }
                }
            })
            .map_err(|e| KafkaError::Embedded(e.to_string()))?;
        let bootstrap =
            ready_rx.recv().map_err(|_| KafkaError::Embedded("broker thread died while starting".into()))??;
        Ok(EmbeddedBroker { bootstrap, commands, thread: Some(thread) })
    }

    /// `bootstrap.servers` of the embedded broker (`127.0.0.1:PORT`).
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic (the mock cluster does not serve CreateTopics).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        let (reply, rx) = std_mpsc::channel();
        self.commands
            .send(Command::CreateTopic { name: name.to_owned(), partitions, reply })
            .map_err(|_| KafkaError::Embedded("broker thread is gone".into()))?;
        rx.recv().map_err(|_| KafkaError::Embedded("broker thread is gone".into()))?
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connections [`forward_bootstrap`] serves at once; more wait in the
/// listener's backlog. Clients use it only to bootstrap (metadata), then
/// connect to the broker's own port.
const MAX_BOOTSTRAP_CONNECTIONS: usize = 64;

/// Listens on `listen` (the well-known `127.0.0.1:9092` by default) and
/// forwards each connection to the embedded broker's ephemeral port, so
/// that `kcat -b 127.0.0.1:9092` reaches `sluice up` without reading its
/// log. The broker's metadata names its real port, where clients then
/// connect directly. Listens until `stop` completes; returns the address.
pub async fn forward_bootstrap(
    listen: &str,
    broker: String,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_BOOTSTRAP_CONNECTIONS));
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let accepted = tokio::select! {
                _ = &mut stop => return,
                a = listener.accept() => a,
            };
            let (mut client, _) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "embedded broker bootstrap: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let broker = broker.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::net::TcpStream::connect(&broker).await {
                    Ok(mut upstream) => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "embedded broker bootstrap: cannot reach the broker"),
                }
            });
        }
    });
    Ok(addr)
}
