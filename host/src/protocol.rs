//! The wire protocol (PROTOCOL.md §2): parsing client frames strictly,
//! writing server frames, error codes, ids and timestamps.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Longest event name, in characters.
pub const MAX_EVENT_NAME_CHARS: usize = 64;

/// Whether `name` is a valid event name: 1–64 chars of `[A-Za-z0-9_.:-]`.
pub fn is_valid_event_name(name: &str) -> bool {
    (1..=MAX_EVENT_NAME_CHARS).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The protocol's error codes (exact strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A `refreshToken` with a bad token; HTTP 401.
    Unauthorized,
    /// Malformed frame or body, wrong types.
    BadRequest,
    /// No handler for that event.
    UnknownEvent,
    /// A plugin (or the host) refused.
    Forbidden,
    /// Something named does not exist.
    NotFound,
    /// Too big.
    TooLarge,
    /// Too many frames or requests.
    RateLimited,
    /// The plugin trapped, timed out or returned invalid output.
    PluginFailed,
    /// A dependency is down.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// The exact wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::BadRequest => "bad_request",
            Self::UnknownEvent => "unknown_event",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::PluginFailed => "plugin_failed",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// An error to report to a client or HTTP caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    /// The code.
    pub code: ErrorCode,
    /// A human-readable reason, without secrets.
    pub message: String,
}

impl ErrorBody {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A parsed client frame.
#[derive(Debug)]
pub struct ClientFrame {
    /// The event name (validated).
    pub event: String,
    /// The data as JSON text; `null` when absent.
    pub data: Box<RawValue>,
    /// The ack to answer, when present.
    pub ack: Option<u64>,
}

/// Why a client frame was rejected; `ack` is set when it could be read, so
/// that the error goes back as a reply rather than an `error` event.
#[derive(Debug)]
pub struct FrameError {
    /// The frame's ack, if it was valid.
    pub ack: Option<u64>,
    /// What was wrong.
    pub error: ErrorBody,
}

#[derive(serde::Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    ack: Option<&'a RawValue>,
}

/// Parses a text frame: a JSON object with a valid `event`, optional
/// `data`, optional `ack` (u64). `null` counts as absent.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let bad = |ack, message: &str| FrameError {
        ack,
        error: ErrorBody::new(ErrorCode::BadRequest, message),
    };
    if !text.trim_start().starts_with('{') {
        return Err(bad(None, "a frame must be a JSON object"));
    }
    let raw: RawFrame<'_> =
        serde_json::from_str(text).map_err(|_| bad(None, "a frame must be a JSON object"))?;
    let ack = match raw.ack.map(RawValue::get) {
        None | Some("null") => None,
        Some(ack) => Some(
            ack.parse::<u64>()
                .map_err(|_| bad(None, "`ack` must be an unsigned 64-bit integer"))?,
        ),
    };
    let event = match raw
        .event
        .map(|event| serde_json::from_str::<Value>(event.get()))
    {
        Some(Ok(Value::String(event))) => event,
        None | Some(Ok(Value::Null)) => return Err(bad(ack, "`event` is required")),
        _ => return Err(bad(ack, "`event` must be a string")),
    };
    if !is_valid_event_name(&event) {
        return Err(bad(ack, "`event` must be 1-64 chars of [A-Za-z0-9_.:-]"));
    }
    let data = match raw.data {
        Some(data) => data.to_owned(),
        None => RawValue::from_string("null".to_owned()).expect("null is JSON"),
    };
    Ok(ClientFrame { event, data, ack })
}

/// `{"event":"<name>","data":<data>,"id":"<delivery id>"}`
pub fn push_frame(event: &str, data: &RawValue, id: &str) -> String {
    #[derive(Serialize)]
    struct Push<'a> {
        event: &'a str,
        data: &'a RawValue,
        id: &'a str,
    }
    // `{"event":"","data":,"id":""}` around the parts, unescaped.
    let size = event.len() + data.get().len() + id.len() + 28;
    to_string_sized(&Push { event, data, id }, size)
}

/// `{"event":"<name>","data":<data>,"id":"<delivery id>","ephemeral":true}`:
/// a push that is not logged. The mark tells a client not to take its `id`
/// as a `resume` cursor (the log does not know it).
pub fn ephemeral_push_frame(event: &str, data: &RawValue, id: &str) -> String {
    #[derive(Serialize)]
    struct Push<'a> {
        event: &'a str,
        data: &'a RawValue,
        id: &'a str,
        ephemeral: bool,
    }
    let size = event.len() + data.get().len() + id.len() + 45;
    to_string_sized(
        &Push {
            event,
            data,
            id,
            ephemeral: true,
        },
        size,
    )
}

