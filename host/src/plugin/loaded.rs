//! One loaded plugin version: its validated facts, a pool of warm instances
//! and the bounded `handle` call.

use std::sync::{Arc, Mutex, PoisonError};

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, Trap};

use super::bindings::{v1, v2};
use super::error::{CallError, LoadError};
use super::instance::{PluginContext, State, new_store};
use super::outcome;
use super::placement::Placement;
use super::runtime::{PluginLimits, deadline_ticks};
use super::stats::PluginStats;
use super::types::{Event, Origin, Outcome, PluginInfo, RefusalCode, lifecycle};

/// What wasmtime says when a call's results exceed the store's hostcall
/// fuel (its error type is private).
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// Client events the host handles itself; a plugin may not take them over.
const RESERVED_EVENTS: [&str; 3] = ["setConnection", "refreshToken", "resume"];

/// A plugin's component, ready to instantiate, by contract version.
enum PluginPre {
    V2(v2::PluginPre<State>),
    V1(v1::PluginPre<State>),
}

/// An instance's exports, by contract version.
enum PluginBindings {
    V2(v2::Plugin),
    V1(v1::Plugin),
}

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
    pre: PluginPre,
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
        let instance_pre = linker.instantiate_pre(component).map_err(wrong_world)?;
        // The newest contract first; a 0.1 plugin's exports do not type-check
        // against 0.2's and fall through to it.
        let pre = match v2::PluginPre::new(instance_pre.clone()) {
            Ok(pre) => PluginPre::V2(pre),
            Err(v2_err) => match v1::PluginPre::new(instance_pre) {
                Ok(pre) => PluginPre::V1(pre),
                Err(_) => return Err(wrong_world(v2_err)),
            },
        };

        let start_failure = |err: CallError| LoadError::Start(err.to_string());
        let mut warm = instantiate(engine, &pre, &context, &limits).map_err(start_failure)?;
        let (name, version) = guarded(&mut warm, &limits, |bindings, store| match bindings {
            PluginBindings::V2(plugin) => plugin
                .call_info(&mut *store)
                .map(|info| (info.name, info.version)),
            PluginBindings::V1(plugin) => plugin
                .call_info(&mut *store)
                .map(|info| (info.name, info.version)),
        })
        .map_err(start_failure)?;
        let subscriptions = guarded(&mut warm, &limits, |bindings, store| match bindings {
            PluginBindings::V2(plugin) => plugin.call_subscriptions(store),
            PluginBindings::V1(plugin) => plugin.call_subscriptions(store),
        })
        .map_err(start_failure)?;
        let subscriptions = check_subscriptions(subscriptions, matches!(pre, PluginPre::V2(_)))?;
        check_info_field("name", &name)?;
        check_info_field("version", &version)?;

        let label = format!("{}@{}", context.name, version).into();
        Ok(Self {
            info: PluginInfo { name, version },
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

    /// The contract version the plugin was built for: `0.1` or `0.2`.
    pub fn contract(&self) -> &'static str {
        match self.pre {
            PluginPre::V2(_) => "0.2",
            PluginPre::V1(_) => "0.1",
        }
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
        // A trapped instance is dropped here, never reused: its memory may be
        // in any state.
        let decision = guarded(&mut warm, &self.limits, |bindings, store| match bindings {
            PluginBindings::V2(plugin) => plugin
                .call_handle(store, to_wit_v2(event))
                .map(|decision| decision.map_err(refused_v2)),
            PluginBindings::V1(plugin) => plugin
                .call_handle(store, to_wit_v1(event))
                .map(|decision| decision.map(from_v1).map_err(refused_v1)),
        })?;
        self.put_back(warm);
        outcome::validate(decision?, event.origin.client().is_some(), &self.limits)
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
    pre: &PluginPre,
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
    store.data_mut().deadline = std::time::Instant::now() + limits.call_timeout;
    let instantiated = match pre {
        PluginPre::V2(pre) => pre.instantiate(&mut store).map(PluginBindings::V2),
        PluginPre::V1(pre) => pre.instantiate(&mut store).map(PluginBindings::V1),
    };
    match instantiated {
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
    warm.store.data_mut().deadline = std::time::Instant::now() + limits.call_timeout;
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

/// Checks the declared subscriptions. Names under `sockets.` are the host's:
/// a 0.2 plugin may subscribe to its lifecycle events, nothing else there.
fn check_subscriptions(names: Vec<String>, contract_v2: bool) -> Result<Vec<String>, LoadError> {
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
    if let Some(reserved) = names.iter().find(|name| {
        lifecycle::is_reserved(name) && !(contract_v2 && lifecycle::ALL.contains(&name.as_str()))
    }) {
        return Err(LoadError::Subscriptions(if contract_v2 {
            format!("`{reserved}` is not an event the host raises")
        } else {
            format!("`{reserved}`: lifecycle events need the sockets:plugin@0.2.0 contract")
        }));
    }
    Ok(names)
}

fn refused(code: RefusalCode, message: &str) -> CallError {
    CallError::Refused {
        code,
        message: message.chars().take(1024).collect(),
    }
}

fn refused_v2(failure: v2::sockets::plugin::types::Failure) -> CallError {
    use v2::sockets::plugin::types::ErrorCode;
    let code = match failure.code {
        ErrorCode::BadRequest => RefusalCode::BadRequest,
        ErrorCode::Forbidden => RefusalCode::Forbidden,
        ErrorCode::NotFound => RefusalCode::NotFound,
        ErrorCode::Internal => RefusalCode::Internal,
    };
    refused(code, &failure.message)
}

fn refused_v1(failure: v1::sockets::plugin::types::Failure) -> CallError {
    use v1::sockets::plugin::types::ErrorCode;
    let code = match failure.code {
        ErrorCode::BadRequest => RefusalCode::BadRequest,
        ErrorCode::Forbidden => RefusalCode::Forbidden,
        ErrorCode::NotFound => RefusalCode::NotFound,
        ErrorCode::Internal => RefusalCode::Internal,
    };
    refused(code, &failure.message)
}

fn to_wit_v2(event: &Event) -> v2::sockets::plugin::types::Event<'_> {
    use v2::sockets::plugin::types as wit;
    fn client(client: &super::types::ClientOrigin) -> wit::Client<'_> {
        wit::Client {
            user_id: &client.user_id,
            role: &client.role,
            connection_id: &client.connection_id,
        }
    }
    let origin = match &event.origin {
        Origin::Client(sender) => wit::Origin::Client(client(sender)),
        Origin::Lifecycle(about) => wit::Origin::Lifecycle(client(about)),
        Origin::Broker => wit::Origin::Broker,
        Origin::Api(service) => wit::Origin::Api(service),
        Origin::Plugin(name) => wit::Origin::Plugin(name),
    };
    wit::Event {
        id: &event.id,
        name: &event.name,
        origin,
        data: &event.data,
        received_at: &event.received_at,
    }
}

/// The event as a 0.1 plugin sees it: an event a plugin emitted is a
/// backend event (0.1 has no lifecycle events to be handed).
fn to_wit_v1(event: &Event) -> v1::sockets::plugin::types::Event<'_> {
    use v1::sockets::plugin::types as wit;
    let origin = match &event.origin {
        Origin::Client(sender) | Origin::Lifecycle(sender) => wit::Origin::Client(wit::Client {
            user_id: &sender.user_id,
            role: &sender.role,
            connection_id: &sender.connection_id,
        }),
        Origin::Broker | Origin::Plugin(_) => wit::Origin::Broker,
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

/// A 0.1 outcome in 0.2 terms: durable deliveries, nothing emitted.
fn from_v1(outcome: v1::sockets::plugin::types::Outcome) -> v2::sockets::plugin::types::Outcome {
    use v1::sockets::plugin::types as old;
    use v2::sockets::plugin::types as new;
    let recipient = |recipient: old::Recipient| match recipient {
        old::Recipient::User(id) => new::Recipient::User(id),
        old::Recipient::Connection(id) => new::Recipient::Connection(id),
        old::Recipient::SenderOthers => new::Recipient::SenderOthers,
    };
    new::Outcome {
        deliveries: outcome
            .deliveries
            .into_iter()
            .map(|delivery| new::Delivery {
                to: delivery.to.into_iter().map(recipient).collect(),
                event: delivery.event,
                data: delivery.data,
                ephemeral: false,
            })
            .collect(),
        reply: outcome.reply.map(|reply| new::Reply {
            data: reply.data,
            delivered_field: reply.delivered_field,
        }),
        emit: Vec::new(),
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
        let checked = check_subscriptions(names(&["b", "a", "b"]), true).unwrap();
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
            &["sockets.somethingElse"],
        ] {
            assert!(
                matches!(
                    check_subscriptions(names(bad), true),
                    Err(LoadError::Subscriptions(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_a_02_plugin_may_subscribe_to_lifecycle_events() {
        let online = names(&[lifecycle::USER_ONLINE, "x"]);
        assert!(check_subscriptions(online.clone(), true).is_ok());
        assert!(matches!(
            check_subscriptions(online, false),
            Err(LoadError::Subscriptions(why)) if why.contains("0.2.0")
        ));
    }
}
