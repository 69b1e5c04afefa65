//! Issue 10, item 2: queries run on the engine's own `sluice-sql` threads,
//! never on the caller's runtime, so a heavy query cannot hold the threads
//! that serve the gateway's jobs. Measured as CPU time per thread (from
//! `/proc`), not as latency. Its own test binary, so that no other test's
//! queries run on `sluice-sql` threads meanwhile.

use std::time::Duration;

use sluice_sql::{Analytics, QueryLimits, Scope, Sources};

/// User + system CPU time of one thread, in clock ticks.
fn ticks(stat: &str) -> u64 {
    let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); the state, field 3, is fields[0] here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn own_ticks() -> u64 {
    ticks(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
}

/// CPU ticks of this process's threads named `name`.
fn ticks_of(name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() == name
            && let Ok(stat) = std::fs::read_to_string(dir.join("stat"))
        {
            total += ticks(&stat);
        }
    }
    total
}

#[test]
fn a_query_runs_on_the_engines_threads_not_the_callers() {
    let dir = tempfile::tempdir().unwrap();
    let sources = Sources { lake: Some(dir.path().to_path_buf()), shards: vec![] };
    let analytics = Analytics::new(sources, QueryLimits::new(10, Duration::from_secs(300))).unwrap();
    // The caller's runtime has one thread: this one.
    let caller = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let n: u64 = 400_000_000;
    let (own_before, sql_before) = (own_ticks(), ticks_of("sluice-sql"));
    let sql = format!("SELECT sum(value % 7) AS s FROM range(0, {n})");
    let answer = caller.block_on(analytics.query(&sql, &Scope::All)).unwrap();
    let (own, on_sql) = (own_ticks() - own_before, ticks_of("sluice-sql") - sql_before);
    let want: u64 = n / 7 * 21 + (0..n % 7).sum::<u64>();
    assert_eq!(answer.to_json_rows().unwrap()[0]["s"], want, "the query ran to its answer");
    println!("CPU ticks: sluice-sql threads {on_sql}, the caller's thread {own}");
    assert!(on_sql >= 20, "the query's work ran on the sluice-sql threads: {on_sql} ticks");
    assert!(own * 5 <= on_sql, "the caller's thread did little of it: {own} ticks against {on_sql}");
}
