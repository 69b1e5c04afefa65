//! What a scenario drives: a `sluice up` this tool starts (the default), or
//! a deployment that runs already (`--http`, `--brokers`).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, ensure};
use clap::Args;

use crate::child::SluiceProcess;

/// Topic prefix of the `sluice up` this tool starts.
const OWN_PREFIX: &str = "load";

#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// The `sluice` binary, to start `sluice up` (embedded broker,
    /// in-process store, or Redis with `--redis`). Not used with `--http`.
    #[arg(long, env = "SLUICE_BIN")]
    sluice: Option<PathBuf>,
    /// Model repository of the `sluice up` this tool starts.
    #[arg(long, env = "SLUICE_MODEL_REPO")]
    models: Option<PathBuf>,
    /// Redis URL for the started `sluice up`'s results store (in-process
    /// when absent).
    #[arg(long)]
    redis: Option<String>,
    /// A setting for the started `sluice up`, `KEY=VALUE` (repeatable):
    /// `--env SLUICE__ENGINE__MAX_BATCH_SIZE=64`.
    #[arg(long = "env", value_parser = crate::child::parse_env)]
    envs: Vec<(String, String)>,
    /// An existing deployment's REST API (e.g. `http://gateway:8080`):
    /// nothing is started. Needs `--brokers` too.
    #[arg(long, requires = "brokers")]
    http: Option<String>,
    /// The existing deployment's Kafka bootstrap servers. Jobs sent with
    /// `--via kafka` go there, and results are read from its results topic
    /// (a consumer group of this run's own, so nothing is taken from the
    /// deployment's sinks).
    #[arg(long)]
    brokers: Option<String>,
    /// The existing deployment's `kafka.topic_prefix`.
    #[arg(long, default_value = "sluice")]
    topic_prefix: String,
    /// API key for REST (sent as `Authorization: Bearer`).
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Process ids whose resident memory the report plots (for an existing
    /// deployment on this machine; the started `sluice up` is always plotted).
    #[arg(long = "pid", value_delimiter = ',')]
    pids: Vec<u32>,
}

impl TargetArgs {
    /// The `sluice` binary and model repository, for a scenario that starts
    /// its own processes.
    pub fn own_binaries(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        ensure!(self.http.is_none(), "this scenario starts its own deployment: no --http");
        let sluice = self.sluice.clone().context("give --sluice (or SLUICE_BIN)")?;
        let models = self.models.clone().context("give --models (or SLUICE_MODEL_REPO)")?;
        ensure!(models.is_dir(), "model repository {} is not a directory", models.display());
        Ok((sluice, models))
    }

    /// The user's `--env` settings.
    pub fn envs(&self) -> &[(String, String)] {
        &self.envs
    }
}

/// A Sluice to drive.
pub struct Target {
    /// REST API base URL.
    pub http: String,
    /// Kafka bootstrap servers.
    pub brokers: String,
    pub topic_prefix: String,
    pub api_key: Option<String>,
    /// Processes whose memory is sampled, by name.
    pub pids: Vec<(String, u32)>,
    /// Whether this tool started it (and how).
    pub started: Option<String>,
    process: Option<SluiceProcess>,
}

impl Target {
    /// Connects to `--http`/`--brokers`, or starts `sluice up` with
    /// `settings` (the scenario's, then the user's `--env`, which win).
    pub async fn open(args: &TargetArgs, settings: &[(String, String)], log: PathBuf) -> anyhow::Result<Target> {
        let extra: Vec<(String, u32)> = args.pids.iter().map(|p| (format!("pid {p}"), *p)).collect();
        if let Some(http) = &args.http {
            let brokers = args.brokers.clone().context("--http needs --brokers (results are read from Kafka)")?;
            return Ok(Target {
                http: http.trim_end_matches('/').to_owned(),
                brokers,
                topic_prefix: args.topic_prefix.clone(),
                api_key: args.api_key.clone(),
                pids: extra,
                started: None,
                process: None,
            });
        }
        let sluice = args.sluice.clone().context("give --sluice (or SLUICE_BIN) to start `sluice up`, or --http")?;
        let models = args.models.clone().context("give --models (or SLUICE_MODEL_REPO) for `sluice up`")?;
        ensure!(models.is_dir(), "model repository {} is not a directory", models.display());
        let mut cmd: Vec<OsString> =
            vec!["up".into(), "--models".into(), models.into(), "--listen".into(), "127.0.0.1:0".into()];
        if let Some(redis) = &args.redis {
            cmd.extend(["--redis".into(), redis.into()]);
        }
        let mut envs = vec![
            ("SLUICE__KAFKA__TOPIC_PREFIX".to_owned(), OWN_PREFIX.to_owned()),
            // Nothing lands on disk from a load run unless asked for.
            ("SLUICE__SINKS__UP_LOCAL_DEFAULTS".to_owned(), "false".to_owned()),
            // Every job runs: a cache hit would measure the cache.
            ("SLUICE__STORE__CACHE_TTL_SECS".to_owned(), "0".to_owned()),
        ];
        envs.extend(settings.iter().cloned());
        envs.extend(args.envs.iter().cloned());
        let process = SluiceProcess::start(&sluice, &cmd, &envs, Some(&log)).await?;
        let http = process.http.clone().context("sluice up serves no REST API")?;
        let mut pids = extra;
        if let Some(pid) = process.pid() {
            pids.insert(0, ("sluice up".to_owned(), pid));
        }
        let shown: Vec<String> = envs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Ok(Target {
            http,
            brokers: process.bootstrap.clone(),
            topic_prefix: OWN_PREFIX.to_owned(),
            api_key: args.api_key.clone(),
            pids,
            started: Some(format!("sluice up ({}; log {})", shown.join(" "), log.display())),
            process: Some(process),
        })
    }

    /// A deployment this tool started and manages itself (the `faults`
    /// scenario's processes): nothing for [`Target::close`] to stop.
    pub fn deployed(
        http: String,
        brokers: String,
        topic_prefix: String,
        pids: Vec<(String, u32)>,
        how: String,
    ) -> Target {
        Target { http, brokers, topic_prefix, api_key: None, pids, started: Some(how), process: None }
    }

    /// Stops what this tool started.
    pub async fn close(self) -> anyhow::Result<()> {
        match self.process {
            Some(p) => p.stop().await,
            None => Ok(()),
        }
    }
}
