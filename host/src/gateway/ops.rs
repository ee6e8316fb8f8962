//! `GET /healthz`, `/readyz`, `/metrics` (PROTOCOL.md §8).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::AppState;
use super::claims::MaybeAdmin;

/// The process is alive.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Whether the dependencies are usable; the body says which are degraded.
/// With no plugin loaded no event can be routed; with the broker down no
/// backend event comes in. Why a dependency is degraded (its raw error,
/// which may name hosts and users) is shown to admin tokens only.
pub async fn readyz(
    MaybeAdmin(admin): MaybeAdmin,
    State(state): State<AppState>,
) -> impl IntoResponse {
    let plugins = state.plugins.snapshot();
    let loaded = plugins.iter().count();
    let status = |ok: bool| if ok { "ok" } else { "degraded" };
    let store_problem = state.store_health.problem();
    let backend = if state.config.mongo_url.is_some() {
        "mongodb"
    } else {
        "embedded"
    };
    let mut checks = json!({
        "store": {"status": status(store_problem.is_none()), "backend": backend, "error": store_problem},
        "plugins": {"status": status(loaded > 0), "loaded": loaded},
    });
    let mut ready = loaded > 0 && store_problem.is_none();
    if let Some(broker) = &state.broker {
        let problem = broker.problem();
        ready &= problem.is_none();
        checks["broker"] = json!({"status": status(problem.is_none()), "error": problem});
    }
    if let Some(jwks) = state.auth.jwks() {
        // Without keys, no token signed by the identity provider passes.
        let problem = if jwks.is_empty() {
            jwks.problem()
        } else {
            None
        };
        ready &= problem.is_none();
        checks["jwks"] = json!({
            "status": status(problem.is_none()),
            "keys": jwks.len(),
            "error": jwks.problem(),
        });
    }
    if let Some(cluster) = &state.cluster {
        let problem = cluster.status().problem();
        ready &= problem.is_none();
        checks["cluster"] = json!({"status": status(problem.is_none()), "error": problem});
    }
    if !admin && let Some(checks) = checks.as_object_mut() {
        for check in checks.values_mut() {
            if let Some(check) = check.as_object_mut() {
                check.remove("error");
            }
        }
    }
    let body = json!({
        "status": if ready { "ready" } else { "degraded" },
        "checks": checks,
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

/// The OpenAPI 3.1 document of this HTTP API (`docs/openapi.yaml`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// `GET /openapi.yaml`
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}
