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

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::connections::Connections;
use crate::directory::FileDirectory;
use crate::gateway::{AppState, app};
use crate::hotswap::{self, PluginManager};
use crate::intake::Idempotency;
use crate::intake::amqp::{AmqpIntake, BrokerStatus};
use crate::metrics::Metrics;
use crate::plugin::{PluginLimits, PluginRegistry, PluginRuntime};
use crate::router::{PluginServices, Router};
use crate::store::{EmbeddedLog, MemoryConnections};

/// How long idempotency keys are remembered (PROTOCOL: at least 10 minutes).
const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(15 * 60);
/// How long shutdown waits for connections to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
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
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
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
    if config.jwt.secret.is_some() || config.jwt.public_key_pem.is_some() {
        return Ok(false);
    }
    config.jwt.secret = Some(dev_secret(&config.data_dir)?);
    Ok(true)
}

/// Runs the server on `listener` until `shutdown` resolves, then stops
/// accepting, closes every WebSocket with 1001 and waits for in-flight work.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let auth = Arc::new(Authenticator::new(&config.jwt).context("JWT configuration")?);
    let directory = Arc::new(FileDirectory::load(&config.users_file)?);
    let connections = Arc::new(Connections::new());
    let metrics = Arc::new(Metrics::default());
    let log = Arc::new(EmbeddedLog::open(&config.data_dir).context("notification log")?);
    let runtime = Arc::new(PluginRuntime::new(
        PluginLimits::default(),
        Arc::new(PluginServices {
            directory,
            connections: Arc::clone(&connections),
        }),
        Some(&config.data_dir.join("plugin-cache")),
    )?);
    let plugins = Arc::new(PluginRegistry::new());
    let manager = Arc::new(PluginManager::new(
        runtime,
        Arc::clone(&plugins),
        config.plugins_dir.clone(),
        config.plugin_configs.clone(),
    ));
    manager.load_all().await;
    let _watcher = hotswap::watch(Arc::clone(&manager), config.config_file.clone())
        .context("watching the plugins folder")?;

    let (stop, stopped) = watch::channel(false);
    let instance_id: Arc<str> = crate::protocol::new_id().into();
    let cluster = config
        .amqp
        .clone()
        .filter(|amqp| amqp.cluster)
        .map(|settings| {
            Cluster::start(
                settings,
                Arc::clone(&instance_id),
                Arc::clone(&connections),
                Arc::clone(&metrics),
                stopped.clone(),
            )
        });
    let router = Arc::new(Router::new(
        Arc::clone(&plugins),
        Arc::clone(&connections),
        log,
        Arc::clone(&metrics),
        cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
    ));
    let idempotency = Arc::new(Idempotency::new(IDEMPOTENCY_RETENTION));
    let broker = config.amqp.clone().map(|settings| {
        let status = Arc::new(BrokerStatus::connecting());
        let intake = AmqpIntake {
            settings,
            router: Arc::clone(&router),
            plugins: Arc::clone(&plugins),
            idempotency: Arc::clone(&idempotency),
            status: Arc::clone(&status),
        };
        let intake = tokio::spawn(intake.run(stopped.clone()));
        (status, intake)
    });
    let state = AppState {
        config: Arc::clone(&config),
        auth,
        connections: Arc::clone(&connections),
        connection_store: Arc::new(MemoryConnections::new()),
        router,
        plugins,
        manager,
        metrics,
        idempotency,
        broker: broker.as_ref().map(|(status, _)| Arc::clone(status)),
        cluster: cluster.as_ref().map(|(cluster, _)| Arc::clone(cluster)),
        shutdown: stopped,
        instance_id,
    };

    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, closing sockets with 1001");
            let _ = stop.send(true);
        })
        .await?;

    if let Some((_, intake)) = broker {
        // Stops consuming; unacknowledged messages go back to the queue.
        let _ = intake.await;
    }
    // Upgraded connections outlive axum's graceful shutdown: wait for them.
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while !connections.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some((_, link)) = cluster {
        let _ = link.await;
    }
    tracing::info!(open = connections.len(), "stopped");
    Ok(())
}
