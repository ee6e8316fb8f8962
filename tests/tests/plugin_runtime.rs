//! The plugin runtime against real components compiled from source: the
//! bundled plugins' outcomes for the PROTOCOL examples, and isolation of
//! plugins that loop, hoard memory, panic or return garbage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sockets_host::plugin::{
    CallError, ClientOrigin, DispatchError, Event, HostServices, LoadError, LoadedPlugin, Origin,
    Outcome, PluginLimits, PluginRegistry, PluginRuntime, Recipient, RefusalCode,
};
use sockets_host::store::directory::User;
use sockets_host::store::plugin_state::{MemoryPluginState, PluginState};
use sockets_tests::plugin_wasm;

/// A directory of two students and a consultant; `c_1` has two connections.
struct Services {
    users: HashMap<String, User>,
    state: MemoryPluginState,
}

impl Services {
    fn new() -> Self {
        let user = |id: &str, role: &str| {
            (
                id.to_owned(),
                User {
                    id: id.to_owned(),
                    role: role.to_owned(),
                    name: None,
                },
            )
        };
        Self {
            users: [
                user("s_1", "student"),
                user("s_2", "student"),
                user("c_1", "consultant"),
            ]
            .into_iter()
            .collect(),
            state: MemoryPluginState::default(),
        }
    }
}

impl HostServices for Services {
    fn get_user(&self, id: &str) -> Option<User> {
        self.users.get(id).cloned()
    }

    fn connection_count(&self, user_id: &str) -> u32 {
        if user_id == "c_1" { 2 } else { 0 }
    }

    fn plugin_state(&self) -> &dyn PluginState {
        &self.state
    }
}

fn runtime() -> PluginRuntime {
    PluginRuntime::new(PluginLimits::default(), Arc::new(Services::new()), None).unwrap()
}

fn load(runtime: &PluginRuntime, crate_name: &str) -> LoadedPlugin {
    load_with_config(runtime, crate_name, "{}")
}

fn load_with_config(runtime: &PluginRuntime, crate_name: &str, config: &str) -> LoadedPlugin {
    let wasm = std::fs::read(plugin_wasm(crate_name)).unwrap();
    runtime.load(crate_name, &wasm, config).unwrap()
}

fn event(name: &str, origin: Origin, data: Value) -> Event {
    Event {
        id: "evt-42".to_owned(),
        name: name.to_owned(),
        origin,
        data: data.to_string(),
        received_at: "2026-11-26T10:00:00Z".to_owned(),
    }
}

fn client(user_id: &str, role: &str) -> Origin {
    Origin::Client(ClientOrigin {
        user_id: user_id.to_owned(),
        role: role.to_owned(),
        connection_id: format!("conn-{user_id}"),
    })
}

fn data_of(outcome: &Outcome, index: usize) -> Value {
    serde_json::from_str(outcome.deliveries[index].data.get()).unwrap()
}

#[test]
fn payments_plugin_turns_the_protocol_example_into_the_protocol_push() {
    let runtime = runtime();
    let plugin = load(&runtime, "payments");
    assert_eq!(plugin.subscriptions(), ["PAYMENT_PROCESSED"]);
    assert_eq!(plugin.label().as_ref(), "payments@0.1.0");

    let outcome = plugin
        .handle(&event(
            "PAYMENT_PROCESSED",
            Origin::Broker,
            json!({"paymentId":"p_1","studentId":"s_1","consultantId":"c_1","amount":4900,"currency":"USD","status":"succeeded"}),
        ))
        .unwrap();

    assert_eq!(outcome.deliveries.len(), 1);
    assert_eq!(outcome.deliveries[0].event, "paymentProcessed");
    assert_eq!(outcome.deliveries[0].to, [Recipient::User("s_1".into())]);
    assert_eq!(
        data_of(&outcome, 0),
        json!({"paymentId":"p_1","amount":4900,"currency":"USD","status":"succeeded","consultantId":"c_1"})
    );
}

