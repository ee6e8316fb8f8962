//! `GET /ws`: the Origin check, then the token, then the upgrade
//! (PROTOCOL.md §1). Rejections happen before the upgrade, as JSON.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Extension;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::AppState;
use super::connection::{self, Session};
use super::error::ApiError;
use super::serve::ConnectionSlot;
use crate::auth::{AuthError, Claims};

/// tungstenite zero-fills its whole read buffer before the first read, so
/// every idle connection holds it. Frames of the protocol are mostly a few
/// hundred bytes; a larger message grows the buffer as it arrives.
const READ_BUFFER_BYTES: usize = 1024;

/// Queued frames are written together up to this many bytes (then flushed
/// at the end of the batch): fewer write calls under load, and a bound on
/// the write buffer a burst leaves allocated.
const WRITE_BATCH_BYTES: usize = 8 * 1024;

pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    slot: Option<Extension<ConnectionSlot>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    check_origin(&state, &headers)?;
    let claims = authenticate(&state, &headers, query.ok().as_deref())
        .await
        .map_err(|err| ApiError::new(StatusCode::UNAUTHORIZED, err.to_string()))?;
    let upgrade =
        upgrade.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;

    let session = Session {
        claims,
        remote_addr: peer.to_string(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
    };
    let limits = &state.config.limits;
    Ok(upgrade
        .max_message_size(limits.max_message_bytes)
        .max_frame_size(limits.max_message_bytes)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .on_upgrade(move |socket| {
            let tasks = state.connection_tasks.clone();
            let connection = connection::run(socket, state, session);
            tasks.track_future(async move {
                // The socket counts against SOCKETS_MAX_CONNECTIONS until
                // the connection ends, not only until the upgrade.
                let _slot = slot;
                connection.await;
            })
        }))
}

/// With an allow-list configured, a browser `Origin` must be on it; requests
/// without `Origin` (not browsers) pass.
fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let (Some(allowed), Some(origin)) =
        (&state.config.allowed_origins, headers.get(header::ORIGIN))
    else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if allowed.iter().any(|candidate| candidate == origin) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, "origin not allowed"))
    }
}

/// The header wins; when it is present but bad, the query is not tried.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&HashMap<String, String>>,
) -> Result<Claims, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        return state.auth.verify_bearer_fresh(value).await;
    }
    match query.and_then(|query| query.get("access_token")) {
        Some(token) if !token.is_empty() => state.auth.verify_fresh(token).await,
        _ => Err(AuthError::Missing),
    }
}
