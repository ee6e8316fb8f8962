//! Hot reload and plugin operations (PROTOCOL.md §8): swaps under load lose
//! and duplicate nothing, bad versions never replace good ones, rollback,
//! delete, configuration reloads, and the compiled-artifact cache.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sockets_tests::client::{Client, Response, http};
use sockets_tests::{eventually, plugin_wasm};

/// How long a change of the plugins folder may take to show.
const TEN_SECONDS: Duration = Duration::from_secs(10);
use sockets_tests::server::{Server, ServerConfig, token};

fn admin() -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {}", token("ops", "admin")))]
}

async fn plugins(server: &Server) -> Value {
    let response = http(server, "GET", "/admin/plugins", &admin(), b"").await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

/// Plugin `name`'s entry in `GET /admin/plugins`.
async fn entry(server: &Server, name: &str) -> Value {
    let list = plugins(server).await;
    list["plugins"]
        .as_array()
        .and_then(|all| all.iter().find(|plugin| plugin["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

async fn serving_hash(server: &Server, name: &str) -> Option<String> {
    let list = plugins(server).await;
    list["plugins"]
        .as_array()?
        .iter()
        .find(|plugin| plugin["name"] == name)?["current"]["sha256"]
        .as_str()
        .map(str::to_owned)
}

async fn upload(server: &Server, name: &str, wasm: &[u8]) -> Response {
    http(
        server,
        "PUT",
        &format!("/admin/plugins/{name}"),
        &admin(),
        wasm,
    )
    .await
}

fn sha256(bytes: &[u8]) -> String {
    sockets_host::plugin::content_hash(bytes)
}

/// Sends one message and returns the pushed frame's data as the recipient saw it.
async fn exchange(from: &mut Client, to: &mut Client, to_id: &str, text: &str) -> Value {
    from.send(&json!({"event": "sendMessage", "data": {"to": to_id, "text": text}, "ack": 1}))
        .await;
    let reply = from.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    to.recv().await["data"].clone()
}

async fn pair(server: &Server) -> (Client, Client) {
    let student = Client::connect(server, &token("s_1", "student")).await.0;
    let consultant = Client::connect(server, &token("c_1", "consultant")).await.0;
    (student, consultant)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swap_under_load_loses_and_duplicates_nothing() {
    let server =
        Server::in_process_with(ServerConfig::default().env("SOCKETS_RATE_LIMIT", "0")).await;
    let (mut student, mut consultant) = pair(&server).await;
    let v2 = std::fs::read(plugin_wasm("chat-v2")).unwrap();
    let v2_hash = sha256(&v2);

    // Both sides send continuously with up to WINDOW acks in flight, at
    // least SENDS messages each and until the new version has served for
    // half a second; bounded to MAX_SENDS each and 20 s.
    const SENDS: u64 = 1500;
    const MAX_SENDS: u64 = 200_000;
    const WINDOW: u64 = 32;
    let plugins_dir = server.plugins_dir.clone();
    let started = Instant::now();
    let (mut swapped_at, mut serving_at) = (None, None);
    let mut sent = [0u64; 2];
    let mut acked = [0u64; 2];
    let mut received: [HashMap<u64, u32>; 2] = [HashMap::new(), HashMap::new()];
    let mut first_v2_seq: [Option<u64>; 2] = [None, None];
    let mut v1_after_v2 = 0;
    let deadline = started + Duration::from_secs(20);
    let mut sending = true;
    while (sending
        || acked != sent
        || received[0].len() as u64 != sent[1]
        || received[1].len() as u64 != sent[0])
        && Instant::now() < deadline
    {
        if sending
            && sent.iter().all(|sent| *sent >= SENDS)
            && serving_at.is_some_and(|at: Instant| at.elapsed() >= Duration::from_millis(500))
        {
            sending = false;
        }
        for side in 0..2 {
            let (me, peer) = if side == 0 {
                ("s_1", "c_1")
            } else {
                ("c_1", "s_1")
            };
            let client = if side == 0 {
                &mut student
            } else {
                &mut consultant
            };
            while sending && sent[side] < MAX_SENDS && sent[side] - acked[side] < WINDOW {
                let seq = sent[side];
                client
                    .send(&json!({"event": "sendMessage", "data": {"to": peer, "text": format!("{me}:{seq}")}, "ack": seq}))
                    .await;
                sent[side] += 1;
            }
            // Read what is there: acks for our sends and pushes from the peer.
            while let Some(frame) = client.try_recv(Duration::from_millis(2)).await {
                if frame.get("ack").is_some() {
                    assert_eq!(
                        frame["ok"], true,
                        "a message failed during the swap: {frame}"
                    );
                    acked[side] += 1;
                } else {
                    assert_eq!(frame["event"], "message");
                    let text = frame["data"]["text"].as_str().unwrap();
                    let seq: u64 = text.split(':').nth(1).unwrap().parse().unwrap();
                    *received[side].entry(seq).or_default() += 1;
                    let edition2 = frame["data"]["edition"] == 2;
                    if edition2 {
                        first_v2_seq[side].get_or_insert(seq);
                    } else if first_v2_seq[side].is_some() {
                        v1_after_v2 += 1;
                    }
                }
            }
        }
        // Swap a third of the way in: an operator drops the new file.
        if swapped_at.is_none() && acked[0] >= SENDS / 3 {
            let temporary = plugins_dir.join("chat.wasm.part");
            std::fs::write(&temporary, &v2).unwrap();
            std::fs::rename(&temporary, plugins_dir.join("chat.wasm")).unwrap();
            swapped_at = Some(Instant::now());
        }
        if serving_at.is_none()
            && swapped_at.is_some()
            && serving_hash(&server, "chat").await.as_deref() == Some(v2_hash.as_str())
        {
            serving_at = Some(Instant::now());
        }
    }
    let elapsed = started.elapsed();
    assert!(!sending, "the run hit its bounds before the swap was done");
    assert_eq!(acked, sent, "every message was acknowledged");
    for side in 0..2 {
        assert_eq!(
            received[side].len() as u64,
            sent[1 - side],
            "side {side} lost messages"
        );
        assert!(
            received[side].values().all(|count| *count == 1),
            "side {side} got duplicates"
        );
        assert!(
            first_v2_seq[side].is_some(),
            "side {side} never saw the new version"
        );
    }
    assert_eq!(
        v1_after_v2, 0,
        "no old-version push after the first new-version one"
    );
    let swap = serving_at
        .expect("the new version serves")
        .duration_since(swapped_at.unwrap());
    let messages = sent[0] + sent[1];
    eprintln!(
        "swap under load: {messages} messages in {elapsed:?} ({:.0} msg/s), file write -> serving observed after {swap:?}",
        messages as f64 / elapsed.as_secs_f64()
    );
    // Still the same connections: send one more each way.
    let data = exchange(&mut student, &mut consultant, "c_1", "after").await;
    assert_eq!(data["edition"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_rollback_and_delete_through_the_admin_api() {
    let server = Server::in_process().await;
    let (mut student, mut consultant) = pair(&server).await;
    let v1_hash = serving_hash(&server, "chat").await.unwrap();
    assert!(
        exchange(&mut student, &mut consultant, "c_1", "v1")
            .await
            .get("edition")
            .is_none()
    );

    let v2 = std::fs::read(plugin_wasm("chat-v2")).unwrap();
    let uploaded = upload(&server, "chat", &v2).await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.body);
    let report = uploaded.json();
    assert_eq!(report["status"], "serving");
    assert_eq!(report["current"]["sha256"], sha256(&v2));
    assert_eq!(report["current"]["label"], "chat@0.2.0");
    assert_eq!(report["previous"][0]["sha256"], v1_hash.as_str());
    assert_eq!(
        exchange(&mut student, &mut consultant, "c_1", "v2").await["edition"],
        2
    );
    assert_eq!(
        std::fs::read(server.plugins_dir.join("chat.wasm")).unwrap(),
        v2,
        "uploads persist in the folder"
    );

    // A broken upload is refused with the reason and changes nothing.
    let broken = upload(&server, "chat", b"\0asm but not really").await;
    assert_eq!(broken.status, 400);
    assert_eq!(broken.json()["error"]["code"], "bad_request");
    assert!(
        broken.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid WebAssembly component")
    );
    let wrong_world = upload(
        &server,
        "chat",
        &std::fs::read(plugin_wasm("wrong-world")).unwrap(),
    )
    .await;
    assert_eq!(wrong_world.status, 400);
    assert_eq!(
        serving_hash(&server, "chat").await.as_deref(),
        Some(sha256(&v2).as_str())
    );
    assert_eq!(
        exchange(&mut student, &mut consultant, "c_1", "still v2").await["edition"],
        2
    );

    // Rollback restores the previous behaviour.
    let rolled = http(
        &server,
        "POST",
        "/admin/plugins/chat/rollback",
        &admin(),
        b"",
    )
    .await;
    assert_eq!(rolled.status, 200, "{}", rolled.body);
    assert_eq!(rolled.json()["current"]["sha256"], v1_hash.as_str());
    assert!(
        exchange(&mut student, &mut consultant, "c_1", "v1 again")
            .await
            .get("edition")
            .is_none()
    );

    // Delete stops routing.
    let deleted = http(&server, "DELETE", "/admin/plugins/chat", &admin(), b"").await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "gone"}, "ack": 5}))
        .await;
    assert_eq!(student.recv().await["error"]["code"], "unknown_event");
    assert!(!server.plugins_dir.join("chat.wasm").exists());
    let again = http(&server, "DELETE", "/admin/plugins/chat", &admin(), b"").await;
    assert_eq!(again.status, 404);
    let bad_name = upload(&server, "../escape", &v2).await;
    assert!(
        bad_name.status == 400 || bad_name.status == 404,
        "{}",
        bad_name.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_needs_the_admin_role() {
    let server = Server::in_process().await;
    let as_student = [(
        "authorization",
        format!("Bearer {}", token("s_1", "student")),
    )];
    let response = http(&server, "GET", "/admin/plugins", &as_student, b"").await;
    assert_eq!(
        (response.status, response.json()["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let response = http(&server, "PUT", "/admin/plugins/chat", &as_student, b"x").await;
    assert_eq!(response.status, 403);
    assert_eq!(
        http(&server, "GET", "/admin/plugins", &[], b"")
            .await
            .status,
        401
    );
    let list = plugins(&server).await;
    let names: Vec<_> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    let bundled: Vec<_> = sockets_tests::bundled_plugins()
        .iter()
        .map(|name| json!(name))
        .collect();
    assert_eq!(names, bundled);
    assert!(names.contains(&json!("chat")), "{names:?}");
    let chat = &entry(&server, "chat").await;
    assert_eq!(chat["current"]["subscriptions"], json!(["sendMessage"]));
    assert!(chat["current"]["counters"]["calls"].is_u64());
    assert!(chat["current"]["loadedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(chat["current"]["offWorkers"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_folder_is_watched_removed_files_unload_and_broken_files_keep_the_old_version() {
    let server = Server::in_process().await;
    let (mut student, mut consultant) = pair(&server).await;
    let v1_hash = serving_hash(&server, "chat").await.unwrap();

    // A half-written (truncated) file does not replace the serving version.
    let v2 = std::fs::read(plugin_wasm("chat-v2")).unwrap();
    std::fs::write(server.plugins_dir.join("chat.wasm"), &v2[..v2.len() / 2]).unwrap();
    eventually(TEN_SECONDS, "the failed load is reported", || async {
        entry(&server, "chat").await["lastError"]
            .is_string()
            .then_some(())
    })
    .await;
    assert_eq!(
        serving_hash(&server, "chat").await.as_deref(),
        Some(v1_hash.as_str())
    );
    assert!(
        exchange(&mut student, &mut consultant, "c_1", "still v1")
            .await
            .get("edition")
            .is_none()
    );
    let metrics = http(&server, "GET", "/metrics", &[], b"").await.body;
    assert!(
        metrics
            .lines()
            .any(|line| line == "sockets_plugin_load_failures_total 1"),
        "{metrics}"
    );

    // The rest of the write arrives: the new version loads.
    std::fs::write(server.plugins_dir.join("chat.wasm"), &v2).unwrap();
    let v2_hash = sha256(&v2);
    eventually(TEN_SECONDS, "the new version serves", || async {
        (serving_hash(&server, "chat").await.as_deref() == Some(v2_hash.as_str())).then_some(())
    })
    .await;
    assert_eq!(
        exchange(&mut student, &mut consultant, "c_1", "v2").await["edition"],
        2
    );

    std::fs::remove_file(server.plugins_dir.join("chat.wasm")).unwrap();
    eventually(TEN_SECONDS, "the removed plugin unloads", || async {
        serving_hash(&server, "chat").await.is_none().then_some(())
    })
    .await;
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "x"}, "ack": 3}))
        .await;
    assert_eq!(student.recv().await["error"]["code"], "unknown_event");
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_a_plugins_configuration_reloads_it() {
    let dir = sockets_tests::server::scratch_dir("config");
    let file = dir.join("sockets.toml");
    std::fs::write(
        &file,
        "[plugins.chat]\nallow = [{ from = \"student\", to = \"*\" }]\n",
    )
    .unwrap();
    let config = ServerConfig {
        args: vec!["--config".into(), file.display().to_string()],
        ..ServerConfig::default()
    };
    let server = Server::in_process_with(config).await;
    let mut student = Client::connect_as(&server, "s_1", "student").await;
    let to_student = json!({"event": "sendMessage", "data": {"to": "s_2", "text": "hi"}, "ack": 1});
    student.send(&to_student).await;
    assert_eq!(student.recv().await["ok"], true);

    std::fs::write(
        &file,
        "[plugins.chat]\nallow = [{ from = \"student\", to = \"consultant\" }]\n",
    )
    .unwrap();
    eventually(
        TEN_SECONDS,
        "the configuration change reached the plugin",
        || async {
            entry(&server, "chat").await["current"]["config"]
                .as_str()
                .is_some_and(|config| config.contains("consultant"))
                .then_some(())
        },
    )
    .await;
    student.send(&to_student).await;
    assert_eq!(student.recv().await["error"]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_unchanged_plugins_uses_the_artifact_cache() {
    let data_dir = sockets_tests::server::scratch_dir("cache").join("data");
    let config = || ServerConfig {
        data_dir: Some(data_dir.clone()),
        ..ServerConfig::default()
    };
    let bundled = sockets_tests::bundled_plugins().len();
    let server = Server::in_process_with(config()).await;
    let cache = plugins(&server).await["cache"].clone();
    assert_eq!(cache, json!({"hits": 0, "misses": bundled}));
    assert!(server.stop().await);

    let server = Server::in_process_with(config()).await;
    assert_eq!(
        plugins(&server).await["cache"],
        json!({"hits": bundled, "misses": 0})
    );
    // The cached artifacts serve.
    let (mut student, mut consultant) = pair(&server).await;
    assert_eq!(
        exchange(&mut student, &mut consultant, "c_1", "cached").await["text"],
        "cached"
    );
    assert!(server.stop().await);

    // A corrupted cache is not trusted: entries that do not load are misses.
    for entry in walk(&data_dir.join("plugin-cache")) {
        std::fs::write(&entry, b"garbage").unwrap();
    }
    let server = Server::in_process_with(config()).await;
    assert_eq!(
        plugins(&server).await["cache"],
        json!({"hits": 0, "misses": bundled})
    );
    let (mut student, mut consultant) = pair(&server).await;
    assert_eq!(
        exchange(&mut student, &mut consultant, "c_1", "rebuilt").await["text"],
        "rebuilt"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
