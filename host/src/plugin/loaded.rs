//! One loaded plugin version: its validated facts, a pool of warm instances
//! and the bounded `handle` call.

use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, Trap};

use super::bindings::sockets::plugin::types as wit;
use super::bindings::{Plugin as PluginBindings, PluginPre};
use super::error::{CallError, LoadError};
use super::instance::{PluginContext, State, new_store};
use super::outcome;
use super::placement::Placement;
use super::runtime::{PluginLimits, deadline_ticks};
use super::stats::PluginStats;
use super::types::{Event, Origin, Outcome, PluginInfo, RefusalCode};

/// What wasmtime says when a call's results exceed the store's hostcall
/// fuel (its error type is private).
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// Client events the host handles itself; a plugin may not take them over.
const RESERVED_EVENTS: [&str; 3] = ["setConnection", "refreshToken", "resume"];

/// A warm instance: instantiated once, reused for many calls.
struct WarmInstance {
    store: Store<State>,
    bindings: PluginBindings,
    calls: u64,
}

/// A compiled, validated plugin version, ready to handle events.
pub struct LoadedPlugin {
    context: Arc<PluginContext>,
    info: PluginInfo,
    hash: String,
    label: Arc<str>,
    subscriptions: Vec<String>,
    engine: Engine,
    pre: PluginPre<State>,
    limits: PluginLimits,
    /// Instantiation costs tens of microseconds, a warm call one or two:
    /// instances are kept between calls (at most `max_idle_instances`).
    idle: Mutex<Vec<WarmInstance>>,
    placement: Placement,
    stats: PluginStats,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("label", &self.label)
            .field("hash", &self.hash)
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Links the component against the plugin world, instantiates it and
    /// reads its declared facts; the instance becomes the first warm one.
    pub(crate) fn validate(
        engine: &Engine,
        linker: &Linker<State>,
        component: &Component,
        hash: String,
        context: Arc<PluginContext>,
        limits: PluginLimits,
    ) -> Result<Self, LoadError> {
        let wrong_world = |err: wasmtime::Error| LoadError::WrongWorld(format!("{err:#}"));
        let pre = PluginPre::new(linker.instantiate_pre(component).map_err(wrong_world)?)
            .map_err(wrong_world)?;

        let start_failure = |err: CallError| LoadError::Start(err.to_string());
        let mut warm = instantiate(engine, &pre, &context, &limits).map_err(start_failure)?;
        let info = guarded(&mut warm, &limits, |bindings, store| {
            bindings.call_info(store)
        })
        .map_err(start_failure)?;
        let subscriptions = guarded(&mut warm, &limits, |bindings, store| {
            bindings.call_subscriptions(store)
        })
        .map_err(start_failure)?;
        let subscriptions = check_subscriptions(subscriptions)?;
        check_info_field("name", &info.name)?;
        check_info_field("version", &info.version)?;

        let label = format!("{}@{}", context.name, info.version).into();
        Ok(Self {
            info: PluginInfo {
                name: info.name,
                version: info.version,
            },
            hash,
            label,
            subscriptions,
            engine: engine.clone(),
            pre,
            limits,
            idle: Mutex::new(vec![warm]),
            placement: Placement::default(),
            stats: PluginStats::default(),
            context,
        })
    }

    /// The operator's name for this plugin (its file stem).
    pub fn name(&self) -> &str {
        &self.context.name
    }

    /// `name@version`, as written to the notification log.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// What the plugin declares about itself.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Hex SHA-256 of the plugin's bytes.
    pub fn content_hash(&self) -> &str {
        &self.hash
    }

    /// The event names this plugin handles.
    pub fn subscriptions(&self) -> &[String] {
        &self.subscriptions
    }

    /// The plugin's JSON configuration.
    pub fn config(&self) -> &str {
        &self.context.config
    }

    /// Log lines of this version dropped by its log rate limit.
    pub fn log_lines_dropped(&self) -> u64 {
        self.context.log_budget.dropped()
    }

    /// This version's counters.
    pub fn stats(&self) -> &PluginStats {
        &self.stats
    }

    /// Whether this version's calls run off the async workers now (slower):
    /// for good once it printed, for a minute after its calls were
    /// measured slow again and again.
    pub fn runs_off_workers(&self) -> bool {
        self.placement.is_off_worker()
    }

    /// Hands one event to the plugin, under the deadline and memory limit,
    /// and validates what it returns. Blocking for at most the deadline
    /// (plus instantiation when no warm instance is free), on the calling
    /// async worker unless this version showed it must not (`placement`).
    pub fn handle(&self, event: &Event) -> Result<Outcome, CallError> {
        let (result, took) = self.placement.run(&self.label, || self.call(event));
        self.stats.record(took, result.as_ref().map(|_| ()));
        result
    }

    fn call(&self, event: &Event) -> Result<Outcome, CallError> {
        let warm = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut warm = match warm {
            Some(warm) => warm,
            None => instantiate(&self.engine, &self.pre, &self.context, &self.limits)?,
        };
        let input = to_wit(event);
        // A trapped instance is dropped here, never reused: its memory may be
        // in any state.
        let decision = guarded(&mut warm, &self.limits, |bindings, store| {
            bindings.call_handle(store, input)
        })?;
        self.put_back(warm);

        let raw = decision.map_err(|failure| CallError::Refused {
            code: refusal_code(failure.code),
            message: failure.message.chars().take(1024).collect(),
        })?;
        outcome::validate(raw, matches!(event.origin, Origin::Client(_)), &self.limits)
    }

