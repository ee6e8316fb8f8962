//! The `/demo` page and its dev-mode endpoints: served with the client it
//! embeds on the embedded default, signing in students and consultants
//! only, playing the two backend events only, and absent wherever a key is
//! configured or the setting turns it off. (`tests/browser` drives the page
//! itself in Chromium.)

use serde_json::{Value, json};
use sockets_tests::client::{Client, Response, http};
use sockets_tests::server::{Server, ServerConfig};
use sockets_tests::workspace_root;

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value.as_str())
        .unwrap_or_else(|| panic!("no {name} header: {:?}", response.headers))
}

async fn post_json(server: &Server, path: &str, body: &Value) -> Response {
    http(
        server,
        "POST",
        path,
        &[("content-type", "application/json".to_owned())],
        body.to_string().as_bytes(),
    )
    .await
}

async fn demo_token(server: &Server, user: &str) -> String {
    let answer = post_json(server, "/demo/token", &json!({"user": user})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_serves_the_page_with_the_client_it_embeds() {
    let server = Server::in_process_with(ServerConfig::default().dev_mode()).await;
    let page = http(&server, "GET", "/demo", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(header(&page, "content-type").starts_with("text/html"));
    assert!(
        page.body
            .contains(r#"<script type="module" src="/demo/app.js">"#)
    );
    // The page's scripts are its own files: nothing inline, nothing remote.
    assert!(header(&page, "content-security-policy").contains("default-src 'self'"));
    assert_eq!(
        http(&server, "GET", "/demo/", &[], b"").await.body,
        page.body
    );

    let app = http(&server, "GET", "/demo/app.js", &[], b"").await;
    assert!(header(&app, "content-type").starts_with("text/javascript"));
    assert!(app.body.contains(r#"from "/demo/client.js""#));
    let client = http(&server, "GET", "/demo/client.js", &[], b"").await;
    let source =
        std::fs::read_to_string(workspace_root().join("clients/typescript/src/index.js")).unwrap();
    assert_eq!(client.body, source, "the page runs the published client");
    let style = http(&server, "GET", "/demo/style.css", &[], b"").await;
    assert!(header(&style, "content-type").starts_with("text/css"));

    let session = http(&server, "GET", "/demo/session", &[], b"").await.json();
    assert_eq!(session["signIn"], true);
    let users: Vec<&str> = session["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|user| user["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        ["c_1", "c_2", "s_1", "s_2", "s_3"],
        "no admin offered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_signs_in_students_and_consultants_only() {
    let server = Server::in_process_with(ServerConfig::default().dev_mode()).await;
    let token = demo_token(&server, "s_1").await;
    let (_student, connected) = Client::connect(&server, &token).await;
    assert_eq!(connected["data"]["userId"], "s_1");
    assert_eq!(connected["data"]["role"], "student");

    let admin = post_json(&server, "/demo/token", &json!({"user": "a_1"})).await;
    admin.assert_error(403, "forbidden");
    let nobody = post_json(&server, "/demo/token", &json!({"user": "nobody"})).await;
    nobody.assert_error(404, "not_found");
    let malformed = post_json(&server, "/demo/token", &json!({"id": "s_1"})).await;
    malformed.assert_error(400, "bad_request");
    // What a form of another site can send without asking (no preflight).
    let cross_site = http(
        &server,
        "POST",
        "/demo/token",
        &[("content-type", "text/plain".to_owned())],
        br#"{"user":"s_1"}"#,
    )
    .await;
    cross_site.assert_error(415, "bad_request");
    assert!(!cross_site.body.contains("eyJ"), "{}", cross_site.body);
    // The JSON request another site would need asks first, and is not let in.
    let preflight = http(
        &server,
        "OPTIONS",
        "/demo/token",
        &[
            ("origin", "https://evil.example".to_owned()),
            ("access-control-request-method", "POST".to_owned()),
            ("access-control-request-headers", "content-type".to_owned()),
        ],
        b"",
    )
    .await;
    assert!(
        !preflight
            .headers
            .iter()
            .any(|(name, _)| name.starts_with("access-control-allow")),
        "{:?}",
        preflight.headers
    );
    // A page of another site whose name now points at 127.0.0.1.
    let rebound = raw_post(
        &server,
        "/demo/token",
        "evil.example:8080",
        r#"{"user":"s_1"}"#,
    )
    .await;
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    assert!(!rebound.contains("eyJ"), "{rebound}");
    let local = raw_post(
        &server,
        "/demo/token",
        "localhost:8080",
        r#"{"user":"s_1"}"#,
    )
    .await;
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
}

/// A JSON `POST` naming `host` in its Host header; the raw answer.
async fn raw_post(server: &Server, path: &str, host: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_plays_the_payment_and_review_events_only() {
    let server = Server::in_process_with(ServerConfig::default().dev_mode()).await;
    let (mut student, _) = Client::connect(&server, &demo_token(&server, "s_1").await).await;
    let played = post_json(
        &server,
        "/demo/events",
        &json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p_demo", "studentId": "s_1", "amount": 120}}),
    )
    .await;
    assert_eq!(played.status, 202, "{}", played.body);
    assert_eq!(played.json()["recipients"], 1);
    let push = student.recv().await;
    assert_eq!(push["event"], "paymentProcessed", "{push}");
    assert_eq!(push["data"]["paymentId"], "p_demo");

    let other = post_json(
        &server,
        "/demo/events",
        &json!({"event": "sendMessage", "data": {"to": "s_1", "text": "spoofed"}}),
    )
    .await;
    other.assert_error(400, "bad_request");
    let invalid = post_json(
        &server,
        "/demo/events",
        &json!({"event": "REVIEW_ADDED", "data": {"consultantId": "c_1"}}),
    )
    .await;
    assert_eq!(
        invalid.status, 400,
        "the plugin validates: {}",
        invalid.body
    );
    let plain = http(
        &server,
        "POST",
        "/demo/events",
        &[("content-type", "text/plain".to_owned())],
        json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p_x", "studentId": "s_1"}})
            .to_string()
            .as_bytes(),
    )
    .await;
    plain.assert_error(415, "bad_request");
    assert!(
        student
            .try_recv(std::time::Duration::from_millis(300))
            .await
            .is_none(),
        "nothing but the one payment reached the student"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_key_hides_the_demo_and_never_mints() {
    // The tests' servers have a secret: not dev mode.
    let server = Server::in_process().await;
    http(&server, "GET", "/demo", &[], b"")
        .await
        .assert_error(404, "not_found");
    post_json(&server, "/demo/token", &json!({"user": "s_1"}))
        .await
        .assert_error(404, "not_found");

    // Turned on, the page asks for a token; nothing mints one.
    let shown = Server::in_process_with(ServerConfig::default().env("SOCKETS_DEMO", "true")).await;
    assert_eq!(http(&shown, "GET", "/demo", &[], b"").await.status, 200);
    let session = http(&shown, "GET", "/demo/session", &[], b"").await.json();
    assert_eq!(session, json!({"signIn": false, "users": []}));
    post_json(&shown, "/demo/token", &json!({"user": "s_1"}))
        .await
        .assert_error(404, "not_found");
    post_json(
        &shown,
        "/demo/events",
        &json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p", "studentId": "s_1"}}),
    )
    .await
    .assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_setting_turns_the_demo_off_in_dev_mode() {
    let server = Server::in_process_with(
        ServerConfig::default()
            .dev_mode()
            .env("SOCKETS_DEMO", "false"),
    )
    .await;
    for path in ["/demo", "/demo/client.js", "/demo/session"] {
        http(&server, "GET", path, &[], b"")
            .await
            .assert_error(404, "not_found");
    }
    post_json(&server, "/demo/token", &json!({"user": "s_1"}))
        .await
        .assert_error(404, "not_found");
}
