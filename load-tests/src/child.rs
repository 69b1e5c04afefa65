//! A `sluice` child process (`up`, `worker`, …), ready once it has written
//! its ready file, stopped with SIGTERM.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// A `KEY=VALUE` command-line argument: a setting for a `sluice` child.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// A running `sluice` process.
pub struct SluiceProcess {
    child: tokio::process::Child,
    /// The REST API (`up`, `gateway`) or the ops listener (`worker`, `sink`).
    pub http: Option<String>,
    /// `bootstrap.servers` it uses (the embedded broker's, for `up`).
    pub bootstrap: String,
}

impl SluiceProcess {
    /// Starts `sluice <args>` with extra environment variables and waits
    /// until it is ready (at most 120 s). Its standard error goes to `log`
    /// when given (and is inherited otherwise).
    pub async fn start(
        sluice: &Path,
        args: &[OsString],
        envs: &[(String, String)],
        log: Option<&Path>,
    ) -> anyhow::Result<SluiceProcess> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ready = std::env::temp_dir().join(format!("sluice-load-{}-{n}.json", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        let stderr = match log {
            Some(path) => {
                Stdio::from(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?)
            }
            None => Stdio::inherit(),
        };
        let child = tokio::process::Command::new(sluice)
            .args(args)
            .stderr(stderr)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", sluice.display()))?;
        let mut child = SluiceProcess { child, http: None, bootstrap: String::new() };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(bytes) = std::fs::read(&ready)
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
            {
                child.http = v["http"].as_str().map(str::to_owned);
                child.bootstrap = v["bootstrap"].as_str().context("ready file without bootstrap")?.to_owned();
                let _ = std::fs::remove_file(&ready);
                return Ok(child);
            }
            if let Some(status) = child.child.try_wait()? {
                let hint = log.map(|l| format!("; its log: {}", l.display())).unwrap_or_default();
                bail!(
                    "`sluice {}` exited before it was ready ({status}){hint}",
                    args.first().map(|a| a.to_string_lossy()).unwrap_or_default()
                );
            }
            ensure!(Instant::now() < deadline, "sluice not ready after 120 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group (a crash).
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM (the graceful path: drain, commit, leave the group), then
    /// waits up to 30 s for a clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid we spawned and still own.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        ensure!(status.success(), "sluice exited with {status}");
        Ok(())
    }
}
