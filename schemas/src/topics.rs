//! Topic naming: `<prefix>.jobs.<model>`, `<prefix>.results`, `<prefix>.dlq`,
//! `<prefix>.callbacks.dlq`,
//! and the key that names a job on the results topic ([`job_key`]).
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

/// What names one job everywhere Sluice keeps it: `<tenant>/<job_id>`. The
/// results topic's record key, the results store's key, and the pair the
/// lake and the shards are unique on. Job ids are the caller's, so two
/// tenants may use the same one; a tenant never holds `/` and a job id
/// never does either ([`crate::JobRequest`] validation), so the key splits
/// back unambiguously ([`split_job_key`]).
pub fn job_key(tenant: &str, job_id: &str) -> String {
    format!("{tenant}/{job_id}")
}

/// `(tenant, job_id)` of a [`job_key`]; `None` for anything else.
pub fn split_job_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/').filter(|(t, j)| !t.is_empty() && !j.is_empty() && !j.contains('/'))
}

/// Dead-letter topic for records that cannot become jobs.
pub fn dlq(prefix: &str) -> String {
    format!("{prefix}.dlq")
}

/// Dead-letter topic of completion callbacks that could not be delivered:
/// the JobResult that was to be sent, with why in the headers
/// ([`crate::headers::ERROR_CODE`], [`crate::headers::CALLBACK_URL`], ...).
pub fn callbacks_dlq(prefix: &str) -> String {
    format!("{prefix}.callbacks.dlq")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::jobs("sluice", "all-minilm-l6-v2"), "sluice.jobs.all-minilm-l6-v2");
        assert_eq!(super::results("acme"), "acme.results");
        assert_eq!(super::dlq("acme"), "acme.dlq");
        assert_eq!(super::callbacks_dlq("acme"), "acme.callbacks.dlq");
        assert_eq!(super::job_key("acme", "doc:1"), "acme/doc:1");
        assert_eq!(super::split_job_key("acme/doc:1"), Some(("acme", "doc:1")));
        for bad in ["acme", "/doc", "acme/", "a/b/c"] {
            assert_eq!(super::split_job_key(bad), None, "{bad}");
        }
    }
}
