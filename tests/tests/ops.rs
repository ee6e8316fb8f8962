//! PROTOCOL.md §8 health, readiness and metrics; §6 graceful shutdown; §9
//! the `token` subcommand.

use std::time::Duration;

use serde_json::json;
use sockets_tests::client::{Client, http, student_and_consultant};
use sockets_tests::server::{Server, ServerConfig};

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let server = Server::in_process().await;
    let health = http(&server, "GET", "/healthz", &[], b"").await;
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(
        ready.json()["checks"]["plugins"]["loaded"],
        sockets_tests::bundled_plugins().len()
    );

    let (mut student, mut consultant) = student_and_consultant(&server).await;
    student
        .send(&json!({"event": "sendMessage", "data": {"to": "c_1", "text": "hi"}, "ack": 1}))
        .await;
    student.recv().await;
    consultant.recv().await;

    let metrics = http(&server, "GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    for line in [
        "sockets_connections 2",
        "sockets_frames_in_total 1",
        "sockets_deliveries_total 1",
        "sockets_plugin_calls_total{plugin=\"chat@0.1.0\"} 1",
        "sockets_plugin_off_workers{plugin=\"chat@0.1.0\"} 0",
        // The message, and the two users coming online (for `presence`).
        "sockets_plugin_dispatch_seconds_count 3",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_plugins_the_server_is_alive_but_not_ready() {
    let server = Server::in_process_with(ServerConfig {
        plugins: vec![],
        ..ServerConfig::default()
    })
    .await;
    assert_eq!(http(&server, "GET", "/healthz", &[], b"").await.status, 200);
    let ready = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "degraded");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_sockets_with_1001_and_exits_cleanly() {
    let server = Server::start().await;
    let (mut a, mut b) = student_and_consultant(&server).await;
    let closing = async {
        let (first, second) = tokio::join!(
            a.closed(Duration::from_secs(15)),
            b.closed(Duration::from_secs(15))
        );
        (first.0, second.0, first.1)
    };
    let (stopped, (code_a, code_b, reason)) = tokio::join!(server.stop(), closing);
    assert_eq!((code_a, code_b), (1001, 1001));
    assert_eq!(reason, "server shutting down");
    assert!(stopped, "exit status 0 after SIGTERM");
}

#[test]
fn the_token_command_mints_a_token_the_server_accepts() {
    let data_dir = sockets_tests::server::scratch_dir("token").join("data");
    let output = std::process::Command::new(sockets_tests::host_binary())
        .args(["token", "--sub", "s_1", "--role", "student", "--ttl", "15m"])
        .env("SOCKETS_JWT_SECRET", sockets_tests::server::SECRET)
        .env("SOCKETS_DATA_DIR", &data_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let minted = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = Server::in_process().await;
        let (_client, connected) = Client::connect(&server, &minted).await;
        assert_eq!(connected["data"]["role"], "student");
    });

    let bad_ttl = std::process::Command::new(sockets_tests::host_binary())
        .args(["token", "--sub", "s_1", "--ttl", "10years"])
        .env("SOCKETS_JWT_SECRET", "x")
        .output()
        .unwrap();
    assert!(!bad_ttl.status.success());
}

#[test]
fn dev_mode_keeps_one_secret_in_the_data_folder() {
    let data_dir = sockets_tests::server::scratch_dir("dev").join("data");
    let mint = || {
        let output = std::process::Command::new(sockets_tests::host_binary())
            .args(["token", "--sub", "s_1"])
            .env_remove("SOCKETS_JWT_SECRET")
            .env("SOCKETS_DATA_DIR", &data_dir)
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let (first, second) = (mint(), mint());
    assert!(!first.trim().is_empty());
    let secret = std::fs::read_to_string(data_dir.join("dev-jwt-secret")).unwrap();
    assert!(secret.len() >= 32);
    // Both tokens are signed with the one stored secret.
    let verify = |token: &str| {
        jsonwebtoken::decode::<serde_json::Value>(
            token.trim(),
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .is_ok()
    };
    assert!(verify(&first) && verify(&second));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_demo_runs_against_a_server() {
    let server = Server::in_process().await;
    // Through the tests' cargo helper: with this test's cargo variables
    // left in, ring's build script would rerun, and so would it in the
    // next test binary's build of the host (~3 minutes each).
    let mut demo = sockets_tests::cargo();
    demo.args(["run", "-q", "-p", "sockets-tests", "--example", "demo"])
        .env("SOCKETS_URL", server.addr.to_string())
        .env("SOCKETS_JWT_SECRET", sockets_tests::server::SECRET);
    let output = tokio::process::Command::from(demo).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(r#""event":"paymentProcessed""#), "{stdout}");
    assert!(stdout.contains(r#""text":"15:00 works.""#), "{stdout}");
}

#[tokio::test]
async fn the_openapi_document_is_served_and_names_every_route() {
    let server = Server::in_process().await;
    let served = http(&server, "GET", "/openapi.yaml", &[], b"").await;
    assert_eq!(served.status, 200);
    let file =
        std::fs::read_to_string(sockets_tests::workspace_root().join("docs/openapi.yaml")).unwrap();
    assert_eq!(
        served.body, file,
        "the host serves docs/openapi.yaml as it is"
    );
    for route in [
        "/ws",
        "/api/events",
        "/admin/plugins",
        "/admin/plugins/{name}",
        "/admin/plugins/{name}/rollback",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.yaml",
    ] {
        assert!(
            file.contains(&format!("\n  {route}:\n")),
            "{route} is not documented"
        );
    }
}
