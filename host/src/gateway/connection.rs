//! One WebSocket connection: a reader that handles frames in order and a
//! writer that drains the bounded outbound queue, sends pings and the close
//! frame (PROTOCOL.md §2, §3, §6).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::time::{sleep_until, timeout};

use super::AppState;
use super::rate::{RateLimiter, Verdict};
use super::replies::{MAX_WAITING, Replies};
use crate::auth::Claims;
use crate::delivery::registry::{
    CLOSE_TRY_AGAIN_LATER, CloseRequest, ConnectionHandle, OutboundFrame,
};
use crate::dispatch::Inbound;
use crate::plugin::{ClientOrigin, Event, Origin};
use crate::protocol::{
    ClientFrame, ErrorBody, ErrorCode, FrameError, error_frame, event_frame, new_id, ok_reply,
    parse_client_frame, rfc3339,
};
use crate::store::{ConnectionRecord, Source};

/// Close codes of PROTOCOL.md §6.
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_INVALID_PAYLOAD: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
const CLOSE_IDLE: u16 = 4002;
const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// The furthest a token's expiry timer is set (it is re-checked then).
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How long the close handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// `lastSeenAt` is refreshed at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(30);

/// What the upgrade learned about the client.
pub struct Session {
    /// The verified token.
    pub claims: Claims,
    /// The peer address.
    pub remote_addr: String,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
}

/// Runs a connection from upgrade to close.
///
/// Not an `async fn`: its future would keep the arguments next to what is
/// moved out of them for the connection's whole life. Splitting the socket
/// before the future exists keeps an idle connection's task ~1 KB smaller.
pub fn run(
    socket: WebSocket,
    state: AppState,
    session: Session,
) -> impl Future<Output = ()> + Send {
    let (sink, stream) = socket.split();
    let id: Arc<str> = new_id().into();
    // The `connected` frame is the queue's first, from the start: no
    // delivery can overtake it, whenever the connection is registered.
    let connected =
        json!({"connectionId": &*id, "userId": session.claims.sub, "role": session.claims.role});
    let handle = Arc::new(ConnectionHandle::opened_with(
        id,
        session.claims.sub.as_str().into(),
        session.claims.role.as_str().into(),
        state.config.limits.outbound_queue_frames,
        event_frame("connected", &connected).into(),
    ));
    let limits = &state.config.limits;
    let limiter = RateLimiter::new(limits.rate_limit, limits.abuse_window, Instant::now());
    let mut connection = Connection {
        state,
        replies: Arc::new(Replies::new(Arc::clone(&handle))),
        handle,
        session,
        limiter,
    };
    async move {
        // A panic while opening (after the connection was registered) must
        // not leave it registered either.
        if AssertUnwindSafe(connection.open())
            .catch_unwind()
            .await
            .is_err()
        {
            connection.state.metrics.connection_panicked();
            tracing::error!(connection = %connection.handle.id, "connection task panicked while opening");
            connection
                .handle
                .request_close(CLOSE_INTERNAL_ERROR, "internal error");
            connection.state.connections.unregister(&connection.handle);
            let _ = connection
                .state
                .connection_store
                .remove(&connection.handle.id)
                .await;
            return;
        }
        let writer = tokio::spawn(write_loop(
            sink,
            Arc::clone(&connection.handle),
            connection.state.config.limits.ping_interval,
            Arc::clone(&connection.state.metrics),
        ));
        // A panic while handling a frame must not leave the connection
        // registered (counted, reachable) for good: it is closed with 1011
        // and cleaned up like any other.
        let close = match AssertUnwindSafe(connection.read_loop(stream))
            .catch_unwind()
            .await
        {
            Ok(close) => close,
            Err(_) => {
                connection.state.metrics.connection_panicked();
                tracing::error!(connection = %connection.handle.id, "connection task panicked; closing with 1011");
                Some(CloseRequest {
                    code: CLOSE_INTERNAL_ERROR,
                    reason: "internal error",
                })
            }
        };
        connection.close(close, writer).await;
    }
}

