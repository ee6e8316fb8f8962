//! What a newcomer does first, done the way they do it: the README's first
//! command on the checkout with no `SOCKETS_*` setting, then every command
//! of its "Trying it" section; and the binary started with no settings at
//! all in a fresh folder. Both listen on the default address (PROTOCOL §9:
//! 127.0.0.1:8080), so they run one after the other in one test.
//!
//! A suite that only started the server with its own settings once hid
//! that the first command crashed (a relative default data folder).

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use sockets_tests::client::{Client, http, publish};
use sockets_tests::server::{Server, listening_addr, scratch_dir};
use sockets_tests::{as_newcomer, eventually, host_binary, workspace_root};

const DEFAULT_ADDR: &str = "127.0.0.1:8080";
const LISTENING: &str = "sockets-host listening on http://";

#[tokio::test(flavor = "multi_thread")]
async fn a_newcomer_runs_the_readme_and_the_bare_binary() {
    assert!(
        std::net::TcpListener::bind(DEFAULT_ADDR).is_ok(),
        "{DEFAULT_ADDR} is taken: this test runs the server on its default address; stop whatever listens there"
    );
    readme_first_command_and_trying_it().await;
    bare_binary_in_a_fresh_folder().await;
}

/// `scripts/run.sh` from the checkout, then the "Trying it" commands.
async fn readme_first_command_and_trying_it() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let first = section(&readme, "## Two commands");
    assert!(
        first.contains("\nscripts/run.sh\n") || first.contains("   scripts/run.sh\n"),
        "the README's first command is no longer scripts/run.sh; update this test with it"
    );
    let trying = section(&readme, "## Trying it");
    let blocks = shell_blocks(trying);
    assert!(
        blocks.len() >= 2,
        "\"Trying it\" should show the demo and the by-hand commands: {blocks:?}"
    );

    let mut command = as_newcomer("bash");
    command.arg("scripts/run.sh").current_dir(workspace_root());
    let data_dir = workspace_root().join("data");
    // A build may come first when the tests' own build left something to do.
    let server = start_as_newcomer(
        command,
        &scratch_dir("readme").join("run.log"),
        &data_dir,
        Duration::from_secs(900),
    )
    .await;
    assert_eq!(server.addr.to_string(), DEFAULT_ADDR);
    wait_ready(&server).await;
    let startup = server.log();
    assert!(
        startup.contains(&format!("data_dir={}", data_dir.display())),
        "the start-up log shows the resolved data folder:\n{startup}"
    );
    assert!(
        data_dir.join("dev-jwt-secret").is_file(),
        "dev mode keeps its secret in ./data"
    );

    assert_demo_page_served(&server).await;

    // Tokens as the README mints them, from the checkout.
    let student_token = readme_token("s_1", "student");
    let consultant_token = readme_token("c_1", "consultant");
    let (mut student, connected) = Client::connect(&server, &student_token).await;
    assert_eq!(connected["data"]["userId"], "s_1");
    let (mut consultant, _) = Client::connect(&server, &consultant_token).await;
    exchange_a_message(&mut student, &mut consultant, "c_1").await;

    // The demo example: it talks to the same users, so both clients see it.
    let demo = run_block(blocks[0]);
    for expected in [
        r#""event":"message""#,
        "202",
        r#""event":"paymentProcessed""#,
    ] {
        assert!(
            demo.contains(expected),
            "demo output lacks {expected}:\n{demo}"
        );
    }
    let demo_message = consultant.recv().await;
    assert_eq!(demo_message["event"], "message", "{demo_message}");
    let demo_payment = next_event(&mut student, "paymentProcessed").await;
    assert_eq!(
        demo_payment["data"]["consultantId"], "c_1",
        "{demo_payment}"
    );

    // The by-hand commands: `token` twice and the `curl` publish.
    let by_hand = blocks
        .iter()
        .find(|block| block.contains("curl"))
        .expect("a curl publish in \"Trying it\"");
    let answer = run_block(by_hand);
    let answer: Value = serde_json::from_str(answer.trim())
        .unwrap_or_else(|err| panic!("curl printed no JSON ({err}): {answer}"));
    assert_eq!(answer["recipients"], 1, "{answer}");
    let payment = next_event(&mut student, "paymentProcessed").await;
    // The README's payment, not the demo's: no consultant, no studentId.
    assert_eq!(
        payment["data"],
        json!({"paymentId": "p_1", "amount": 4900, "currency": "USD"}),
        "{payment}"
    );

    // The browser snippet, run by Node (whose WebSocket is the browser's).
    let snippet = code_blocks(trying, "js")
        .into_iter()
        .next()
        .expect("a JavaScript client in \"Trying it\"");
    assert!(snippet.contains("\"PASTE $TOKEN\""), "{snippet}");
    let snippet = snippet.replace("\"PASTE $TOKEN\"", &json!(student_token).to_string());
    let replied = run_javascript(&format!(
        "{snippet}\n\
         ws.addEventListener('message', (f) => {{ if (JSON.parse(f.data).ack === 1) process.exit(0); }});\n\
         setTimeout(() => process.exit(1), 10000);",
    ));
    assert!(replied.contains("event: 'connected'"), "{replied}");
    assert!(
        replied.contains("ack: 1") && replied.contains("ok: true"),
        "{replied}"
    );
    // After the demo's messages (and its `c_1`'s copies to this one).
    let mut texts = Vec::new();
    while texts.last() != Some(&json!("hello")) {
        assert!(
            texts.len() < 10,
            "the snippet's message never came: {texts:?}"
        );
        texts.push(next_event(&mut consultant, "message").await["data"]["text"].clone());
    }

    assert!(server.stop().await, "SIGTERM ends the server with success");
}

