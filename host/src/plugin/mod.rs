//! The plugin runtime: the only module that touches wasmtime.
//!
//! A plugin is a WebAssembly component of the world in `sdk/wit/`. Loading
//! compiles it, instantiates it and reads its subscriptions before anything
//! routes to it; calls go to a pool of warm instances, each call bounded by
//! an epoch deadline and a memory limit; outcomes are validated before the
//! host acts on them.

mod bindings;
mod error;
mod instance;
mod loaded;
pub mod manager;
mod outcome;
mod placement;
mod registry;
mod runtime;
mod stats;
mod types;

pub use error::{CallError, LoadError};
pub use instance::HostServices;
pub use loaded::LoadedPlugin;
pub use registry::{Decision, DispatchError, PluginDelivery, PluginRegistry, PluginSet};
pub use runtime::{PluginLimits, PluginRuntime, content_hash};
pub use stats::{PluginStats, StatsSnapshot};
pub use types::{
    ClientOrigin, Delivery, Emitted, Event, Origin, Outcome, PluginInfo, Recipient, RefusalCode,
    Reply, lifecycle,
};
