//! A real WebSocket client (tokio-tungstenite) and a minimal HTTP/1.1
//! client, with timeouts so a test never hangs.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::server::{Server, token};

/// How long a test waits for an expected frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected WebSocket client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection attempt ended.
#[derive(Debug)]
pub enum Refused {
    /// The server answered the upgrade with an HTTP status and JSON body.
    Http(u16, Value),
    /// Something else went wrong.
    Other(String),
}

impl Client {
    /// Connects with `Authorization: Bearer <token>`; returns the client
    /// and its `connected` frame.
    pub async fn connect(server: &Server, token: &str) -> (Client, Value) {
        Self::try_connect(server, &[("authorization", format!("Bearer {token}"))], "")
            .await
            .unwrap_or_else(|err| panic!("connect failed: {err:?}"))
    }

    /// Connects as `user` with `role` (a valid test token); returns the
    /// client, its `connected` frame read.
    pub async fn connect_as(server: &Server, user: &str, role: &str) -> Client {
        Self::connect(server, &token(user, role)).await.0
    }

    /// Connects from `source` (one of the 127.0.0.0/8 addresses, so that
    /// thousands of connections do not use up one address's ports) with
    /// the token in the query; returns the client and its `connected`
    /// frame.
    pub async fn connect_from(
        server: &Server,
        source: std::net::IpAddr,
        token: &str,
    ) -> Result<(Client, Value), Refused> {
        let refused = |err: &dyn std::fmt::Display| Refused::Other(err.to_string());
        let socket = tokio::net::TcpSocket::new_v4().map_err(|err| refused(&err))?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|err| refused(&err))?;
        let stream = socket
            .connect(server.addr)
            .await
            .map_err(|err| refused(&err))?;
        let request = format!("{}?access_token={token}", server.ws_url())
            .into_client_request()
            .map_err(|err| refused(&err))?;
        let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .map_err(|err| refused(&err))?;
        let mut client = Client { ws };
        let connected = client.recv().await;
        Ok((client, connected))
    }

    /// Connects with the given headers and query string.
    pub async fn try_connect(
        server: &Server,
        headers: &[(&str, String)],
        query: &str,
    ) -> Result<(Client, Value), Refused> {
        let url = format!("{}{}", server.ws_url(), query);
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap();
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(value).unwrap());
        }
        let (ws, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(connected) => connected,
            Err(WsError::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().clone().unwrap_or_default();
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                return Err(Refused::Http(status, body));
            }
            Err(err) => return Err(Refused::Other(err.to_string())),
        };
        let mut client = Client { ws };
        let connected = client.recv().await;
        Ok((client, connected))
    }

    /// Sends a JSON value as a text frame.
    pub async fn send(&mut self, frame: &Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a JSON value; `false` when the connection is gone.
    pub async fn try_send(&mut self, frame: &Value) -> bool {
        self.ws.send(Message::text(frame.to_string())).await.is_ok()
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Closes the connection normally (1000) and waits for the server's
    /// close frame.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(FRAME_TIMEOUT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.expect("send");
    }

    /// The next text frame as JSON; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        match tokio::time::timeout(FRAME_TIMEOUT, self.next_text()).await {
            Ok(Some(text)) => serde_json::from_str(&text).expect("frames are JSON"),
            Ok(None) => panic!("the connection closed while a frame was expected"),
            Err(_) => panic!("no frame within {FRAME_TIMEOUT:?}"),
        }
    }

    /// The next text frame within `wait`, if any.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        match tokio::time::timeout(wait, self.next_text()).await {
            Ok(Some(text)) => Some(serde_json::from_str(&text).expect("frames are JSON")),
            _ => None,
        }
    }

    /// The next push of `event`, skipping other frames; panics on timeout
    /// or close.
    pub async fn next_push(&mut self, event: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["event"] == event {
                return frame;
            }
        }
    }

    /// Panics if a push of `event` comes within `quiet`, or if the
    /// connection no longer answers after it (a closed connection brings
    /// nothing either).
    pub async fn no_push(&mut self, event: &str, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Some(frame) = self
            .try_recv(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            assert_ne!(frame["event"], event, "unexpected {frame}");
        }
        self.send(&serde_json::json!({"event": "setConnection", "data": {}, "ack": 991}))
            .await;
        loop {
            let frame = self.recv().await;
            assert_ne!(frame["event"], event, "unexpected {frame}");
            if frame["ack"] == 991 {
                assert_eq!(frame["ok"], true, "the connection still answers: {frame}");
                return;
            }
        }
    }

    async fn next_text(&mut self) -> Option<String> {
        while let Some(message) = self.ws.next().await {
            match message.ok()? {
                Message::Text(text) => return Some(text.to_string()),
                Message::Close(_) => return None,
                _ => {}
            }
        }
        None
    }

    /// Sends `resume` with `data` (ack 900) and reads up to its reply:
    /// the pushes that came before it, and the reply.
    pub async fn resume(&mut self, data: Value) -> (Vec<Value>, Value) {
        self.send(&serde_json::json!({"event": "resume", "data": data, "ack": 900}))
            .await;
        let mut pushes = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["ack"] == 900 {
                return (pushes, frame);
            }
            pushes.push(frame);
        }
    }

    /// Reads until the server closes; returns the close code and reason
    /// and the text frames seen before it.
    pub async fn closed(&mut self, wait: Duration) -> (u16, String, Vec<Value>) {
        let mut frames = Vec::new();
        let result = tokio::time::timeout(wait, async {
            while let Some(message) = self.ws.next().await {
                match message {
                    Ok(Message::Text(text)) => frames.push(serde_json::from_str(&text).unwrap()),
                    Ok(Message::Close(Some(frame))) => {
                        return (u16::from(frame.code), frame.reason.to_string());
                    }
                    Ok(Message::Close(None)) => {
                        return (u16::from(CloseCode::Status), String::new());
                    }
                    Ok(_) => {}
                    Err(err) => return (0, format!("error: {err}")),
                }
            }
            (0, "stream ended without a close frame".to_owned())
        })
        .await
        .unwrap_or_else(|_| panic!("the server did not close within {wait:?}"));
        (result.0, result.1, frames)
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {}", self.body))
    }

    /// Asserts PROTOCOL.md's HTTP error answer: `status`, and the body
    /// `{"error":{"code": code, "message": <text>}}`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
}

