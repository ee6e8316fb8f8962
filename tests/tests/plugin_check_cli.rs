//! `sockets-host plugin check` (PROTOCOL.md §9), run as an operator would.

use std::process::Output;

use serde_json::{Value, json};
use sockets_tests::{host_binary, plugin_wasm};

fn check(plugin: &str, args: &[&str]) -> Output {
    std::process::Command::new(host_binary())
        .args(["plugin", "check"])
        .arg(plugin_wasm(plugin))
        .args(args)
        .env_remove("SOCKETS_USERS_FILE")
        .output()
        .expect("sockets-host runs")
}

/// `sendMessage` from student `s_1` with `data`, through the chat plugin.
fn student_sends(data: &str) -> Output {
    let args = [
        "--event",
        "sendMessage",
        "--user",
        "s_1",
        "--role",
        "student",
    ];
    check("chat", &[&args[..], &["--data", data]].concat())
}

fn report(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not a JSON report ({err}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn without_an_event_it_prints_the_subscriptions() {
    let output = check("reviews", &[]);
    assert!(output.status.success());
    let report = report(&output);
    assert_eq!(report["plugin"], "reviews@0.1.0");
    assert_eq!(report["subscriptions"], json!(["REVIEW_ADDED"]));
    assert_eq!(report["sha256"].as_str().map(str::len), Some(64));
}

#[test]
fn payments_sample_event_gives_the_protocol_push() {
    let data = r#"{"paymentId":"p_1","studentId":"s_1","consultantId":"c_1","amount":4900,"currency":"USD","status":"succeeded"}"#;
    let output = check(
        "payments",
        &["--event", "PAYMENT_PROCESSED", "--data", data],
    );
    assert!(output.status.success());
    let delivery = &report(&output)["outcome"]["deliveries"][0];
    assert_eq!(delivery["to"], json!([{"user": "s_1"}]));
    assert_eq!(delivery["event"], "paymentProcessed");
    assert_eq!(
        delivery["data"],
        json!({"paymentId":"p_1","amount":4900,"currency":"USD","status":"succeeded","consultantId":"c_1"})
    );
}

#[test]
fn reviews_sample_event_gives_the_protocol_push() {
    let data = r#"{"reviewId":"r_1","consultantId":"c_1","studentId":"s_1","rating":5,"comment":"Great session"}"#;
    let output = check("reviews", &["--event", "REVIEW_ADDED", "--data", data]);
    assert!(output.status.success());
    let delivery = &report(&output)["outcome"]["deliveries"][0];
    assert_eq!(delivery["to"], json!([{"user": "c_1"}]));
    assert_eq!(delivery["event"], "reviewAdded");
    assert_eq!(
        delivery["data"],
        json!({"reviewId":"r_1","studentId":"s_1","rating":5,"comment":"Great session"})
    );
}

#[test]
fn chat_sample_event_uses_the_demo_directory() {
    let output = student_sends(r#"{"to":"c_1","text":"hello"}"#);
    assert!(output.status.success());
    let outcome = &report(&output)["outcome"];
    assert_eq!(
        outcome["deliveries"][0]["to"],
        json!([{"user": "c_1"}, "senderOthers"])
    );
    assert_eq!(outcome["deliveries"][0]["data"]["text"], "hello");
    assert_eq!(outcome["deliveries"][0]["data"]["fromRole"], "student");
    assert_eq!(outcome["reply"]["deliveredField"], "delivered");
}

#[test]
fn a_refusal_is_reported_with_its_code_and_a_failing_exit_status() {
    let output = student_sends(r#"{"to":"ghost","text":"hi"}"#);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(report(&output)["error"]["code"], "not_found");
}

#[test]
fn a_trap_is_reported_as_plugin_failed() {
    let output = check("misbehaving", &["--event", "panic"]);
    assert_eq!(output.status.code(), Some(1));
    let error = &report(&output)["error"];
    assert_eq!(error["code"], "plugin_failed");
    assert!(
        error["message"].as_str().unwrap().contains("unreachable"),
        "{error}"
    );
}

#[test]
fn an_event_the_plugin_does_not_subscribe_to_is_unknown() {
    let output = check("payments", &["--event", "REVIEW_ADDED", "--data", "{}"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(report(&output)["error"]["code"], "unknown_event");
}

#[test]
fn a_component_of_another_world_is_refused_with_the_reason() {
    let output = check("wrong-world", &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not implement the world"), "{stderr}");
    assert!(stderr.contains("handle"), "{stderr}");
}
