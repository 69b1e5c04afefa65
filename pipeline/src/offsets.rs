//! Which offsets may be committed.
//!
//! Records of one partition finish out of order (batches, retries, dead
//! letters), but Kafka stores one offset per partition: "everything before
//! this is done". [`OffsetTracker`] remembers the records in flight and
//! yields, per partition, the lowest offset not yet finished — committing it
//! can never skip a record whose effects are not yet durable.

use std::collections::{BTreeSet, HashMap};

type Partition = (String, i32);

#[derive(Default)]
struct PartitionState {
    /// Offsets started and not yet finished.
    in_flight: BTreeSet<i64>,
    /// One past the highest offset started.
    next: i64,
    /// The offset last handed out for committing.
    committed: Option<i64>,
}

/// Per-partition bookkeeping of records in flight.
#[derive(Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
}

impl OffsetTracker {
    /// A record was read and its processing begins.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.partitions.entry((topic.to_owned(), partition)).or_default();
        p.in_flight.insert(offset);
        p.next = p.next.max(offset + 1);
    }

    /// A record's effects are durable.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&(topic.to_owned(), partition)) {
            p.in_flight.remove(&offset);
        }
    }

    /// Records started and not finished, over all partitions.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }

    /// The offsets to commit now: for each partition whose safe point moved
    /// since the last call, `(topic, partition, next offset to read)`.
    pub fn take_commits(&mut self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), p) in &mut self.partitions {
            if let Some(safe) = p.advance() {
                out.push((topic.clone(), *partition, safe));
            }
        }
        out.sort();
        out
    }

    /// Partitions taken away by a rebalance: returns what may still be
    /// committed for them, then forgets them (records of theirs that finish
    /// later are ignored; their effects are idempotent and whoever owns the
    /// partitions now will commit them).
    pub fn revoke(&mut self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for key in partitions {
            if let Some(mut p) = self.partitions.remove(key)
                && let Some(safe) = p.advance()
            {
                out.push((key.0.clone(), key.1, safe));
            }
        }
        out.sort();
        out
    }
}

impl PartitionState {
    /// The lowest unfinished offset, if it moved past the last commit.
    fn advance(&mut self) -> Option<i64> {
        let safe = self.in_flight.first().copied().unwrap_or(self.next);
        if self.committed.is_none_or(|c| safe > c) {
            self.committed = Some(safe);
            Some(safe)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_oldest_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.start("jobs", 0, o);
        }
        t.finish("jobs", 0, 11);
        t.finish("jobs", 0, 12);
        assert_eq!(t.take_commits(), vec![("jobs".into(), 0, 10)]);
        // nothing moved: nothing to commit
        assert_eq!(t.take_commits(), vec![]);
        t.finish("jobs", 0, 10);
        assert_eq!(t.take_commits(), vec![("jobs".into(), 0, 13)]);
        t.finish("jobs", 0, 13);
        t.finish("jobs", 0, 14);
        assert_eq!(t.take_commits(), vec![("jobs".into(), 0, 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn revoked_partitions_commit_once_and_are_forgotten() {
        let mut t = OffsetTracker::default();
        t.start("jobs", 0, 3);
        t.start("jobs", 0, 4);
        t.start("jobs", 1, 9);
        t.finish("jobs", 0, 3);
        assert_eq!(t.revoke(&[("jobs".into(), 0)]), vec![("jobs".into(), 0, 4)]);
        // A record of the revoked partition finishing later changes nothing.
        t.finish("jobs", 0, 4);
        assert_eq!(t.take_commits(), vec![("jobs".into(), 1, 9)]);
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.start("jobs", 0, 5);
        t.start("jobs", 1, 7);
        t.finish("jobs", 1, 7);
        assert_eq!(t.take_commits(), vec![("jobs".into(), 0, 5), ("jobs".into(), 1, 8)]);
        assert_eq!(t.in_flight(), 1);
    }
}
