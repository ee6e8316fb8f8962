//! The wasmtime engine shared by all plugins: configuration, the epoch
//! ticker that enforces call deadlines, and loading (compile + validate).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Cache, CacheConfig, Config, Engine};

use super::error::LoadError;
use super::instance::{HostServices, LogBudget, PluginContext, State};
use super::loaded::LoadedPlugin;

/// Bounds on every plugin call and outcome.
#[derive(Debug, Clone)]
pub struct PluginLimits {
    /// Wall-clock budget of one call (instantiation and `handle` alike).
    pub call_timeout: Duration,
    /// Largest linear memory a plugin instance may grow to (all its
    /// memories together).
    pub memory_bytes: usize,
    /// Most deliveries in one outcome.
    pub max_deliveries: usize,
    /// Most recipients across an outcome's deliveries.
    pub max_recipients: usize,
    /// Largest single payload (delivery or reply data), in bytes.
    pub max_payload_bytes: usize,
    /// Largest sum of payload bytes in one outcome.
    pub max_outcome_bytes: usize,
    /// Warm instances kept per plugin version; more are created under load
    /// and dropped afterwards.
    pub max_idle_instances: usize,
    /// Calls after which an instance is replaced, so that a slow leak inside
    /// a plugin cannot grow without bound.
    pub recycle_after_calls: u64,
}

impl PluginLimits {
    /// Bytes the host copies out of a plugin in one call at most (checked
    /// before copying): the payload cap plus room for a full outcome's
    /// lists, names and recipient ids.
    pub fn copy_bytes(&self) -> usize {
        self.max_outcome_bytes
            .saturating_add(self.max_recipients.saturating_mul(512))
            .saturating_add(self.max_deliveries.saturating_mul(512))
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_millis(50),
            memory_bytes: 32 << 20,
            max_deliveries: 256,
            max_recipients: 1024,
            max_payload_bytes: 64 << 10,
            max_outcome_bytes: 1 << 20,
            max_idle_instances: 16,
            recycle_after_calls: 100_000,
        }
    }
}

/// The WASI clocks interface as wasmtime-wasi 48 defines it; a plugin's
/// `0.2.x` import resolves to it (the highest `0.2` defined), so the
/// overrides below must be made in this instance, not one of the plugin's
/// version. A test plugin that sleeps checks they still apply.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// What a plugin that tries to wait is told (as its call's trap).
pub const NO_WAITING: &str =
    "plugins may not wait (sleep, or subscribe to a clock): a call must finish within its deadline";

