//! One typed configuration, from a TOML file, the environment and flags
//! (flags beat environment, environment beats the file), validated once at
//! start (PROTOCOL.md §9).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::intake::amqp::AmqpSettings;

/// Settings as given by an operator: every field optional, from flags and
/// environment (clap) or from the config file (serde).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "SOCKETS_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// HS256 secret for client, service and admin tokens.
    #[arg(
        long,
        env = "SOCKETS_JWT_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Path to a PEM public key (RS256/ES256).
    #[arg(long, env = "SOCKETS_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS URL for RS256/ES256 keys, refreshed on rotation.
    #[arg(long, env = "SOCKETS_JWT_JWKS_URL", global = true)]
    pub jwt_jwks_url: Option<String>,
    /// Shortest time between two JWKS fetches caused by unknown `kid`s,
    /// seconds.
    #[arg(long, env = "SOCKETS_JWT_JWKS_REFETCH", global = true)]
    pub jwt_jwks_refetch: Option<u64>,
    /// Required `iss` claim.
    #[arg(long, env = "SOCKETS_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "SOCKETS_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Comma-separated allow-list of JWT algorithms.
    #[arg(long, env = "SOCKETS_JWT_ALGORITHMS", global = true)]
    pub jwt_algorithms: Option<String>,
    /// Clock leeway for `exp`/`nbf`, in seconds.
    #[arg(long, env = "SOCKETS_JWT_LEEWAY", global = true)]
    pub jwt_leeway: Option<u64>,
    /// Folder of `*.wasm` plugins.
    #[arg(long, env = "SOCKETS_PLUGINS_DIR", global = true)]
    pub plugins_dir: Option<PathBuf>,
    /// Embedded store folder.
    #[arg(long, env = "SOCKETS_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// User directory file (JSON) for the embedded default.
    #[arg(long, env = "SOCKETS_USERS_FILE", global = true)]
    pub users_file: Option<PathBuf>,
    /// RabbitMQ URL.
    #[arg(long, env = "SOCKETS_AMQP_URL", global = true, hide_env_values = true)]
    pub amqp_url: Option<String>,
    /// Topic exchange of backend events.
    #[arg(long, env = "SOCKETS_AMQP_EXCHANGE", global = true)]
    pub amqp_exchange: Option<String>,
    /// Exchange (and queue) of dead letters.
    #[arg(long, env = "SOCKETS_AMQP_DEAD_EXCHANGE", global = true)]
    pub amqp_dead_exchange: Option<String>,
    /// The intake queue shared by all nodes.
    #[arg(long, env = "SOCKETS_AMQP_QUEUE", global = true)]
    pub amqp_queue: Option<String>,
    /// Unacknowledged broker messages in flight per node.
    #[arg(long, env = "SOCKETS_AMQP_PREFETCH", global = true)]
    pub amqp_prefetch: Option<u16>,
    /// Direct exchange that carries deliveries between nodes.
    #[arg(long, env = "SOCKETS_AMQP_NODES_EXCHANGE", global = true)]
    pub amqp_nodes_exchange: Option<String>,
    /// Deliver across nodes (default true); `false` for a single node that
    /// only takes its intake from the broker, saving one broker message per
    /// delivery.
    #[arg(long, env = "SOCKETS_AMQP_CLUSTER", global = true)]
    pub amqp_cluster: Option<bool>,
    /// Shared secret that signs every message between nodes (HMAC-SHA256);
    /// required when the cluster link is on.
    #[arg(
        long,
        env = "SOCKETS_CLUSTER_KEY",
        global = true,
        hide_env_values = true
    )]
    pub cluster_key: Option<String>,
    /// MongoDB URL.
    #[arg(long, env = "SOCKETS_MONGO_URL", global = true, hide_env_values = true)]
    pub mongo_url: Option<String>,
    /// MongoDB database name.
    #[arg(long, env = "SOCKETS_MONGO_DB", global = true)]
    pub mongo_db: Option<String>,
    /// Seconds without renewal after which a node counts as dead and its
    /// connection records are removed (MongoDB only).
    #[arg(long, env = "SOCKETS_NODE_LEASE", global = true)]
    pub node_lease: Option<u64>,
    /// Seconds the notification log keeps a record (0 = for ever); past it
    /// a `resume` answers `not_found`.
    #[arg(long, env = "SOCKETS_LOG_RETENTION", global = true)]
    pub log_retention: Option<u64>,
    /// MiB the embedded notification log may take on disk (0 = no cap);
    /// its oldest segments go first.
    #[arg(long, env = "SOCKETS_LOG_MAX_MB", global = true)]
    pub log_max_mb: Option<u64>,
    /// Comma-separated Origin allow-list.
    #[arg(long, env = "SOCKETS_ALLOWED_ORIGINS", global = true)]
    pub allowed_origins: Option<String>,
    /// Inbound frames per second per connection (burst 2x; 0 = off).
    #[arg(long, env = "SOCKETS_RATE_LIMIT", global = true)]
    pub rate_limit: Option<u32>,
    /// Seconds between server pings.
    #[arg(long, env = "SOCKETS_PING_INTERVAL", global = true)]
    pub ping_interval: Option<u64>,
    /// Seconds without a frame or pong before a connection is closed.
    #[arg(long, env = "SOCKETS_IDLE_TIMEOUT", global = true)]
    pub idle_timeout: Option<u64>,
    /// Open connections (WebSocket and HTTP) before new ones get 503.
    #[arg(long, env = "SOCKETS_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers.
    #[arg(long, env = "SOCKETS_HEADER_TIMEOUT", global = true)]
    pub header_timeout: Option<u64>,
    /// Longest user id (`sub`, or one a client names), bytes.
    #[arg(long, env = "SOCKETS_MAX_USER_ID_BYTES", global = true)]
    pub max_user_id_bytes: Option<usize>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "SOCKETS_LOG", global = true)]
    pub log: Option<String>,
    /// Serve the demo page at `/demo` (default: on in dev mode on the
    /// embedded store, off otherwise).
    #[arg(long, env = "SOCKETS_DEMO", global = true)]
    pub demo: Option<bool>,
    /// Per-plugin JSON configuration, from the file's `[plugins.NAME]` tables.
    #[arg(skip)]
    #[serde(default)]
    pub plugins: BTreeMap<String, toml::Value>,
}

