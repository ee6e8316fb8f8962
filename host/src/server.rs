//! Assembles the server from a [`Config`] and runs it until shutdown:
//! library-first, so tests and the binary start it the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::cluster::{Cluster, ClusterKey, ClusterPresence, LocalNode, RemotePresence};
use crate::config::Config;
use crate::delivery::registry::ConnectionRegistry;
use crate::dispatch::{Dispatcher, PluginServices};
use crate::gateway::demo::Demo;
use crate::gateway::{self, AppState, ConnectionLimits, app};
use crate::health::Health;
use crate::intake::Idempotency;
use crate::intake::amqp::AmqpIntake;
use crate::metrics::Metrics;
use crate::plugin::manager::{self, PluginManager};
use crate::plugin::{PluginLimits, PluginRegistry, PluginRuntime};
use crate::store::directory::FileDirectory;
use crate::store::directory::{User, UserDirectory};
use crate::store::mongo::{
    Maintenance, Mongo, MongoConnections, MongoDirectory, MongoKeys, MongoLog, MongoPluginState,
};
use crate::store::plugin_state::{MemoryPluginState, PluginState};
use crate::store::{
    ConnectionStore, EmbeddedKeys, EmbeddedLog, MemoryConnections, NotificationLog,
    PUBLISHED_KEY_RETENTION, Presence, PublishedKeys,
};

/// How long shutdown waits for connections to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown then waits for the plugins to hear of the closes.
const LIFECYCLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown then waits for queued notification log records (the
/// MongoDB writer retries at most 5 s apart, so a database that is back gets
/// at least one more try).
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the listen address with a large accept backlog: tokio's default of
/// 128 drops connects during a connection storm.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| {
        format!("cannot listen on {addr} (SOCKETS_LISTEN; is another server using it?)")
    })?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// The HS256 secret of dev mode: chosen once, kept in the data folder so
/// that `sockets-host token` and restarts agree with the server.
pub fn dev_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("dev-jwt-secret");
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_owned();
        if !secret.is_empty() {
            return Ok(secret);
        }
    }
    std::fs::create_dir_all(data_dir).with_context(|| {
        format!(
            "cannot create the data folder {} (SOCKETS_DATA_DIR)",
            data_dir.display()
        )
    })?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(&path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret)
}

/// Fills in the dev secret when no key is configured; returns whether dev
/// mode is on.
pub fn apply_dev_mode(config: &mut Config) -> anyhow::Result<bool> {
    if config.jwt.secret.is_some()
        || config.jwt.public_key_pem.is_some()
        || config.jwt.jwks_url.is_some()
    {
        return Ok(false);
    }
    config.jwt.secret = Some(dev_secret(&config.data_dir)?);
    config.dev_mode = true;
    Ok(true)
}

/// Runs the server on `listener` until `shutdown` resolves, then stops
/// accepting, closes every WebSocket with 1001 and waits for in-flight work.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    start(config, listener).await?.serve(shutdown).await
}

/// A server whose stores, plugins and links are set up: it answers as soon
/// as [`Server::serve`] runs. Split from serving so that a caller can say
/// "listening" only once everything that can fail at start has succeeded.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    stop: watch::Sender<bool>,
    log: Arc<dyn NotificationLog>,
    /// The MongoDB node maintenance task, which removes this node's lease
    /// and records when it ends.
    maintenance: Option<tokio::task::JoinHandle<()>>,
    broker: Option<(Arc<Health>, tokio::task::JoinHandle<()>)>,
    /// The cluster link's own stop: flipped once nothing forwards copies.
    stop_link: watch::Sender<bool>,
    cluster_link: Option<tokio::task::JoinHandle<()>>,
    /// Keeps the plugins folder watched for as long as the server runs.
    _watcher: manager::FolderWatch,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Sets up everything the server needs (stores, plugins, broker links) on
