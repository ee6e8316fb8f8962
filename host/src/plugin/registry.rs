//! The loaded plugins: name → current version → subscriptions, swapped
//! atomically so that a call in flight finishes on the version it started
//! with while new events see the new set.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::error::CallError;
use super::loaded::LoadedPlugin;
use super::types::{Delivery, Emitted, Event, Reply};

/// An immutable set of loaded plugins and the routes derived from it.
#[derive(Debug, Default)]
pub struct PluginSet {
    plugins: BTreeMap<String, Arc<LoadedPlugin>>,
    /// Event name → plugins subscribed to it, in plugin-name order.
    routes: HashMap<String, Vec<Arc<LoadedPlugin>>>,
}

/// A delivery together with the plugin that decided it.
#[derive(Debug, Clone)]
pub struct PluginDelivery {
    /// `name@version` of the deciding plugin.
    pub plugin: Arc<str>,
    /// The delivery.
    pub delivery: Delivery,
}

/// The merged decision of every plugin subscribed to an event.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Deliveries of all plugins, in plugin-name order.
    pub deliveries: Vec<PluginDelivery>,
    /// The first reply given, in plugin-name order.
    pub reply: Option<Reply>,
    /// Events the plugins emit, with the emitting plugin's `name@version`.
    pub emit: Vec<(Arc<str>, Emitted)>,
}

/// Why an event could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No loaded plugin subscribes to the event.
    #[error("no plugin handles `{0}`")]
    NoHandler(String),
    /// A plugin refused the event or failed.
    #[error("plugin `{plugin}` {error}")]
    Plugin {
        /// `name@version` of the plugin.
        plugin: Arc<str>,
        /// What went wrong.
        error: CallError,
    },
}

impl PluginSet {
    fn from_plugins(plugins: BTreeMap<String, Arc<LoadedPlugin>>) -> Self {
        let mut routes: HashMap<String, Vec<Arc<LoadedPlugin>>> = HashMap::new();
        for plugin in plugins.values() {
            for event in plugin.subscriptions() {
                routes
                    .entry(event.clone())
                    .or_default()
                    .push(Arc::clone(plugin));
            }
        }
        Self { plugins, routes }
    }

    /// A loaded plugin by name.
    pub fn get(&self, name: &str) -> Option<&Arc<LoadedPlugin>> {
        self.plugins.get(name)
    }

    /// All loaded plugins, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.plugins.values()
    }

    /// Every event name some plugin subscribes to.
    pub fn events(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// The plugins subscribed to `event`, in name order.
    pub fn handlers(&self, event: &str) -> &[Arc<LoadedPlugin>] {
        self.routes
            .get(event)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Hands `event` to every subscribed plugin, in name order, and merges
    /// their outcomes. All or nothing: the first refusal or failure decides
    /// the event and no delivery of the other plugins is made.
    pub fn dispatch(&self, event: &Event) -> Result<Decision, DispatchError> {
        let handlers = self.handlers(&event.name);
        if handlers.is_empty() {
            return Err(DispatchError::NoHandler(event.name.clone()));
        }
        let mut decision = Decision {
            deliveries: Vec::new(),
            reply: None,
            emit: Vec::new(),
        };
        for plugin in handlers {
            let outcome = plugin
                .handle(event)
                .map_err(|error| DispatchError::Plugin {
                    plugin: Arc::clone(plugin.label()),
                    error,
                })?;
            decision
                .deliveries
                .extend(
                    outcome
                        .deliveries
                        .into_iter()
                        .map(|delivery| PluginDelivery {
                            plugin: Arc::clone(plugin.label()),
                            delivery,
                        }),
                );
            if decision.reply.is_none() {
                decision.reply = outcome.reply;
            }
            decision.emit.extend(
                outcome
                    .emit
                    .into_iter()
                    .map(|event| (Arc::clone(plugin.label()), event)),
            );
        }
        Ok(decision)
    }
}

/// The current [`PluginSet`], replaced atomically on every change.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    current: ArcSwap<PluginSet>,
}

impl PluginRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current set; keep it for the duration of one event so that the
    /// event is handled by one consistent set of versions.
    pub fn snapshot(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Installs `plugin` under its name, replacing (and returning) the
    /// version that served before.
    pub fn install(&self, plugin: LoadedPlugin) -> Option<Arc<LoadedPlugin>> {
        self.install_shared(Arc::new(plugin))
    }

    /// [`PluginRegistry::install`] for a version that is already shared
    /// (a rollback reinstalls a kept version).
    pub fn install_shared(&self, plugin: Arc<LoadedPlugin>) -> Option<Arc<LoadedPlugin>> {
        let name = plugin.name().to_owned();
        let previous = self.current.rcu(|set| {
            let mut plugins = set.plugins.clone();
            plugins.insert(name.clone(), Arc::clone(&plugin));
            PluginSet::from_plugins(plugins)
        });
        previous.plugins.get(&name).cloned()
    }

    /// Unloads the plugin called `name`, returning it if it was loaded.
    pub fn remove(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        let previous = self.current.rcu(|set| {
            let mut plugins = set.plugins.clone();
            plugins.remove(name);
            PluginSet::from_plugins(plugins)
        });
        previous.plugins.get(name).cloned()
    }
}
