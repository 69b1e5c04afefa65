//! Process-wide telemetry: logs through `tracing`, metrics through the
//! `metrics` facade rendered as Prometheus text (all names start `sluice_`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

/// Describes every metric of [`sluice_schemas::metrics::ALL`] to the
/// installed recorder (its `# HELP` line and unit).
fn describe() {
    use sluice_schemas::metrics::{ALL, Kind, Unit};
    for m in ALL {
        let unit = match m.unit {
            Unit::Seconds => Some(metrics::Unit::Seconds),
            Unit::Count => Some(metrics::Unit::Count),
            Unit::None => None,
        };
        let (key, help) = (metrics::KeyName::from_const_str(m.name), metrics::SharedString::const_str(m.help));
        metrics::with_recorder(|r| match m.kind {
            Kind::Counter => r.describe_counter(key, unit, help),
            Kind::Gauge => r.describe_gauge(key, unit, help),
            Kind::Histogram => r.describe_histogram(key, unit, help),
        });
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,ort=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use sluice_schemas::metrics::{ALL, Kind};

    /// Every metric of the catalog, emitted once with its labels, is
    /// rendered with its `# HELP` text and its `# TYPE`.
    #[test]
    fn every_metric_of_the_catalog_is_exported_with_its_help() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            super::describe();
            for m in ALL {
                let labels: Vec<metrics::Label> = m.labels.iter().map(|k| metrics::Label::new(*k, "x")).collect();
                match m.kind {
                    Kind::Counter => metrics::counter!(m.name, labels).increment(1),
                    Kind::Gauge => metrics::gauge!(m.name, labels).set(1.0),
                    Kind::Histogram => metrics::histogram!(m.name, labels).record(1.0),
                }
            }
        });
        let text = handle.render();
        for m in ALL {
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "summary",
            };
            let help = format!("# HELP {} {}", m.name, m.help);
            assert!(text.lines().any(|l| l == help), "{}: no or another HELP line in\n{text}", m.name);
            assert!(text.lines().any(|l| l == format!("# TYPE {} {kind}", m.name)), "{}: TYPE in\n{text}", m.name);
        }
    }

    /// No metric is emitted under a name of its own: every `counter!`,
    /// `gauge!` and `histogram!` in the workspace's sources takes its name
    /// from the catalog, and every catalog entry is emitted somewhere.
    #[test]
    fn every_emitted_metric_comes_from_the_catalog_and_every_entry_is_emitted() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut sources = Vec::new();
        for dir in ["pipeline/src", "adapters/src", "workers/src", "sql/src", "load-tests/src"] {
            collect_rs(&root.join(dir), &mut sources);
        }
        assert!(sources.len() > 20, "found the sources: {}", sources.len());
        let mut text = String::new();
        for path in &sources {
            let body = std::fs::read_to_string(path).unwrap();
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in body.match_indices(macro_name) {
                    let rest = body[at + macro_name.len()..].trim_start();
                    let from_catalog = rest.starts_with("sluice_schemas::metrics::");
                    assert!(
                        from_catalog,
                        "{}: a metric named outside the catalog: {macro_name}{}",
                        path.display(),
                        &rest[..rest.len().min(60)]
                    );
                }
            }
            text.push_str(&body);
        }
        for line in include_str!("../../schemas/src/metrics.rs").lines() {
            let Some((id, _)) = line.trim_start().split_once(" = ") else { continue };
            if id.chars().all(|c| c.is_ascii_uppercase() || c == '_') && id.len() > 2 {
                assert!(
                    text.contains(&format!("sluice_schemas::metrics::{id}.name")),
                    "{id} is declared but never emitted"
                );
            }
        }
    }

    fn collect_rs(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                collect_rs(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("telemetry.rs") {
                out.push(path);
            }
        }
    }
}