impl Connection {
    /// Stores the record, queues `connected` and makes the connection
    /// reachable.
    async fn open(&self) {
        let (state, handle, session) = (&self.state, &self.handle, &self.session);
        let now = SystemTime::now();
        let record = ConnectionRecord {
            id: handle.id.to_string(),
            user_id: session.claims.sub.clone(),
            role: session.claims.role.clone(),
            instance_id: state.instance_id.to_string(),
            connected_at: rfc3339(now),
            last_seen_at: rfc3339(now),
            details: serde_json::Map::new(),
            remote_addr: Some(session.remote_addr.clone()),
            user_agent: session.user_agent.clone(),
        };
        if let Err(err) = state.connection_store.insert(record).await {
            tracing::warn!(connection = %handle.id, "connection record not stored: {err}");
        }

        let local = state.connections.register(Arc::clone(handle));
        if let Some(cluster) = &state.cluster {
            // The writer starts after this: the client sees `connected` only
            // once deliveries from other nodes reach this one.
            cluster.join(&handle.user_id).await;
        }
        state.metrics.connection_opened();
        tracing::info!(connection = %handle.id, user = %session.claims.sub, role = %session.claims.role, "connected");
        state.lifecycle.opened(&self.origin(), local).await;
    }

    /// Stops the writer (with `close`, if the server closes), unregisters
    /// the connection and removes its record.
    async fn close(&self, close: Option<CloseRequest>, writer: tokio::task::JoinHandle<()>) {
        let (state, handle) = (&self.state, &self.handle);
        // A client-initiated close was already answered by the WebSocket
        // layer; 1000 here only stops the writer.
        let close = close.unwrap_or(CloseRequest {
            code: 1000,
            reason: "",
        });
        handle.request_close(close.code, close.reason);
        let local = state.connections.unregister(handle);
        if let Some(cluster) = &state.cluster {
            cluster.leave(&handle.user_id).await;
        }
        if let Some(local) = local {
            state.lifecycle.closed(&self.origin(), local).await;
        }
        let _ = writer.await;

        if let Err(err) = state.connection_store.remove(&handle.id).await {
            tracing::warn!(connection = %handle.id, "connection record not removed: {err}");
        }
        state.metrics.connection_closed();
        let closed = handle.close_requested().await;
        tracing::info!(connection = %handle.id, user = %self.session.claims.sub, code = closed.code, reason = closed.reason, "disconnected");
    }
}

/// Writes queued frames in order, pings, and finally the close frame.
async fn write_loop(
    sink: SplitSink<WebSocket, Message>,
    handle: Arc<ConnectionHandle>,
    ping_every: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    write_frames(sink, &handle, ping_every, &metrics).await;
    handle.close_queue();
}