impl Settings {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Invalid {
            setting: "--config",
            why: format!("cannot read {}: {err}", path.display()),
        })?;
        toml::from_str(&text).map_err(|err| ConfigError::Invalid {
            setting: "--config",
            why: format!("{}: {err}", path.display()),
        })
    }

    /// Fills every field not set here from `lower` (these settings win).
    pub fn or(self, lower: Settings) -> Settings {
        let mut plugins = lower.plugins;
        plugins.extend(self.plugins);
        Settings {
            listen: self.listen.or(lower.listen),
            jwt_secret: self.jwt_secret.or(lower.jwt_secret),
            jwt_public_key: self.jwt_public_key.or(lower.jwt_public_key),
            jwt_jwks_url: self.jwt_jwks_url.or(lower.jwt_jwks_url),
            jwt_jwks_refetch: self.jwt_jwks_refetch.or(lower.jwt_jwks_refetch),
            jwt_issuer: self.jwt_issuer.or(lower.jwt_issuer),
            jwt_audience: self.jwt_audience.or(lower.jwt_audience),
            jwt_algorithms: self.jwt_algorithms.or(lower.jwt_algorithms),
            jwt_leeway: self.jwt_leeway.or(lower.jwt_leeway),
            plugins_dir: self.plugins_dir.or(lower.plugins_dir),
            data_dir: self.data_dir.or(lower.data_dir),
            users_file: self.users_file.or(lower.users_file),
            amqp_url: self.amqp_url.or(lower.amqp_url),
            amqp_exchange: self.amqp_exchange.or(lower.amqp_exchange),
            amqp_dead_exchange: self.amqp_dead_exchange.or(lower.amqp_dead_exchange),
            amqp_queue: self.amqp_queue.or(lower.amqp_queue),
            amqp_prefetch: self.amqp_prefetch.or(lower.amqp_prefetch),
            amqp_nodes_exchange: self.amqp_nodes_exchange.or(lower.amqp_nodes_exchange),
            amqp_cluster: self.amqp_cluster.or(lower.amqp_cluster),
            cluster_key: self.cluster_key.or(lower.cluster_key),
            max_connections: self.max_connections.or(lower.max_connections),
            header_timeout: self.header_timeout.or(lower.header_timeout),
            max_user_id_bytes: self.max_user_id_bytes.or(lower.max_user_id_bytes),
            mongo_url: self.mongo_url.or(lower.mongo_url),
            mongo_db: self.mongo_db.or(lower.mongo_db),
            node_lease: self.node_lease.or(lower.node_lease),
            log_retention: self.log_retention.or(lower.log_retention),
            log_max_mb: self.log_max_mb.or(lower.log_max_mb),
            allowed_origins: self.allowed_origins.or(lower.allowed_origins),
            rate_limit: self.rate_limit.or(lower.rate_limit),
            ping_interval: self.ping_interval.or(lower.ping_interval),
            idle_timeout: self.idle_timeout.or(lower.idle_timeout),
            log: self.log.or(lower.log),
            demo: self.demo.or(lower.demo),
            plugins,
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value is unusable.
    #[error("invalid {setting}: {why}")]
    Invalid {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// HS256 secret; `None` only before the dev secret is chosen.
    pub secret: Option<String>,
    /// PEM public key contents (RS256/ES256).
    pub public_key_pem: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Allowed algorithms, as named in JWT headers (`HS256`, `RS256`, …).
    pub algorithms: Option<Vec<String>>,
    /// Clock leeway for `exp`/`nbf`.
    pub leeway: Duration,
    /// Longest accepted `sub`, bytes (a longer one is refused, `401`).
    pub max_sub_bytes: usize,
    /// Where RS256/ES256 keys are published (JWKS), when they are.
    pub jwks_url: Option<String>,
    /// Shortest time between two JWKS fetches caused by unknown `kid`s.
    pub jwks_refetch: Duration,
}

impl JwtConfig {
    /// HS256 tokens under `secret`, with every other setting at its default
    /// (PROTOCOL §9): what tests and tools that mint their own tokens use.
    pub fn with_secret(secret: &str) -> Self {
        let settings = Settings {
            jwt_secret: Some(secret.to_owned()),
            ..Settings::default()
        };
        Config::from_settings(settings)
            .expect("the default settings are valid")
            .jwt
    }
}

/// Per-connection limits (PROTOCOL.md §6).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest reassembled inbound message, bytes.
    pub max_message_bytes: usize,
    /// Sustained inbound frames per second (0 = unlimited); burst is twice.
    pub rate_limit: u32,
    /// How long a client may keep being rate-limited before it is closed.
    pub abuse_window: Duration,
    /// Frames queued for one connection before it counts as too slow.
    pub outbound_queue_frames: usize,
    /// Interval between server pings.
    pub ping_interval: Duration,
    /// Silence after which a connection is closed.
    pub idle_timeout: Duration,
    /// Largest `setConnection` details, bytes of compact JSON.
    pub max_details_bytes: usize,
    /// Largest HTTP request body, bytes.
    pub max_body_bytes: usize,
    /// Largest plugin upload on the admin API, bytes.
    pub max_plugin_bytes: usize,
    /// Open connections (HTTP and WebSocket) before new ones get `503`.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Longest user id, bytes (`sub`; plugins check the ids clients name).
    pub max_user_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65_536,
            rate_limit: 100,
            abuse_window: Duration::from_secs(10),
            outbound_queue_frames: 1024,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_details_bytes: 4096,
            max_body_bytes: 1 << 20,
            max_plugin_bytes: 16 << 20,
            max_connections: 100_000,
            header_read_timeout: Duration::from_secs(10),
            max_user_id_bytes: 256,
        }
    }
}

