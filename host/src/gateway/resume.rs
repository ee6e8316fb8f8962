//! The `resume` event (PROTOCOL §3, v1.1): the pushes a client missed while
//! it was away, sent again from the notification log on its connection,
//! then the reply.

use std::time::Duration;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::delivery::registry::{CLOSE_TRY_AGAIN_LATER, ConnectionHandle, Push};
use crate::metrics::Metrics;
use crate::protocol::{ErrorBody, ErrorCode, parse_rfc3339, push_frame};
use crate::store::{NotificationLog, ReplayFrom};

/// Most pushes one `resume` sends, and its default.
pub const MAX_LIMIT: u64 = 1000;
/// How long a replay waits for the client to read before the connection
/// is closed as too slow (1013), as a live push to a full queue would.
const ROOM_WAIT: Duration = Duration::from_secs(10);
/// The longest a whole replay may take, waits for room included: the
/// connection's reader handles nothing else meanwhile.
const REPLAY_WAIT: Duration = Duration::from_secs(30);
/// The longest a replay waits for this node's log writes in flight (with
/// MongoDB down they wait for the database).
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// A valid `resume` request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Where the replay starts.
    pub from: ReplayFrom,
    /// Most pushes to send.
    pub limit: usize,
}

fn bad_request(message: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, message)
}

impl Request {
    /// Reads `data`: exactly one of `after` (a non-empty string) and `since`
    /// (RFC 3339), and `limit`, an integer 1–1000; `null` is absent.
    pub fn parse(data: &RawValue) -> Result<Self, ErrorBody> {
        let Ok(Value::Object(data)) = serde_json::from_str::<Value>(data.get()) else {
            return Err(bad_request("`data` must be a JSON object"));
        };
        let present = |field: &str| data.get(field).filter(|value| !value.is_null());
        let from = match (present("after"), present("since")) {
            (Some(after), None) => match after {
                Value::String(after) if !after.is_empty() => ReplayFrom::After(after.clone()),
                _ => return Err(bad_request("`after` must be a non-empty string")),
            },
            (None, Some(since)) => match since.as_str().and_then(parse_rfc3339) {
                Some(at) => ReplayFrom::Since(at),
                None => return Err(bad_request("`since` must be an RFC 3339 time")),
            },
            _ => return Err(bad_request("give exactly one of `after` and `since`")),
        };
        let limit = match present("limit") {
            None => MAX_LIMIT,
            Some(limit) => match limit.as_u64() {
                Some(limit @ 1..=MAX_LIMIT) => limit,
                _ => return Err(bad_request("`limit` must be an integer from 1 to 1000")),
            },
        };
        Ok(Self {
            from,
            limit: limit as usize,
        })
    }
}

/// Sends the pushes of `request` to `connection`, in log order, and
/// returns the reply's data.
pub async fn replay(
    log: &dyn NotificationLog,
    connection: &ConnectionHandle,
    metrics: &Metrics,
    request: &Request,
) -> Result<Box<RawValue>, ErrorBody> {
    let unavailable =
        |err: crate::store::StoreError| ErrorBody::new(ErrorCode::Unavailable, err.to_string());
    // This node pushes before it logs: the push a client resumes after may
    // still be on its way to the log.
    tokio::time::timeout(FLUSH_WAIT, log.flush())
        .await
        .map_err(|_| ErrorBody::new(ErrorCode::Unavailable, "the log is not writable now"))?
        .map_err(unavailable)?;
    let page = log
        .replay(&connection.user_id, &request.from, request.limit)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotFound,
                "`after` is not a push to this user that the log still holds: reload from the backend",
            )
        })?;
    let deadline = tokio::time::Instant::now() + REPLAY_WAIT;
    for record in &page.records {
        let frame = push_frame(&record.event, &record.data, record.delivery_id());
        let wait = ROOM_WAIT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, connection.push_when_room(frame.into())).await {
            Ok(Push::Queued) => {}
            Ok(Push::Closed | Push::TooSlow) => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "the connection closed",
                ));
            }
            Err(_) => {
                connection.request_close(CLOSE_TRY_AGAIN_LATER, "too slow");
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    "the client does not read",
                ));
            }
        }
    }
    metrics.resumed(page.records.len());
    let reply = serde_json::json!({"replayed": page.records.len(), "more": page.more});
    Ok(serde_json::value::to_raw_value(&reply).expect("JSON serializes"))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn parse(data: &str) -> Result<Request, ErrorCode> {
        let data = RawValue::from_string(data.to_owned()).unwrap();
        Request::parse(&data).map_err(|error| error.code)
    }

    #[test]
    fn after_or_since_with_a_limit() {
        assert_eq!(
            parse(r#"{"after":"d1"}"#),
            Ok(Request {
                from: ReplayFrom::After("d1".into()),
                limit: 1000
            })
        );
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_551_200);
        assert_eq!(
            parse(r#"{"since":"2026-12-06T10:00:00Z","limit":5,"after":null}"#),
            Ok(Request {
                from: ReplayFrom::Since(since),
                limit: 5
            })
        );
        assert_eq!(
            parse(r#"{"since":"2026-12-06T11:00:00+01:00","limit":null}"#).map(|r| r.from),
            Ok(ReplayFrom::Since(since))
        );
    }

    #[test]
    fn anything_else_is_a_bad_request() {
        for data in [
            "[]",
            "null",
            "{}",
            r#"{"after":"d1","since":"2026-12-06T10:00:00Z"}"#,
            r#"{"after":""}"#,
            r#"{"after":7}"#,
            r#"{"since":"yesterday"}"#,
            r#"{"since":"2026-12-06"}"#,
            r#"{"after":"d1","limit":0}"#,
            r#"{"after":"d1","limit":1001}"#,
            r#"{"after":"d1","limit":5.0}"#,
            r#"{"after":"d1","limit":-1}"#,
            r#"{"after":"d1","limit":"5"}"#,
        ] {
            assert_eq!(parse(data), Err(ErrorCode::BadRequest), "{data}");
        }
    }
}