/// `config`; the first failure is returned with what failed and where.
pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Server> {
    tracing::info!(
        data_dir = %config.data_dir.display(),
        plugins_dir = %config.plugins_dir.display(),
        users_file = %config.users_file.display(),
        config_file = %config.config_file.as_deref().map(|file| file.display().to_string()).unwrap_or_else(|| "none".into()),
        "starting",
    );
    // Said at every start: records past the window are deleted, the audit
    // included (an upgrade from a version without a window deletes at once).
    let retention = config.log_retention;
    tracing::info!(
        max_age_s = retention.max_age.map_or(0, |age| age.as_secs()),
        max_mib = retention.max_bytes.map_or(0, |bytes| bytes >> 20),
        "notification log window (SOCKETS_LOG_RETENTION, SOCKETS_LOG_MAX_MB; 0: no limit)"
    );
    let config = Arc::new(config);
    let auth = Arc::new(Authenticator::new(&config.jwt).context("JWT configuration")?);
    let (stop, stopped) = watch::channel(false);
    if let Some(jwks) = auth.jwks() {
        // Tokens signed with these keys are refused until the first fetch
        // succeeds; the server starts all the same (`/readyz` says why).
        if let Err(err) = jwks.refresh().await {
            tracing::warn!("no JWKS keys yet (SOCKETS_JWT_JWKS_URL): {err}");
        }
        tokio::spawn(crate::auth::jwks::keep_fresh(
            Arc::clone(jwks),
            stopped.clone(),
        ));
    }
    let connections = Arc::new(ConnectionRegistry::new());
    let metrics = Arc::new(Metrics::default());
    let instance_id: Arc<str> = crate::protocol::new_id().into();
    let store = match &config.mongo_url {
        Some(url) => Store::mongo(url, &config, &instance_id, stopped.clone()).await?,
        None => Store::embedded(&config, &connections)?,
    };
    if config.mongo_url.is_none() && config.amqp.as_ref().is_some_and(|amqp| amqp.cluster) {
        tracing::warn!(
            "clustered on the embedded store: each node keeps its own log and idempotency keys, \
             so an id published to two nodes is delivered by both; share MongoDB \
             (SOCKETS_MONGO_URL) for exactly-once across nodes"
        );
    }
    // In a cluster, the nodes' announcements count every node's connections
    // without a database call; otherwise the store knows what it knows.
    let cluster_settings = config
        .amqp
        .clone()
        .filter(|amqp| amqp.cluster)
        .map(|settings| (settings, Arc::new(RemotePresence::default())));
    let presence: Arc<dyn Presence> = match &cluster_settings {
        Some((_, remote)) => Arc::new(ClusterPresence {
            local: Arc::clone(&connections),
            remote: Arc::clone(remote),
        }),
        None => Arc::clone(&store.presence),
    };

    let cache_dir = config.data_dir.join("plugin-cache");
    let runtime = Arc::new(
        PluginRuntime::new(
            PluginLimits::default(),
            Arc::new(PluginServices {
                directory: Arc::clone(&store.directory),
                presence: Arc::clone(&presence),
                state: Arc::clone(&store.plugin_state),
                max_user_id_bytes: config.limits.max_user_id_bytes,
            }),
            Some(&cache_dir),
        )
        .with_context(|| {
            format!(
                "plugin runtime with its compilation cache in {} (SOCKETS_DATA_DIR)",
                cache_dir.display()
            )
        })?,
    );
    let plugins = Arc::new(PluginRegistry::new());
    let manager = Arc::new(PluginManager::new(
        runtime,
        Arc::clone(&plugins),
        config.plugins_dir.clone(),
        config.plugin_configs.clone(),
    ));
    manager.load_all().await;
    if plugins.snapshot().iter().next().is_none() {
        tracing::warn!(
            "no plugin loaded from {} (SOCKETS_PLUGINS_DIR): every event is unknown_event \
             until one is; build the bundled ones with scripts/build-plugins.sh",
            config.plugins_dir.display()
        );
    }
    let watcher =
        manager::watch(Arc::clone(&manager), config.config_file.clone()).with_context(|| {
            format!(
                "watching the plugins folder {} (SOCKETS_PLUGINS_DIR)",
                config.plugins_dir.display()
            )
        })?;

    let cluster_key = match &cluster_settings {
        Some((settings, _)) => Some(
            ClusterKey::new(settings.cluster_key.as_deref().unwrap_or_default())
                .context("cluster link")?,
        ),
        None => None,
    };
    // A delivery repeats at the latest when another node takes over a
    // dead node's event, a lease after the fact.
    let recent = Arc::new(crate::delivery::recent::RecentDeliveries::new(
        config.node_lease * 2 + Duration::from_secs(30),
    ));
    // The link stops after everything that forwards copies has finished.
    let (stop_link, link_stopped) = watch::channel(false);
    let cluster = cluster_settings
        .zip(cluster_key)
        .map(|((settings, remote_presence), key)| {
            Cluster::start(
                settings,
                key,
                LocalNode {
                    instance_id: Arc::clone(&instance_id),
                    connections: Arc::clone(&connections),
                    remote: remote_presence,
                    metrics: Arc::clone(&metrics),
                    recent: Arc::clone(&recent),
                },
                link_stopped,
            )
        });
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&plugins),
        Arc::clone(&connections),
        Arc::clone(&store.log),
        Arc::clone(&metrics),
        cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
        recent,
    ));
    // Lifecycle events count this node's connections as it registers them
    // and, in a cluster, the other nodes' as they announced them (a
    // database's count lags behind a connection that just closed).
    let lifecycle = Arc::new(crate::lifecycle::Lifecycle::new(
        Arc::clone(&plugins),
        cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
    ));
    tokio::spawn(Arc::clone(&lifecycle).run(Arc::clone(&dispatcher)));
    let emitted = dispatcher
        .take_emitted()
        .expect("a new dispatcher's queue is there");
    match &config.amqp {
        Some(settings) => tokio::spawn(crate::intake::amqp::publish_emitted(
            settings.clone(),
            emitted,
            stopped.clone(),
        )),
        None => tokio::spawn(crate::intake::emit::route_locally(
            Arc::clone(&dispatcher),
            emitted,
        )),
    };
    let idempotency = Arc::new(Idempotency::new(store.keys, PUBLISHED_KEY_RETENTION));
    let broker = config.amqp.clone().map(|settings| {
        let status = Arc::new(Health::connecting());
        let intake = AmqpIntake {
            settings,
            dispatcher: Arc::clone(&dispatcher),
            plugins: Arc::clone(&plugins),
            idempotency: Arc::clone(&idempotency),
            status: Arc::clone(&status),
        };
        let intake = tokio::spawn(intake.run(stopped.clone()));
        (status, intake)
    });
    let connection_tasks = TaskTracker::new();
    let state = AppState {
        config: Arc::clone(&config),
        auth,
        connections: Arc::clone(&connections),
        connection_store: store.connections,
        store_health: store.health,
        dispatcher,
        lifecycle,
        log: Arc::clone(&store.log),
        plugins,
        manager,
        metrics,
        idempotency,
        broker: broker.as_ref().map(|(status, _)| Arc::clone(status)),
        cluster: cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
        shutdown: stopped,
        connection_tasks: connection_tasks.clone(),
        instance_id,
        demo: config.demo_page().then(|| {
            let sign_in = gateway::demo::sign_in_allowed(config.dev_mode, config.listen);
            if config.dev_mode && !sign_in {
                tracing::warn!(
                    listen = %config.listen,
                    "the demo page cannot sign in by itself: dev mode mints its tokens on a \
                     loopback address only (SOCKETS_LISTEN)"
                );
            }
            Arc::new(Demo {
                sign_in,
                directory: Arc::clone(&store.directory),
                users: store.listed_users,
            })
        }),
    };
    Ok(Server {
        listener,
        state,
        stop,
        log: store.log,
        maintenance: store.maintenance,
        broker,
        stop_link,
        cluster_link: cluster.map(|(_, link)| link),
        _watcher: watcher,
    })
}

