//! `resume` (PROTOCOL.md §3, v1.1) on the embedded store: the pushes a
//! client missed while away, sent again from the notification log; the
//! log's window (age, size) and a full disk. The MongoDB store's, across
//! two nodes, is in `mongo.rs`.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use sockets_tests::client::{Client, http};
use sockets_tests::server::{
    Server, ServerConfig, fresh_data_dir_sharing_compiled_plugins, scratch_dir, token,
};

/// Rate limits off: the tests send hundreds of messages at once.
fn unlimited() -> ServerConfig {
    ServerConfig::default().env("SOCKETS_RATE_LIMIT", "0")
}

/// Sends `texts` from `sender` to `to`, all acked, and waits for the acks.
async fn send_all(sender: &mut Client, to: &str, texts: impl IntoIterator<Item = String>) {
    let mut sent = 0u64;
    for text in texts {
        sent += 1;
        sender
            .send(&json!({"event": "sendMessage", "data": {"to": to, "text": text}, "ack": sent}))
            .await;
    }
    for _ in 0..sent {
        let reply = sender.recv().await;
        assert_eq!(reply["ok"], true, "{reply}");
    }
}

fn texts(pushes: &[Value]) -> Vec<&str> {
    pushes
        .iter()
        .map(|push| push["data"]["text"].as_str().unwrap())
        .collect()
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("m{n}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_back_from_a_gap_gets_what_it_missed_once_in_order_then_the_reply() {
    let server = Server::in_process_with(unlimited()).await;
    let mut phone = Client::connect_as(&server, "s_1", "student").await;
    let mut laptop = Client::connect_as(&server, "s_1", "student").await;
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    send_all(&mut phone, "c_1", ["before".to_owned()]).await;
    let seen = consultant.recv().await;
    let sender_copy = laptop.recv().await;
    assert_eq!(sender_copy["id"], seen["id"]);
    consultant.close().await;

    send_all(&mut phone, "c_1", numbered(0..3)).await;
    let mut live_ids = Vec::new();
    for _ in 0..3 {
        live_ids.push(laptop.recv().await["id"].clone());
    }
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let (pushes, reply) = consultant.resume(json!({"after": seen["id"]})).await;

    assert_eq!(texts(&pushes), ["m0", "m1", "m2"]);
    for push in &pushes {
        // The original push: same event, data and id as the live copies.
        let keys: HashSet<&str> = push
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, HashSet::from(["event", "data", "id"]), "{push}");
        assert_eq!(push["event"], "message");
        assert_eq!(push["data"]["from"], "s_1");
        assert_eq!(push["data"]["to"], "c_1");
    }
    let replayed_ids: Vec<Value> = pushes.iter().map(|push| push["id"].clone()).collect();
    assert_eq!(replayed_ids, live_ids);
    assert_eq!(
        reply,
        json!({"ack": 900, "ok": true, "data": {"replayed": 3, "more": false}})
    );
    // Nothing after the reply: each missed push came once.
    assert_eq!(consultant.try_recv(Duration::from_millis(300)).await, None);

    // The sender's other devices got copies, which are not theirs to replay.
    let (pushes, reply) = laptop
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(pushes, Vec::<Value>::new());
    assert_eq!(reply["data"], json!({"replayed": 0, "more": false}));
    let (_, reply) = laptop.resume(json!({"after": sender_copy["id"]})).await;
    assert_eq!(reply["error"]["code"], "not_found", "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_gap_comes_in_pages_and_since_reads_from_a_time() {
    let server = Server::in_process_with(unlimited()).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    send_all(&mut student, "c_1", ["first".to_owned()]).await;
    // (Times are read to the millisecond.)
    tokio::time::sleep(Duration::from_millis(5)).await;
    let between = sockets_host::protocol::rfc3339(std::time::SystemTime::now());
    tokio::time::sleep(Duration::from_millis(5)).await;
    send_all(&mut student, "c_1", numbered(0..5)).await;

    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let (all, reply) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(texts(&all), ["first", "m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(reply["data"], json!({"replayed": 6, "more": false}));

    let (later, _) = consultant.resume(json!({"since": between})).await;
    assert_eq!(texts(&later), ["m0", "m1", "m2", "m3", "m4"]);

    // Pages of two, each after the last id received, until `more` is false.
    let mut after = all[0]["id"].clone();
    let mut pages = Vec::new();
    loop {
        let (page, reply) = consultant.resume(json!({"after": after, "limit": 2})).await;
        assert_eq!(reply["data"]["replayed"], page.len());
        pages.push(texts(&page).join(","));
        if reply["data"]["more"] == false {
            break;
        }
        after = page.last().unwrap()["id"].clone();
    }
    assert_eq!(pages, ["m0,m1", "m2,m3", "m4"]);
    // At the end: nothing, and no more.
    let (none, reply) = consultant
        .resume(json!({"after": all[5]["id"], "limit": 1}))
        .await;
    assert!(none.is_empty());
    assert_eq!(reply["data"], json!({"replayed": 0, "more": false}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_point_the_log_does_not_hold_is_not_found_and_bad_input_a_bad_request() {
    let server = Server::in_process_with(unlimited()).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    send_all(&mut student, "c_2", ["to someone else".to_owned()]).await;
    let mut other = Client::connect_as(&server, "c_2", "consultant").await;
    let (theirs, _) = other.resume(json!({"since": "2000-01-01T00:00:00Z"})).await;
    let their_id = theirs[0]["id"].clone();

    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    for after in [json!("0123456789abcdef0123456789abcdef"), their_id] {
        let (pushes, reply) = consultant.resume(json!({"after": after})).await;
        assert!(pushes.is_empty());
        assert_eq!(reply["ok"], false);
        assert_eq!(reply["error"]["code"], "not_found", "{reply}");
    }
    for data in [
        json!({}),
        json!({"after": "x", "since": "2026-12-06T10:00:00Z"}),
        json!({"since": "not a time"}),
        json!({"after": 5}),
        // Checked before the unknown `after`.
        json!({"after": "unknown", "limit": 1001}),
        json!({"after": "unknown", "limit": 2.0}),
        json!("after"),
    ] {
        let (_, reply) = consultant.resume(data.clone()).await;
        assert_eq!(reply["error"]["code"], "bad_request", "{data}: {reply}");
    }
    // Without an ack the error is an `error` event.
    consultant
        .send(&json!({"event": "resume", "data": {"after": "unknown"}}))
        .await;
    let error = consultant.recv().await;
    assert_eq!(error["event"], "error");
    assert_eq!(error["data"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn live_pushes_during_a_large_replay_all_arrive_and_the_replay_keeps_the_client_open() {
    let server = Server::in_process_with(unlimited()).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    send_all(&mut student, "c_1", ["m9999".to_owned()]).await;
    // More than half the 1024-frame outbound queue: the replay must wait
    // for the writer instead of closing the client as too slow.
    send_all(&mut student, "c_1", numbered(0..700)).await;

    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let (first, _) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z", "limit": 1}))
        .await;
    consultant
        .send(&json!({"event": "resume", "data": {"after": first[0]["id"]}, "ack": 900}))
        .await;
    let live = tokio::spawn(async move {
        send_all(&mut student, "c_1", numbered(700..730)).await;
        student
    });

    let mut replayed = Vec::new();
    let mut live_texts = Vec::new();
    let mut ids = HashSet::new();
    let reply = loop {
        let frame = consultant.recv().await;
        if frame["ack"] == 900 {
            break frame;
        }
        let text = frame["data"]["text"].as_str().unwrap().to_owned();
        ids.insert(frame["id"].as_str().unwrap().to_owned());
        let number: usize = text[1..].parse().unwrap();
        if number < 700 || number == 9999 {
            replayed.push(text);
        } else {
            live_texts.push(text);
        }
    };
    live.await.unwrap();
    while let Some(frame) = consultant.try_recv(Duration::from_millis(500)).await {
        ids.insert(frame["id"].as_str().unwrap().to_owned());
        live_texts.push(frame["data"]["text"].as_str().unwrap().to_owned());
    }
    let replayed_count = reply["data"]["replayed"].as_u64().unwrap() as usize;
    assert!(replayed_count >= 700, "{reply}");
    // Every missed push, in log order; live ones may be replayed as well
    // (the client de-duplicates by id) but none is lost.
    let expected: Vec<String> = numbered(0..700);
    let in_order: Vec<&String> = replayed
        .iter()
        .filter(|text| text.as_str() != "m9999")
        .collect();
    assert_eq!(in_order.len(), 700);
    assert!(
        in_order
            .iter()
            .zip(&expected)
            .all(|(got, want)| *got == want)
    );
    let live_unique: HashSet<&String> = live_texts.iter().collect();
    assert_eq!(live_unique.len(), 30, "live pushes lost: {live_texts:?}");
    assert_eq!(ids.len(), 730);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_replays_what_it_logged_before() {
    let config = unlimited();
    let server = Server::in_process_with(config.clone()).await;
    let data_dir = server.data_dir.clone();
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    send_all(&mut student, "c_1", numbered(0..4)).await;
    drop(student);
    assert!(server.stop().await);

    let mut config = config;
    config.data_dir = Some(data_dir);
    let server = Server::in_process_with(config).await;
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let (all, _) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(texts(&all), ["m0", "m1", "m2", "m3"]);
    let (rest, reply) = consultant.resume(json!({"after": all[1]["id"]})).await;
    assert_eq!(texts(&rest), ["m2", "m3"]);
    assert_eq!(reply["data"], json!({"replayed": 2, "more": false}));
}

/// The notification log's segment files and their total size.
fn log_files(server: &Server) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    let mut bytes = 0;
    for entry in std::fs::read_dir(server.data_dir.join("notifications")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".jsonl") {
            bytes += entry.metadata().unwrap().len();
            names.push(name);
        }
    }
    names.sort();
    (names, bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_retention_a_push_is_not_replayed_and_its_segment_is_deleted() {
    let server = Server::in_process_with(unlimited().env("SOCKETS_LOG_RETENTION", "2")).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    send_all(&mut student, "c_1", ["old".to_owned()]).await;
    let old = consultant.recv().await;
    let (first_files, _) = log_files(&server);

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    send_all(&mut student, "c_1", ["new".to_owned()]).await;
    consultant.recv().await;
    let (_, reply) = consultant.resume(json!({"after": old["id"]})).await;
    assert_eq!(reply["error"]["code"], "not_found", "{reply}");
    let (kept, _) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(texts(&kept), ["new"]);

    // The segment that held it goes from the disk too.
    sockets_tests::eventually(
        Duration::from_secs(10),
        "the old segment is deleted",
        || async {
            let (files, _) = log_files(&server);
            (!files.contains(&first_files[0])).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_stays_under_its_size_cap_by_deleting_its_oldest_segments() {
    let server = Server::in_process_with(unlimited().env("SOCKETS_LOG_MAX_MB", "1")).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    // About 1.5 MiB of records, in segments of 128 KiB.
    let long = "x".repeat(400);
    for round in 0..3 {
        send_all(
            &mut student,
            "c_1",
            (0..800).map(|n| format!("r{round}-{n} {long}")),
        )
        .await;
    }
    let (files, bytes) =
        sockets_tests::eventually(Duration::from_secs(10), "the log fits its cap", || async {
            let (files, bytes) = log_files(&server);
            (bytes <= 1 << 20).then_some((files, bytes))
        })
        .await;
    assert!(files.len() >= 4, "several segments: {files:?}");
    assert!(
        !files.contains(&"000001.jsonl".to_owned()),
        "the oldest went first: {files:?}"
    );
    assert!(
        bytes > 512 << 10,
        "only what the cap needs is deleted: {bytes} bytes"
    );

    // What is left replays, page after page, up to the newest record.
    let mut consultant = Client::connect_as(&server, "c_1", "consultant").await;
    let (mut page, mut reply) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert!(
        !texts(&page)[0].starts_with("r0-0 "),
        "the oldest records are gone"
    );
    let mut replayed = page.len();
    while reply["data"]["more"] == true {
        let after = page.last().unwrap()["id"].clone();
        (page, reply) = consultant.resume(json!({"after": after})).await;
        replayed += page.len();
    }
    assert!(texts(&page).last().unwrap().starts_with("r2-799 "));
    assert!(replayed < 2400, "{replayed}");
}

/// A tmpfs of a few MiB, unmounted when dropped: a disk that fills up.
struct SmallDisk {
    dir: std::path::PathBuf,
}

/// Runs `command` as is, else through `sudo -n`; whether either succeeded.
fn as_root(command: &[&std::ffi::OsStr]) -> bool {
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        std::process::Command::new(program)
            .args(args)
            .status()
            .is_ok_and(|status| status.success())
    };
    let (program, args) = command.split_first().expect("a command");
    run(&program.to_string_lossy(), args) || run("sudo", &[&["-n".as_ref()][..], command].concat())
}

impl SmallDisk {
    /// Mounts it; fails loudly where it cannot (the test command runs as
    /// root, or with sudo).
    fn mount(size: &str) -> SmallDisk {
        let dir = scratch_dir("small-disk");
        let options = format!("size={size}");
        let command = ["mount", "-t", "tmpfs", "-o", &options, "tmpfs"].map(std::ffi::OsStr::new);
        assert!(
            as_root(&[&command[..], &[dir.as_os_str()]].concat()),
            "cannot mount a tmpfs at {} (the test needs root or sudo)",
            dir.display()
        );
        SmallDisk { dir }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while file
            .write_all(&chunk)
            .and_then(|()| file.sync_data())
            .is_ok()
        {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: the server's files may still be open.
        as_root(&["umount".as_ref(), "-l".as_ref(), self.dir.as_os_str()]);
    }
}

async fn readiness(server: &Server) -> (u16, Value) {
    let admin = [("authorization", format!("Bearer {}", token("ops", "admin")))];
    let response = http(server, "GET", "/readyz", &admin, b"").await;
    (response.status, response.json())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_log_writes_clearly_and_the_service_recovers_when_space_returns() {
    let disk = SmallDisk::mount("8m");
    let mut config = unlimited();
    config.data_dir = Some(fresh_data_dir_sharing_compiled_plugins(&disk.dir));
    let server = Server::in_process_with(config).await;
    let (mut student, mut consultant) = (
        Client::connect_as(&server, "s_1", "student").await,
        Client::connect_as(&server, "c_1", "consultant").await,
    );
    send_all(&mut student, "c_1", ["before".to_owned()]).await;
    consultant.recv().await;
    assert_eq!(readiness(&server).await.0, 200);

    let filler = disk.fill();
    // The segment's last page may still take a record or two.
    let mut logged_while_full = Vec::new();
    let failed = loop {
        let text = format!("during {}", logged_while_full.len());
        student
            .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": text}, "ack": 7}))
            .await;
        let reply = student.recv().await;
        // The push goes out before the write, whether it fails or not.
        assert_eq!(consultant.recv().await["data"]["text"], text.as_str());
        if reply["ok"] == false {
            break reply;
        }
        assert!(logged_while_full.len() < 100, "the disk never filled");
        logged_while_full.push(text);
    };
    assert_eq!(failed["ack"], 7);
    assert_eq!(failed["error"]["code"], "unavailable", "{failed}");
    // A resume meanwhile writes nothing, and says nothing of the disk.
    let (_, reply) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let (status, body) = readiness(&server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["store"]["status"], "degraded");
    assert_eq!(body["checks"]["store"]["backend"], "embedded");
    let error = body["checks"]["store"]["error"].as_str().unwrap();
    assert!(error.contains("No space left"), "{error}");

    // Space comes back: ready again without any write in between.
    std::fs::remove_file(filler).unwrap();
    sockets_tests::eventually(Duration::from_secs(10), "ready again", || async {
        (readiness(&server).await.0 == 200).then_some(())
    })
    .await;
    send_all(&mut student, "c_1", ["after".to_owned()]).await;
    assert_eq!(consultant.recv().await["data"]["text"], "after");
    let (logged, _) = consultant
        .resume(json!({"since": "2000-01-01T00:00:00Z"}))
        .await;
    // The write that failed is not in the log; what came after is.
    let mut expected = vec!["before".to_owned()];
    expected.extend(logged_while_full);
    expected.push("after".to_owned());
    assert_eq!(texts(&logged), expected);
}
