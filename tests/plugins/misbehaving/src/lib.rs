//! A plugin that misbehaves on demand, one way per event name, so the
//! runtime's isolation can be tested with a real component. `ok` always
//! works, to show the plugin keeps serving after each misbehaviour.

use sockets_sdk::{Delivery, Event, Failure, Host, Outcome, Plugin};

/// The misbehaving plugin.
pub struct Misbehaving;

impl Plugin for Misbehaving {
    const SUBSCRIPTIONS: &'static [&'static str] = &[
        "ok",
        "spin",
        "grow",
        "panic",
        "oversized",
        "notJson",
        "badEventName",
        "sandbox",
        "refuse",
        "config",
        "print",
        "logFlood",
        "sleep",
    ];

    fn handle(event: &Event, host: &dyn Host) -> Result<Outcome, Failure> {
        let echo = |data: &str| Delivery {
            to: vec![sockets_sdk::Recipient::User("u_1".into())],
            event: "echo".into(),
            data: data.into(),
            ephemeral: false,
        };
        match event.name.as_str() {
            "ok" => Ok(Outcome::new().deliver(echo(&event.data))),
            "spin" => {
                let mut counter: u64 = 0;
                loop {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("this plugin panics on purpose"),
            "oversized" => {
                Ok(Outcome::new().deliver(echo(&format!("\"{}\"", "x".repeat(1 << 20)))))
            }
            "notJson" => Ok(Outcome::new().deliver(echo("{this is not json"))),
            "badEventName" => {
                let mut delivery = echo("1");
                delivery.event = "has spaces".into();
                Ok(Outcome::new().deliver(delivery))
            }
            "sandbox" => {
                let env_vars = std::env::vars().count();
                let root_listing = std::fs::read_dir("/").is_ok();
                let read_file = std::fs::read("/etc/passwd").is_ok();
                let data = serde_json::json!({"envVars": env_vars, "canListRoot": root_listing, "canReadFile": read_file});
                Ok(Outcome::new().deliver(echo(&data.to_string())))
            }
            "refuse" => Err(Failure::forbidden("refused on purpose")),
            "config" => Ok(Outcome::new().deliver(echo(&host.config()))),
            // Not misbehaving, but WASI's blocking I/O: the host must run it
            // off its async workers.
            "print" => {
                println!("a plugin printing to stdout");
                eprintln!("and to stderr");
                Ok(Outcome::new().deliver(echo(&event.data)))
            }
            // Waits in the host (a WASI clock subscription): out of reach of
            // the epoch deadline, which interrupts guest code only.
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(8));
                Ok(Outcome::new().deliver(echo(&event.data)))
            }
            // A thousand lines, each trying to forge a line of its own and
            // to write terminal escapes.
            "logFlood" => {
                for n in 0..1000 {
                    host.log(
                        sockets_sdk::Level::Warn,
                        &format!("flood {n}\nFORGED host line\u{1b}[31m red"),
                    );
                }
                Ok(Outcome::new().deliver(echo(&event.data)))
            }
            _ => Err(Failure::bad_request("unexpected event")),
        }
    }
}

sockets_sdk::export_plugin!(Misbehaving);
