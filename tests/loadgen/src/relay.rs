//! `relay`: the floor the host is measured against, not a product. It
//! speaks the host's chat protocol (PROTOCOL §1–§4: a token on the upgrade,
//! `connected`, `sendMessage` pushed as `message` to the recipient's
//! connections and the sender's others, acked with the delivered count,
//! and the chat plugin's checks: the recipient exists, a student and a
//! consultant talk to each other) and does nothing else: no plugins, no
//! log, no limits, no cluster. Its writer batches frames like the host's
//! (feed what is queued, flush once). Runs until SIGTERM or ctrl-c.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames a connection's writer feeds before it flushes (the host's 64).
const FRAMES_PER_FLUSH: usize = 64;
/// A connection's outbound queue (the host's 1024 frames).
const QUEUE_FRAMES: usize = 1024;
/// The host's read buffer and write batch (`gateway/upgrade.rs`).
const READ_BUFFER_BYTES: usize = 1024;
const WRITE_BATCH_BYTES: usize = 8 * 1024;

pub struct Options {
    pub listen: SocketAddr,
    pub secret: String,
    /// `loadgen users-file` output: who exists, with which role.
    pub users: PathBuf,
}

struct Relay {
    key: DecodingKey,
    validation: Validation,
    roles: HashMap<String, String>,
    connections: RwLock<HashMap<Arc<str>, Vec<Connection>>>,
    ids: AtomicU64,
}

#[derive(Clone)]
struct Connection {
    id: u64,
    frames: mpsc::Sender<Message>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default = "default_role")]
    role: String,
}

fn default_role() -> String {
    "user".to_owned()
}

#[derive(Deserialize)]
struct ClientFrame<'a> {
    event: &'a str,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    ack: Option<u64>,
}

#[derive(Deserialize)]
struct SendMessage<'a> {
    to: &'a str,
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct User {
    id: String,
    role: String,
}

pub async fn run(options: Options) -> anyhow::Result<Value> {
    let users: Vec<User> = serde_json::from_slice(
        &std::fs::read(&options.users)
            .with_context(|| format!("reading {}", options.users.display()))?,
    )?;
    let relay = Arc::new(Relay {
        key: DecodingKey::from_secret(options.secret.as_bytes()),
        validation: Validation::new(Algorithm::HS256),
        roles: users.into_iter().map(|user| (user.id, user.role)).collect(),
        connections: RwLock::default(),
        ids: AtomicU64::new(1),
    });
    let listener = TcpListener::bind(options.listen).await?;
    // Scripts wait for this line, as they do for the host's.
    println!("relay listening on http://{}", listener.local_addr()?);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut served = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                stream.set_nodelay(true)?;
                served += 1;
                tokio::spawn(serve(Arc::clone(&relay), stream));
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(json!({"run": "relay", "connections": served}))
}

async fn serve(relay: Arc<Relay>, stream: TcpStream) {
    let mut claims = None;
    // The handshake callback's type is tungstenite's, large error and all.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let token = request.uri().query().and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("access_token="))
        });
        match token.and_then(|token| {
            jsonwebtoken::decode::<Claims>(token, &relay.key, &relay.validation).ok()
        }) {
            Some(token) => {
                claims = Some(token.claims);
                Ok(response)
            }
            None => {
                let mut refusal = ErrorResponse::new(Some(
                    r#"{"error":{"code":"unauthorized","message":"invalid token"}}"#.to_owned(),
                ));
                *refusal.status_mut() =
                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                Err(refusal)
            }
        }
    };
    // The host's buffers: tungstenite zero-fills its read buffer (128 KiB by
    // default) on every read, which alone took 17% of the relay's samples.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES);
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    let Ok(socket) = accepted.await else {
        return;
    };
    let Some(Claims { sub, role }) = claims else {
        return;
    };
    let user: Arc<str> = sub.into();
    let id = relay.ids.fetch_add(1, Ordering::Relaxed);
    let (frames, mut queued) = mpsc::channel(QUEUE_FRAMES);
    let connected = json!({"event": "connected", "data": {
        "connectionId": format!("{id:032x}"), "userId": &*user, "role": &role}});
    let _ = frames.try_send(Message::text(connected.to_string()));
    relay
        .connections
        .write()
        .unwrap()
        .entry(Arc::clone(&user))
        .or_default()
        .push(Connection {
            id,
            frames: frames.clone(),
        });

    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(first) = queued.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            for _ in 1..FRAMES_PER_FLUSH {
                let Ok(frame) = queued.try_recv() else { break };
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        if let Some(reply) = relay.handle(&user, &role, id, text.as_str()) {
            let _ = frames.try_send(Message::text(reply));
        }
    }
    if let Some(connections) = relay.connections.write().unwrap().get_mut(&user) {
        connections.retain(|connection| connection.id != id);
    }
    drop(frames);
    let _ = writer.await;
}

