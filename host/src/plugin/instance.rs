//! One plugin instance (a wasmtime store) and what the host offers inside
//! it: the `host` imports, a memory limiter, a WASI context granting nothing.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::sockets::plugin::{host, types as wit};
use crate::directory::User;

/// What plugins may ask of the rest of the host, answered synchronously
/// (plugin calls are synchronous and bounded by their deadline).
pub trait HostServices: Send + Sync + 'static {
    /// Looks a user up in the user directory.
    fn get_user(&self, id: &str) -> Option<User>;
    /// The number of live connections of a user, cluster-wide.
    fn connection_count(&self, user_id: &str) -> u32;
}

/// Per-plugin-version facts every instance of it shares.
pub(crate) struct PluginContext {
    /// The operator's name for the plugin, used to tag its log lines.
    pub name: String,
    /// The plugin's JSON configuration.
    pub config: String,
    pub services: Arc<dyn HostServices>,
}

/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;
/// Most table elements a plugin may grow to.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The data of one plugin store.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: MemoryLimiter,
    context: Arc<PluginContext>,
}

impl State {
    pub fn new(context: Arc<PluginContext>, memory_bytes: usize) -> Self {
        Self {
            // The default builder inherits nothing from the host process.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: memory_bytes,
                denied: false,
            },
            context,
        }
    }
}

/// Caps linear memory growth and remembers a refusal, so a trap that
/// follows can be reported as what it is: the memory limit.
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    pub denied: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.max_bytes;
        self.denied |= !allowed;
        Ok(allowed)
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

/// Creates a store for one instance, with its limiter installed and the
/// epoch deadline armed on every entry.
pub(crate) fn new_store(
    engine: &wasmtime::Engine,
    context: Arc<PluginContext>,
    memory_bytes: usize,
) -> Store<State> {
    let mut store = Store::new(engine, State::new(context, memory_bytes));
    store.limiter(|state| &mut state.limiter);
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

impl wit::Host for State {}

impl host::Host for State {
    fn log(&mut self, level: host::Level, message: String) {
        let plugin = self.context.name.as_str();
        let message = match message.char_indices().nth(MAX_LOG_LINE) {
            Some((cut, _)) => &message[..cut],
            None => message.as_str(),
        };
        match level {
            host::Level::Debug => tracing::debug!(target: "plugin", plugin, "{message}"),
            host::Level::Info => tracing::info!(target: "plugin", plugin, "{message}"),
            host::Level::Warn => tracing::warn!(target: "plugin", plugin, "{message}"),
            host::Level::Error => tracing::error!(target: "plugin", plugin, "{message}"),
        }
    }

    fn get_user(&mut self, id: String) -> Option<wit::User> {
        self.context.services.get_user(&id).map(|user| wit::User {
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