impl Server {
    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting, closes every
    /// WebSocket with 1001 and waits for in-flight work.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            listener,
            state,
            stop,
            log,
            maintenance,
            broker,
            stop_link,
            cluster_link,
            _watcher,
        } = self;
        let connections = Arc::clone(&state.connections);
        let connection_tasks = state.connection_tasks.clone();
        let lifecycle = Arc::clone(&state.lifecycle);
        let limits = ConnectionLimits {
            max_connections: state.config.limits.max_connections,
            header_read_timeout: state.config.limits.header_read_timeout,
        };
        let metrics = Arc::clone(&state.metrics);
        gateway::serve(listener, app(state), limits, metrics, async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, closing sockets with 1001");
            let _ = stop.send(true);
        })
        .await;

        if let Some((_, intake)) = broker {
            // Stops consuming; unacknowledged messages go back to the queue.
            let _ = intake.await;
        }
        // Upgraded connections outlive the HTTP graceful shutdown: wait until
        // each has written its close frame.
        connection_tasks.close();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection_tasks.wait()).await;
        // Watchers on other nodes hear this node's users go offline.
        let _ = tokio::time::timeout(LIFECYCLE_DRAIN_TIMEOUT, lifecycle.drained()).await;
        if let Some(link) = cluster_link {
            // Publishes the copies still waiting and waits for the broker.
            let _ = stop_link.send(true);
            let _ = link.await;
        }
        flush_log(log.as_ref()).await;
        if let Some(maintenance) = maintenance {
            // Removes this node's lease and records.
            let _ = maintenance.await;
        }
        tracing::info!(open = connections.len(), "stopped");
        Ok(())
    }
}

