//! Plugin state (WIT `state-*`): small values by key, one namespace per
//! plugin name, so that plugins — whose instances are stateless and
//! replaced at will — can remember between calls. Synchronous: plugins
//! call it mid-call, under their deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// Most live keys in one plugin's namespace.
pub const MAX_KEYS_PER_PLUGIN: usize = 100_000;

/// Why a state operation failed (WIT `state-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A key or value over the caps, or an empty key.
    #[error("{0}")]
    TooLarge(String),
    /// The namespace holds [`MAX_KEYS_PER_PLUGIN`] keys.
    #[error("the plugin's state holds {MAX_KEYS_PER_PLUGIN} keys")]
    Full,
    /// The store did not answer in time.
    #[error("plugin state unavailable: {0}")]
    Unavailable(String),
}

/// A store of plugin state.
pub trait PluginState: Send + Sync {
    /// The live value of `key` in `plugin`'s namespace.
    fn get(&self, plugin: &str, key: &str) -> Result<Option<String>, StateError>;
    /// Sets a value, expiring after `ttl` when given.
    fn set(
        &self,
        plugin: &str,
        key: &str,
        value: String,
        ttl: Option<Duration>,
    ) -> Result<(), StateError>;
    /// Removes a key.
    fn delete(&self, plugin: &str, key: &str) -> Result<(), StateError>;
    /// Compare-and-set; `None` stands for absent on both sides.
    fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&str>,
        value: Option<String>,
        ttl: Option<Duration>,
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
#[derive(Default)]
pub struct MemoryPluginState {
    namespaces: Mutex<HashMap<String, HashMap<String, Entry>>>,
}

impl MemoryPluginState {
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
) -> Result<(), StateError> {
    if namespace.contains_key(key) || namespace.len() < MAX_KEYS_PER_PLUGIN {
        return Ok(());
    }
    namespace.retain(|_, entry| entry.live(now));
    if namespace.len() < MAX_KEYS_PER_PLUGIN {
        Ok(())
    } else {
        Err(StateError::Full)
    }
}

impl PluginState for MemoryPluginState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<String>, StateError> {
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
    ) -> Result<(), StateError> {
        check_sizes(key, Some(&value))?;
        self.with_namespace(plugin, |namespace, now| {
            room_for(namespace, key, now)?;
            let expires = ttl.and_then(|ttl| now.checked_add(ttl));
            namespace.insert(key.to_owned(), Entry { value, expires });
            Ok(())
        })
    }

    fn delete(&self, plugin: &str, key: &str) -> Result<(), StateError> {
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
    ) -> Result<bool, StateError> {
        check_sizes(key, value.as_deref())?;
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
                    room_for(namespace, key, now)?;
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

    #[test]
    fn values_are_kept_per_plugin_and_expire() {
        let state = MemoryPluginState::default();
        state.set("a", "k", "1".into(), None).unwrap();
        state
            .set("b", "k", "2".into(), Some(Duration::from_millis(30)))
            .unwrap();
        assert_eq!(state.get("a", "k").unwrap().as_deref(), Some("1"));
        assert_eq!(state.get("b", "k").unwrap().as_deref(), Some("2"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(state.get("b", "k").unwrap(), None);
        state.delete("a", "k").unwrap();
        assert_eq!(state.get("a", "k").unwrap(), None);
    }

    #[test]
    fn swap_compares_before_it_sets() {
        let state = MemoryPluginState::default();
        assert!(state.swap("p", "k", None, Some("1".into()), None).unwrap());
        assert!(!state.swap("p", "k", None, Some("2".into()), None).unwrap());
        assert!(
            !state
                .swap("p", "k", Some("0"), Some("2".into()), None)
                .unwrap()
        );
        assert!(
            state
                .swap("p", "k", Some("1"), Some("2".into()), None)
                .unwrap()
        );
        assert!(state.swap("p", "k", Some("2"), None, None).unwrap());
        assert_eq!(state.get("p", "k").unwrap(), None);
    }

    #[test]
    fn caps_hold() {
        let state = MemoryPluginState::default();
        assert!(matches!(state.get("p", ""), Err(StateError::TooLarge(_))));
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            state.get("p", &long_key),
            Err(StateError::TooLarge(_))
        ));
        let big = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            state.set("p", "k", big, None),
            Err(StateError::TooLarge(_))
        ));
        for i in 0..MAX_KEYS_PER_PLUGIN {
            state.set("p", &i.to_string(), String::new(), None).unwrap();
        }
        assert_eq!(
            state.set("p", "one more", String::new(), None),
            Err(StateError::Full)
        );
        // Overwriting a key takes no room; another plugin has its own.
        state.set("p", "0", "x".into(), None).unwrap();
        state.set("q", "one more", String::new(), None).unwrap();
    }

    #[test]
    fn expired_keys_make_room() {
        let state = MemoryPluginState::default();
        for i in 0..MAX_KEYS_PER_PLUGIN {
            let ttl = (i == 7).then_some(Duration::from_millis(1));
            state.set("p", &i.to_string(), String::new(), ttl).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        state.set("p", "one more", String::new(), None).unwrap();
    }
}
