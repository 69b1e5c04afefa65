//! A run's report: `report.json` (every number) and `report.html` (the same
//! numbers in tables, and plots drawn as inline SVG, readable offline).
//!
//! Everything is derived from the per-job [`Book`]: a job is counted in the
//! second it was due (sent, answers) or finished (completed, latency), and
//! the backlog at the end of a second is the number of accepted jobs due
//! by then and not finished by then.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::{Value, json};
use sluice_schemas::JobStatus;

use super::drive::{Answer, Book, Job, Plan, answers, histogram};

/// Latency percentiles reported everywhere (as fractions).
const QUANTILES: [(&str, f64); 4] = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)];

/// One second of a run.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Second {
    pub t: u64,
    pub sent: u64,
    pub accepted: u64,
    pub limited: u64,
    pub overloaded: u64,
    pub errors: u64,
    pub completed: u64,
    /// Accepted, due by the end of this second and not finished by then.
    pub backlog: u64,
    /// Latency of the jobs that finished in this second (ms).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The timeline of a run, one entry per second.
pub fn timeline(book: &Book) -> Vec<Second> {
    let len = book.ended.ceil().max(1.0) as usize;
    let mut secs: Vec<Second> = (0..len).map(|t| Second { t: t as u64, ..Second::default() }).collect();
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); len];
    // +1 at the second an accepted job was due, -1 at the second it finished.
    let mut delta = vec![0i64; len + 1];
    let at = |t: f64| (t.max(0.0) as usize).min(len - 1);
    for j in book.jobs.values() {
        let s = &mut secs[at(j.due)];
        s.sent += 1;
        match j.answer {
            Answer::Accepted => s.accepted += 1,
            Answer::Limited => s.limited += 1,
            Answer::Overloaded => s.overloaded += 1,
            Answer::Error => s.errors += 1,
            Answer::Pending => {}
        }
        if j.answer == Answer::Accepted {
            delta[at(j.due)] += 1;
        }
        if let (Some(done), Some(ms)) = (j.done, j.latency_ms()) {
            secs[at(done)].completed += 1;
            latencies[at(done)].push(ms);
            if j.answer == Answer::Accepted {
                delta[at(done)] -= 1;
            }
        }
    }
    let mut backlog = 0i64;
    for (i, s) in secs.iter_mut().enumerate() {
        backlog += delta[i];
        s.backlog = backlog.max(0) as u64;
        if !latencies[i].is_empty() {
            s.p50_ms = Some(crate::stats::percentile(&latencies[i], 50.0));
            s.p99_ms = Some(crate::stats::percentile(&latencies[i], 99.0));
        }
    }
    secs
}

/// Counts, latencies and the pipeline's own timings of a set of jobs.
pub fn summary<'a>(jobs: impl Iterator<Item = &'a Job> + Clone) -> Value {
    let answered = answers(jobs.clone());
    let accepted: Vec<&Job> = jobs.clone().filter(|j| j.answer == Answer::Accepted).collect();
    let finished = accepted.iter().filter(|j| j.done.is_some()).count() as u64;
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for j in accepted.iter().filter(|j| j.done.is_some()) {
        let key = match (&j.status, &j.error_code) {
            (Some(JobStatus::Succeeded), _) => "succeeded".to_owned(),
            (Some(s), Some(code)) => format!("{s}: {code}"),
            (Some(s), None) => s.to_string(),
            (None, _) => "unknown".to_owned(),
        };
        *statuses.entry(key).or_default() += 1;
    }
    let pct = |values: Vec<f64>| -> Value {
        if values.is_empty() {
            return Value::Null;
        }
        let h = histogram(values.into_iter());
        let mut o = serde_json::Map::new();
        for (name, q) in QUANTILES {
            o.insert(name.into(), json!(h.value_at_quantile(q)));
        }
        o.insert("max".into(), json!(h.max()));
        o.insert("mean".into(), json!((h.mean() * 10.0).round() / 10.0));
        Value::Object(o)
    };
    json!({
        "sent": jobs.clone().count(),
        "answers": answered,
        "accepted": accepted.len(),
        "finished": finished,
        "unfinished": accepted.len() as u64 - finished,
        "statuses": statuses,
        "latency_ms": pct(accepted.iter().filter_map(|j| j.latency_ms()).collect()),
        "queued_ms": pct(accepted.iter().filter_map(|j| j.queued_ms.map(|v| v as f64)).collect()),
        "inference_ms": pct(accepted.iter().filter_map(|j| j.inference_ms.map(|v| v as f64)).collect()),
        "delivery_ms": pct(accepted.iter().filter_map(|j| j.delivery_ms).collect()),
    })
}

