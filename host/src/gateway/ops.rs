//! `GET /healthz`, `/readyz`, `/metrics` (PROTOCOL.md §8).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::AppState;

/// The process is alive.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Whether the dependencies are usable; the body says which are degraded.
/// The embedded store is in-process, so readiness here is about plugins:
/// with none loaded, no event can be routed.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let plugins = state.plugins.snapshot();
    let loaded = plugins.iter().count();
    let plugins_check = if loaded > 0 { "ok" } else { "degraded" };
    let ready = loaded > 0;
    let body = json!({
        "status": if ready { "ready" } else { "degraded" },
        "checks": {
            "store": {"status": "ok", "backend": "embedded"},
            "plugins": {"status": plugins_check, "loaded": loaded},
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.metrics.render(
        state.connections.len(),
        &state.plugins.snapshot(),
        state.manager.failed_loads(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