/// The pair most tests talk through: student `s_1` and consultant `c_1`,
/// both connected.
pub async fn student_and_consultant(server: &Server) -> (Client, Client) {
    let student = Client::connect_as(server, "s_1", "student").await;
    let consultant = Client::connect_as(server, "c_1", "consultant").await;
    (student, consultant)
}

/// The value of a counter or gauge on the server's `/metrics`; `name` is
/// the whole series, labels included (`name{plugin="x@1"}`) if it has any.
pub async fn counter(server: &Server, name: &str) -> u64 {
    let metrics = http(server, "GET", "/metrics", &[], b"").await.body;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

/// One HTTP/1.1 request with `Connection: close`.
pub async fn http(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Response {
    http_at(server.addr, method, path, headers, body).await
}

/// One HTTP/1.1 request with `Connection: close` to any server at `addr`.
pub async fn http_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Response {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        // The server may answer (413) before reading a large body.
        let _ = stream.write_all(body).await;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        raw
    };
    let raw = tokio::time::timeout(FRAME_TIMEOUT, exchange)
        .await
        .expect("HTTP answer in time");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `POST /api/events` with a bearer token and a JSON body.
pub async fn publish(server: &Server, token: &str, body: &Value) -> Response {
    publish_at(server.addr, token, body).await
}

/// `POST /api/events` to any server at `addr` (the benchmark's peer too).
pub async fn publish_at(addr: SocketAddr, token: &str, body: &Value) -> Response {
    http_at(
        addr,
        "POST",
        "/api/events",
        &[
            ("authorization", format!("Bearer {token}")),
            ("content-type", "application/json".to_owned()),
        ],
        body.to_string().as_bytes(),
    )
    .await
}