/// The report's JSON: the plan, per-stream and per-phase summaries, the
/// timeline, batch sizes, memory, poison, and the scenario's own `verdict`.
pub fn build(scenario: &str, target: Value, plan: &Plan, book: &Book, verdict: Value) -> Value {
    let mut streams = Vec::new();
    let mut phases = Vec::new();
    for (i, s) in plan.streams.iter().enumerate() {
        let mine = book.jobs.values().filter(move |j| j.stream == i);
        let mut sum = summary(mine);
        sum["tenant"] = json!(s.tenant);
        streams.push(sum);
        for (p, phase) in s.phases.iter().enumerate() {
            let these = book.jobs.values().filter(move |j| j.stream == i && j.phase == p);
            if these.clone().next().is_none() {
                continue;
            }
            let mut sum = summary(these);
            sum["tenant"] = json!(s.tenant);
            sum["phase"] = json!(phase.name);
            sum["rate"] = json!(phase.rate);
            sum["secs"] = json!(phase.secs);
            phases.push(sum);
        }
    }
    let mut batch_sizes: BTreeMap<u32, u64> = BTreeMap::new();
    for b in book.jobs.values().filter_map(|j| j.batch_size) {
        *batch_sizes.entry(b).or_default() += 1;
    }
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for c in book.poison.values().flatten() {
        *codes.entry(c.clone()).or_default() += 1;
    }
    let rss: BTreeMap<&str, Vec<(f64, u64)>> = book.rss.iter().fold(BTreeMap::new(), |mut m, (t, name, b)| {
        m.entry(name.as_str()).or_default().push(((t * 10.0).round() / 10.0, *b));
        m
    });
    json!({
        "scenario": scenario,
        "target": target,
        "model": plan.model,
        "via": plan.via,
        "plan": plan.streams.iter().map(|s| json!({"tenant": s.tenant, "phases": s.phases})).collect::<Vec<_>>(),
        "verdict": verdict,
        "total": summary(book.jobs.values()),
        "streams": streams,
        "phases": phases,
        "duplicate_results": book.duplicate_results,
        "late_sends": book.late_sends,
        "errors": book.errors,
        "poison": {
            "sent": book.poison.len(),
            "dead_lettered": book.poison.values().filter(|c| c.is_some()).count(),
            "codes": codes,
            "good_jobs_dead_lettered": book.good_dead_lettered,
        },
        "batch_sizes": batch_sizes,
        "rss_bytes": rss,
        "sent_until_s": book.sent_until,
        "ended_s": book.ended,
        "timeline": timeline(book),
    })
}