#[test]
fn reviews_plugin_turns_the_protocol_example_into_the_protocol_push() {
    let runtime = runtime();
    let plugin = load(&runtime, "reviews");
    let outcome = plugin
        .handle(&event(
            "REVIEW_ADDED",
            Origin::Api("reviews-service".into()),
            json!({"reviewId":"r_1","consultantId":"c_1","studentId":"s_1","rating":5,"comment":"Great session"}),
        ))
        .unwrap();

    assert_eq!(outcome.deliveries[0].event, "reviewAdded");
    assert_eq!(outcome.deliveries[0].to, [Recipient::User("c_1".into())]);
    assert_eq!(
        data_of(&outcome, 0),
        json!({"reviewId":"r_1","studentId":"s_1","rating":5,"comment":"Great session"})
    );
}

#[test]
fn chat_plugin_routes_a_message_and_asks_for_the_delivered_count() {
    let runtime = runtime();
    let plugin = load(&runtime, "chat");
    let outcome = plugin
        .handle(&event(
            "sendMessage",
            client("s_1", "student"),
            json!({"to":"c_1","text":"hello","from":"c_1"}),
        ))
        .unwrap();

    assert_eq!(outcome.deliveries[0].event, "message");
    assert_eq!(
        outcome.deliveries[0].to,
        [Recipient::User("c_1".into()), Recipient::SenderOthers]
    );
    assert_eq!(
        data_of(&outcome, 0),
        json!({"messageId":"evt-42","from":"s_1","fromRole":"student","to":"c_1","text":"hello","sentAt":"2026-11-26T10:00:00Z"})
    );
    let reply = outcome.reply.unwrap();
    assert_eq!(reply.data.get(), r#"{"messageId":"evt-42"}"#);
    assert_eq!(reply.delivered_field.as_deref(), Some("delivered"));
}

#[test]
fn chat_plugin_refusals_carry_protocol_codes_in_protocol_order() {
    let runtime = runtime();
    let plugin = load(&runtime, "chat");
    let cases = [
        (json!({"to":"nobody","text":""}), RefusalCode::BadRequest),
        (json!({"to":"nobody","text":"hi"}), RefusalCode::NotFound),
        (json!({"to":"s_2","text":"hi"}), RefusalCode::Forbidden),
        (json!({"to":"s_1","text":"hi"}), RefusalCode::BadRequest),
    ];
    for (data, expected) in cases {
        let result = plugin.handle(&event(
            "sendMessage",
            client("s_1", "student"),
            data.clone(),
        ));
        match result {
            Err(CallError::Refused { code, .. }) => assert_eq!(code, expected, "data: {data}"),
            other => panic!("data {data}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn chat_plugin_reads_its_rules_from_its_configuration() {
    let runtime = runtime();
    let plugin = load_with_config(
        &runtime,
        "chat",
        r#"{"allow":[{"from":"student","to":"student"}]}"#,
    );
    let student_to_student = event(
        "sendMessage",
        client("s_1", "student"),
        json!({"to":"s_2","text":"hi"}),
    );
    assert!(plugin.handle(&student_to_student).is_ok());
    let student_to_consultant = event(
        "sendMessage",
        client("s_1", "student"),
        json!({"to":"c_1","text":"hi"}),
    );
    assert!(matches!(
        plugin.handle(&student_to_consultant),
        Err(CallError::Refused {
            code: RefusalCode::Forbidden,
            ..
        })
    ));
}

fn misbehave(plugin: &LoadedPlugin, name: &str) -> CallError {
    plugin
        .handle(&event(name, Origin::Broker, json!(null)))
        .expect_err("the plugin should have failed")
}

fn still_serves(plugin: &LoadedPlugin) {
    let outcome = plugin
        .handle(&event("ok", Origin::Broker, json!({"n": 1})))
        .expect("the plugin keeps serving after a failure");
    assert_eq!(data_of(&outcome, 0), json!({"n": 1}));
}

#[test]
fn an_infinite_loop_is_interrupted_at_the_deadline_and_the_plugin_keeps_serving() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    let started = Instant::now();
    let error = misbehave(&plugin, "spin");
    let elapsed = started.elapsed();

    assert!(
        matches!(error, CallError::Timeout(limit) if limit == Duration::from_millis(50)),
        "{error:?}"
    );
    // The deadline is 50 ms in 5 ms epochs; a generous bound keeps this
    // robust on a loaded machine while still proving the loop was stopped.
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    still_serves(&plugin);
    assert_eq!(plugin.stats().snapshot().timeouts, 1);
}

#[test]
fn a_plugin_that_sleeps_traps_at_once() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    let started = Instant::now();
    let error = misbehave(&plugin, "sleep");
    let elapsed = started.elapsed();
    assert!(
        matches!(&error, CallError::Trapped(why) if why.contains("may not wait")),
        "{error:?}"
    );
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    still_serves(&plugin);
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    let error = misbehave(&plugin, "grow");
    assert!(
        matches!(error, CallError::OutOfMemory(bytes) if bytes == 32 << 20),
        "{error:?}"
    );
    still_serves(&plugin);
    assert_eq!(plugin.stats().snapshot().out_of_memory, 1);
}

#[test]
fn a_panic_is_an_isolated_trap() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    let error = misbehave(&plugin, "panic");
    assert!(matches!(error, CallError::Trapped(_)), "{error:?}");
    assert!(error.is_malfunction());
    still_serves(&plugin);
}

#[test]
fn oversized_or_invalid_outcomes_are_rejected_with_the_reason() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    for (name, reason) in [
        ("oversized", "payload of"),
        ("notJson", "not JSON"),
        ("badEventName", "event name"),
    ] {
        match misbehave(&plugin, name) {
            CallError::InvalidOutcome(why) => assert!(why.contains(reason), "{name}: {why}"),
            other => panic!("{name}: expected an invalid outcome, got {other:?}"),
        }
    }
    still_serves(&plugin);
    assert_eq!(plugin.stats().snapshot().invalid_outcomes, 3);
}

