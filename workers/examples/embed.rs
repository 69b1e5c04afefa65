//! Embeds sentences with one model version on a chosen execution provider,
//! outside the pipeline: a check of a model directory and of a provider.
//!
//! ```text
//! ORT_DYLIB_PATH=... cargo run --release -p sluice-workers --example embed [--features cuda] -- \
//!     MODEL_VERSION_DIR [cpu|cuda] [fail|cpu] [repeat]
//! ```

use std::time::Instant;

use sluice_schemas::Input;
use sluice_workers::{ExecutionProvider, ModelVersion, ProviderFallback, RawSession, SessionConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().expect("usage: embed MODEL_VERSION_DIR [cpu|cuda] [fail|cpu] [repeat]");
    let provider = match args.get(1).map(String::as_str) {
        Some("cuda") => ExecutionProvider::Cuda { device_id: 0 },
        _ => ExecutionProvider::Cpu,
    };
    let fallback = match args.get(2).map(String::as_str) {
        Some("cpu") => ProviderFallback::Cpu,
        _ => ProviderFallback::Fail,
    };
    let repeat: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(20);
    let model = ModelVersion::open(std::path::Path::new(dir)).expect("model version verifies");
    let cfg = SessionConfig { provider, fallback, ..Default::default() };
    let started = Instant::now();
    let mut session = match RawSession::load(&model, &cfg) {
        Ok(s) => s,
        Err(e) => {
            println!("load failed ({provider:?}, fallback {fallback:?}): {e}");
            std::process::exit(2);
        }
    };
    println!("loaded {} on {provider:?} (fallback {fallback:?}) in {:?}", model.label(), started.elapsed());
    let texts: Vec<String> = (0..64).map(|i| format!("This is example sentence number {i} about batching.")).collect();
    let prepared: Vec<_> = texts.iter().map(|t| session.prepare(&Input::Text(t.clone())).unwrap()).collect();
    let refs: Vec<_> = prepared.iter().collect();
    let example = session.prepare(&Input::Text("This is an example sentence".into())).unwrap();
    let out = session.run(&[&example]).unwrap();
    println!("\"This is an example sentence\" -> {:?}", &format!("{:?}", out[0])[..80]);
    session.run(&refs).unwrap();
    let t = Instant::now();
    for _ in 0..repeat {
        session.run(&refs).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!("{} batches of 64: {:.1} texts/s", repeat, (repeat * 64) as f64 / secs);
}
