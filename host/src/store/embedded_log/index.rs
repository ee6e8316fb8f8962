//! Where each user's records lie in the journal, in log order: what a
//! `resume` reads, so that a replay costs the records it returns, not a scan
//! of the log. Held in memory (24 bytes an entry, about 84 a record with
//! the map of ids and vector slack: docs/benchmarks.md, "Resume"),
//! built from the segments when the log opens and extended by the writer
//! after each commit, before the appenders hear of it.
//!
//! Deliveries are found by a 64-bit hash of their id; the record read back
//! is checked against the id asked for.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher, Hash, Hasher};
use std::io::{self, BufRead, BufReader};
use std::time::SystemTime;

use crate::store::{LogClock, NotificationRecord, ReplayFrom};

/// Bits of a [`Position`] that hold the offset in its segment (4 GiB: a
/// segment is at most 64 MiB and one batch past it); the segment number
/// has the other 32.
const OFFSET_BITS: u32 = 32;

/// A record's place in the journal: segment number and byte offset, packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Position(u64);

impl Position {
    pub(super) fn new(segment: u64, offset: u64) -> Self {
        assert!(
            offset < 1 << OFFSET_BITS && segment < 1 << (64 - OFFSET_BITS),
            "a journal position out of range: segment {segment}, offset {offset}"
        );
        Self((segment << OFFSET_BITS) | offset)
    }

    pub(super) fn segment(self) -> u64 {
        self.0 >> OFFSET_BITS
    }

    pub(super) fn offset(self) -> u64 {
        self.0 & ((1 << OFFSET_BITS) - 1)
    }
}

/// One record of a user.
#[derive(Debug, Clone, Copy)]
struct Entry {
    position: Position,
    /// The hash of its delivery id.
    delivery: u64,
    seq: i64,
}

/// What a replay reads, found in the index.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// The record the replay starts after (`ReplayFrom::After`), to check.
    pub anchor: Option<Position>,
    /// The records to send, in log order.
    pub records: Vec<Position>,
    /// Whether the limit cut the replay short.
    pub more: bool,
}

/// Every indexed record of the log, by user.
#[derive(Debug, Default)]
pub(super) struct UserIndex {
    /// Each user's records, by `seq`.
    users: HashMap<Box<str>, Vec<Entry>>,
    /// The `seq` of each record indexed, by [`record_key`]: finds a replay's
    /// anchor without a walk, and a record appended again (a retried write
    /// of a delivery) keeps its first place.
    known: HashMap<u64, i64, BuildHasherDefault<Prehashed>>,
    last_seq: i64,
}

/// The hasher of `known`, whose keys are SipHash values already: hashing
/// them again cost a SipHash on every insert and, as the map grows by a key
/// per record, on every rehash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else still spreads.
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }
}

fn hash_of(text: &str) -> u64 {
    // SipHash with fixed keys: the index lives and dies with the process.
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// A record's key in `known`: its delivery's hash and its user.
fn record_key(delivery: u64, user: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    delivery.hash(&mut hasher);
    user.hash(&mut hasher);
    hasher.finish()
}

/// What the index reads of a stored record.
#[derive(serde::Deserialize)]
struct Stored<'a> {
    #[serde(rename = "_id", borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    to: Cow<'a, str>,
    /// Absent from records of versions before `resume`.
    seq: Option<i64>,
    #[serde(rename = "createdAt", borrow)]
    created_at: Cow<'a, str>,
}

