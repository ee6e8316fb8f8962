//! One plugin instance (a wasmtime store) and what the host offers inside
//! it: the `host` imports, a memory limiter, a WASI context granting nothing.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{v1, v2};
use crate::store::directory::User;
use crate::store::plugin_state::{PluginState, StateError};

/// What plugins may ask of the rest of the host, answered synchronously
/// (plugin calls are synchronous and bounded by their deadline).
pub trait HostServices: Send + Sync + 'static {
    /// Looks a user up in the user directory.
    fn get_user(&self, id: &str) -> Option<User>;
    /// The number of live connections of a user, cluster-wide.
    fn connection_count(&self, user_id: &str) -> u32;
    /// Where plugins keep state.
    fn plugin_state(&self) -> &dyn PluginState;
}

/// Per-plugin-version facts every instance of it shares.
pub(crate) struct PluginContext {
    /// The operator's name for the plugin, used to tag its log lines.
    pub name: String,
    /// The plugin's JSON configuration.
    pub config: String,
    pub services: Arc<dyn HostServices>,
    /// What the plugin may still write to the host's log.
    pub log_budget: LogBudget,
}

/// Longest log line a plugin may write, in characters; longer ones are cut.
const MAX_LOG_LINE: usize = 1024;
/// Log lines a plugin may write per second, sustained (all its instances
/// together); twice that in a burst. Beyond it lines are dropped, counted,
/// and the count is logged once lines pass again.
const LOG_LINES_PER_SECOND: f64 = 50.0;

/// A token bucket over a plugin's log lines.
pub(crate) struct LogBudget {
    bucket: std::sync::Mutex<(f64, std::time::Instant)>,
    dropped_since_last: std::sync::atomic::AtomicU64,
    dropped_total: std::sync::atomic::AtomicU64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            bucket: std::sync::Mutex::new((2.0 * LOG_LINES_PER_SECOND, std::time::Instant::now())),
            dropped_since_last: std::sync::atomic::AtomicU64::new(0),
            dropped_total: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl LogBudget {
    /// Whether one more line may be written now; if so, how many were
    /// dropped before it.
    fn take(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::Instant::now();
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = &mut *bucket;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * LOG_LINES_PER_SECOND)
            .min(2.0 * LOG_LINES_PER_SECOND);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Some(self.dropped_since_last.swap(0, Relaxed))
        } else {
            self.dropped_since_last.fetch_add(1, Relaxed);
            self.dropped_total.fetch_add(1, Relaxed);
            None
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A plugin's log message made safe for one line of the host's log: cut to
/// [`MAX_LOG_LINE`] characters, control characters (newlines, escape
/// sequences) written as `\u{..}` so that a plugin cannot forge lines.
pub(crate) fn sanitize_log_line(message: &str) -> String {
    let mut line = String::with_capacity(message.len().min(MAX_LOG_LINE));
    for (count, c) in message.chars().enumerate() {
        if count == MAX_LOG_LINE {
            line.push('…');
            break;
        }
        if c.is_control() {
            line.extend(c.escape_unicode());
        } else {
            line.push(c);
        }
    }
    line
}
/// Most table elements a plugin may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The data of one plugin store.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    context: Arc<PluginContext>,
    /// When the current call must end: host calls that wait (MongoDB
    /// state) give up then.
    pub deadline: std::time::Instant,
}

impl State {
    pub fn new(context: Arc<PluginContext>, memory_bytes: usize) -> Self {
        Self {
            // The default builder inherits nothing from the host process.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: memory_bytes,
                used_bytes: 0,
                last_grant: None,
                denied: false,
            },
            context,
            deadline: std::time::Instant::now(),
        }
    }
}

