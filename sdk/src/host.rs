//! What a plugin may ask of the host.

use serde::de::DeserializeOwned;

use crate::bindings::sockets::plugin::host as imports;
use crate::{Failure, Level, StateError, User};

/// The host's services available to a plugin while it handles an event.
///
/// Inside the component this is the real host; in native unit tests it is
/// [`crate::testing::TestHost`].
pub trait Host {
    /// Writes a line to the host's log, tagged with the plugin's name.
    fn log(&self, level: Level, message: &str);
    /// Looks a user up in the user directory.
    fn get_user(&self, id: &str) -> Option<User>;
    /// The number of live connections of a user, cluster-wide.
    fn connection_count(&self, user_id: &str) -> u32;
    /// This plugin's configuration as JSON text (`{}` when none is set).
    fn config(&self) -> String;
    /// The value of `key` in this plugin's state, if set and not expired.
    fn state_get(&self, key: &str) -> Result<Option<String>, StateError>;
    /// Sets `key`, expiring after `ttl_ms` milliseconds when given.
    fn state_set(&self, key: &str, value: &str, ttl_ms: Option<u64>) -> Result<(), StateError>;
    /// Removes `key`.
    fn state_delete(&self, key: &str) -> Result<(), StateError>;
    /// Compare-and-set: when `key` holds `expected` (`None`: absent), sets
    /// it to `value` (`None`: removes it) and returns true.
    fn state_swap(
        &self,
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, StateError>;
}

impl dyn Host + '_ {
    /// Parses this plugin's configuration; a configuration that does not fit
    /// `T` is an `internal` failure (the operator's mistake, not the
    /// sender's).
    pub fn config_as<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_str(&self.config())
            .map_err(|err| Failure::internal(format!("invalid plugin configuration: {err}")))
    }
}

/// The host as seen from inside the component: calls the WIT imports.
#[derive(Debug, Clone, Copy)]
pub struct ComponentHost;

impl Host for ComponentHost {
    fn log(&self, level: Level, message: &str) {
        imports::log(level, message);
    }

    fn get_user(&self, id: &str) -> Option<User> {
        imports::get_user(id)
    }

    fn connection_count(&self, user_id: &str) -> u32 {
        imports::connection_count(user_id)
    }

    fn config(&self) -> String {
        // The configuration is fixed for an instance's life (a change loads
        // new instances), so one import call per instance is enough.
        static CONFIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        CONFIG.get_or_init(imports::config).clone()
    }

    fn state_get(&self, key: &str) -> Result<Option<String>, StateError> {
        imports::state_get(key)
    }

    fn state_set(&self, key: &str, value: &str, ttl_ms: Option<u64>) -> Result<(), StateError> {
        imports::state_set(key, value, ttl_ms)
    }

    fn state_delete(&self, key: &str) -> Result<(), StateError> {
        imports::state_delete(key)
    }

    fn state_swap(
        &self,
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, StateError> {
        imports::state_swap(key, expected, value, ttl_ms)
    }
}

impl From<StateError> for Failure {
    /// A state failure is the plugin's `internal` failure.
    fn from(err: StateError) -> Self {
        Failure::internal(format!("plugin state: {err:?}"))
    }
}
