//! `sluice-load demo` (`make demo`): `sluice up` with its embedded broker and
//! in-process store, every sentence of a corpus through REST and through
//! Kafka, every result polled over REST and checked, then an SQL answer.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use sluice_pipeline::kafka::Producer;
use sluice_schemas::{JobRequest, headers, topics};

use crate::child::SluiceProcess;
use crate::stats;

const MODEL: &str = "all-minilm-l6-v2";
/// Published by sentence-transformers for "This is an example sentence".
const EXAMPLE: [f32; 5] = [0.0676569, 0.0634959, 0.0487131, 0.0793050, 0.0374481];

struct Sentence {
    topic: String,
    text: String,
}

fn load_corpus(path: Option<&Path>) -> anyhow::Result<Vec<Sentence>> {
    let text = crate::corpus::corpus_text(path)?;
    let name = path.map(|p| p.display().to_string()).unwrap_or_else(|| "the built-in corpus".into());
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let (topic, text) = l.split_once('\t').with_context(|| format!("{name}:{}: no tab", i + 1))?;
            Ok(Sentence { topic: topic.to_owned(), text: text.to_owned() })
        })
        .collect()
}

/// Where this demo's results land: its own lake and two SQLite shards.
struct Data {
    dir: std::path::PathBuf,
}