/// Caps the linear memory of an instance, all its memories together (a
/// component may define several, each of which wasmtime limits on its
/// own), and remembers a refusal, so a trap that follows can be reported
/// as what it is: the memory limit.
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    /// The sum of the instance's memories' sizes.
    used_bytes: usize,
    /// The last growth allowed, undone should it fail.
    last_grant: Option<(usize, usize)>,
    pub denied: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let used = (self.used_bytes - current.min(self.used_bytes)).saturating_add(desired);
        let allowed = used <= self.max_bytes;
        self.last_grant = allowed.then_some((current, desired));
        if allowed {
            self.used_bytes = used;
        }
        self.denied |= !allowed;
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Granted but not done (the allocation failed): not in use.
        if let Some((current, desired)) = self.last_grant.take() {
            self.used_bytes = (self.used_bytes + current).saturating_sub(desired);
        }
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Creates a store for one instance, with its limiter installed, the epoch
/// deadline armed on every entry and the bytes the host copies out of the
/// plugin per call (`copy_bytes`) bounded.
pub(crate) fn new_store(
    engine: &wasmtime::Engine,
    context: Arc<PluginContext>,
    memory_bytes: usize,
    copy_bytes: usize,
) -> Store<State> {
    let mut store = Store::new(engine, State::new(context, memory_bytes));
    store.limiter(|state| &mut state.limiter);
    // Checked while lifting, before each string or list is copied: without
    // it, an outcome of 10,000 deliveries pointing at one 8 MiB string made
    // the host allocate 80 GB before the outcome caps were looked at.
    store.set_hostcall_fuel(copy_bytes);
    store.epoch_deadline_trap();
    store
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl State {
    fn write_log(&self, level: tracing::Level, message: &str) {
        let plugin = self.context.name.as_str();
        let Some(dropped) = self.context.log_budget.take() else {
            return;
        };
        if dropped > 0 {
            tracing::warn!(target: "plugin", plugin, dropped, "log lines dropped: over the plugin's log rate");
        }
        let message = sanitize_log_line(message);
        match level {
            tracing::Level::DEBUG => tracing::debug!(target: "plugin", plugin, "{message}"),
            tracing::Level::INFO => tracing::info!(target: "plugin", plugin, "{message}"),
            tracing::Level::WARN => tracing::warn!(target: "plugin", plugin, "{message}"),
            _ => tracing::error!(target: "plugin", plugin, "{message}"),
        }
    }

    fn state(&self) -> (&dyn PluginState, &str, std::time::Instant) {
        (
            self.context.services.plugin_state(),
            self.context.name.as_str(),
            self.deadline,
        )
    }
}

/// A TTL in milliseconds as a duration.
fn ttl(ms: Option<u64>) -> Option<std::time::Duration> {
    ms.map(std::time::Duration::from_millis)
}

fn state_error(err: StateError) -> v2::sockets::plugin::types::StateError {
    use v2::sockets::plugin::types::StateError as Wit;
    match err {
        StateError::TooLarge(why) => Wit::TooLarge(why),
        StateError::Full => Wit::Full,
        StateError::Unavailable(why) => Wit::Unavailable(why),
    }
}

impl v2::sockets::plugin::types::Host for State {}

impl v2::sockets::plugin::host::Host for State {
    fn log(&mut self, level: v2::sockets::plugin::host::Level, message: String) {
        use v2::sockets::plugin::host::Level;
        let level = match level {
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        self.write_log(level, &message);
    }

    fn get_user(&mut self, id: String) -> Option<v2::sockets::plugin::types::User> {
        self.context
            .services
            .get_user(&id)
            .map(|user| v2::sockets::plugin::types::User {
                id: user.id,
                role: user.role,
                name: user.name,
            })
    }

    fn connection_count(&mut self, user_id: String) -> u32 {
        self.context.services.connection_count(&user_id)
    }

    fn config(&mut self) -> String {
        self.context.config.clone()
    }

    fn state_get(
        &mut self,
        key: String,
    ) -> Result<Option<String>, v2::sockets::plugin::types::StateError> {
        let (state, plugin, deadline) = self.state();
        state.get(plugin, &key, deadline).map_err(state_error)
    }

    fn state_set(
        &mut self,
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    ) -> Result<(), v2::sockets::plugin::types::StateError> {
        let (state, plugin, deadline) = self.state();
        state
            .set(plugin, &key, value, ttl(ttl_ms), deadline)
            .map_err(state_error)
    }

    fn state_delete(&mut self, key: String) -> Result<(), v2::sockets::plugin::types::StateError> {
        let (state, plugin, deadline) = self.state();
        state.delete(plugin, &key, deadline).map_err(state_error)
    }

    fn state_swap(
        &mut self,
        key: String,
        expected: Option<String>,
        value: Option<String>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, v2::sockets::plugin::types::StateError> {
        let (state, plugin, deadline) = self.state();
        state
            .swap(
                plugin,
                &key,
                expected.as_deref(),
                value,
                ttl(ttl_ms),
                deadline,
            )
            .map_err(state_error)
    }
}

impl v1::sockets::plugin::types::Host for State {}

/// The 0.1 imports: the same services, without state.
impl v1::sockets::plugin::host::Host for State {
    fn log(&mut self, level: v1::sockets::plugin::host::Level, message: String) {
        use v1::sockets::plugin::host::Level;
        let level = match level {
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        self.write_log(level, &message);
    }

    fn get_user(&mut self, id: String) -> Option<v1::sockets::plugin::types::User> {
        self.context
            .services
            .get_user(&id)
            .map(|user| v1::sockets::plugin::types::User {
                id: user.id,
                role: user.role,
                name: user.name,
            })
    }

    fn connection_count(&mut self, user_id: String) -> u32 {
        self.context.services.connection_count(&user_id)
    }

    fn config(&mut self) -> String {
        self.context.config.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_holds_for_all_of_an_instances_memories_together() {
        let mut limiter = MemoryLimiter {
            max_bytes: 32 << 20,
            used_bytes: 0,
            last_grant: None,
            denied: false,
        };
        // Two memories of 20 MiB: each within the limit, not together.
        assert!(limiter.memory_growing(0, 20 << 20, None).unwrap());
        assert!(!limiter.memory_growing(0, 20 << 20, None).unwrap());
        assert!(limiter.denied);
        // The first one may still grow within what is left.
        assert!(limiter.memory_growing(20 << 20, 30 << 20, None).unwrap());
        assert!(!limiter.memory_growing(30 << 20, 33 << 20, None).unwrap());
    }
}