impl UserIndex {
    /// The index of the segments in `dir` (their complete lines), and
    /// numbers for the records of older versions written without one.
    pub(super) fn build(segments: &[(u64, std::path::PathBuf)]) -> io::Result<Self> {
        let mut index = Self::default();
        let mut clock = LogClock::default();
        let mut line = Vec::new();
        for (segment, path) in segments {
            let mut reader = BufReader::new(std::fs::File::open(path)?);
            let mut offset = 0u64;
            loop {
                line.clear();
                let read = reader.read_until(b'\n', &mut line)?;
                if read == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                if let Ok(stored) = serde_json::from_slice::<Stored<'_>>(&line) {
                    let seq = match stored.seq {
                        Some(seq) => seq,
                        None => clock.next(created_at(&stored.created_at)),
                    };
                    clock = LogClock::after(clock.last().max(seq));
                    index.add(&stored.id, &stored.to, Position::new(*segment, offset), seq);
                }
                offset += read as u64;
            }
        }
        Ok(index)
    }

    /// The highest `seq` indexed: a reopened log numbers on from it.
    pub(super) fn last_seq(&self) -> i64 {
        self.last_seq
    }

    /// Indexes a committed record (`record_id` is `<delivery id>:<to>`).
    /// Deliveries are numbered before they are pushed and written in
    /// batches, so a record may come a little after one with a higher
    /// number: it is put in its place.
    pub(super) fn add(&mut self, record_id: &str, to: &str, position: Position, seq: i64) {
        let delivery = hash_of(NotificationRecord::delivery_of(record_id, to));
        match self.known.entry(record_key(delivery, to)) {
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(vacant) => vacant.insert(seq),
        };
        let entry = Entry {
            position,
            delivery,
            seq,
        };
        self.last_seq = self.last_seq.max(seq);
        let entries = match self.users.get_mut(to) {
            Some(entries) => entries,
            None => self.users.entry(to.into()).or_default(),
        };
        let at = entries.len()
            - entries
                .iter()
                .rev()
                .take_while(|later| later.seq > seq)
                .count();
        entries.insert(at, entry);
    }

    /// Forgets the records in segments up to `through_segment` (deleted)
    /// and those numbered below `first_kept` (past the retention).
    pub(super) fn forget(&mut self, through_segment: Option<u64>, first_kept: i64) {
        let gone = |entry: &Entry| {
            entry.seq < first_kept
                || through_segment.is_some_and(|through| entry.position.segment() <= through)
        };
        let known = &mut self.known;
        // Every entry is looked at: segments are deleted seldom (a few per
        // retention window or per eighth of the size cap).
        self.users.retain(|user, entries| {
            entries.retain(|entry| {
                let kept = !gone(entry);
                if !kept {
                    known.remove(&record_key(entry.delivery, user));
                }
                kept
            });
            if entries.capacity() > 2 * entries.len() + 8 {
                entries.shrink_to_fit();
            }
            !entries.is_empty()
        });
    }

    /// The records of a replay for `user`, none numbered below
    /// `first_kept`; `None` when `from` names no delivery to this user
    /// that is kept.
    pub(super) fn plan(
        &self,
        user: &str,
        from: &ReplayFrom,
        limit: usize,
        first_kept: i64,
    ) -> Option<Plan> {
        let all = self.users.get(user).map_or(&[][..], Vec::as_slice);
        let entries = &all[all.partition_point(|entry| entry.seq < first_kept)..];
        let (anchor, start) = match from {
            ReplayFrom::After(delivery) => {
                let seq = *self.known.get(&record_key(hash_of(delivery), user))?;
                if seq < first_kept {
                    return None;
                }
                let at = entries.partition_point(|entry| entry.seq < seq);
                (Some(entries.get(at)?.position), at + 1)
            }
            ReplayFrom::Since(at) => {
                let first = LogClock::first_at(*at);
                (None, entries.partition_point(|entry| entry.seq < first))
            }
        };
        let rest = &entries[start..];
        Some(Plan {
            anchor,
            records: rest
                .iter()
                .take(limit)
                .map(|entry| entry.position)
                .collect(),
            more: rest.len() > limit,
        })
    }
}

