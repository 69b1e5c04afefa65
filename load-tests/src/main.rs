//! `sluice-load`: drives Sluice from the outside, the way users do.
//!
//! - `demo` is `make demo`: it starts `sluice up` (embedded broker,
//!   in-process store), submits every sentence of a corpus twice — once
//!   through `POST /v1/jobs`, once as a JobRequest published straight to
//!   Kafka — polls every result over REST, checks them, and prints what came
//!   back.
//! - `bench` is `make bench-e2e`: Sluice end to end against the raw ONNX
//!   Runtime ceiling, with the embedded and a real broker (see `bench.rs`).
//! - `search-bench` is `make bench-search`: recall and latency of the
//!   approximate search index against exact search (see `search_bench.rs`).
//! - `steady`, `capacity`, `spike`, `tenants` are load scenarios against a
//!   `sluice up` they start or an existing deployment, each writing a report
//!   (see `load/mod.rs`).

mod bench;
mod child;
mod corpus;
mod demo;
mod load;
mod procstat;
mod search_bench;
mod stats;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Drives a Sluice from the outside")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start `sluice up`, push a corpus through REST and Kafka, print results.
    Demo {
        /// The `sluice` binary.
        #[arg(long, env = "SLUICE_BIN")]
        sluice: PathBuf,
        /// Model repository.
        #[arg(long, env = "SLUICE_MODEL_REPO")]
        models: PathBuf,
        /// Corpus: `topic<TAB>sentence` per line; the first two lines of a
        /// topic are paraphrases.
        /// Default: `load-tests/data/sentences.tsv`, built into the binary.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Concurrent HTTP requests.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// End-to-end throughput: jobs published by a non-Sluice Kafka client,
    /// through `sluice` (embedded broker, and a real one with --brokers), to
    /// results readable in Redis — against the raw ONNX Runtime ceiling of
    /// the same model, with the CPU each process used. Also compares the
    /// text model's versions (fp32, int8) for speed and accuracy.
    Bench(bench::BenchArgs),
    /// Recall@k and latency of `POST /v1/search`'s approximate index
    /// against exact search, on embeddings made through the pipeline.
    SearchBench(search_bench::SearchBenchArgs),
    #[command(flatten)]
    Load(load::Scenario),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Demo { sluice, models, corpus, concurrency } => {
            demo::run(&sluice, &models, corpus.as_deref(), concurrency).await
        }
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::SearchBench(args) => search_bench::run(args).await,
        Cmd::Load(scenario) => {
            if !load::run(scenario).await? {
                eprintln!("verdict: FAILED (see the report)");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
