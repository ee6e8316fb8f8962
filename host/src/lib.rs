//! The sockets host: a realtime WebSocket gateway whose routing decisions
//! are made by hot-reloaded WebAssembly plugins.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules.

#![forbid(unsafe_code)]

pub mod auth;
pub mod backoff;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod gateway;
pub mod health;
pub mod intake;
pub mod lifecycle;
pub mod metrics;
pub mod plugin;
pub mod protocol;
pub mod server;
pub mod store;
