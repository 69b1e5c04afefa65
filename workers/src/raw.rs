//! One session driven directly: no queue, no scheduler, no threads. The
//! ceiling the engine is measured against (`benches/batching.rs`), and a
//! tool for checking a model outside the pipeline.

use sluice_schemas::{Input, Output};

use crate::WorkerError;
use crate::backend::{Prepared, Preprocessor, Runner};
use crate::model::ModelVersion;
use crate::runtime::SessionConfig;

/// A model version's preprocessor and one session, on the caller's thread.
pub struct RawSession {
    pre: Preprocessor,
    runner: Runner,
}

impl RawSession {
    /// Loads `model` (blocking).
    pub fn load(model: &ModelVersion, cfg: &SessionConfig) -> Result<RawSession, WorkerError> {
        let (runner, inputs) = Runner::load(model, cfg)?;
        Ok(RawSession { pre: Preprocessor::new(model, inputs)?, runner })
    }

    /// Tokenizes or checks one input.
    pub fn prepare(&self, input: &Input) -> Result<Prepared, WorkerError> {
        self.pre.prepare(input)
    }

    /// Runs one batch as given (padded to its longest input).
    pub fn run(&mut self, batch: &[&Prepared]) -> Result<Vec<Output>, WorkerError> {
        self.runner.run(batch)?.into_iter().collect()
    }
}
