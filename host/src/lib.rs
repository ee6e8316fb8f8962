//! The sockets host: a realtime WebSocket gateway whose routing decisions
//! are made by hot-reloaded WebAssembly plugins.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules.

pub mod check;
pub mod cli;
pub mod directory;
pub mod plugin;
pub mod protocol;
