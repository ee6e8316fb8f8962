//! One `handle` call of the chat plugin with a ~200-byte event, measured side
//! by side: the same plugin logic as native Rust, a warm component call
//! through the runtime (the production path), and a fresh instance per call.
//!
//! Run: `cargo bench -p sockets-tests --bench plugin_call`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sockets_host::plugin::{
    ClientOrigin, Event, HostServices, Origin, PluginLimits, PluginRuntime,
};
use sockets_host::store::directory::User;
use sockets_host::store::plugin_state::{MemoryPluginState, PluginState};
use sockets_sdk::Plugin as _;
use sockets_tests::plugin_wasm;

/// About 200 bytes, as in the DESIGN.md measurements.
const DATA: &str = r#"{"to":"c_1","text":"Hello! Could we move tomorrow's session to 15:00? I would like to go over the mock interview feedback and the CV changes we discussed last week."}"#;

#[derive(Default)]
struct Directory {
    state: MemoryPluginState,
}

impl HostServices for Directory {
    fn get_user(&self, id: &str) -> Option<User> {
        (id == "c_1").then(|| User {
            id: id.to_owned(),
            role: "consultant".to_owned(),
            name: None,
        })
    }

    fn connection_count(&self, _user_id: &str) -> u32 {
        1
    }

    fn plugin_state(&self) -> &dyn PluginState {
        &self.state
    }
}

fn event() -> Event {
    Event {
        id: "0192f5e2-7c3a-7d4e-9b1a-3f2e1d0c9b8a".to_owned(),
        name: "sendMessage".to_owned(),
        origin: Origin::Client(ClientOrigin {
            user_id: "s_1".to_owned(),
            role: "student".to_owned(),
            connection_id: "conn-1".to_owned(),
        }),
        data: DATA.to_owned(),
        received_at: "2026-11-26T10:00:00Z".to_owned(),
    }
}

/// Set to a `chat.wasm` to measure that build instead of the workspace's
/// (two builds of the plugin, compared with the same bench binary).
const CHAT_WASM_VAR: &str = "PLUGIN_CALL_CHAT_WASM";

fn plugin_call(c: &mut Criterion) {
    let chat_path = std::env::var_os(CHAT_WASM_VAR).map_or_else(|| plugin_wasm("chat"), Into::into);
    let wasm = std::fs::read(&chat_path)
        .unwrap_or_else(|err| panic!("chat plugin {}: {err}", chat_path.display()));
    let event = event();
    let mut group = c.benchmark_group("chat_handle");

    let native_host = sockets_sdk::testing::TestHost::new().with_user("c_1", "consultant");
    let native_event = sockets_sdk::testing::client_event("sendMessage", "s_1", "student", DATA);
    group.bench_function("native", |b| {
        b.iter(|| chat::Chat::handle(black_box(&native_event), &native_host).unwrap())
    });

    let runtime = PluginRuntime::new(
        PluginLimits::default(),
        Arc::new(Directory::default()),
        None,
    )
    .unwrap();
    let warm = runtime.load("chat", &wasm, "{}").unwrap();
    group.bench_function("component_warm", |b| {
        b.iter(|| warm.handle(black_box(&event)).unwrap())
    });

    // The same call shape with (almost) no plugin logic: the cost of the
    // component boundary and the host's outcome checks.
    let echo_wasm = std::fs::read(plugin_wasm("misbehaving")).expect("misbehaving plugin built");
    let echo = runtime.load("misbehaving", &echo_wasm, "{}").unwrap();
    let echo_event = Event {
        name: "ok".to_owned(),
        ..event.clone()
    };
    group.bench_function("component_warm_echo", |b| {
        b.iter(|| echo.handle(black_box(&echo_event)).unwrap())
    });

    let no_pool = PluginLimits {
        max_idle_instances: 0,
        ..PluginLimits::default()
    };
    let runtime = PluginRuntime::new(no_pool, Arc::new(Directory::default()), None).unwrap();
    let fresh = runtime.load("chat", &wasm, "{}").unwrap();
    group.bench_function("component_fresh_instance", |b| {
        b.iter(|| fresh.handle(black_box(&event)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, plugin_call);
criterion_main!(benches);
