//! What `resume` costs on the embedded log (issue #36, docs/benchmarks.md):
//! writes RECORDS chat-sized records for USERS users into a fresh log,
//! reopens it (the index is rebuilt from the segments), and times replays
//! of 100 records, of none, and since a time, against the full scan the
//! log's other queries make. Prints one JSON object.
//!
//! ```sh
//! cargo run --release -p sockets-tests --example resume_cost -- 1000000 10000
//! ```
//!
//! Bounded: at most 5,000,000 records, and at most RECORDS / 200 users (a
//! replay of 100 needs that many per user); the log goes to a temporary
//! folder that is removed at the end.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use serde_json::value::RawValue;
use sockets_host::protocol::{delivery_id, rfc3339};
use sockets_host::store::{EmbeddedLog, NotificationLog, NotificationRecord, ReplayFrom};

fn user(n: usize) -> String {
    format!("usr_{n:08x}-0000-7000-8000-{:012x}", n * 7919)
}

fn record(n: usize, users: usize, at: &str) -> NotificationRecord {
    let to = user(n % users);
    let delivery = delivery_id(&format!("evt-{n}"), "chat", 0);
    let data = format!(
        r#"{{"messageId":"evt-{n}","from":"{}","fromRole":"student","to":"{to}","text":"a message of a typical length, about sixty characters long","sentAt":"{at}"}}"#,
        user(n % users + 1)
    );
    NotificationRecord {
        id: NotificationRecord::record_id(&delivery, &to),
        event_id: format!("evt-{n}"),
        event: "message".into(),
        trigger: "sendMessage".into(),
        source: "client".into(),
        from: user(n % users + 1),
        to,
        plugin: "chat@0.1.0".into(),
        data: RawValue::from_string(data).expect("JSON"),
        connections: 1,
        created_at: at.to_owned(),
        seq: 0,
    }
}

/// Median and worst of `runs` timings of `run`, in microseconds.
async fn timed<F: AsyncFnMut(usize)>(runs: usize, mut run: F) -> serde_json::Value {
    let mut micros = Vec::with_capacity(runs);
    for n in 0..runs {
        let started = Instant::now();
        run(n).await;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    json!({"median_us": micros[runs / 2].round(), "max_us": micros[runs - 1].round()})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let records: usize = args.next().map_or(Ok(1_000_000), |n| n.parse())?;
    let users: usize = args.next().map_or(Ok(10_000), |n| n.parse())?;
    let records = records.clamp(1_000, 5_000_000);
    let users = users.clamp(1, records / 200);
    let dir =
        std::env::temp_dir().join(format!("resume-cost-{}", sockets_host::protocol::new_id()));

    let started = Instant::now();
    {
        let log = EmbeddedLog::open(&dir)?;
        let at = rfc3339(SystemTime::now());
        for batch in (0..records).step_by(1_000) {
            let batch: Vec<_> = (batch..(batch + 1_000).min(records))
                .map(|n| record(n, users, &at))
                .collect();
            log.append(batch).await?;
        }
    }
    let write_seconds = started.elapsed().as_secs_f64();
    let log_bytes: u64 = std::fs::read_dir(dir.join("notifications"))?
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|metadata| metadata.len())
        .sum();

    let rss_before = sockets_tests::rss_kib()?;
    let started = Instant::now();
    let log = EmbeddedLog::open(&dir)?;
    let open_seconds = started.elapsed().as_secs_f64();
    let index_kib = sockets_tests::rss_kib()?.saturating_sub(rss_before);

    // Each user holds records / users records; a client resuming 100 back.
    let per_user = records / users;
    let anchor = |n: usize| {
        let n = n % users;
        let record = record(n + (per_user - 101) * users, users, "");
        (user(n), record.delivery_id().to_owned())
    };
    let replay_100 = timed(200, async |n| {
        let (user, after) = anchor(n);
        let page = log
            .replay(&user, &ReplayFrom::After(after), 1000)
            .await
            .expect("replay")
            .expect("the anchor is logged");
        assert_eq!(page.records.len(), 100);
    })
    .await;
    let replay_none = timed(200, async |n| {
        let n = n % users;
        let newest = record(n + (per_user - 1) * users, users, "");
        let page = log
            .replay(
                &user(n),
                &ReplayFrom::After(newest.delivery_id().to_owned()),
                1000,
            )
            .await
            .expect("replay")
            .expect("the anchor is logged");
        assert!(page.records.is_empty());
    })
    .await;
    let replay_since_hour_ago = timed(50, async |n| {
        let since = SystemTime::now() - Duration::from_secs(3600);
        let page = log
            .replay(&user(n % users), &ReplayFrom::Since(since), 1000)
            .await
            .expect("replay")
            .expect("since always answers");
        assert_eq!(page.records.len(), per_user.min(1000));
    })
    .await;
    let scan = timed(3, async |n| {
        let found = log.for_user(&user(n % users), 100).await.expect("scan");
        assert_eq!(found.len(), 100.min(per_user));
    })
    .await;
    drop(log);
    std::fs::remove_dir_all(&dir)?;

    println!(
        "{}",
        json!({
            "records": records,
            "users": users,
            "log_mib": log_bytes >> 20,
            "write_s": (write_seconds * 10.0).round() / 10.0,
            "open_s": (open_seconds * 100.0).round() / 100.0,
            "index_rss_kib": index_kib,
            "index_bytes_per_record": (index_kib * 1024) as f64 / records as f64,
            "replay_100_after": replay_100,
            "replay_0_after_newest": replay_none,
            "replay_since_hour_ago_per_user_records": replay_since_hour_ago,
            "scan_for_user_100": scan,
        })
    );
    Ok(())
}
