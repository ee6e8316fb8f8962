//! The admin API (PROTOCOL.md §8): list, upload, delete and roll back
//! plugins on a running server. Every route needs a token with role `admin`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::claims::{AdminRole, Authorized, LimitedBody, UploadLimit};
use super::error::ApiError;
use crate::plugin::manager::OperationError;

/// Every admin route takes this before anything else (the upload's body
/// included).
type Admin = Authorized<AdminRole>;

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
pub async fn list(_admin: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (hits, misses) = state.manager.runtime().cache_stats();
    Ok(Json(json!({
        "plugins": state.manager.reports(),
        "cache": {"hits": hits, "misses": misses},
        "failedLoads": state.manager.failed_loads(),
    })))
}

/// `PUT /admin/plugins/{name}` with the `.wasm` as the body.
pub async fn upload(
    _admin: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: LimitedBody<UploadLimit>,
) -> Result<Json<Value>, ApiError> {
    let report = state
        .manager
        .upload(&name, body.bytes.to_vec())
        .await
        .map_err(operation_error)?;
    Ok(Json(json!(report)))
}

/// `DELETE /admin/plugins/{name}`
pub async fn delete(
    _admin: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.manager.delete(&name).await.map_err(operation_error)?;
    Ok(Json(json!({"name": name, "status": "unloaded"})))
}

/// `POST /admin/plugins/{name}/rollback`
pub async fn rollback(
    _admin: Admin,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let report = state
        .manager
        .rollback(&name)
        .await
        .map_err(operation_error)?;
    Ok(Json(json!(report)))
}
