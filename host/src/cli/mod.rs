//! The command line (PROTOCOL.md §9).

pub mod check;
pub mod new;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, Settings};

/// Realtime WebSocket gateway routed by WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "sockets-host", version)]
pub struct Cli {
    /// A TOML config file; flags and environment variables override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Settings (each also `SOCKETS_*` in the environment).
    #[command(flatten)]
    pub settings: Settings,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The configuration this command line names: its `--config` file
    /// (made absolute) under its flags and environment, validated.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let config_file = self
            .config
            .as_deref()
            .map(|path| crate::config::absolute(path, "--config"))
            .transpose()?;
        let file = match &config_file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        let mut config = Config::from_settings(self.settings.clone().or(file))?;
        config.config_file = config_file;
        Ok(config)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Print a JWT signed with the configured HS256 secret (development and
    /// tests).
    Token(TokenArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

/// `sockets-host token --sub ID --role ROLE [--ttl 1h]`
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user (or service) id.
    #[arg(long)]
    pub sub: String,
    /// The role, e.g. `student`, `consultant`, `service`, `admin`.
    #[arg(long, default_value = "user")]
    pub role: String,
    /// Lifetime: `30s`, `15m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = crate::auth::parse_ttl)]
    pub ttl: std::time::Duration,
}

/// `sockets-host plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin exactly as the server would, print its subscriptions
    /// and, given an event, the outcome it returns.
    Check(CheckArgs),
    /// Create a plugin crate that builds, with a native test.
    New(NewArgs),
}

/// `sockets-host plugin new NAME [--dir plugins]`
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: lowercase words joined by `_` (`offline_notify`);
    /// it names the crate, the `.wasm` and its events.
    pub name: String,
    /// Where the crate's folder goes; default: the `plugins` folder of the
    /// checkout around the working directory (a workspace member, built by
    /// scripts/build-plugins.sh). Anywhere else: a crate of its own.
    #[arg(long)]
    pub dir: Option<PathBuf>,
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
    /// The plugin's configuration (JSON); defaults to its `[plugins.NAME]`
    /// table in the config file, else `{}`.
    #[arg(long = "plugin-config")]
    pub plugin_config: Option<String>,
    /// The user directory (JSON users file); defaults to `SOCKETS_USERS_FILE`
    /// or the demo file.
    #[arg(long)]
    pub users: Option<PathBuf>,
}