/// Replaces WASI's clock subscriptions, the only way a plugin could wait
/// (its stdio is empty, always ready), with ones that trap at once. The
/// epoch deadline only interrupts guest code: a plugin sleeping inside
/// the host's `poll`/`block` held its thread for as long as it liked, and
/// wasmtime-wasi's blocking waits panic on a tokio worker. `now` and
/// `resolution` stay: reading a clock never waits.
fn forbid_clock_waits(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |_store, (_duration,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
            Err(wasmtime::format_err!(NO_WAITING))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |_store, (_instant,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
            Err(wasmtime::format_err!(NO_WAITING))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// How often the engine's epoch advances; call deadlines are rounded up to it.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The plugin runtime: one engine and one linker for every plugin.
pub struct PluginRuntime {
    engine: Engine,
    linker: Arc<Linker<State>>,
    limits: PluginLimits,
    services: Arc<dyn HostServices>,
    cache: Option<Cache>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// Creates the engine. `services` answers the plugins' `get-user` and
    /// `connection-count`; compiled artifacts are cached in `cache_dir`
    /// when given.
    pub fn new(
        limits: PluginLimits,
        services: Arc<dyn HostServices>,
        cache_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut config = Config::new();
        let cache = match cache_dir {
            // Keyed by the wasm bytes and every compilation setting; an entry
            // that does not load (corrupt, other wasmtime) is a miss and is
            // rebuilt.
            Some(dir) => {
                let mut settings = CacheConfig::new();
                settings.with_directory(dir);
                Some(Cache::new(settings)?)
            }
            None => None,
        };
        config.cache(cache.clone());
        config
            .epoch_interruption(true)
            // Sync calls only: component-model concurrency costs every call
            // (~350 ns measured) and no plugin needs it.
            .concurrency_support(false)
            // Compile on one thread: a hot swap then leaves the other cores
            // to the traffic it must not disturb.
            .parallel_compilation(false)
            .max_wasm_stack(1 << 20);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // WASI is linked because Rust's std imports it, but the context grants
        // nothing: no preopened directories, environment, arguments or sockets.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        forbid_clock_waits(&mut linker)?;
        // Both contract versions: their interfaces are versioned names, so
        // a plugin links against the one it was built for.
        super::bindings::v2::Plugin::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
            &mut linker,
            |state| state,
        )?;
        super::bindings::v1::Plugin::add_to_linker::<State, wasmtime::component::HasSelf<State>>(
            &mut linker,
            |state| state,
        )?;

        let ticker = EpochTicker::start(engine.clone());
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            limits,
            services,
            cache,
            _ticker: ticker,
        })
    }

    /// Compilations served from, and missing in, the artifact cache.
    pub fn cache_stats(&self) -> (usize, usize) {
        self.cache
            .as_ref()
            .map_or((0, 0), |cache| (cache.cache_hits(), cache.cache_misses()))
    }

    /// Compiles and validates a plugin: it is instantiated, and its `info`
    /// and `subscriptions` are read, before anything may route to it.
    /// Blocking (compilation takes tens of milliseconds); async callers use
    /// [`PluginRuntime::load_blocking`] through `spawn_blocking`.
    ///
    /// `name` is the operator's handle for the plugin (its file stem);
    /// `config` its JSON configuration.
    pub fn load(&self, name: &str, wasm: &[u8], config: &str) -> Result<LoadedPlugin, LoadError> {
        serde_json::from_str::<serde::de::IgnoredAny>(config)
            .map_err(|err| LoadError::Config(err.to_string()))?;
        let component = Component::new(&self.engine, wasm)
            .map_err(|err| LoadError::Compile(format!("{err:#}")))?;
        let context = Arc::new(PluginContext {
            name: name.to_owned(),
            config: config.to_owned(),
            services: Arc::clone(&self.services),
            log_budget: LogBudget::default(),
        });
        LoadedPlugin::validate(
            &self.engine,
            &self.linker,
            &component,
            content_hash(wasm),
            context,
            self.limits.clone(),
        )
    }

    /// [`PluginRuntime::load`] on tokio's blocking pool, so compilation never
    /// stalls the async runtime.
    pub async fn load_blocking(
        self: &Arc<Self>,
        name: String,
        wasm: Arc<Vec<u8>>,
        config: String,
    ) -> Result<LoadedPlugin, LoadError> {
        let runtime = Arc::clone(self);
        tokio::task::spawn_blocking(move || runtime.load(&name, &wasm, &config))
            .await
            .unwrap_or_else(|join| Err(LoadError::Start(format!("loader panicked: {join}"))))
    }
}

/// Hex SHA-256 of a plugin's bytes: its version identity.
pub fn content_hash(wasm: &[u8]) -> String {
    let digest = Sha256::digest(wasm);
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Epoch ticks that make up `timeout`, rounded up, at least one.
pub(crate) fn deadline_ticks(timeout: Duration) -> u64 {
    let ticks = timeout.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] so that calls past their
/// deadline trap; stops when the runtime is dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        assert_eq!(deadline_ticks(Duration::from_millis(50)), 10);
        assert_eq!(deadline_ticks(Duration::from_millis(51)), 11);
        assert_eq!(deadline_ticks(Duration::ZERO), 1);
    }

    #[test]
    fn content_hash_is_hex_sha256() {
        assert_eq!(
            content_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