/// The time of a stored `createdAt` (the epoch if unreadable).
fn created_at(text: &str) -> SystemTime {
    crate::protocol::parse_rfc3339(text).unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(seconds: u64) -> i64 {
        LogClock::first_at(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
    }

    fn index_of(records: &[(&str, &str, i64)]) -> UserIndex {
        let mut index = UserIndex::default();
        for (offset, (delivery, to, seq)) in records.iter().enumerate() {
            let id = format!("{delivery}:{to}");
            index.add(&id, to, Position::new(1, offset as u64), *seq);
        }
        index
    }

    fn offsets(plan: &Plan) -> Vec<u64> {
        plan.records
            .iter()
            .map(|position| position.offset())
            .collect()
    }

    #[test]
    fn a_replay_after_a_delivery_is_the_users_later_records() {
        let index = index_of(&[
            ("d1", "u", at(1)),
            ("d2", "v", at(2)),
            ("d3", "u", at(3)),
            ("d4", "u", at(4)),
        ]);
        let plan = index
            .plan("u", &ReplayFrom::After("d1".into()), 10, i64::MIN)
            .unwrap();
        assert_eq!(plan.anchor, Some(Position::new(1, 0)));
        assert_eq!(offsets(&plan), [2, 3]);
        assert!(!plan.more);

        let page = index
            .plan("u", &ReplayFrom::After("d1".into()), 1, i64::MIN)
            .unwrap();
        assert_eq!(offsets(&page), [2]);
        assert!(page.more);

        // Another user's delivery, or none at all, is not a place to start.
        assert_eq!(
            index.plan("u", &ReplayFrom::After("d2".into()), 10, i64::MIN),
            None
        );
        assert_eq!(
            index.plan("w", &ReplayFrom::After("d1".into()), 10, i64::MIN),
            None
        );
    }

    #[test]
    fn a_replay_since_a_time_starts_at_the_first_record_written_then() {
        let index = index_of(&[("d1", "u", at(1)), ("d2", "u", at(2) + 5)]);
        let since =
            |seconds| ReplayFrom::Since(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
        assert_eq!(
            offsets(&index.plan("u", &since(0), 10, i64::MIN).unwrap()),
            [0, 1]
        );
        assert_eq!(
            offsets(&index.plan("u", &since(2), 10, i64::MIN).unwrap()),
            [1]
        );
        assert!(
            index
                .plan("u", &since(3), 10, i64::MIN)
                .unwrap()
                .records
                .is_empty()
        );
        // A user without records has nothing since any time.
        assert!(
            index
                .plan("w", &since(0), 10, i64::MIN)
                .unwrap()
                .records
                .is_empty()
        );
    }

    #[test]
    fn a_record_appended_again_keeps_its_first_place() {
        let index = index_of(&[("d1", "u", at(1)), ("d2", "u", at(2)), ("d1", "u", at(3))]);
        let plan = index
            .plan("u", &ReplayFrom::After("d1".into()), 10, i64::MIN)
            .unwrap();
        assert_eq!(offsets(&plan), [1]);
        assert_eq!(index.last_seq(), at(2));
    }

    #[test]
    fn records_past_the_retention_or_in_deleted_segments_are_forgotten() {
        let mut index = UserIndex::default();
        for (n, (delivery, to, seq)) in [
            ("d1", "u", at(1)),
            ("d2", "v", at(2)),
            ("d3", "u", at(3)),
            ("d4", "u", at(4)),
        ]
        .into_iter()
        .enumerate()
        {
            let segment = 1 + n as u64 / 2;
            index.add(
                &format!("{delivery}:{to}"),
                to,
                Position::new(segment, 0),
                seq,
            );
        }
        let after = |delivery: &str| ReplayFrom::After(delivery.into());
        // Past the retention: not a place to start, not replayed.
        assert_eq!(index.plan("u", &after("d1"), 10, at(2)), None);
        let since_start = ReplayFrom::Since(SystemTime::UNIX_EPOCH);
        let kept = index.plan("u", &since_start, 10, at(3) + 1).unwrap();
        assert_eq!(kept.records, [Position::new(2, 0)]);

        index.forget(Some(1), i64::MIN);
        assert_eq!(index.plan("u", &after("d1"), 10, i64::MIN), None);
        assert!(
            !index.users.contains_key("v"),
            "a user with no records left is dropped"
        );
        let rest = index.plan("u", &after("d3"), 10, i64::MIN).unwrap();
        assert_eq!(rest.records, [Position::new(2, 0)]);
        // A forgotten record written again is indexed again.
        index.add("d1:u", "u", Position::new(3, 0), at(5));
        assert_eq!(
            index
                .plan("u", &after("d4"), 10, i64::MIN)
                .unwrap()
                .records
                .len(),
            1
        );
        index.forget(None, at(4));
        assert_eq!(
            index
                .plan("u", &after("d4"), 10, i64::MIN)
                .unwrap()
                .records
                .len(),
            1
        );
        assert_eq!(index.plan("u", &after("d3"), 10, i64::MIN), None);
    }

    #[test]
    fn a_record_written_after_one_numbered_higher_takes_its_place() {
        // d2 was numbered after d1 but reached the writer first.
        let index = index_of(&[("d2", "u", at(2)), ("d1", "u", at(1)), ("d3", "u", at(3))]);
        let since = ReplayFrom::Since(SystemTime::UNIX_EPOCH);
        assert_eq!(
            offsets(&index.plan("u", &since, 10, i64::MIN).unwrap()),
            [1, 0, 2]
        );
        let after_d1 = index.plan("u", &ReplayFrom::After("d1".into()), 10, i64::MIN);
        assert_eq!(offsets(&after_d1.unwrap()), [0, 2]);
    }

    #[test]
    fn positions_keep_segment_and_offset_apart() {
        let position = Position::new(7, (1 << OFFSET_BITS) - 1);
        assert_eq!(Position::new((1 << 32) - 1, 0).segment(), (1 << 32) - 1);
        assert_eq!(position.segment(), 7);
        assert_eq!(position.offset(), (1 << OFFSET_BITS) - 1);
        assert!(Position::new(1, 900) < Position::new(2, 0));
    }
}
