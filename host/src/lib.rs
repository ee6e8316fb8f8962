//! The sockets host: a realtime WebSocket gateway whose routing decisions
//! are made by hot-reloaded WebAssembly plugins.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules.

pub mod auth;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod directory;
pub mod gateway;
pub mod health;
pub mod hotswap;
pub mod intake;
pub mod metrics;
pub mod plugin;
pub mod protocol;
pub mod recent;
pub mod router;
pub mod server;
pub mod store;