/// `{"event":"<name>","data":<data>}` — `connected` and `error` events.
pub fn event_frame(event: &str, data: &impl Serialize) -> String {
    #[derive(Serialize)]
    struct Event<'a, T> {
        event: &'a str,
        data: &'a T,
    }
    serde_json::to_string(&Event { event, data }).expect("an event serializes")
}

/// `{"ack":N,"ok":true,"data":<data>}`
pub fn ok_reply(ack: u64, data: &RawValue) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        ack: u64,
        ok: bool,
        data: &'a RawValue,
    }
    // `{"ack":,"ok":true,"data":}` around the parts; an ack has at most 20
    // digits.
    let size = 26 + 20 + data.get().len();
    to_string_sized(
        &Reply {
            ack,
            ok: true,
            data,
        },
        size,
    )
}

/// Serializes a frame into a buffer sized for it up front: these run for
/// every routed message, and `serde_json::to_string` starts at 128 bytes and
/// grows, a reallocation or two per frame.
fn to_string_sized(frame: &impl Serialize, size: usize) -> String {
    let mut text = Vec::with_capacity(size);
    serde_json::to_writer(&mut text, frame).expect("a frame serializes");
    String::from_utf8(text).expect("serde_json writes UTF-8")
}

/// `{"ack":N,"ok":false,"error":{...}}`
pub fn error_reply(ack: u64, error: &ErrorBody) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        ack: u64,
        ok: bool,
        error: &'a ErrorBody,
    }
    serde_json::to_string(&Reply {
        ack,
        ok: false,
        error,
    })
    .expect("a reply serializes")
}

/// The error answer for a frame: a reply when it had an ack, else an
/// `error` event.
pub fn error_frame(ack: Option<u64>, error: &ErrorBody) -> String {
    match ack {
        Some(ack) => error_reply(ack, error),
        None => event_frame("error", error),
    }
}

/// A new unique id (UUID v7: time-ordered, so ids sort by creation).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The id of a delivery: derived from the event it answers (its id), the
/// plugin that made it (its name, not version) and its position among the
/// event's deliveries, so that an event processed again — redelivered by
/// the broker, retried by a publisher, after a restart, on another node —
/// yields the same push `id`s and log `_id`s: clients and the log
/// de-duplicate (PROTOCOL §5, v1.1). 128 bits of SHA-256, 32 hex digits
/// like the random ids.
pub fn delivery_id(event_id: &str, plugin: &str, position: usize) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for field in [event_id.as_bytes(), plugin.as_bytes()] {
        hash.update((field.len() as u64).to_be_bytes());
        hash.update(field);
    }
    hash.update((position as u64).to_be_bytes());
    let digest = hash.finalize();
    // By table, not `write!`: one id per delivery, and sixteen trips
    // through the formatter cost more than the hash.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for byte in &digest[..16] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

/// RFC 3339 UTC with millisecond precision, e.g. `2026-11-26T10:00:00.123Z`.
pub fn rfc3339(at: SystemTime) -> String {
    // Written by hand into a buffer of the right size: it runs twice per
    // routed event, and through `write!` it took 2.7% of the host's CPU in
    // the chat benchmark (0.35% now); `time`'s formatter costs more still.
    let at = time::OffsetDateTime::from(at);
    let Ok(year @ 0..=9999) = u32::try_from(at.year()) else {
        return rfc3339_any_year(at);
    };
    let mut text = String::with_capacity(24);
    push_digits(&mut text, year, 4);
    text.push('-');
    push_digits(&mut text, u8::from(at.month()).into(), 2);
    text.push('-');
    push_digits(&mut text, at.day().into(), 2);
    text.push('T');
    push_digits(&mut text, at.hour().into(), 2);
    text.push(':');
    push_digits(&mut text, at.minute().into(), 2);
    text.push(':');
    push_digits(&mut text, at.second().into(), 2);
    text.push('.');
    push_digits(&mut text, at.millisecond().into(), 3);
    text.push('Z');
    text
}