/// A plot: its file name (without `.svg`) and the SVG document.
pub type Chart = (&'static str, String);

/// Writes `report.json`, `report.html` and each plot as `<name>.svg` into `dir`.
pub fn write(dir: &Path, report: &Value, extra_charts: Vec<Chart>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut all = charts(report)?;
    all.extend(extra_charts);
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    std::fs::write(dir.join("report.html"), html(report, &all)?)?;
    for (name, svg) in &all {
        std::fs::write(dir.join(format!("{name}.svg")), svg)?;
    }
    Ok(())
}

fn html(r: &Value, charts: &[Chart]) -> anyhow::Result<String> {
    let mut h = String::new();
    let title = format!("sluice-load {}", r["scenario"].as_str().unwrap_or("?"));
    writeln!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:1000px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}\
         th{{background:#eee}}td:first-child{{text-align:left}}.chart{{margin:1.5em 0}}\
         pre{{background:#f6f6f6;padding:1em;white-space:pre-wrap}}</style></head><body>"
    )?;
    writeln!(h, "<h1>{title}</h1>")?;
    writeln!(
        h,
        "<p>Model <b>{}</b>, submitted through <b>{}</b>, target: {}.</p>",
        esc(r["model"].as_str().unwrap_or("")),
        esc(r["via"].as_str().unwrap_or("")),
        esc(&r["target"].to_string())
    )?;
    writeln!(h, "<h2>Verdict</h2><pre>{}</pre>", esc(&serde_json::to_string_pretty(&r["verdict"])?))?;
    writeln!(h, "<h2>Per tenant</h2>{}", table(r["streams"].as_array().map(Vec::as_slice).unwrap_or(&[]), false))?;
    writeln!(h, "<h2>Per phase</h2>{}", table(r["phases"].as_array().map(Vec::as_slice).unwrap_or(&[]), true))?;
    writeln!(
        h,
        "<p>Latency is submit → result (from when each job was due, so a slow system cannot hide it); \
         <i>queued</i> and <i>inference</i> are the pipeline's own timings from each result, \
         <i>delivery</i> the time from a result's <code>finished_at</code> to its arrival on the results topic. \
         Results seen twice on the results topic: {}. Jobs sent late (generator at its in-flight bound): {}. \
         Poison records: {} sent, {} dead-lettered ({}).</p>",
        r["duplicate_results"],
        r["late_sends"],
        r["poison"]["sent"],
        r["poison"]["dead_lettered"],
        esc(&r["poison"]["codes"].to_string())
    )?;
    for (_, svg) in charts {
        writeln!(h, "<div class=\"chart\">{svg}</div>")?;
    }
    if let Some(errors) = r["errors"].as_array().filter(|e| !e.is_empty()) {
        writeln!(h, "<h2>First errors</h2><pre>{}</pre>", esc(&serde_json::to_string_pretty(errors)?))?;
    }
    writeln!(h, "</body></html>")?;
    Ok(h)
}

fn table(rows: &[Value], phase: bool) -> String {
    let mut t = String::from("<table><tr>");
    let mut cols = vec!["tenant"];
    if phase {
        cols.extend(["phase", "rate/s"]);
    }
    cols.extend(["sent", "accepted", "429", "503", "errors", "finished", "unfinished", "p50 ms", "p99 ms", "max ms"]);
    cols.extend(["queued p99", "inference p99", "delivery p99"]);
    for c in &cols {
        let _ = write!(t, "<th>{c}</th>");
    }
    t.push_str("</tr>");
    for r in rows {
        let a = &r["answers"];
        let n = |v: &Value| if v.is_null() { "0".to_owned() } else { v.to_string() };
        let mut cells = vec![esc(r["tenant"].as_str().unwrap_or(""))];
        if phase {
            cells.extend([esc(r["phase"].as_str().unwrap_or("")), n(&r["rate"])]);
        }
        cells.extend([
            n(&r["sent"]),
            n(&a["accepted"]),
            n(&a["429"]),
            n(&a["503"]),
            n(&a["error"]),
            n(&r["finished"]),
            n(&r["unfinished"]),
            n(&r["latency_ms"]["p50"]),
            n(&r["latency_ms"]["p99"]),
            n(&r["latency_ms"]["max"]),
            n(&r["queued_ms"]["p99"]),
            n(&r["inference_ms"]["p99"]),
            n(&r["delivery_ms"]["p99"]),
        ]);
        t.push_str("<tr>");
        for c in cells {
            let _ = write!(t, "<td>{c}</td>");
        }
        t.push_str("</tr>");
    }
    t.push_str("</table>");
    t
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The standard plots of a report.
fn charts(r: &Value) -> anyhow::Result<Vec<Chart>> {
    let tl: Vec<Second> = serde_json::from_value(r["timeline"].clone()).unwrap_or_default();
    let series = |f: &dyn Fn(&Second) -> Option<f64>| -> Vec<(f64, f64)> {
        tl.iter().filter_map(|s| f(s).map(|v| (s.t as f64 + 0.5, v))).collect()
    };
    let mut out = vec![
        (
            "throughput",
            line_chart(
                "Throughput",
                "seconds",
                "jobs per second",
                &[
                    ("sent", series(&|s| Some(s.sent as f64))),
                    ("accepted", series(&|s| Some(s.accepted as f64))),
                    ("refused (429 + 503)", series(&|s| Some((s.limited + s.overloaded) as f64))),
                    ("completed", series(&|s| Some(s.completed as f64))),
                ],
            )?,
        ),
        (
            "latency",
            line_chart(
                "Latency, submit → result, of the jobs finishing each second",
                "seconds",
                "milliseconds",
                &[("p50", series(&|s| s.p50_ms)), ("p99", series(&|s| s.p99_ms))],
            )?,
        ),
        (
            "backlog",
            line_chart(
                "Backlog: accepted, not yet finished",
                "seconds",
                "jobs",
                &[("backlog", series(&|s| Some(s.backlog as f64)))],
            )?,
        ),
    ];
    let batches: Vec<(f64, f64)> = r["batch_sizes"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.parse::<f64>().ok()?, v.as_f64()?))).collect())
        .unwrap_or_default();
    if !batches.is_empty() {
        out.push(("batch-sizes", bar_chart("Batch size each job ran in", "batch size", "jobs", &batches)?));
    }
    if let Some(rss) = r["rss_bytes"].as_object().filter(|m| !m.is_empty()) {
        let lines: Vec<(&str, Vec<(f64, f64)>)> = rss
            .iter()
            .map(|(name, v)| {
                let pts = v
                    .as_array()
                    .map(|a| {
                        a.iter().filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()? / (1024.0 * 1024.0)))).collect()
                    })
                    .unwrap_or_default();
                (name.as_str(), pts)
            })
            .collect();
        out.push(("memory", line_chart("Resident memory", "seconds", "MiB", &lines)?));
    }
    Ok(out)
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

