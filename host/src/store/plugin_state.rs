//! Plugin state (WIT `state-*`): small values by key, one namespace per
//! plugin name, so that plugins — whose instances are stateless and
//! replaced at will — can remember between calls. Synchronous: plugins
//! call it mid-call, under their deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the plugin call making a state operation must end: a store that
/// waits on I/O gives up then (the call would trap as soon as it resumes).
pub type Deadline = Instant;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// Most live keys in one plugin's namespace.
pub const MAX_KEYS_PER_PLUGIN: usize = 1_000_000;

/// Why a state operation failed (WIT `state-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A key or value over the caps, or an empty key.
    #[error("{0}")]
    TooLarge(String),
    /// The namespace holds as many live keys as it may.
    #[error("the plugin's state holds as many keys as it may")]
    Full,
    /// The store did not answer in time.
    #[error("plugin state unavailable: {0}")]
    Unavailable(String),
}

/// A store of plugin state. Every operation ends by `deadline`.
pub trait PluginState: Send + Sync {
    /// The live value of `key` in `plugin`'s namespace.
    fn get(
        &self,
        plugin: &str,
        key: &str,
        deadline: Deadline,
    ) -> Result<Option<String>, StateError>;
    /// Sets a value, expiring after `ttl` when given.
    fn set(
        &self,
        plugin: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
        deadline: Deadline,
    ) -> Result<(), StateError>;
    /// Removes a key.
    fn delete(&self, plugin: &str, key: &str, deadline: Deadline) -> Result<(), StateError>;
    /// Compare-and-set; `None` stands for absent on both sides.
    fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&str>,
        value: Option<String>,
        ttl: Option<Duration>,
        deadline: Deadline,
    ) -> Result<bool, StateError>;
}

/// Checks a key, and a value when given, against the caps.
pub fn check_sizes(key: &str, value: Option<&str>) -> Result<(), StateError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StateError::TooLarge(format!(
            "a key is 1-{MAX_KEY_BYTES} bytes, not {}",
            key.len()
        )));
    }
    match value {
        Some(value) if value.len() > MAX_VALUE_BYTES => Err(StateError::TooLarge(format!(
            "a value is at most {MAX_VALUE_BYTES} bytes, not {}",
            value.len()
        ))),
        _ => Ok(()),
    }
}

struct Entry {
    value: String,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

/// The embedded default's plugin state: this node's memory. It outlives
/// instances and hot swaps, not a restart, and is not shared between nodes
/// (a cluster shares state through MongoDB).
pub struct MemoryPluginState {
    namespaces: Mutex<HashMap<String, HashMap<String, Entry>>>,
    max_keys: usize,
}

impl Default for MemoryPluginState {
    fn default() -> Self {
        Self::with_max_keys(MAX_KEYS_PER_PLUGIN)
    }
}

impl MemoryPluginState {
    /// At most `max_keys` live keys per plugin.
    pub fn with_max_keys(max_keys: usize) -> Self {
        Self {
            namespaces: Mutex::default(),
            max_keys,
        }
    }

    fn with_namespace<R>(
        &self,
        plugin: &str,
        change: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> R,
    ) -> R {
        let mut namespaces = self
            .namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !namespaces.contains_key(plugin) {
            namespaces.insert(plugin.to_owned(), HashMap::new());
        }
        let namespace = namespaces.get_mut(plugin).expect("inserted above");
        change(namespace, Instant::now())
    }
}

/// Makes room for one more key: expired entries go first.
fn room_for(
    namespace: &mut HashMap<String, Entry>,
    key: &str,
    now: Instant,
    max_keys: usize,
) -> Result<(), StateError> {
    if namespace.contains_key(key) || namespace.len() < max_keys {
        return Ok(());
    }
    namespace.retain(|_, entry| entry.live(now));
    if namespace.len() < max_keys {
        Ok(())
    } else {
        Err(StateError::Full)
    }
}

/// Memory answers at once: the deadline never binds.
impl PluginState for MemoryPluginState {
    fn get(&self, plugin: &str, key: &str, _: Deadline) -> Result<Option<String>, StateError> {
        check_sizes(key, None)?;
        Ok(self.with_namespace(plugin, |namespace, now| {
            namespace
                .get(key)
                .filter(|entry| entry.live(now))
                .map(|entry| entry.value.clone())
        }))
    }