/// The validated configuration of a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Token verification.
    pub jwt: JwtConfig,
    /// Folder of plugins.
    pub plugins_dir: PathBuf,
    /// Embedded store folder.
    pub data_dir: PathBuf,
    /// Users file of the embedded directory.
    pub users_file: PathBuf,
    /// The RabbitMQ intake, when a broker is used.
    pub amqp: Option<AmqpSettings>,
    /// MongoDB URL, when MongoDB is used.
    pub mongo_url: Option<String>,
    /// MongoDB database.
    pub mongo_db: String,
    /// A node's lease in the store (MongoDB only).
    pub node_lease: Duration,
    /// How much of the notification log is kept.
    pub log_retention: crate::store::LogRetention,
    /// Allowed `Origin`s; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    /// Per-connection limits.
    pub limits: Limits,
    /// Log filter.
    pub log: String,
    /// Per-plugin JSON configuration, by plugin name.
    pub plugin_configs: BTreeMap<String, String>,
    /// The config file, watched for plugin configuration changes.
    pub config_file: Option<PathBuf>,
    /// `SOCKETS_DEMO`, when set.
    pub demo: Option<bool>,
    /// No key is configured: the server signs with the dev secret (set by
    /// `server::apply_dev_mode`).
    pub dev_mode: bool,
}