/// A line chart as an SVG document.
pub fn line_chart(title: &str, x: &str, y: &str, lines: &[(&str, Vec<(f64, f64)>)]) -> anyhow::Result<String> {
    let pts = lines.iter().flat_map(|(_, p)| p.iter());
    let xmax = pts.clone().map(|p| p.0).fold(1.0, f64::max);
    let xmin = pts.clone().map(|p| p.0).fold(xmax, f64::min).min(0.0);
    let ymax = pts.map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.08;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(xmin..xmax, 0.0..ymax)?;
        chart.configure_mesh().x_desc(x).y_desc(y).light_line_style(WHITE.mix(0.0)).draw()?;
        for (i, (name, p)) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Bars at integer x values, as an SVG document.
pub fn bar_chart(title: &str, x: &str, y: &str, bars: &[(f64, f64)]) -> anyhow::Result<String> {
    let xmax = bars.iter().map(|b| b.0).fold(1.0, f64::max) + 1.0;
    let ymax = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0) * 1.08;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)?;
        chart.configure_mesh().x_desc(x).y_desc(y).light_line_style(WHITE.mix(0.0)).draw()?;
        chart.draw_series(
            bars.iter().map(|&(bx, by)| Rectangle::new([(bx - 0.4, 0.0), (bx + 0.4, by)], COLORS[0].filled())),
        )?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(due: f64, answer: Answer, done: Option<f64>) -> Job {
        Job {
            answer,
            done,
            deliveries: u32::from(done.is_some()),
            status: done.map(|_| JobStatus::Succeeded),
            batch_size: Some(4),
            ..Job::new(0, 0, due)
        }
    }

    #[test]
    fn the_timeline_counts_backlog_from_what_was_accepted_and_finished() {
        let mut book = Book::default();
        book.jobs.insert("a".into(), job(0.1, Answer::Accepted, Some(0.3)));
        book.jobs.insert("b".into(), job(0.5, Answer::Accepted, Some(2.5)));
        book.jobs.insert("c".into(), job(1.2, Answer::Accepted, None));
        book.jobs.insert("d".into(), job(1.4, Answer::Limited, None));
        book.ended = 3.0;
        let tl = timeline(&book);
        assert_eq!(tl.len(), 3);
        assert_eq!((tl[0].sent, tl[0].accepted, tl[0].completed, tl[0].backlog), (2, 2, 1, 1));
        assert_eq!((tl[1].sent, tl[1].accepted, tl[1].limited, tl[1].backlog), (2, 1, 1, 2));
        assert_eq!((tl[2].completed, tl[2].backlog), (1, 1));
        assert_eq!(tl[2].p50_ms, Some(2000.0));
        let s = summary(book.jobs.values());
        assert_eq!(
            (s["accepted"].as_u64(), s["finished"].as_u64(), s["unfinished"].as_u64()),
            (Some(3), Some(2), Some(1))
        );
        assert_eq!(s["answers"]["429"], 1);
    }

    #[test]
    fn charts_are_svg_with_their_series() {
        let svg =
            line_chart("T", "x", "y", &[("one", vec![(0.0, 1.0), (1.0, 3.0)]), ("two", vec![(0.5, 2.0)])]).unwrap();
        assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() >= 2, "{svg}");
        assert!(svg.lines().any(|l| l.trim() == "one") && svg.lines().any(|l| l.trim() == "two"), "legend: {svg}");
        let bars = bar_chart("B", "x", "y", &[(1.0, 5.0), (32.0, 7.0)]).unwrap();
        assert!(bars.matches("<rect").count() >= 3, "background and two bars");
    }
}