impl Relay {
    /// A client frame's reply, after its pushes were queued.
    fn handle(&self, user: &str, role: &str, connection: u64, text: &str) -> Option<String> {
        let Ok(frame) = serde_json::from_str::<ClientFrame<'_>>(text) else {
            return Some(error(None, "bad_request", "not a client frame"));
        };
        let ack = frame.ack;
        if frame.event != "sendMessage" {
            return Some(error(ack, "unknown_event", "no such event"));
        }
        let Some(request) = frame
            .data
            .and_then(|data| serde_json::from_str::<SendMessage<'_>>(data.get()).ok())
        else {
            return Some(error(
                ack,
                "bad_request",
                "sendMessage needs `to` and `text`",
            ));
        };
        let Some(recipient_role) = self.roles.get(request.to) else {
            return Some(error(ack, "not_found", "no such user"));
        };
        let allowed = matches!(
            (role, recipient_role.as_str()),
            ("student", "consultant") | ("consultant", "student")
        );
        if !allowed {
            return Some(error(
                ack,
                "forbidden",
                "not between a student and a consultant",
            ));
        }
        let message_id = format!("{:032x}", self.ids.fetch_add(1, Ordering::Relaxed));
        // Written out, not built as a `Value`: a relay that spent its time
        // on JSON maps would be no limit to read the host against.
        let push: Utf8Bytes = format!(
            r#"{{"event":"message","data":{{"messageId":"{message_id}","from":{},"fromRole":{},"to":{},"text":{},"sentAt":"{}"}},"id":"{message_id}"}}"#,
            json_string(user),
            json_string(role),
            json_string(request.to),
            json_string(&request.text),
            now_rfc3339(),
        )
        .into();
        let connections = self.connections.read().unwrap();
        let mut delivered = 0;
        for (owner, counted) in [(request.to, true), (user, false)] {
            for target in connections.get(owner).into_iter().flatten() {
                if target.id == connection {
                    continue;
                }
                if target.frames.try_send(Message::Text(push.clone())).is_ok() && counted {
                    delivered += 1;
                }
            }
        }
        ack.map(|ack| {
            format!(
                r#"{{"ack":{ack},"ok":true,"data":{{"messageId":"{message_id}","delivered":{delivered}}}}}"#
            )
        })
    }
}

/// `text` as a JSON string, quotes and escapes included.
fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn error(ack: Option<u64>, code: &str, message: &str) -> String {
    json!({"ack": ack, "ok": false, "error": {"code": code, "message": message}}).to_string()
}

/// Now as RFC 3339 with milliseconds, UTC (the host's `sentAt`).
fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_millis())
}

/// `unix_seconds` and `millis` as RFC 3339, UTC.
fn rfc3339(unix_seconds: u64, millis: u32) -> String {
    let (days, seconds) = (unix_seconds / 86_400, unix_seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds / 3_600,
        seconds / 60 % 60,
        seconds % 60,
        millis
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc_3339_in_utc() {
        assert_eq!(rfc3339(1_765_111_178, 621), "2025-12-07T12:39:38.621Z");
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(0, 5), "1970-01-01T00:00:00.005Z");
    }
}