impl Data {
    fn new() -> anyhow::Result<Data> {
        let dir = std::env::temp_dir().join(format!("sluice-demo-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Data { dir })
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec!["--lake".to_owned(), self.dir.join("lake").display().to_string()];
        for i in 0..2 {
            a.extend(["--shard".to_owned(), format!("sqlite:{}/shard-{i}.db", self.dir.display())]);
        }
        a
    }
}

struct Outcome {
    via: &'static str,
    index: usize,
    record: Value,
}

pub async fn run(sluice: &Path, models: &Path, corpus: Option<&Path>, concurrency: usize) -> anyhow::Result<()> {
    let sentences = load_corpus(corpus)?;
    ensure!(!sentences.is_empty(), "empty corpus");
    println!("== starting `sluice up` (embedded broker, in-process store, local lake and SQLite shards)");
    let data = Data::new()?;
    let mut args: Vec<std::ffi::OsString> =
        vec!["up".into(), "--listen".into(), "127.0.0.1:0".into(), "--models".into()];
    args.push(models.into());
    args.extend(data.args().into_iter().map(Into::into));
    let child = SluiceProcess::start(sluice, &args, &[], None).await?;
    let http = child.http.clone().context("sluice up serves no REST API")?;
    println!("   REST API {http}   Kafka bootstrap {}", child.bootstrap);
    let client = reqwest::Client::new();
    let run = Run { http: &client, base: &http };

    // One job through each path first: the published reference vector.
    let example = run.submit_rest("This is an example sentence").await?;
    let example = run.wait(&example).await?;
    let got = embedding(&example)?;
    println!(
        "\n== \"This is an example sentence\" → [{:.7}, {:.7}, {:.7}, {:.7}, {:.7}, …] ({} dims)",
        got[0],
        got[1],
        got[2],
        got[3],
        got[4],
        got.len()
    );
    println!(
        "   sentence-transformers publishes [{:.7}, {:.7}, {:.7}, {:.7}, {:.7}, …]",
        EXAMPLE[0], EXAMPLE[1], EXAMPLE[2], EXAMPLE[3], EXAMPLE[4]
    );
    let max_dev = got.iter().zip(EXAMPLE).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    ensure!(max_dev < 1e-4, "embedding deviates from the published one by {max_dev}");

    println!(
        "\n== submitting {} sentences through REST and the same {} through Kafka",
        sentences.len(),
        sentences.len()
    );
    let started = Instant::now();
    let producer = Producer::new(&child.bootstrap, "sluice-demo", Duration::from_secs(10))?;
    let topic = topics::jobs("sluice", MODEL);
    let kafka_ids: Vec<String> = stream::iter(sentences.iter().enumerate())
        .map(|(i, s)| {
            let (producer, topic) = (&producer, &topic);
            async move {
                let req = JobRequest::decode(
                    json!({
                        "job_id": format!("demo-kafka-{}-{i}", std::process::id()),
                        "tenant": "demo",
                        "model": MODEL,
                        "input": {"text": s.text},
                        "metadata": {"topic": s.topic, "text": s.text, "via": "kafka"},
                        "submitted_at": chrono::Utc::now().to_rfc3339(),
                    })
                    .to_string()
                    .as_bytes(),
                )?;
                let payload = serde_json::to_vec(&req)?;
                producer.send(topic, Some(req.job_id.as_bytes()), &payload, &[(headers::TENANT, b"demo")]).await?;
                anyhow::Ok(req.job_id)
            }
        })
        .buffered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let rest_ids: Vec<String> = stream::iter(sentences.iter())
        .map(|s| {
            run.submit(json!({
                "tenant": "demo",
                "model": MODEL,
                "input": {"text": s.text},
                "metadata": {"topic": s.topic, "text": s.text, "via": "rest"},
            }))
        })
        .buffered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let submitted = started.elapsed();

    let all: Vec<(&'static str, usize, String)> = rest_ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| ("rest", i, id))
        .chain(kafka_ids.into_iter().enumerate().map(|(i, id)| ("kafka", i, id)))
        .collect();
    let outcomes: Vec<Outcome> = stream::iter(all)
        .map(|(via, index, id)| {
            let run = &run;
            async move { anyhow::Ok(Outcome { via, index, record: run.wait(&id).await? }) }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let elapsed = started.elapsed();

    report(&sentences, &outcomes, submitted, elapsed)?;

    println!("\n== versions, tensor models and the cache");
    // Jobs so far: the example plus every sentence twice; counted on below
    // to know when the sinks have landed everything.
    let mut jobs = outcomes.len() as i64 + 1;
    let int8 = run.submit(json!({"tenant": "demo", "model": MODEL, "model_version": "2", "input": {"text": "This is an example sentence"}})).await?;
    let int8 = run.wait(&int8).await?;
    jobs += 1;
    println!(
        "   pinned int8 version {}: cosine to fp32 {:.4}",
        int8["model_version"].as_str().unwrap_or("?"),
        stats::cosine(&embedding(&int8)?, &got)
    );
    let again = run.submit_rest("This is an example sentence").await?;
    let again = run.wait(&again).await?;
    jobs += 1;
    println!(
        "   the same sentence again: batch_size {} (0 = served from the inference cache), same vector: {}",
        again["timings"]["batch_size"],
        embedding(&again)? == got
    );
    let x: Vec<f64> = vec![-2.0, -1.0, 0.0, 1.0, 2.0];
    let sig = run
        .submit(json!({"tenant": "demo", "model": "sigmoid",
            "input": {"tensors": {"x": {"dtype": "float32", "shape": [3, 4, 5], "data": x.repeat(12)}}}}))
        .await;
    match sig {
        Ok(id) => {
            let r = run.wait(&id).await?;
            jobs += 1;
            let y: Vec<String> = r["output"]["tensors"]["y"]["data"]
                .as_array()
                .context("no tensor output")?
                .iter()
                .take(5)
                .map(|v| format!("{:.4}", v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            println!("   tensor model `sigmoid`: x = {x:?} → y = [{}, …]", y.join(", "));
        }
        Err(e) => println!("   tensor model `sigmoid` not served here: {e}"),
    }

    println!("\n== a bad request gets a clear error");
    let r = client.post(format!("{http}/v1/jobs")).body(r#"{"model":"gpt-9","input":{"text":"hi"}}"#).send().await?;
    println!("   POST /v1/jobs {{\"model\":\"gpt-9\",…}} → {} {}", r.status().as_u16(), r.text().await?);

    println!("\n== results at rest: waiting for the lake and shard sinks to land every job");
    let sql = |q: &str| {
        let (http, base) = (&client, &http);
        // Open mode: SQL sees the tenant it names (default: the gateway's
        // default tenant), never every tenant unless configured.
        let body = json!({"query": q, "tenant": "demo"}).to_string();
        async move {
            let r = http.post(format!("{base}/v1/sql")).body(body).send().await?;
            let status = r.status();
            let v: Value = r.json().await?;
            ensure!(status.is_success(), "POST /v1/sql: {status} {v}");
            anyhow::Ok(v["rows"][0]["n"].as_i64().unwrap_or(0))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut lake, mut shards) = (0, 0);
    while lake < jobs || shards < jobs {
        ensure!(Instant::now() < deadline, "sinks landed only {lake} (lake) / {shards} (shards) of {jobs} jobs");
        tokio::time::sleep(Duration::from_millis(300)).await;
        lake = sql("SELECT count(*) AS n FROM results").await?;
        shards = sql("SELECT count(*) AS n FROM shards").await?;
    }
    println!("   POST /v1/sql: {lake} jobs in the Parquet lake, {shards} in the SQL shards");

    println!("\n== search: the stored jobs nearest a new question (POST /v1/search)");
    // The approximate index follows the lake; wait for its next refresh. It
    // searches one version (the default, here): count that version's jobs.
    let mut probe = vec![0.0f32; 384];
    probe[0] = 1.0;
    let probe = json!({"model": MODEL, "vector": probe, "k": 1, "tenant": "demo"});
    loop {
        let v: Value = client.post(format!("{http}/v1/search")).json(&probe).send().await?.json().await?;
        let version = v["model_version"].as_str().context("a search answer names its version")?.replace('\'', "");
        let embedded = sql(&format!(
            "SELECT count(*) AS n FROM results WHERE model = '{MODEL}' AND model_version = '{version}' AND status = 'succeeded'"
        ))
        .await?;
        if v["indexed"].as_i64().unwrap_or(0) >= embedded {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the search index of version {version} holds {} of {embedded} embeddings",
            v["indexed"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (query, topic) in
        [("My tomato seedlings are wilting, what should I do?", "gardening"), ("Will it snow tomorrow?", "weather")]
    {
        // Every sentence went in twice (REST and Kafka): search one copy.
        let body =
            json!({"model": MODEL, "text": query, "k": 3, "tenant": "demo", "filter": {"metadata": {"via": "kafka"}}});
        let r = client.post(format!("{http}/v1/search")).json(&body).send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        ensure!(status.is_success(), "POST /v1/search: {status} {v}");
        let how = match v["indexed"].as_u64() {
            Some(n) => format!("approximate index of {n} embeddings"),
            None => "exact scan".to_owned(),
        };
        println!("   \"{query}\" ({how}, {} ms)", v["elapsed_ms"]);
        let hits = v["results"].as_array().context("no results")?;
        for h in hits {
            println!(
                "     {:.3}  [{}] {}",
                h["score"].as_f64().unwrap_or(f64::NAN),
                h["metadata"]["topic"].as_str().unwrap_or("-"),
                h["metadata"]["text"].as_str().unwrap_or_default()
            );
        }
        ensure!(
            hits.first().is_some_and(|h| h["metadata"]["topic"] == topic),
            "the nearest job of \"{query}\" is not about {topic}: {v}"
        );
    }

    println!("\n== stopping sluice (SIGTERM: drain, flush the sinks, commit, leave the groups)");
    child.stop().await?;

    let query = "SELECT model, model_version AS version, count(*) AS jobs, \
                 round(percentile_cont(0.5) WITHIN GROUP (ORDER BY queued_ms + inference_ms)) AS p50_ms, \
                 round(percentile_cont(0.95) WITHIN GROUP (ORDER BY queued_ms + inference_ms)) AS p95_ms, \
                 round(avg(batch_size), 1) AS avg_batch FROM results GROUP BY model, model_version ORDER BY jobs DESC, model, version";
    for table in ["results", "shards"] {
        let q = query.replace("FROM results", &format!("FROM {table}"));
        println!(
            "\n== sluice sql: jobs and latency per model, from the {}",
            if table == "results" { "Parquet lake (`results`)" } else { "SQL shards (`shards`)" }
        );
        let out = tokio::process::Command::new(sluice).arg("sql").args(data.args()).arg(&q).output().await?;
        ensure!(out.status.success(), "sluice sql failed: {}", String::from_utf8_lossy(&out.stderr));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let _ = std::fs::remove_dir_all(&data.dir);
    println!("demo OK");
    Ok(())
}

struct Run<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
}

impl Run<'_> {
    async fn submit_rest(&self, text: &str) -> anyhow::Result<String> {
        self.submit(json!({"tenant": "demo", "model": MODEL, "input": {"text": text}})).await
    }

    async fn submit(&self, body: Value) -> anyhow::Result<String> {
        let r = self.http.post(format!("{}/v1/jobs", self.base)).json(&body).send().await?;
        let status = r.status();
        let body: Value = r.json().await?;
        ensure!(status.as_u16() == 202, "POST /v1/jobs answered {status}: {body}");
        Ok(body["job_id"].as_str().context("no job_id")?.to_owned())
    }

    async fn wait(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            // Job ids are per tenant; the demo's jobs are tenant demo's.
            let r = self.http.get(format!("{}/v1/jobs/{id}?tenant=demo", self.base)).send().await?;
            if r.status().is_success() {
                let v: Value = r.json().await?;
                if !matches!(v["status"].as_str(), Some("queued" | "running")) {
                    return Ok(v);
                }
            }
            ensure!(Instant::now() < deadline, "job {id} did not finish within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn embedding(record: &Value) -> anyhow::Result<Vec<f32>> {
    ensure!(record["status"] == "succeeded", "job did not succeed: {record}");
    record["output"]["embedding"]
        .as_array()
        .context("no embedding")?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32).context("non-numeric embedding"))
        .collect()
}

fn report(sentences: &[Sentence], outcomes: &[Outcome], submitted: Duration, elapsed: Duration) -> anyhow::Result<()> {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        *by_status.entry(o.record["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    let n = outcomes.len();
    println!(
        "   {n} jobs finished in {:.2} s ({:.2} s to submit): {:.0} jobs/s end to end",
        elapsed.as_secs_f64(),
        submitted.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!("   by status: {by_status:?}");
    ensure!(by_status.get("succeeded") == Some(&n), "not every job succeeded");

    let timing =
        |key: &str| -> Vec<f64> { outcomes.iter().filter_map(|o| o.record["timings"][key].as_f64()).collect() };
    let (queued, inference, batch) = (timing("queued_ms"), timing("inference_ms"), timing("batch_size"));
    println!(
        "   queue time ms p50 {:.0} p95 {:.0} | batch inference ms p50 {:.0} p95 {:.0} | batch size mean {:.1} max {:.0}",
        stats::percentile(&queued, 50.0),
        stats::percentile(&queued, 95.0),
        stats::percentile(&inference, 50.0),
        stats::percentile(&inference, 95.0),
        stats::mean(&batch),
        stats::percentile(&batch, 100.0),
    );

    // The same sentence through REST and through Kafka gives the same vector.
    let mut vectors: HashMap<(&str, usize), Vec<f32>> = HashMap::new();
    for o in outcomes {
        vectors.insert((o.via, o.index), embedding(&o.record)?);
    }
    let worst = (0..sentences.len())
        .map(|i| stats::cosine(&vectors[&("rest", i)], &vectors[&("kafka", i)]))
        .fold(1f32, f32::min);
    println!("   REST and Kafka results for the same sentence agree: lowest cosine {worst:.6}");
    ensure!(worst > 0.9999, "REST and Kafka embeddings differ");

    let v: Vec<&Vec<f32>> = (0..sentences.len()).map(|i| &vectors[&("rest", i)]).collect();
    println!("\n== similarities that make sense");
    let mut firsts: Vec<usize> = Vec::new();
    for (i, s) in sentences.iter().enumerate() {
        if i == 0 || sentences[i - 1].topic != s.topic {
            firsts.push(i);
        }
    }
    let mut pair_scores = Vec::new();
    for &i in &firsts {
        if i + 1 < sentences.len() && sentences[i + 1].topic == sentences[i].topic {
            pair_scores.push(stats::cosine(v[i], v[i + 1]) as f64);
        }
    }
    let mut cross = Vec::new();
    for i in 0..v.len() {
        for j in i + 1..v.len() {
            if sentences[i].topic != sentences[j].topic {
                cross.push(stats::cosine(v[i], v[j]) as f64);
            }
        }
    }
    println!(
        "   paraphrase pairs: mean cosine {:.3} (min {:.3}); sentences of different topics: mean {:.3}",
        stats::mean(&pair_scores),
        stats::percentile(&pair_scores, 0.0),
        stats::mean(&cross)
    );
    let same_topic_nn = (0..v.len())
        .filter(|&i| {
            let nn = (0..v.len())
                .filter(|&j| j != i)
                .max_by(|&a, &b| stats::cosine(v[i], v[a]).total_cmp(&stats::cosine(v[i], v[b])));
            nn.is_some_and(|j| sentences[j].topic == sentences[i].topic)
        })
        .count();
    println!(
        "   nearest neighbour is on the same topic for {same_topic_nn}/{} sentences ({:.0}%)",
        v.len(),
        100.0 * same_topic_nn as f64 / v.len() as f64
    );
    for &i in firsts.iter().step_by((firsts.len() / 4).max(1)).take(4) {
        let mut scored: Vec<(f32, usize)> =
            (0..v.len()).filter(|&j| j != i).map(|j| (stats::cosine(v[i], v[j]), j)).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("   \"{}\"", sentences[i].text);
        for (score, j) in scored.iter().take(2) {
            println!("      {score:.3}  [{}] {}", sentences[*j].topic, sentences[*j].text);
        }
        let (score, j) = scored.last().expect("corpus has more than one sentence");
        println!("      {score:.3}  [{}] {}   (least similar)", sentences[*j].topic, sentences[*j].text);
    }
    ensure!(stats::mean(&pair_scores) > stats::mean(&cross) + 0.3, "paraphrases do not stand out");
    Ok(())
}
