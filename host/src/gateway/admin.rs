//! The admin API (PROTOCOL.md §8): list, upload, delete and roll back
//! plugins on a running server. Every route needs a token with role `admin`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, require_role};
use crate::hotswap::OperationError;

const ADMIN_ROLE: &str = "admin";

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    require_role(&state.auth, headers, ADMIN_ROLE).map(drop)
}

fn operation_error(err: OperationError) -> ApiError {
    let status = match &err {
        OperationError::BadName(_) | OperationError::Load(_) => StatusCode::BAD_REQUEST,
        OperationError::NotLoaded(_) | OperationError::NoPreviousVersion(_) => {
            StatusCode::NOT_FOUND
        }
        OperationError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, err.to_string())
}

/// `GET /admin/plugins`
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let (hits, misses) = state.manager.runtime().cache_stats();
    Ok(Json(json!({
        "plugins": state.manager.reports(),
        "cache": {"hits": hits, "misses": misses},
        "failedLoads": state.manager.failed_loads(),
    })))
}

/// `PUT /admin/plugins/{name}` with the `.wasm` as the body.
pub async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let body =
        body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    let report = state
        .manager
        .upload(&name, body.to_vec())
        .await
        .map_err(operation_error)?;
    Ok(Json(json!(report)))
}

/// `DELETE /admin/plugins/{name}`
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    state.manager.delete(&name).await.map_err(operation_error)?;
    Ok(Json(json!({"name": name, "status": "unloaded"})))
}

/// `POST /admin/plugins/{name}/rollback`
pub async fn rollback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let report = state
        .manager
        .rollback(&name)
        .await
        .map_err(operation_error)?;
    Ok(Json(json!(report)))
}