impl Config {
    /// Whether `/demo` is served: as set, or on the embedded default (dev
    /// mode, no MongoDB).
    pub fn demo_page(&self) -> bool {
        self.demo
            .unwrap_or(self.dev_mode && self.mongo_url.is_none())
    }
}

/// The plugins folder a newcomer gets: what `scripts/build-plugins.sh` builds.
pub fn default_plugins_dir() -> PathBuf {
    let host_crate = Path::new(env!("CARGO_MANIFEST_DIR"));
    host_crate
        .parent()
        .unwrap_or(host_crate)
        .join("target/plugins/wasm32-wasip2/release")
}

/// `path` made absolute against the working directory, once at start: a
/// relative path would otherwise mean something else to each library that
/// opens it (wasmtime's cache refuses relative ones outright) and to the
/// plugins folder watcher.
pub fn absolute(path: &Path, setting: &'static str) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|err| ConfigError::Invalid {
        setting,
        why: format!(
            "cannot resolve {} against the working directory: {err}",
            path.display()
        ),
    })
}

/// The `[plugins.NAME]` tables as JSON text, by plugin name.
pub fn plugin_configs(settings: &Settings) -> Result<BTreeMap<String, String>, ConfigError> {
    settings
        .plugins
        .iter()
        .map(|(name, value)| {
            serde_json::to_string(value)
                .map(|json| (name.clone(), json))
                .map_err(|err| ConfigError::Invalid {
                    setting: "plugins",
                    why: format!("[plugins.{name}]: {err}"),
                })
        })
        .collect()
}

/// A JWKS URL is only as trustworthy as the way its keys arrive and the
/// tokens they may verify: `https://` (plain `http://` only to this
/// machine), and an issuer is required, since identity providers publish
/// keys shared by many tenants and apps; tokens of the others must not
/// pass.
fn checked_jwks_url(url: String, issuer: Option<&str>) -> Result<String, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid {
        setting: "SOCKETS_JWT_JWKS_URL",
        why: why.into(),
    };
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|prefix| {
            url.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
        });
    if !url.starts_with("https://") && !loopback {
        return Err(invalid(
            "must be an https:// URL (http:// only to 127.0.0.1, localhost or [::1])",
        ));
    }
    if issuer.is_none_or(str::is_empty) {
        return Err(invalid(
            "needs SOCKETS_JWT_ISSUER: keys published by an identity provider may sign \
             tokens of other tenants and apps",
        ));
    }
    Ok(url)
}

