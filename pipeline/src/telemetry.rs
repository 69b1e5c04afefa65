//! Process-wide telemetry: logs through `tracing`, metrics through the
//! `metrics` facade rendered as Prometheus text (all names start `sluice_`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            zero_counters();
            handle
        })
        .clone()
}

/// The exporter, with each histogram's buckets from the catalog (so it is
/// exported as a Prometheus histogram, not a per-process summary).
fn builder() -> PrometheusBuilder {
    use metrics_exporter_prometheus::Matcher;
    use sluice_schemas::metrics::{ALL, buckets};
    ALL.iter().filter(|m| !buckets(m).is_empty()).fold(PrometheusBuilder::new(), |b, m| {
        b.set_buckets_for_metric(Matcher::Full(m.name.to_owned()), buckets(m))
            .expect("the catalog's buckets are not empty. This is a bug.")
    })
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

/// Exports every counter without labels at 0 from the start, so that a rule
/// like `increase(sluice_dead_letter_failures_total[10m]) > 0` has a series
/// to read before the first increment (counters with labels appear with
/// their first labelled increment).
fn zero_counters() {
    use sluice_schemas::metrics::{ALL, Kind};
    let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
    for m in ALL.iter().filter(|m| m.kind == Kind::Counter && m.labels.is_empty()) {
        metrics::with_recorder(|r| r.register_counter(&metrics::Key::from_static_name(m.name), &meta).absolute(0));
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,ort=warn"));
    // Colours only on a terminal: container logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use sluice_schemas::metrics::{ALL, Kind};

    /// Every metric of the catalog, emitted once with its labels, is
    /// rendered with its `# HELP` text and its `# TYPE`.
    #[test]
    fn every_metric_of_the_catalog_is_exported_with_its_help() {
        let recorder = super::builder().build_recorder();
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
                Kind::Histogram => "histogram",
            };
            let help = format!("# HELP {} {}", m.name, m.help);
            assert!(text.lines().any(|l| l == help), "{}: no or another HELP line in\n{text}", m.name);
            assert!(text.lines().any(|l| l == format!("# TYPE {} {kind}", m.name)), "{}: TYPE in\n{text}", m.name);
        }
    }

    /// Counters without labels are exported at 0 before anything happens.
    #[test]
    fn counters_without_labels_are_exported_from_the_start() {
        let recorder = super::builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, super::zero_counters);
        let text = handle.render();
        for name in ["sluice_dead_letter_failures_total", "sluice_consumer_offset_resets_total"] {
            assert!(text.lines().any(|l| l == format!("{name} 0")), "{name} in\n{text}");
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

    /// The alert rules and the dashboard read only metrics Sluice exports,
    /// under the names Prometheus gives them (`_bucket`, `_sum`, `_count`
    /// only of histograms).
    #[test]
    fn the_alert_rules_and_the_dashboard_read_only_exported_metrics() {
        use sluice_schemas::metrics::{ALL, Kind};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for file in ["deploy/prometheus/rules.yml", "deploy/grafana/dashboards/sluice.json"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let mut seen = 0;
            for (at, _) in text.match_indices("sluice_") {
                // A name, not the tail of `sluice:…` or of another word.
                if at > 0 && text.as_bytes()[at - 1].is_ascii_alphanumeric() {
                    continue;
                }
                let name: String = text[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                let (base, histogram_part) = match ["_bucket", "_sum", "_count"].iter().find(|s| name.ends_with(*s)) {
                    Some(suffix) => (name.trim_end_matches(suffix), true),
                    None => (name.as_str(), false),
                };
                let m = ALL.iter().find(|m| m.name == base || m.name == name);
                let m = m.unwrap_or_else(|| panic!("{file}: {name} is not an exported metric"));
                if histogram_part && m.name != name {
                    assert_eq!(m.kind, Kind::Histogram, "{file}: {name} of a {:?}", m.kind);
                }
                seen += 1;
            }
            assert!(seen > 10, "{file}: read {seen} metric names");
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