/// Writes the notification log records still queued, e.g. those of clients
/// that heard `unavailable` while the database was slow, before the process
/// exits; gives up after [`LOG_FLUSH_TIMEOUT`] (a database still down).
async fn flush_log(log: &dyn NotificationLog) {
    tracing::info!("flushing the notification log (at most {LOG_FLUSH_TIMEOUT:?})");
    match tokio::time::timeout(LOG_FLUSH_TIMEOUT, log.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::error!("notification log not flushed at shutdown: {err}"),
        Err(_) => tracing::error!(
            "notification log records still queued after {LOG_FLUSH_TIMEOUT:?} are lost"
        ),
    }
}

/// The persistence a server runs on: the embedded default or MongoDB.
struct Store {
    log: Arc<dyn NotificationLog>,
    keys: Arc<dyn PublishedKeys>,
    connections: Arc<dyn ConnectionStore>,
    directory: Arc<dyn UserDirectory>,
    /// The users a directory can list (a users file's; MongoDB's are not).
    listed_users: Vec<User>,
    presence: Arc<dyn Presence>,
    /// Where plugins keep state.
    plugin_state: Arc<dyn PluginState>,
    /// The database's health, or whether the embedded log can be written.
    health: Arc<Health>,
    maintenance: Option<tokio::task::JoinHandle<()>>,
}

impl Store {
    /// The log on disk, connection records in memory, the users file.
    fn embedded(config: &Config, connections: &Arc<ConnectionRegistry>) -> anyhow::Result<Self> {
        let log =
            EmbeddedLog::open_with(&config.data_dir, config.log_retention).with_context(|| {
                format!(
                    "notification log in {} (SOCKETS_DATA_DIR)",
                    config.data_dir.display()
                )
            })?;
        let directory =
            FileDirectory::load(&config.users_file).context("users file (SOCKETS_USERS_FILE)")?;
        Ok(Self {
            health: log.health(),
            log: Arc::new(log),
            keys: Arc::new(
                EmbeddedKeys::open(&config.data_dir, PUBLISHED_KEY_RETENTION).with_context(
                    || {
                        format!(
                            "published keys in {} (SOCKETS_DATA_DIR)",
                            config.data_dir.display()
                        )
                    },
                )?,
            ),
            connections: Arc::new(MemoryConnections::new()),
            listed_users: directory.users(),
            directory: Arc::new(directory),
            presence: Arc::clone(connections) as Arc<dyn Presence>,
            plugin_state: Arc::new(MemoryPluginState::default()),
            maintenance: None,
        })
    }

    /// MongoDB for all four, with the node's maintenance task. Starts even
    /// when the database is down: `/readyz` says so and writes are retried.
    async fn mongo(
        url: &str,
        config: &Config,
        instance_id: &Arc<str>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let mongo = Mongo::connect(url, &config.mongo_db)
            .await
            .context("MongoDB configuration")?;
        let connections = MongoConnections::start(&mongo, Arc::clone(instance_id));
        let maintenance = Maintenance {
            mongo: mongo.clone(),
            instance_id: Arc::clone(instance_id),
            lease: config.node_lease,
            connections: Arc::clone(&connections),
            log_retention: config.log_retention.max_age,
        };
        Ok(Self {
            log: Arc::new(MongoLog::start(&mongo, config.log_retention.max_age)),
            keys: Arc::new(MongoKeys::new(
                &mongo,
                Arc::clone(instance_id),
                PUBLISHED_KEY_RETENTION,
                config.node_lease,
            )),
            directory: Arc::new(MongoDirectory::new(&mongo)),
            listed_users: Vec::new(),
            presence: Arc::clone(&connections) as Arc<dyn Presence>,
            plugin_state: Arc::new(MongoPluginState::new(&mongo)),
            connections,
            health: mongo.health(),
            maintenance: Some(tokio::spawn(maintenance.run(shutdown))),
        })
    }
}