    fn put_back(&self, mut warm: WarmInstance) {
        warm.calls += 1;
        if warm.calls >= self.limits.recycle_after_calls {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.limits.max_idle_instances {
            idle.push(warm);
        }
    }
}

/// Creates a fresh instance under the deadline (start functions run here).
fn instantiate(
    engine: &Engine,
    pre: &PluginPre<State>,
    context: &Arc<PluginContext>,
    limits: &PluginLimits,
) -> Result<WarmInstance, CallError> {
    let mut store = new_store(
        engine,
        Arc::clone(context),
        limits.memory_bytes,
        limits.copy_bytes(),
    );
    store.set_epoch_deadline(deadline_ticks(limits.call_timeout));
    match pre.instantiate(&mut store) {
        Ok(bindings) => Ok(WarmInstance {
            store,
            bindings,
            calls: 0,
        }),
        Err(err) => Err(classify(&err, store.data().limiter.denied, limits)),
    }
}

/// Runs one export with a fresh deadline and the memory flag reset, turning
/// wasmtime errors into [`CallError`]s.
fn guarded<R>(
    warm: &mut WarmInstance,
    limits: &PluginLimits,
    call: impl FnOnce(&PluginBindings, &mut Store<State>) -> wasmtime::Result<R>,
) -> Result<R, CallError> {
    warm.store.data_mut().limiter.denied = false;
    warm.store
        .set_epoch_deadline(deadline_ticks(limits.call_timeout));
    call(&warm.bindings, &mut warm.store)
        .map_err(|err| classify(&err, warm.store.data().limiter.denied, limits))
}

fn classify(err: &wasmtime::Error, memory_denied: bool, limits: &PluginLimits) -> CallError {
    if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        CallError::Timeout(limits.call_timeout)
    } else if err
        .chain()
        .any(|cause| cause.to_string().contains(HOSTCALL_FUEL_EXHAUSTED))
    {
        CallError::InvalidOutcome(format!(
            "more than {} bytes to copy out of the plugin",
            limits.copy_bytes()
        ))
    } else if memory_denied {
        CallError::OutOfMemory(limits.memory_bytes)
    } else {
        // The trap code says what happened; the wasm backtrace is for the
        // plugin's author, in the debug log.
        tracing::debug!(target: "plugin", "trap: {err:?}");
        let reason = match err.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => err.root_cause().to_string(),
        };
        CallError::Trapped(reason)
    }
}

/// A declared name or version: 1–64 characters of `[A-Za-z0-9._+-]` (what
/// semver and crate names use), so that it is safe as a Prometheus label
/// value and in log records as it is.
fn check_info_field(what: &str, value: &str) -> Result<(), LoadError> {
    let valid = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._+-".contains(&byte));
    if valid {
        Ok(())
    } else {
        Err(LoadError::Info(format!(
            "the declared {what} {:?} is not 1-64 chars of [A-Za-z0-9._+-]",
            value.chars().take(80).collect::<String>()
        )))
    }
}

fn check_subscriptions(names: Vec<String>) -> Result<Vec<String>, LoadError> {
    let mut names = names;
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(LoadError::Subscriptions(
            "the plugin subscribes to no event".into(),
        ));
    }
    if let Some(bad) = names
        .iter()
        .find(|name| !crate::protocol::is_valid_event_name(name))
    {
        return Err(LoadError::Subscriptions(format!(
            "{:?} is not 1-64 chars of [A-Za-z0-9_.:-]",
            bad.chars().take(80).collect::<String>()
        )));
    }
    if let Some(reserved) = names
        .iter()
        .find(|name| RESERVED_EVENTS.contains(&name.as_str()))
    {
        return Err(LoadError::Subscriptions(format!(
            "`{reserved}` is handled by the host"
        )));
    }
    Ok(names)
}

fn refusal_code(code: wit::ErrorCode) -> RefusalCode {
    match code {
        wit::ErrorCode::BadRequest => RefusalCode::BadRequest,
        wit::ErrorCode::Forbidden => RefusalCode::Forbidden,
        wit::ErrorCode::NotFound => RefusalCode::NotFound,
        wit::ErrorCode::Internal => RefusalCode::Internal,
    }
}

fn to_wit(event: &Event) -> wit::Event<'_> {
    let origin = match &event.origin {
        Origin::Client(client) => wit::Origin::Client(wit::Client {
            user_id: &client.user_id,
            role: &client.role,
            connection_id: &client.connection_id,
        }),
        Origin::Broker => wit::Origin::Broker,
        Origin::Api(service) => wit::Origin::Api(service),
    };
    wit::Event {
        id: &event.id,
        name: &event.name,
        origin,
        data: &event.data,
        received_at: &event.received_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn subscriptions_are_sorted_and_deduplicated() {
        let checked = check_subscriptions(names(&["b", "a", "b"])).unwrap();
        assert_eq!(checked, names(&["a", "b"]));
    }

    #[test]
    fn unusable_subscriptions_are_refused() {
        for bad in [
            &[][..],
            &["has space"],
            &["setConnection"],
            &["refreshToken", "ok"],
            &["resume"],
        ] {
            assert!(
                matches!(
                    check_subscriptions(names(bad)),
                    Err(LoadError::Subscriptions(_))
                ),
                "{bad:?}"
            );
        }
    }
}