/// The time an RFC 3339 timestamp names (any offset, any precision);
/// `None` if it is not one.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Appends the last `width` (at most 4) decimal digits of `value`.
fn push_digits(text: &mut String, mut value: u32, width: usize) {
    let mut digits = [b'0'; 4];
    for digit in digits[..width].iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
    text.extend(digits[..width].iter().copied().map(char::from));
}

/// A year before 0 (only a clock set absurdly wrong gives one).
fn rfc3339_any_year(at: time::OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_follow_from_event_plugin_and_position() {
        let id = delivery_id("evt-1", "payments", 0);
        assert_eq!(id, delivery_id("evt-1", "payments", 0));
        // The same across versions: a node upgraded between two deliveries
        // of one broker message must repeat its ids (computed apart, with
        // Python's hashlib).
        assert_eq!(id, "b56cc2dbadd0f012dbe1f1fc00b350b7");
        for other in [
            delivery_id("evt-2", "payments", 0),
            delivery_id("evt-1", "reviews", 0),
            delivery_id("evt-1", "payments", 1),
            // Fields are length-prefixed: moving bytes between them counts.
            delivery_id("evt-1p", "ayments", 0),
        ] {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn event_names_follow_the_protocol() {
        for good in [
            "a",
            "sendMessage",
            "PAYMENT_PROCESSED",
            "chat.v2:typing-start",
            &"x".repeat(64),
        ] {
            assert!(is_valid_event_name(good), "{good}");
        }
        for bad in ["", "with space", "émoji", "a/b", &"x".repeat(65)] {
            assert!(!is_valid_event_name(bad), "{bad}");
        }
    }

    #[test]
    fn frames_parse_strictly() {
        let frame = parse_client_frame(r#"{"event":"x","data":{"a":1},"ack":7}"#).unwrap();
        assert_eq!(
            (frame.event.as_str(), frame.data.get(), frame.ack),
            ("x", r#"{"a":1}"#, Some(7))
        );
        let frame = parse_client_frame(r#"{"event":"x","ack":null,"data":null}"#).unwrap();
        assert_eq!((frame.data.get(), frame.ack), ("null", None));

        let rejected = |text: &str| parse_client_frame(text).unwrap_err();
        assert_eq!(rejected("not json").ack, None);
        assert_eq!(rejected("[1]").ack, None);
        assert_eq!(rejected(r#"{"event":"x","ack":-1}"#).ack, None);
        assert_eq!(rejected(r#"{"event":"x","ack":1.0}"#).ack, None);
        assert_eq!(rejected(r#"{"event":"x","ack":"1"}"#).ack, None);
        assert_eq!(
            rejected(r#"{"event":"x","ack":18446744073709551616}"#).ack,
            None
        );
        assert_eq!(rejected(r#"{"ack":3}"#).ack, Some(3));
        assert_eq!(rejected(r#"{"event":5,"ack":3}"#).ack, Some(3));
        assert_eq!(rejected(r#"{"event":"bad name","ack":3}"#).ack, Some(3));
        assert_eq!(rejected(r#"{"event":"","ack":3}"#).ack, Some(3));
    }

    #[test]
    fn server_frames_have_the_protocol_shape() {
        let data = RawValue::from_string(r#"{"a":1}"#.into()).unwrap();
        assert_eq!(
            push_frame("x", &data, "d1"),
            r#"{"event":"x","data":{"a":1},"id":"d1"}"#
        );
        assert_eq!(ok_reply(2, &data), r#"{"ack":2,"ok":true,"data":{"a":1}}"#);
        let error = ErrorBody::new(ErrorCode::NotFound, "gone");
        assert_eq!(
            error_frame(Some(3), &error),
            r#"{"ack":3,"ok":false,"error":{"code":"not_found","message":"gone"}}"#
        );
        assert_eq!(
            error_frame(None, &error),
            r#"{"event":"error","data":{"code":"not_found","message":"gone"}}"#
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(at), "2023-11-14T22:13:20.123Z");
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(981_173_106_007);
        assert_eq!(rfc3339(at), "2001-02-03T04:05:06.007Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(253_402_300_799_999);
        assert_eq!(rfc3339(at), "9999-12-31T23:59:59.999Z");
        let at = std::time::UNIX_EPOCH - std::time::Duration::from_secs(62_198_755_200);
        assert_eq!(rfc3339(at), "-001-01-01T00:00:00.000Z");
    }
}
