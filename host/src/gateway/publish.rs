//! `POST /api/events`: backend services publish events over HTTP
//! (PROTOCOL.md §5), into the same dispatcher as every other intake.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::claims::{Authorized, LimitedBody, RequestBodyLimit, ServiceRole};
use super::error::ApiError;
use crate::dispatch::{Inbound, RouteError};
use crate::intake::Accepted;
use crate::plugin::{Event, Origin};
use crate::protocol::{is_valid_event_name, new_id, rfc3339};
use crate::store::Source;

/// Longest idempotency key: it becomes part of delivery ids and log ids.
const MAX_ID_BYTES: usize = 256;

/// An event to route, as a backend service (or the demo page) publishes it.
pub(super) struct Publication {
    pub(super) event: String,
    pub(super) data: String,
    pub(super) key: Option<String>,
}

pub async fn publish(
    Authorized { claims, .. }: Authorized<ServiceRole>,
    State(state): State<AppState>,
    body: LimitedBody<RequestBodyLimit>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let publication = parse(&body.bytes)?;
    accept(&state, publication, claims.sub).await
}

/// Routes a publication from `from` exactly as `POST /api/events` does:
/// `202` with the recipients, a repeated key answered like the first call.
pub(super) async fn accept(
    state: &AppState,
    publication: Publication,
    from: String,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let inbound = Inbound {
        event: Event {
            id: publication.key.clone().unwrap_or_else(new_id),
            name: publication.event.clone(),
            origin: Origin::Api(from.clone()),
            data: publication.data.clone(),
            received_at: rfc3339(SystemTime::now()),
        },
        source: Source::Api,
        from,
        depth: 0,
    };
    let rejected = |err: RouteError| {
        tracing::info!(event = %publication.event, "published event rejected: {err}");
        ApiError::from_body(err.to_error_body())
    };
    let (accepted, duplicate) = state
        .idempotency
        .run(publication.key.as_deref(), || async {
            let routed = state.dispatcher.route(&inbound).await?;
            Ok::<_, RouteError>(Accepted {
                event_id: inbound.event.id.clone(),
                recipients: routed.recipients,
            })
        })
        .await
        .map_err(rejected)?;
    // PROTOCOL §5: the body is validated first, then a repeated id answers
    // like the first call. The plugins are the validators: a repeat is
    // shown to them (nothing is delivered) before it is called a duplicate.
    if duplicate {
        state.dispatcher.check(&inbound).map_err(rejected)?;
    }

    let mut body = json!({"id": accepted.event_id, "recipients": accepted.recipients});
    if duplicate {
        body["duplicate"] = Value::Bool(true);
    }
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// `{"event": "<name>", "data": <any>, "id": "<optional key>"}`
pub(super) fn parse(body: &[u8]) -> Result<Publication, ApiError> {
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
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_ID_BYTES => Some(id),
        Some(_) => return Err(bad("`id` must be a string of 1-256 bytes")),
    };
    let data = fields.remove("data").unwrap_or(Value::Null).to_string();
    Ok(Publication { event, data, key })
}
