//! What a process costs, read from `/proc` (Linux): CPU time over all its
//! threads, and resident memory; and the CPU time the machine's hypervisor
//! took from it (steal).

/// User + system CPU seconds `pid` has used so far (every thread), or `None`
/// when the process is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU seconds stolen from this machine by its hypervisor so far, summed
/// over every CPU (`steal` of `/proc/stat`'s `cpu` line), or `None` where
/// the kernel does not count it. On a shared VM this is time neither the
/// ceiling nor Sluice could use, and it varies from minute to minute.
pub fn steal_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_steal_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// The share of the machine's CPU its hypervisor stole over the last
/// `seconds`, given [`steal_seconds`] read when they began: 0 to 1, or
/// `None` where steal is not counted.
pub fn steal_share_since(before: Option<f64>, seconds: f64) -> Option<f64> {
    let stolen = steal_seconds()? - before?;
    (seconds > 0.0).then(|| (stolen / (cores() as f64 * seconds)).clamp(0.0, 1.0))
}

/// The 8th value of the aggregate `cpu` line: user nice system idle iowait
/// irq softirq **steal** guest guest_nice.
fn parse_steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    line.split_whitespace().nth(8)?.parse().ok()
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(line), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn steal_is_the_eighth_value_of_the_aggregate_cpu_line() {
        let stat = "cpu  10 1 20 300 4 0 2 77 0 0\ncpu0 5 0 10 150 2 0 1 40 0 0\nintr 1 2\n";
        assert_eq!(parse_steal_ticks(stat), Some(77));
        // A kernel without the field (before 2.6.11) or a garbled file.
        assert_eq!(parse_steal_ticks("cpu  10 1 20 300 4 0 2\n"), None);
        assert_eq!(parse_steal_ticks("intr 1 2\n"), None);
        assert!(steal_seconds().is_some(), "this Linux counts steal");
        let share = steal_share_since(steal_seconds(), 0.5).expect("counted before and after");
        assert!((0.0..=1.0).contains(&share), "{share}");
        assert_eq!(steal_share_since(None, 0.5), None, "nothing to subtract from");
        assert_eq!(steal_share_since(steal_seconds(), 0.0), None, "no time has passed");
    }

    #[test]
    fn this_process_is_measured() {
        let me = std::process::id();
        let before = cpu_seconds(me).unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(me).unwrap() >= before);
        assert!(rss_bytes(me).unwrap() > 1 << 20);
        assert!(cpu_seconds(u32::MAX).is_none());
    }
}
