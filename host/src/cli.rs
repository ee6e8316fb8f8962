//! The command line (PROTOCOL.md §9).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Realtime WebSocket gateway routed by WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "sockets-host", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

/// `sockets-host plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin exactly as the server would, print its subscriptions
    /// and, given an event, the outcome it returns.
    Check(CheckArgs),
}

/// `sockets-host plugin check FILE.wasm [--event NAME --data JSON]`
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plugin component (`.wasm`).
    pub file: PathBuf,
    /// An event to hand to the plugin.
    #[arg(long)]
    pub event: Option<String>,
    /// The event's data (JSON).
    #[arg(long, default_value = "null", requires = "event")]
    pub data: String,
    /// Send the event as this user over WebSocket (a client event);
    /// without it the event comes from the broker.
    #[arg(long, requires = "event")]
    pub user: Option<String>,
    /// The sending user's role.
    #[arg(long, default_value = "user", requires = "user")]
    pub role: String,
    /// The plugin's configuration (JSON).
    #[arg(long, default_value = "{}")]
    pub config: String,
    /// The user directory (JSON users file); defaults to the demo file.
    #[arg(long, env = "SOCKETS_USERS_FILE")]
    pub users: Option<PathBuf>,
}