#[test]
fn what_a_call_returns_is_bounded_before_the_host_copies_it() {
    // Caps below the plugin's 1 MiB payload: the copy out of the plugin
    // is refused while lifting (wasmtime's hostcall fuel), not after a
    // whole outcome was copied (which a crafted component could make
    // 80 GB by pointing 10,000 deliveries at one string).
    let limits = PluginLimits {
        max_outcome_bytes: 64 << 10,
        ..PluginLimits::default()
    };
    assert!(limits.copy_bytes() < 1 << 20, "{}", limits.copy_bytes());
    let runtime = PluginRuntime::new(limits, Arc::new(Services::new()), None).unwrap();
    let plugin = load(&runtime, "misbehaving");
    match misbehave(&plugin, "oversized") {
        CallError::InvalidOutcome(why) => {
            assert!(why.contains("to copy out of the plugin"), "{why}");
        }
        other => panic!("expected an invalid outcome, got {other:?}"),
    }
    still_serves(&plugin);
}

#[test]
fn a_refusal_is_not_a_malfunction() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    let error = misbehave(&plugin, "refuse");
    assert!(
        matches!(&error, CallError::Refused { code: RefusalCode::Forbidden, message } if message == "refused on purpose")
    );
    assert!(!error.is_malfunction());
}

#[test]
fn plugins_get_no_environment_and_no_filesystem() {
    let runtime = runtime();
    let plugin = load(&runtime, "misbehaving");
    let outcome = plugin
        .handle(&event("sandbox", Origin::Broker, json!(null)))
        .unwrap();
    assert_eq!(
        data_of(&outcome, 0),
        json!({"envVars": 0, "canListRoot": false, "canReadFile": false})
    );
}