async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    handle: &ConnectionHandle,
    ping_every: Duration,
    metrics: &crate::metrics::Metrics,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let close = loop {
        tokio::select! {
            biased;
            close = handle.close_requested() => break close,
            frame = handle.next_frame() => {
                let Some(frame) = frame else { return };
                // A socket that stops draining must not block a requested close.
                tokio::select! {
                    sent = write_queued(&mut sink, frame, handle) => match sent {
                        Ok(frames) => metrics.frames_out(frames),
                        Err(_) => return,
                    },
                    close = handle.close_requested() => break close,
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    };
    let _ = timeout(CLOSE_GRACE, async {
        // Frames queued before a regular close still go out first; a client
        // too slow for its queue gets the close at once.
        if close.code != CLOSE_TRY_AGAIN_LATER {
            while let Some(frame) = handle.try_next_frame() {
                if sink.send(text_message(frame)).await.is_err() {
                    return;
                }
                metrics.frames_out(1);
            }
        }
        if close.code != 1000 {
            let frame = CloseFrame {
                code: close.code,
                reason: close.reason.into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        let _ = sink.close().await;
    })
    .await;
}

/// Frames fed to the socket between two flushes at most: a steady stream
/// of pushes still gets flushed (and counted) regularly.
const FRAMES_PER_FLUSH: u64 = 64;

/// Writes `first` and the frames queued behind it, then flushes once: under
/// load several frames leave in one write call instead of one call each.
/// Returns how many frames were written.
async fn write_queued(
    sink: &mut SplitSink<WebSocket, Message>,
    first: OutboundFrame,
    handle: &ConnectionHandle,
) -> Result<u64, axum::Error> {
    sink.feed(text_message(first)).await?;
    let mut frames = 1;
    while frames < FRAMES_PER_FLUSH {
        let Some(frame) = handle.try_next_frame() else {
            break;
        };
        sink.feed(text_message(frame)).await?;
        frames += 1;
    }
    sink.flush().await?;
    Ok(frames)
}

/// The WebSocket message of a registry frame.
fn text_message(frame: OutboundFrame) -> Message {
    let text = Utf8Bytes::try_from(frame.into_bytes()).expect("frames are built from strings");
    Message::Text(text)
}

/// What the rate limiter decided for a frame.
enum Admission {
    /// Handle the frame.
    Admitted,
    /// Refused: answer with this `rate_limited` error.
    Refused(String),
    /// Close the connection.
    Close(CloseRequest),
}

/// A connection's state, owned by its task.
struct Connection {
    state: AppState,
    handle: Arc<ConnectionHandle>,
    /// Replies in frame order, some waiting for the log.
    replies: Arc<Replies>,
    session: Session,
    limiter: RateLimiter,
}

impl Connection {
    /// Handles frames until the connection must close; returns the close to
    /// send, or `None` when the client closed or vanished.
    async fn read_loop(&mut self, stream: SplitStream<WebSocket>) -> Option<CloseRequest> {
        let close = self.read_frames(stream).await;
        // Replies whose log writes are still running: sent if they finish
        // (or reach their time limit) while the connection closes.
        let _ = timeout(CLOSE_GRACE, async {
            while let Some(due) = self.replies.expire(tokio::time::Instant::now()) {
                tokio::select! {
                    () = self.replies.some_left() => {}
                    () = sleep_until(due) => {}
                }
            }
        })
        .await;
        close
    }

    /// Reads and handles frames; replies that wait for the log wait in
    /// `self.replies` (in frame order) while later frames are handled.
    async fn read_frames(&mut self, mut stream: SplitStream<WebSocket>) -> Option<CloseRequest> {
        let idle_timeout = self.state.config.limits.idle_timeout;
        let mut shutdown = self.state.shutdown.clone();
        let mut last_frame = tokio::time::Instant::now();
        let mut touched = last_frame;
        let mut token_expiry = self.session.claims.expires_at();
        let mut token_deadline = self.token_deadline();
        // One timer for both limits and for replies waiting too long for the
        // log, moved only when it fires, the token changes or a reply starts
        // waiting with the timer further off than LOG_WAIT: re-arming it for
        // every frame cost a timer-wheel entry and removal per frame.
        let deadline = sleep_until(token_deadline.min(last_frame + idle_timeout));
        tokio::pin!(deadline);
        loop {
            let message = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => {
                    return Some(CloseRequest { code: CLOSE_GOING_AWAY, reason: "server shutting down" });
                }
                _ = self.handle.close_requested() => return None,
                () = &mut deadline => {
                    let now = tokio::time::Instant::now();
                    if now >= token_deadline {
                        return Some(CloseRequest { code: CLOSE_TOKEN_EXPIRED, reason: "token expired" });
                    }
                    let idle_deadline = last_frame + idle_timeout;
                    if now >= idle_deadline {
                        return Some(CloseRequest { code: CLOSE_IDLE, reason: "idle timeout" });
                    }
                    let next = token_deadline.min(idle_deadline);
                    let reply_due = self.replies.expire(now);
                    deadline.as_mut().reset(reply_due.map_or(next, |due| next.min(due)));
                    continue;
                }
                () = self.replies.some_left(), if self.replies.len() >= MAX_WAITING => continue,
                message = stream.next(), if self.replies.len() < MAX_WAITING => message,
            };
            let message = match message {
                None => return None,
                Some(Ok(message)) => message,
                Some(Err(err)) => return read_error_close(err),
            };
            last_frame = tokio::time::Instant::now();
            if last_frame - touched >= TOUCH_EVERY {
                touched = last_frame;
                let _ = self
                    .state
                    .connection_store
                    .touch(&self.handle.id, SystemTime::now())
                    .await;
            }
            match message {
                Message::Text(text) => {
                    self.state.metrics.frame_in();
                    match self.rate_check(Some(text.as_str())) {
                        Admission::Close(close) => return Some(close),
                        Admission::Refused(reply) => self.replies.send(Some(reply)),
                        Admission::Admitted => {
                            // Boxed: the routing future is large, and an
                            // idle connection's task should not carry it.
                            match Box::pin(self.handle_text(text.as_str())).await {
                                Reply::Now(reply) => self.replies.send(reply),
                                Reply::Waiting { due } => {
                                    if deadline.deadline() > due {
                                        deadline.as_mut().reset(due);
                                    }
                                }
                            }
                            // A refreshed token moves the expiry, not the
                            // time limit of replies waiting for the log.
                            if self.session.claims.expires_at() != token_expiry {
                                token_expiry = self.session.claims.expires_at();
                                token_deadline = self.token_deadline();
                                let next = token_deadline.min(last_frame + idle_timeout);
                                let reply_due = self.replies.expire(last_frame);
                                deadline
                                    .as_mut()
                                    .reset(reply_due.map_or(next, |due| next.min(due)));
                            }
                        }
                    }
                }
                Message::Binary(_) => {
                    self.state.metrics.frame_in();
                    match self.rate_check(None) {
                        Admission::Close(close) => return Some(close),
                        Admission::Refused(reply) => self.replies.send(Some(reply)),
                        Admission::Admitted => {
                            let error = ErrorBody::new(
                                ErrorCode::BadRequest,
                                "binary frames are not part of the protocol",
                            );
                            self.replies.send(Some(error_frame(None, &error)));
                        }
                    }
                }
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Close(_) => return None,
            }
        }
    }

    fn token_deadline(&self) -> tokio::time::Instant {
        let expires = self.session.claims.expires_at() + self.state.auth.leeway();
        let left = expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        // `exp` is clamped (auth::MAX_EXP), and so is this: the timer never
        // sees an instant that overflows.
        let now = tokio::time::Instant::now();
        now.checked_add(left.min(FAR_FUTURE))
            .unwrap_or(now + Duration::from_secs(86_400))
    }

    /// Applies the rate limit to one frame: over the limit, the frame is
    /// answered `rate_limited`; persistent abuse closes with 1008.
    fn rate_check(&mut self, text: Option<&str>) -> Admission {
        match self.limiter.check(Instant::now()) {
            Verdict::Allowed => Admission::Admitted,
            Verdict::Limited => {
                self.state.metrics.frame_rate_limited();
                let ack = text.and_then(|text| parse_client_frame(text).ok()?.ack);
                let error = ErrorBody::new(ErrorCode::RateLimited, "too many frames");
                Admission::Refused(error_frame(ack, &error))
            }
            Verdict::Abusive => Admission::Close(CloseRequest {
                code: CLOSE_POLICY,
                reason: "rate limit exceeded",
            }),
        }
    }

    /// Handles one text frame; routed events are delivered before this
    /// returns, their replies wait for the log.
    async fn handle_text(&mut self, text: &str) -> Reply {
        let frame = match parse_client_frame(text) {
            Ok(frame) => frame,
            Err(FrameError { ack, error }) => return Reply::Now(Some(error_frame(ack, &error))),
        };
        let ack = frame.ack;
        let result = match frame.event.as_str() {
            "setConnection" => self.set_connection(&frame).await,
            "refreshToken" => self.refresh_token(&frame).await,
            "resume" => self.resume(&frame).await,
            _ => return self.route(frame).await,
        };
        Reply::Now(reply_frame(ack, result))
    }

    async fn set_connection(&self, frame: &ClientFrame) -> Result<Box<RawValue>, ErrorBody> {
        let Ok(Value::Object(details)) = serde_json::from_str::<Value>(frame.data.get()) else {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                "`data` must be a JSON object",
            ));
        };
        if let Err(why) = storable_keys(&details, 1) {
            return Err(ErrorBody::new(ErrorCode::BadRequest, why));
        }
        let size = serde_json::to_string(&details).map_or(usize::MAX, |json| json.len());
        let max = self.state.config.limits.max_details_bytes;
        if size > max {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!("connection details are {size} bytes, at most {max} allowed"),
            ));
        }
        self.state
            .connection_store
            .set_details(&self.handle.id, details)
            .await
            .map_err(|err| ErrorBody::new(ErrorCode::Unavailable, err.to_string()))?;
        Ok(raw(&json!({"connectionId": &*self.handle.id})))
    }

    async fn refresh_token(&mut self, frame: &ClientFrame) -> Result<Box<RawValue>, ErrorBody> {
        let token = match serde_json::from_str::<Value>(frame.data.get()) {
            Ok(Value::Object(data)) => match data.get("token") {
                Some(Value::String(token)) if !token.is_empty() => token.clone(),
                _ => {
                    return Err(ErrorBody::new(
                        ErrorCode::BadRequest,
                        "`data.token` must be a non-empty string",
                    ));
                }
            },
            _ => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "`data` must be a JSON object",
                ));
            }
        };
        // A key the identity provider has just rotated in is fetched, as
        // for a new connection.
        let claims = self
            .state
            .auth
            .verify_fresh(&token)
            .await
            .map_err(|err| ErrorBody::new(ErrorCode::Unauthorized, err.to_string()))?;
        if claims.sub != self.session.claims.sub {
            return Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                "the token is for another user",
            ));
        }
        let expires_at = rfc3339(claims.expires_at());
        // The connection keeps the role it was opened with.
        self.session.claims.exp = claims.exp;
        Ok(raw(&json!({"expiresAt": expires_at})))
    }

    async fn resume(&self, frame: &ClientFrame) -> Result<Box<RawValue>, ErrorBody> {
        let request = super::resume::Request::parse(&frame.data)?;
        let state = &self.state;
        let mut shutdown = state.shutdown.clone();
        // The reader handles nothing else meanwhile: a shutdown must not wait
        // for a replay (the read loop then closes with 1001).
        tokio::select! {
            replayed = super::resume::replay(state.log.as_ref(), &self.handle, &state.metrics, &request) => replayed,
            _ = shutdown.wait_for(|stop| *stop) => Err(ErrorBody::new(ErrorCode::Unavailable, "the server is shutting down")),
        }
    }

    /// This connection as the origin of the events it sends or causes.
    fn origin(&self) -> ClientOrigin {
        ClientOrigin {
            user_id: self.session.claims.sub.clone(),
            role: self.session.claims.role.clone(),
            connection_id: self.handle.id.to_string(),
        }
    }

    /// Delivers a plugin-routed event now; its reply waits for the log, in
    /// its place among the connection's replies.
    async fn route(&self, frame: ClientFrame) -> Reply {
        let claims = &self.session.claims;
        let inbound = Inbound {
            event: Event {
                id: new_id(),
                name: frame.event,
                origin: Origin::Client(self.origin()),
                data: Box::<str>::from(frame.data).into_string(),
                received_at: rfc3339(SystemTime::now()),
            },
            source: Source::Client,
            from: claims.sub.clone(),
            depth: 0,
        };
        let ack = frame.ack;
        let delivered = match self.state.dispatcher.deliver(&inbound).await {
            Ok(delivered) => delivered,
            Err(err) => return Reply::Now(reply_frame(ack, Err(err.to_error_body()))),
        };
        let place = self.replies.reserve(ack);
        let due = place.due;
        let replies = Arc::clone(&self.replies);
        self.state.dispatcher.record_then(delivered, move |routed| {
            let routed = routed
                .map(|routed| routed.reply)
                .map_err(|err| err.to_error_body());
            replies.fill(place, reply_frame(ack, routed));
        });
        Reply::Waiting { due }
    }
}