fn comma_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Config {
    /// Validates settings and fills in defaults.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let public_key_pem = match &settings.jwt_public_key {
            Some(path) => {
                let path = absolute(path, "SOCKETS_JWT_PUBLIC_KEY")?;
                Some(
                    std::fs::read_to_string(&path).map_err(|err| ConfigError::Invalid {
                        setting: "SOCKETS_JWT_PUBLIC_KEY",
                        why: format!("cannot read {}: {err}", path.display()),
                    })?,
                )
            }
            None => None,
        };
        if settings.jwt_secret.as_deref() == Some("") {
            return Err(ConfigError::Invalid {
                setting: "SOCKETS_JWT_SECRET",
                why: "empty".into(),
            });
        }
        let plugin_configs = plugin_configs(&settings)?;
        let seconds = |value: Option<u64>, default: u64, setting: &'static str| {
            let value = value.unwrap_or(default);
            if value == 0 {
                Err(ConfigError::Invalid {
                    setting,
                    why: "must be at least 1 second".into(),
                })
            } else {
                Ok(Duration::from_secs(value))
            }
        };
        let limits = Limits {
            rate_limit: settings.rate_limit.unwrap_or(100),
            ping_interval: seconds(settings.ping_interval, 25, "SOCKETS_PING_INTERVAL")?,
            idle_timeout: seconds(settings.idle_timeout, 60, "SOCKETS_IDLE_TIMEOUT")?,
            header_read_timeout: seconds(settings.header_timeout, 10, "SOCKETS_HEADER_TIMEOUT")?,
            max_connections: match settings.max_connections {
                Some(0) => {
                    return Err(ConfigError::Invalid {
                        setting: "SOCKETS_MAX_CONNECTIONS",
                        why: "must be at least 1".into(),
                    });
                }
                Some(max) => max,
                None => Limits::default().max_connections,
            },
            max_user_id_bytes: match settings.max_user_id_bytes {
                // Plugins check the ids clients name against 256 (the SDK's
                // UserId); a host limit above it would accept users whose
                // ids plugins refuse.
                Some(0 | 257..) => {
                    return Err(ConfigError::Invalid {
                        setting: "SOCKETS_MAX_USER_ID_BYTES",
                        why: "must be 1 to 256".into(),
                    });
                }
                Some(max) => max,
                None => Limits::default().max_user_id_bytes,
            },
            ..Limits::default()
        };
        let cluster_on = settings.amqp_url.is_some() && settings.amqp_cluster.unwrap_or(true);
        if cluster_on && settings.cluster_key.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::Invalid {
                setting: "SOCKETS_CLUSTER_KEY",
                why: "the cluster link (SOCKETS_AMQP_URL) signs every message between nodes: \
                      set the same secret on every node, or SOCKETS_AMQP_CLUSTER=false for a \
                      single node"
                    .into(),
            });
        }
        Ok(Self {
            listen: settings
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            jwt: JwtConfig {
                secret: settings.jwt_secret,
                public_key_pem,
                issuer: settings.jwt_issuer.clone(),
                audience: settings.jwt_audience,
                algorithms: settings.jwt_algorithms.as_deref().map(comma_list),
                leeway: match settings.jwt_leeway.unwrap_or(30) {
                    leeway @ 0..=86_400 => Duration::from_secs(leeway),
                    _ => {
                        return Err(ConfigError::Invalid {
                            setting: "SOCKETS_JWT_LEEWAY",
                            why: "at most 86400 seconds (a day)".into(),
                        });
                    }
                },
                max_sub_bytes: limits.max_user_id_bytes,
                jwks_url: match settings.jwt_jwks_url {
                    Some(url) => Some(checked_jwks_url(url, settings.jwt_issuer.as_deref())?),
                    None => None,
                },
                jwks_refetch: seconds(settings.jwt_jwks_refetch, 30, "SOCKETS_JWT_JWKS_REFETCH")?,
            },
            plugins_dir: match &settings.plugins_dir {
                Some(dir) => absolute(dir, "SOCKETS_PLUGINS_DIR")?,
                None => default_plugins_dir(),
            },
            data_dir: absolute(
                settings.data_dir.as_deref().unwrap_or(Path::new("data")),
                "SOCKETS_DATA_DIR",
            )?,
            users_file: match &settings.users_file {
                Some(file) => absolute(file, "SOCKETS_USERS_FILE")?,
                None => crate::store::directory::demo_users_file().to_owned(),
            },
            amqp: settings.amqp_url.map(|url| AmqpSettings {
                url,
                exchange: settings
                    .amqp_exchange
                    .unwrap_or_else(|| "sockets.events".to_owned()),
                dead_exchange: settings
                    .amqp_dead_exchange
                    .unwrap_or_else(|| "sockets.dead".to_owned()),
                queue: settings
                    .amqp_queue
                    .unwrap_or_else(|| "sockets.intake".to_owned()),
                nodes_exchange: settings
                    .amqp_nodes_exchange
                    .unwrap_or_else(|| "sockets.nodes".to_owned()),
                cluster: settings.amqp_cluster.unwrap_or(true),
                cluster_key: settings.cluster_key,
                prefetch: settings.amqp_prefetch.unwrap_or(64),
                max_attempts: 3,
            }),
            mongo_url: settings.mongo_url,
            mongo_db: settings.mongo_db.unwrap_or_else(|| "sockets".to_owned()),
            node_lease: Duration::from_secs(settings.node_lease.unwrap_or(30).max(1)),
            log_retention: crate::store::LogRetention {
                max_age: match settings.log_retention {
                    Some(0) => None,
                    Some(seconds) => Some(Duration::from_secs(seconds)),
                    None => Some(crate::store::LogRetention::DEFAULT_AGE),
                },
                max_bytes: match settings.log_max_mb {
                    Some(0) => None,
                    Some(mib) => Some(mib.saturating_mul(1 << 20)),
                    None => Some(crate::store::LogRetention::DEFAULT_BYTES),
                },
            },
            allowed_origins: settings.allowed_origins.as_deref().map(comma_list),
            limits,
            log: settings.log.unwrap_or_else(|| "info".to_owned()),
            plugin_configs,
            config_file: None,
            demo: settings.demo,
            dev_mode: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_settings_win_and_gaps_are_filled_from_lower_ones() {
        let flags = Settings {
            rate_limit: Some(5),
            ..Settings::default()
        };
        let file: Settings = toml::from_str(
            "rate_limit = 50\nidle_timeout = 9\n[plugins.chat]\nallow = [{from = \"*\", to = \"*\"}]\n",
        )
        .unwrap();
        let config = Config::from_settings(flags.or(file)).unwrap();
        assert_eq!(config.limits.rate_limit, 5);
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(9));
        assert_eq!(config.limits.ping_interval, Duration::from_secs(25));
        assert_eq!(
            config.plugin_configs["chat"],
            r#"{"allow":[{"from":"*","to":"*"}]}"#
        );
    }

    #[test]
    fn defaults_follow_the_protocol() {
        let config = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.jwt.leeway, Duration::from_secs(30));
        assert_eq!(config.limits.rate_limit, 100);
        assert_eq!(config.mongo_db, "sockets");
        assert!(config.allowed_origins.is_none());
    }

    #[test]
    fn the_demo_page_is_on_for_the_embedded_default_only_unless_set() {
        let demo = |settings: Settings, dev_mode: bool| {
            let mut config = Config::from_settings(settings).unwrap();
            config.dev_mode = dev_mode;
            config.demo_page()
        };
        assert!(demo(Settings::default(), true));
        assert!(!demo(Settings::default(), false), "a key is configured");
        let mongo = || Settings {
            mongo_url: Some("mongodb://127.0.0.1:27017".into()),
            ..Settings::default()
        };
        assert!(!demo(mongo(), true), "a production store");
        let set = |on: bool, settings: Settings| Settings {
            demo: Some(on),
            ..settings
        };
        assert!(!demo(set(false, Settings::default()), true));
        assert!(demo(set(true, mongo()), false));
    }

    #[test]
    fn relative_paths_are_resolved_against_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        let config = Config::from_settings(Settings {
            plugins_dir: Some("./plugins".into()),
            users_file: Some("users.json".into()),
            ..Settings::default()
        })
        .unwrap();
        assert_eq!(config.data_dir, cwd.join("data"));
        assert_eq!(config.plugins_dir, cwd.join("plugins"));
        assert_eq!(config.users_file, cwd.join("users.json"));
        assert!(default_plugins_dir().is_absolute());
        assert!(
            !default_plugins_dir()
                .components()
                .any(|part| part == std::path::Component::ParentDir)
        );
    }

    #[test]
    fn a_jwks_url_needs_https_and_an_issuer() {
        let with = |url: &str, issuer: Option<&str>| {
            Config::from_settings(Settings {
                jwt_jwks_url: Some(url.into()),
                jwt_issuer: issuer.map(Into::into),
                ..Settings::default()
            })
        };
        assert!(with("https://id.example/jwks", Some("https://id.example")).is_ok());
        assert!(with("http://127.0.0.1:9000/jwks", Some("x")).is_ok());
        assert!(with("http://localhost/jwks", Some("x")).is_ok());
        assert!(with("http://id.example/jwks", Some("x")).is_err());
        assert!(with("http://127.0.0.1.evil.example/jwks", Some("x")).is_err());
        assert!(with("https://id.example/jwks", None).is_err());
    }

    #[test]
    fn unknown_file_keys_and_zero_timeouts_are_refused() {
        assert!(toml::from_str::<Settings>("listn = \"x\"").is_err());
        let zero = Settings {
            idle_timeout: Some(0),
            ..Settings::default()
        };
        assert!(Config::from_settings(zero).is_err());
    }
}
