//! A native stand-in for the host, so plugin logic is unit-tested with plain
//! `cargo test`, no WebAssembly involved.
//!
//! ```
//! use sockets_sdk::testing::{client_event, TestHost};
//!
//! let host = TestHost::new().with_user("c_1", "consultant").with_connections("c_1", 2);
//! let event = client_event("sendMessage", "s_1", "student", r#"{"to":"c_1","text":"hi"}"#);
//! assert_eq!(event.client().unwrap().user_id, "s_1");
//! # let _ = host;
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use crate::{Client, Event, Host, Level, Origin, StateError, User};

/// The timestamp given to test events.
pub const TEST_RECEIVED_AT: &str = "2026-01-01T00:00:00Z";

/// A fake host: a user directory, presence counts, a configuration and a
/// captured log, all set by the test.
#[derive(Debug, Default)]
pub struct TestHost {
    users: HashMap<String, User>,
    connections: HashMap<String, u32>,
    config: Option<String>,
    logs: RefCell<Vec<(Level, String)>>,
    /// Plugin state; TTLs are recorded, not enforced (tests control time).
    state: RefCell<HashMap<String, (String, Option<u64>)>>,
}

impl TestHost {
    /// An empty directory, nobody online, no configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a user to the directory.
    pub fn with_user(mut self, id: &str, role: &str) -> Self {
        self.users.insert(
            id.to_owned(),
            User {
                id: id.to_owned(),
                role: role.to_owned(),
                name: None,
            },
        );
        self
    }

    /// Sets how many live connections `user_id` has.
    pub fn with_connections(mut self, user_id: &str, count: u32) -> Self {
        self.connections.insert(user_id.to_owned(), count);
        self
    }

    /// Sets the plugin's configuration (JSON text).
    pub fn with_config(mut self, json: &str) -> Self {
        self.config = Some(json.to_owned());
        self
    }

    /// The plugin's state now: key → value.
    pub fn state(&self) -> HashMap<String, String> {
        self.state
            .borrow()
            .iter()
            .map(|(key, (value, _))| (key.clone(), value.clone()))
            .collect()
    }

    /// The TTL a key was last set with.
    pub fn state_ttl(&self, key: &str) -> Option<u64> {
        self.state.borrow().get(key).and_then(|(_, ttl)| *ttl)
    }

    /// The lines the plugin logged so far.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }
}

impl Host for TestHost {
    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn get_user(&self, id: &str) -> Option<User> {
        self.users.get(id).cloned()
    }

    fn connection_count(&self, user_id: &str) -> u32 {
        self.connections.get(user_id).copied().unwrap_or(0)
    }

    fn config(&self) -> String {
        self.config.clone().unwrap_or_else(|| "{}".to_owned())
    }

    fn state_get(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(self.state.borrow().get(key).map(|(value, _)| value.clone()))
    }

    fn state_set(&self, key: &str, value: &str, ttl_ms: Option<u64>) -> Result<(), StateError> {
        self.state
            .borrow_mut()
            .insert(key.to_owned(), (value.to_owned(), ttl_ms));
        Ok(())
    }

    fn state_delete(&self, key: &str) -> Result<(), StateError> {
        self.state.borrow_mut().remove(key);
        Ok(())
    }

    fn state_swap(
        &self,
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, StateError> {
        let mut state = self.state.borrow_mut();
        if state.get(key).map(|(value, _)| value.as_str()) != expected {
            return Ok(false);
        }
        match value {
            Some(value) => state.insert(key.to_owned(), (value.to_owned(), ttl_ms)),
            None => state.remove(key),
        };
        Ok(true)
    }
}

/// A lifecycle event about connection `conn-<user_id>`; `connections` is
/// the user's live connections after the change.
pub fn lifecycle_event(name: &str, user_id: &str, role: &str, connections: u32) -> Event {
    event(
        name,
        Origin::Lifecycle(Client {
            user_id: user_id.to_owned(),
            role: role.to_owned(),
            connection_id: format!("conn-{user_id}"),
        }),
        &format!(r#"{{"connections":{connections}}}"#),
    )
}

/// An event sent by a client connection `conn-<user_id>`, with id `evt-1`.
pub fn client_event(name: &str, user_id: &str, role: &str, data: &str) -> Event {
    event(
        name,
        Origin::Client(Client {
            user_id: user_id.to_owned(),
            role: role.to_owned(),
            connection_id: format!("conn-{user_id}"),
        }),
        data,
    )
}

/// An event published through the broker, with id `evt-1`.
pub fn broker_event(name: &str, data: &str) -> Event {
    event(name, Origin::Broker, data)
}

fn event(name: &str, origin: Origin, data: &str) -> Event {
    Event {
        id: "evt-1".to_owned(),
        name: name.to_owned(),
        origin,
        data: data.to_owned(),
        received_at: TEST_RECEIVED_AT.to_owned(),
    }
}
