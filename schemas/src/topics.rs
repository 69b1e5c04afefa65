//! Topic naming: `<prefix>.jobs.<model>`, `<prefix>.results`, `<prefix>.dlq`.
//!
//! Model names are restricted by [`crate::JobRequest`] validation to
//! characters that are legal in Kafka topic names, so these never fail.

/// Topic the jobs for `model` are published to.
pub fn jobs(prefix: &str, model: &str) -> String {
    format!("{prefix}.jobs.{model}")
}

/// Topic every finished job's [`crate::JobResult`] is published to.
pub fn results(prefix: &str) -> String {
    format!("{prefix}.results")
}

/// Dead-letter topic for records that cannot become jobs.
pub fn dlq(prefix: &str) -> String {
    format!("{prefix}.dlq")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::jobs("sluice", "all-minilm-l6-v2"), "sluice.jobs.all-minilm-l6-v2");
        assert_eq!(super::results("acme"), "acme.results");
        assert_eq!(super::dlq("acme"), "acme.dlq");
    }
}