#[test]
fn plugins_read_their_configuration_through_the_host() {
    let runtime = runtime();
    let plugin = load_with_config(&runtime, "misbehaving", r#"{"greeting":"hi"}"#);
    let outcome = plugin
        .handle(&event("config", Origin::Broker, json!(null)))
        .unwrap();
    assert_eq!(data_of(&outcome, 0), json!({"greeting": "hi"}));
}

#[test]
fn a_component_of_another_world_is_refused_at_load_with_the_reason() {
    let runtime = runtime();
    let wasm = std::fs::read(plugin_wasm("wrong-world")).unwrap();
    let error = runtime.load("wrong-world", &wasm, "{}").unwrap_err();
    assert!(matches!(error, LoadError::WrongWorld(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("sockets:plugin/plugin@0.1.0"), "{message}");
    assert!(
        message.contains("info") || message.contains("handle"),
        "{message}"
    );
}

#[test]
fn bytes_that_are_not_a_component_are_refused_at_load() {
    let runtime = runtime();
    let error = runtime
        .load("garbage", b"definitely not wasm", "{}")
        .unwrap_err();
    assert!(matches!(error, LoadError::Compile(_)), "{error:?}");
}

#[test]
fn a_configuration_that_is_not_json_is_refused_at_load() {
    let runtime = runtime();
    let wasm = std::fs::read(plugin_wasm("chat")).unwrap();
    let error = runtime.load("chat", &wasm, "{not json").unwrap_err();
    assert!(matches!(error, LoadError::Config(_)), "{error:?}");
}

#[test]
fn warm_instances_serve_concurrent_callers() {
    let runtime = runtime();
    let plugin = load(&runtime, "chat");
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let plugin = &plugin;
            scope.spawn(move || {
                for i in 0..200 {
                    let text = format!("message {thread}/{i}");
                    let outcome = plugin
                        .handle(&event(
                            "sendMessage",
                            client("s_1", "student"),
                            json!({"to":"c_1","text":text}),
                        ))
                        .unwrap();
                    assert_eq!(data_of(&outcome, 0)["text"], text.as_str());
                }
            });
        }
    });
    let stats = plugin.stats().snapshot();
    assert_eq!(stats.calls, 800);
    assert_eq!(stats.malfunctions(), 0);
}

#[test]
fn the_registry_merges_plugins_subscribed_to_one_event_in_name_order() {
    let runtime = runtime();
    let chat = std::fs::read(plugin_wasm("chat")).unwrap();
    let registry = PluginRegistry::new();
    registry.install(runtime.load("chat-b", &chat, "{}").unwrap());
    registry.install(runtime.load("chat-a", &chat, "{}").unwrap());
    registry.install(load(&runtime, "payments"));

    let set = registry.snapshot();
    let labels: Vec<_> = set
        .handlers("sendMessage")
        .iter()
        .map(|p| p.name().to_owned())
        .collect();
    assert_eq!(labels, ["chat-a", "chat-b"]);

    let decision = set
        .dispatch(&event(
            "sendMessage",
            client("s_1", "student"),
            json!({"to":"c_1","text":"hi"}),
        ))
        .unwrap();
    let deciders: Vec<_> = decision
        .deliveries
        .iter()
        .map(|d| d.plugin.as_ref())
        .collect();
    assert_eq!(deciders, ["chat-a@0.1.0", "chat-b@0.1.0"]);
    assert!(decision.reply.is_some());

    assert!(matches!(
        set.dispatch(&event("NOBODY_LISTENS", Origin::Broker, json!(null))),
        Err(DispatchError::NoHandler(_))
    ));

    // All or nothing: chat-b allows nobody, so the event fails as a whole
    // and chat-a's delivery is not made either.
    let strict = PluginRegistry::new();
    strict.install(runtime.load("chat-a", &chat, "{}").unwrap());
    strict.install(runtime.load("chat-b", &chat, r#"{"allow":[]}"#).unwrap());
    let refused = strict.snapshot().dispatch(&event(
        "sendMessage",
        client("s_1", "student"),
        json!({"to":"c_1","text":"hi"}),
    ));
    match refused {
        Err(DispatchError::Plugin { plugin, .. }) => assert_eq!(&*plugin, "chat-b@0.1.0"),
        other => panic!("one refusal fails the event: {other:?}"),
    }
}

#[test]
fn a_swap_leaves_held_snapshots_on_the_old_version() {
    let runtime = runtime();
    let registry = PluginRegistry::new();
    registry.install(load_with_config(&runtime, "misbehaving", r#"{"v":1}"#));
    let before = registry.snapshot();
    let replaced = registry.install(load_with_config(&runtime, "misbehaving", r#"{"v":2}"#));
    assert_eq!(replaced.unwrap().config(), r#"{"v":1}"#);

    let config_event = event("config", Origin::Broker, json!(null));
    let old = before.dispatch(&config_event).unwrap();
    let new = registry.snapshot().dispatch(&config_event).unwrap();
    assert_eq!(old.deliveries[0].delivery.data.get(), r#"{"v":1}"#);
    assert_eq!(new.deliveries[0].delivery.data.get(), r#"{"v":2}"#);

    assert!(registry.remove("misbehaving").is_some());
    assert!(registry.snapshot().handlers("config").is_empty());
}