/// What handling a frame produced.
enum Reply {
    /// The reply (if any) is ready.
    Now(Option<String>),
    /// The reply has its place in `Connection::replies` and is filled in
    /// once the log records are written.
    Waiting {
        /// When the reader answers it `unavailable` if the log has not.
        due: tokio::time::Instant,
    },
}

/// The frame answering a client frame: the reply when it asked for an
/// ack, an error frame on failure.
fn reply_frame(ack: Option<u64>, result: Result<Box<RawValue>, ErrorBody>) -> Option<String> {
    match (ack, result) {
        (Some(ack), Ok(data)) => Some(ok_reply(ack, &data)),
        (ack, Err(error)) => Some(error_frame(ack, &error)),
        (None, Ok(_)) => None,
    }
}

/// Deepest nesting of objects and arrays in connection details.
const MAX_DETAILS_DEPTH: usize = 16;

/// Whether every store can keep these connection details as they are: no
/// key with NUL (BSON cannot hold it), none starting with `$` or holding
/// `.` (MongoDB's operators and paths), at most [`MAX_DETAILS_DEPTH`]
/// levels. Checked before the details are stored, so that a record a
/// database refuses never exists.
fn storable_keys(object: &serde_json::Map<String, Value>, depth: usize) -> Result<(), String> {
    if depth > MAX_DETAILS_DEPTH {
        return Err(format!(
            "connection details may nest at most {MAX_DETAILS_DEPTH} levels"
        ));
    }
    for (key, value) in object {
        if key.contains('\0') || key.starts_with('$') || key.contains('.') {
            return Err(format!(
                "connection details keys may not contain NUL or `.` or start with `$`: {:?}",
                key.chars().take(64).collect::<String>()
            ));
        }
        storable_value(value, depth)?;
    }
    Ok(())
}

