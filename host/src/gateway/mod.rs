//! The HTTP surface: routes, the WebSocket upgrade, the per-connection loop,
//! the publish API and the operational endpoints.

mod admin;
mod claims;
mod connection;
pub mod demo;
pub mod error;
mod ops;
mod publish;
pub mod rate;
mod replies;
mod resume;
mod serve;
mod upgrade;

pub use serve::{ConnectionLimits, ConnectionSlot, serve};

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::delivery::registry::ConnectionRegistry;
use crate::dispatch::Dispatcher;
use crate::health::Health;
use crate::intake::Idempotency;
use crate::metrics::Metrics;
use crate::plugin::PluginRegistry;
use crate::plugin::manager::PluginManager;
use crate::store::{ConnectionStore, NotificationLog};

/// Everything request handlers and connection tasks share.
#[derive(Clone)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// This node's live connections.
    pub connections: Arc<ConnectionRegistry>,
    /// Connection records.
    pub connection_store: Arc<dyn ConnectionStore>,
    /// The store's health: the database's, or whether the embedded log
    /// can be written.
    pub store_health: Arc<Health>,
    /// Event routing.
    pub dispatcher: Arc<Dispatcher>,
    /// Where connections report opening and closing (lifecycle events).
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// The notification log (`resume` reads it).
    pub log: Arc<dyn NotificationLog>,
    /// The loaded plugins.
    pub plugins: Arc<PluginRegistry>,
    /// Plugin operations (admin API).
    pub manager: Arc<PluginManager>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Seen idempotency keys of published events.
    pub idempotency: Arc<Idempotency>,
    /// The broker intake's health, when a broker is configured.
    pub broker: Option<Arc<Health>>,
    /// The link to the other nodes, when a broker is configured.
    pub cluster: Option<Arc<Cluster>>,
    /// Flips to `true` when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// This node's id, stored with its connection records.
    pub instance_id: Arc<str>,
    /// Every upgraded connection's task: shutdown waits for them, as a
    /// connection leaves the registry before its close frame is written.
    pub connection_tasks: TaskTracker,
    /// The `/demo` page, when it is served.
    pub demo: Option<Arc<demo::Demo>>,
}

/// The routes, testable without a socket.
pub fn app(state: AppState) -> Router {
    let max_body = state.config.limits.max_body_bytes;
    let max_plugin = state.config.limits.max_plugin_bytes;
    let admin = Router::new()
        .route("/admin/plugins", get(admin::list))
        .route(
            "/admin/plugins/{name}",
            put(admin::upload).delete(admin::delete),
        )
        .route("/admin/plugins/{name}/rollback", post(admin::rollback))
        .layer(DefaultBodyLimit::max(max_plugin));
    let api = Router::new()
        .route("/ws", get(upgrade::upgrade))
        .route("/api/events", post(publish::publish))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.yaml", get(ops::openapi))
        .layer(DefaultBodyLimit::max(max_body));
    let demo = match state.demo.as_deref() {
        Some(page) => demo::routes(page).layer(DefaultBodyLimit::max(max_body)),
        None => Router::new(),
    };
    api.merge(admin)
        .merge(demo)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}