/// The README sends newcomers to `/demo`: the page and its sign-in are on.
async fn assert_demo_page_served(server: &Server) {
    let page = http(server, "GET", "/demo", &[], b"").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let session = http(server, "GET", "/demo/session", &[], b"").await.json();
    assert_eq!(session["signIn"], true, "{session}");
}

/// Runs a script with Node (its WebSocket behind a flag before Node 22);
/// its stdout.
fn run_javascript(script: &str) -> String {
    let version = stdout_of({
        let mut command = std::process::Command::new("node");
        command.arg("--version");
        command
    });
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("node --version said {version}"));
    let mut command = as_newcomer("node");
    if major < 22 {
        command.arg("--experimental-websocket");
    }
    command.args(["-e", script]);
    stdout_of(command)
}

/// `sockets-host` with no arguments and no settings in an empty folder:
/// every default path resolved against it, or against the build.
async fn bare_binary_in_a_fresh_folder() {
    let folder = scratch_dir("fresh-folder");
    let mut command = as_newcomer(host_binary());
    command.current_dir(&folder);
    let data_dir = folder.join("data");
    let server = start_as_newcomer(
        command,
        &folder.join("stderr.log"),
        &data_dir,
        Duration::from_secs(60),
    )
    .await;
    wait_ready(&server).await;
    assert_demo_page_served(&server).await;
    for made in ["dev-jwt-secret", "plugin-cache", "notifications"] {
        assert!(
            data_dir.join(made).exists(),
            "{made} in the default data folder {}",
            data_dir.display()
        );
    }

    let token = |sub: &str, role: &str| {
        let mut command = as_newcomer(host_binary());
        command
            .args(["token", "--sub", sub, "--role", role])
            .current_dir(&folder);
        stdout_of(command)
    };
    let (mut student, _) = Client::connect(&server, &token("s_2", "student")).await;
    let (mut consultant, _) = Client::connect(&server, &token("c_2", "consultant")).await;
    exchange_a_message(&mut student, &mut consultant, "c_2").await;
    let answer = publish(
        &server,
        &token("billing", "service"),
        &json!({"event": "PAYMENT_PROCESSED", "data": {"paymentId": "p_9", "studentId": "s_2"}}),
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let payment = next_event(&mut student, "paymentProcessed").await;
    assert_eq!(payment["data"]["paymentId"], "p_9");
    assert!(server.stop().await, "SIGTERM ends the server with success");
}

/// Starts `command` (a server on its defaults), its stderr to `log`, and
/// waits up to `wait` for its listening line.
async fn start_as_newcomer(
    mut command: std::process::Command,
    log: &std::path::Path,
    data_dir: &std::path::Path,
    wait: Duration,
) -> Server {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the server: {err}"));
    let addr = listening_addr(&mut child, LISTENING, wait, log).await;
    Server::adopt(
        child,
        addr,
        data_dir.to_owned(),
        sockets_host::config::default_plugins_dir(),
        log.to_owned(),
    )
}

/// The student writes to consultant `to`, who receives it; the ack counts
/// the consultant's one connection.
async fn exchange_a_message(student: &mut Client, consultant: &mut Client, to: &str) {
    student
        .send(&json!({"event": "sendMessage", "data": {"to": to, "text": "hello"}, "ack": 1}))
        .await;
    let reply = student.recv().await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"]["delivered"], 1, "{reply}");
    let message = consultant.recv().await;
    assert_eq!(message["event"], "message", "{message}");
    assert_eq!(message["data"]["text"], "hello");
    assert_eq!(message["data"]["to"], to);
}

async fn next_event(client: &mut Client, event: &str) -> Value {
    for _ in 0..10 {
        let frame = client.recv().await;
        if frame["event"] == event {
            return frame;
        }
    }
    panic!("no {event} among the next 10 frames");
}

async fn wait_ready(server: &Server) {
    eventually(Duration::from_secs(30), "/readyz answers 200", || async {
        (http(server, "GET", "/readyz", &[], b"").await.status == 200).then_some(())
    })
    .await;
}

/// A token minted the way the README says:
/// `cargo run -q -p sockets-host -- token --sub ID --role ROLE`.
fn readme_token(sub: &str, role: &str) -> String {
    let mut command = as_newcomer(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .args(["run", "-q", "-p", "sockets-host", "--", "token"])
        .args(["--sub", sub, "--role", role])
        .current_dir(workspace_root());
    stdout_of(command)
}

/// Runs a README shell block with bash in the checkout; its stdout.
fn run_block(block: &str) -> String {
    let mut command = as_newcomer("bash");
    command
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(workspace_root());
    stdout_of(command)
}

fn stdout_of(mut command: std::process::Command) -> String {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The text of a README section, from its heading to the next heading of
/// the same level.
fn section<'a>(readme: &'a str, heading: &str) -> &'a str {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the README has no {heading} section"));
    let body = &readme[start + heading.len() + 2..];
    let end = body.find("\n## ").unwrap_or(body.len());
    &body[..end]
}

/// The ```sh blocks of a README section.
fn shell_blocks(section: &str) -> Vec<&str> {
    code_blocks(section, "sh")
}

/// The code blocks of `language` in a README section.
fn code_blocks<'a>(section: &'a str, language: &str) -> Vec<&'a str> {
    section
        .split(&format!("```{language}\n"))
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .collect()
}