fn storable_value(value: &Value, depth: usize) -> Result<(), String> {
    match value {
        Value::Object(object) => storable_keys(object, depth + 1),
        Value::Array(items) => {
            if depth + 1 > MAX_DETAILS_DEPTH {
                return Err(format!(
                    "connection details may nest at most {MAX_DETAILS_DEPTH} levels"
                ));
            }
            items
                .iter()
                .try_for_each(|item| storable_value(item, depth + 1))
        }
        _ => Ok(()),
    }
}

fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("JSON serializes")
}

/// How a read error ends the connection (RFC 6455 §7.4.1): a message over
/// the size limit closes with 1009, a text frame that is not UTF-8 with
/// 1007, a protocol violation (unmasked frame, reserved bits or opcodes)
/// with 1002; other read errors mean the connection is gone.
fn read_error_close(err: axum::Error) -> Option<CloseRequest> {
    use tungstenite::error::ProtocolError;
    let Ok(err) = err.into_inner().downcast::<tungstenite::Error>() else {
        return None;
    };
    match *err {
        tungstenite::Error::Capacity(_) => Some(CloseRequest {
            code: CLOSE_TOO_BIG,
            reason: "message too big",
        }),
        tungstenite::Error::Utf8(_) => Some(CloseRequest {
            code: CLOSE_INVALID_PAYLOAD,
            reason: "text frame is not valid UTF-8",
        }),
        tungstenite::Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing,
        ) => None,
        tungstenite::Error::Protocol(_) => Some(CloseRequest {
            code: CLOSE_PROTOCOL_ERROR,
            reason: "WebSocket protocol violation",
        }),
        _ => None,
    }
}
