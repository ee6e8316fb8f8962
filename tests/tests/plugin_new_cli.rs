//! `sockets-host plugin new`, followed as a plugin author follows it
//! outside the workspace (inside it, the made crate would join the
//! checkout under test; the manifest it would get is unit-tested in
//! `host/src/cli/new.rs`): the crate passes its own tests, builds for
//! wasm32-wasip2, passes `plugin check`, and a server loads it and answers
//! a client with it.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};
use sockets_tests::client::Client;
use sockets_tests::server::{Server, ServerConfig, scratch_dir};
use sockets_tests::{host_binary, without_test_env, workspace_root};

fn sockets_host(args: &[&str], dir: &Path) -> Output {
    Command::new(host_binary())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("sockets-host runs")
}

/// `cargo ARGS` in the new crate, sharing a target folder across runs;
/// its stdout.
fn cargo_in(crate_dir: &Path, args: &[&str]) -> String {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    without_test_env(&mut command);
    let output = command
        .args(args)
        .current_dir(crate_dir)
        .env(
            "CARGO_TARGET_DIR",
            workspace_root().join("target/plugin-new"),
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?} in {}",
        crate_dir.display()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_plugin_builds_passes_its_tests_and_answers_a_client() {
    let folder = scratch_dir("plugin-new");
    let made = sockets_host(&["plugin", "new", "greeter", "--dir", "."], &folder);
    assert!(made.status.success(), "{made:?}");
    let crate_dir = folder.join("greeter");
    let said = String::from_utf8_lossy(&made.stdout);
    assert!(said.contains("created plugin `greeter`"), "{said}");
    assert!(
        said.contains("greeter.wasm"),
        "the file is named after the plugin: {said}"
    );

    // Its native tests pass as made, and it builds for the host.
    let tested = cargo_in(&crate_dir, &["test"]);
    assert!(tested.contains("test result: ok. 2 passed"), "{tested}");
    cargo_in(
        &crate_dir,
        &["build", "--release", "--quiet", "--target", "wasm32-wasip2"],
    );
    let wasm = workspace_root().join("target/plugin-new/wasm32-wasip2/release/greeter.wasm");
    assert!(wasm.is_file(), "{}", wasm.display());

    let checked = sockets_host(
        &[
            "plugin",
            "check",
            wasm.to_str().unwrap(),
            "--event",
            "greeter.ping",
            "--data",
            r#"{"text":"hi"}"#,
            "--user",
            "s_1",
        ],
        &folder,
    );
    assert!(checked.status.success(), "{checked:?}");
    let report: Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(report["name"], "greeter");
    assert_eq!(report["outcome"]["deliveries"][0]["event"], "greeter.pong");

    // Deployed by file: a server loads it under its name.
    let plugins = folder.join("deployed");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&wasm, plugins.join("greeter.wasm")).unwrap();
    let server = Server::in_process_with(
        ServerConfig {
            plugins: Vec::new(),
            ..ServerConfig::default()
        }
        .env("SOCKETS_PLUGINS_DIR", plugins.to_str().unwrap()),
    )
    .await;
    let mut sender = Client::connect_as(&server, "s_1", "student").await;
    let mut other_tab = Client::connect_as(&server, "s_1", "student").await;
    sender
        .send(&json!({"event": "greeter.ping", "data": {"text": "hello"}, "ack": 1}))
        .await;
    let reply = sender.recv().await;
    assert_eq!(reply["ack"], 1, "{reply}");
    assert_eq!(reply["data"], json!({"pong": true}), "{reply}");
    let pong = other_tab.recv().await;
    assert_eq!(pong["event"], "greeter.pong", "{pong}");
    assert_eq!(pong["data"], json!({"text": "hello", "from": "s_1"}));
    assert!(
        sender
            .try_recv(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "the sending connection gets the reply, not the push"
    );
}

#[test]
fn a_bad_name_or_a_taken_folder_is_refused_with_the_reason() {
    let folder = scratch_dir("plugin-new-refused");
    let bad = sockets_host(&["plugin", "new", "Bad-Name", "--dir", "."], &folder);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("not a plugin name"), "{said}");
    assert!(!folder.join("Bad-Name").exists());

    assert!(
        sockets_host(&["plugin", "new", "twice", "--dir", "."], &folder)
            .status
            .success()
    );
    let again = sockets_host(&["plugin", "new", "twice", "--dir", "."], &folder);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exist already"));
}
