//! What the embedded log keeps: whole closed segments are deleted, oldest
//! first, once their newest record is past the age limit or while the log
//! is over its size cap. The open segment is closed once it has been open
//! a quarter of the age limit, so that it too can age out: the disk holds
//! at most about 1.25 times the window.

use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::segments;
use crate::store::LogRetention;

/// How often the writer applies the retention (also when idle).
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether the open segment, started at `started`, is to be closed before
/// the next write.
pub(super) fn segment_closes(
    started: Option<SystemTime>,
    retention: &LogRetention,
    now: SystemTime,
) -> bool {
    match (started, retention.max_age) {
        (Some(started), Some(age)) => now
            .duration_since(started)
            .is_ok_and(|open_for| open_for >= age / 4),
        _ => false,
    }
}

/// Deletes the segments before `open_segment` that `retention` does not
/// keep; returns the number of the newest one deleted.
pub(super) fn delete_segments(
    dir: &Path,
    open_segment: u64,
    retention: &LogRetention,
    now: SystemTime,
) -> io::Result<Option<u64>> {
    if retention.max_age.is_none() && retention.max_bytes.is_none() {
        return Ok(None);
    }
    let mut sized = Vec::new();
    for (number, path) in segments(dir)? {
        let metadata = std::fs::metadata(&path)?;
        sized.push((number, path, metadata.len(), metadata.modified()?));
    }
    let mut total: u64 = sized.iter().map(|(_, _, len, _)| len).sum();
    let mut deleted = None;
    for (number, path, len, written) in sized {
        if number >= open_segment {
            break;
        }
        let too_old = retention
            .max_age
            .is_some_and(|age| now.duration_since(written).is_ok_and(|old| old > age));
        let too_big = retention.max_bytes.is_some_and(|max| total > max);
        if !too_old && !too_big {
            break;
        }
        std::fs::remove_file(&path)?;
        total -= len;
        deleted = Some(number);
        tracing::info!(
            segment = %path.display(),
            bytes = len,
            reason = if too_old { "age" } else { "size" },
            "notification log: segment deleted by the retention"
        );
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(age: Option<u64>, bytes: Option<u64>) -> LogRetention {
        LogRetention {
            max_age: age.map(Duration::from_secs),
            max_bytes: bytes,
        }
    }

    #[test]
    fn the_open_segment_closes_after_a_quarter_of_the_age_limit() {
        let now = SystemTime::now();
        let started = Some(now - Duration::from_secs(30));
        assert!(segment_closes(started, &retention(Some(100), None), now));
        assert!(!segment_closes(started, &retention(Some(200), None), now));
        assert!(!segment_closes(None, &retention(Some(100), None), now));
        assert!(!segment_closes(started, &retention(None, Some(1)), now));
    }

    #[test]
    fn old_and_excess_segments_go_oldest_first_and_never_the_open_one() {
        let dir = std::env::temp_dir().join(format!("retention-{}", crate::protocol::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        for number in 1..=4 {
            std::fs::write(super::super::segment_path(&dir, number), vec![b'x'; 100]).unwrap();
        }
        let numbers = || -> Vec<u64> { segments(&dir).unwrap().iter().map(|(n, _)| *n).collect() };
        let now = SystemTime::now();
        // Nothing is old yet, and 400 bytes fit.
        let keep = retention(Some(60), Some(400));
        assert_eq!(delete_segments(&dir, 4, &keep, now).unwrap(), None);
        // Over the cap: the oldest go until it fits.
        let cap = retention(None, Some(250));
        assert_eq!(delete_segments(&dir, 4, &cap, now).unwrap(), Some(2));
        assert_eq!(numbers(), [3, 4]);
        // Past the age: every closed one, never the open one.
        let later = now + Duration::from_secs(120);
        assert_eq!(delete_segments(&dir, 4, &keep, later).unwrap(), Some(3));
        assert_eq!(numbers(), [4]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
