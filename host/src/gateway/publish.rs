//! `POST /api/events`: backend services publish events over HTTP
//! (PROTOCOL.md §5), into the same router as every other intake.

use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, require_role};
use crate::intake::Accepted;
use crate::plugin::{Event, Origin};
use crate::protocol::{is_valid_event_name, new_id, rfc3339};
use crate::router::{Inbound, RouteError};
use crate::store::Source;

/// The role a publishing token must carry.
const SERVICE_ROLE: &str = "service";

struct Publication {
    event: String,
    data: String,
    key: Option<String>,
}

pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let claims = require_role(&state.auth, &headers, SERVICE_ROLE)?;
    let body =
        body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    let publication = parse(&body)?;

    let (accepted, duplicate) = state
        .idempotency
        .run(publication.key.as_deref(), || async {
            let event_id = publication.key.clone().unwrap_or_else(new_id);
            let inbound = Inbound {
                event: Event {
                    id: event_id.clone(),
                    name: publication.event.clone(),
                    origin: Origin::Api(claims.sub.clone()),
                    data: publication.data.clone(),
                    received_at: rfc3339(SystemTime::now()),
                },
                source: Source::Api,
                from: claims.sub.clone(),
            };
            let routed = state.router.route(&inbound).await?;
            Ok::<_, RouteError>(Accepted {
                event_id,
                recipients: routed.recipients,
            })
        })
        .await
        .map_err(|err| {
            tracing::info!(event = %publication.event, "published event rejected: {err}");
            ApiError::from_body(err.to_error_body())
        })?;

    let mut body = json!({"id": accepted.event_id, "recipients": accepted.recipients});
    if duplicate {
        body["duplicate"] = Value::Bool(true);
    }
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// `{"event": "<name>", "data": <any>, "id": "<optional key>"}`
fn parse(body: &[u8]) -> Result<Publication, ApiError> {
    let bad = |message: &str| ApiError::new(StatusCode::BAD_REQUEST, message);
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(bad("the body must be a JSON object"));
    };
    let event = match fields.remove("event") {
        Some(Value::String(event)) if is_valid_event_name(&event) => event,
        Some(Value::String(_)) => return Err(bad("`event` must be 1-64 chars of [A-Za-z0-9_.:-]")),
        None | Some(Value::Null) => return Err(bad("`event` is required")),
        Some(_) => return Err(bad("`event` must be a string")),
    };
    let key = match fields.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() => Some(id),
        Some(_) => return Err(bad("`id` must be a non-empty string")),
    };
    let data = fields.remove("data").unwrap_or(Value::Null).to_string();
    Ok(Publication { event, data, key })
}