    fn set(
        &self,
        plugin: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
        _: Deadline,
    ) -> Result<(), StateError> {
        check_sizes(key, Some(&value))?;
        let max_keys = self.max_keys;
        self.with_namespace(plugin, |namespace, now| {
            room_for(namespace, key, now, max_keys)?;
            let expires = ttl.and_then(|ttl| now.checked_add(ttl));
            namespace.insert(key.to_owned(), Entry { value, expires });
            Ok(())
        })
    }

    fn delete(&self, plugin: &str, key: &str, _: Deadline) -> Result<(), StateError> {
        check_sizes(key, None)?;
        self.with_namespace(plugin, |namespace, _| namespace.remove(key));
        Ok(())
    }

    fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&str>,
        value: Option<String>,
        ttl: Option<Duration>,
        _: Deadline,
    ) -> Result<bool, StateError> {
        check_sizes(key, value.as_deref())?;
        let max_keys = self.max_keys;
        self.with_namespace(plugin, |namespace, now| {
            let current = namespace
                .get(key)
                .filter(|entry| entry.live(now))
                .map(|entry| entry.value.as_str());
            if current != expected {
                return Ok(false);
            }
            match value {
                Some(value) => {
                    room_for(namespace, key, now, max_keys)?;
                    let expires = ttl.and_then(|ttl| now.checked_add(ttl));
                    namespace.insert(key.to_owned(), Entry { value, expires });
                }
                None => {
                    namespace.remove(key);
                }
            }
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Deadline {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn values_are_kept_per_plugin_and_expire() {
        let state = MemoryPluginState::default();
        state.set("a", "k", "1".into(), None, far()).unwrap();
        state
            .set("b", "k", "2".into(), Some(Duration::from_millis(30)), far())
            .unwrap();
        assert_eq!(state.get("a", "k", far()).unwrap().as_deref(), Some("1"));
        assert_eq!(state.get("b", "k", far()).unwrap().as_deref(), Some("2"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(state.get("b", "k", far()).unwrap(), None);
        state.delete("a", "k", far()).unwrap();
        assert_eq!(state.get("a", "k", far()).unwrap(), None);
    }

    #[test]
    fn swap_compares_before_it_sets() {
        let state = MemoryPluginState::default();
        assert!(
            state
                .swap("p", "k", None, Some("1".into()), None, far())
                .unwrap()
        );
        assert!(
            !state
                .swap("p", "k", None, Some("2".into()), None, far())
                .unwrap()
        );
        assert!(
            !state
                .swap("p", "k", Some("0"), Some("2".into()), None, far())
                .unwrap()
        );
        assert!(
            state
                .swap("p", "k", Some("1"), Some("2".into()), None, far())
                .unwrap()
        );
        assert!(state.swap("p", "k", Some("2"), None, None, far()).unwrap());
        assert_eq!(state.get("p", "k", far()).unwrap(), None);
    }

    #[test]
    fn caps_hold() {
        let state = MemoryPluginState::with_max_keys(100);
        assert!(matches!(
            state.get("p", "", far()),
            Err(StateError::TooLarge(_))
        ));
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            state.get("p", &long_key, far()),
            Err(StateError::TooLarge(_))
        ));
        let big = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            state.set("p", "k", big, None, far()),
            Err(StateError::TooLarge(_))
        ));
        for i in 0..100 {
            state
                .set("p", &i.to_string(), String::new(), None, far())
                .unwrap();
        }
        assert_eq!(
            state.set("p", "one more", String::new(), None, far()),
            Err(StateError::Full)
        );
        // Overwriting a key takes no room; another plugin has its own.
        state.set("p", "0", "x".into(), None, far()).unwrap();
        state
            .set("q", "one more", String::new(), None, far())
            .unwrap();
    }

    #[test]
    fn expired_keys_make_room() {
        let state = MemoryPluginState::with_max_keys(100);
        for i in 0..100 {
            let ttl = (i == 7).then_some(Duration::from_millis(1));
            state
                .set("p", &i.to_string(), String::new(), ttl, far())
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        state
            .set("p", "one more", String::new(), None, far())
            .unwrap();
    }
}
