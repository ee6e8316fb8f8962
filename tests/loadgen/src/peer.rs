//! The two wire protocols a run can speak: the sockets host's (PROTOCOL.md
//! §2) and Socket.IO 4's (Engine.IO v4 over a WebSocket), reduced to what
//! the runs need: connect with a token, send an event with an ack id, and
//! read acks and pushes.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

/// Which server the run talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The sockets host.
    Sockets,
    /// The Socket.IO peer (`tests/loadgen/socketio`).
    Socketio,
}

/// A frame from the server, as the runs see it.
#[derive(Debug)]
pub enum Incoming {
    /// The reply to a sent event.
    Ack { id: u64, ok: bool },
    /// A pushed event.
    Push { event: String, data: Value },
    /// Anything else (pings answered, `connected`, …).
    Other,
}

pub type Socket = WebSocketStream<TcpStream>;
pub type Writer = SplitSink<Socket, Message>;
pub type Reader = SplitStream<Socket>;

/// Small read buffers: the idle run holds thousands of connections.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Connects from `source` (any port) to `server` and authenticates.
pub async fn connect(
    target: Target,
    server: SocketAddr,
    source: IpAddr,
    token: &str,
) -> anyhow::Result<Socket> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let url = match target {
        Target::Sockets => format!("ws://{server}/ws?access_token={token}"),
        Target::Socketio => format!("ws://{server}/socket.io/?EIO=4&transport=websocket"),
    };
    let request = url.into_client_request()?;
    let (mut ws, _) = client_async_with_config(request, stream, Some(ws_config())).await?;
    match target {
        Target::Sockets => {
            let first = next_text(&mut ws).await?;
            if !first.contains("\"connected\"") {
                bail!("expected `connected`, got {first}");
            }
        }
        Target::Socketio => {
            let open = next_text(&mut ws).await?;
            if !open.starts_with('0') {
                bail!("expected the Engine.IO open packet, got {open}");
            }
            ws.send(Message::text(format!("40{}", json!({"token": token}))))
                .await?;
            let connected = next_text(&mut ws).await?;
            if !connected.starts_with("40") {
                bail!("Socket.IO refused the connection: {connected}");
            }
        }
    }
    Ok(ws)
}

async fn next_text(ws: &mut Socket) -> anyhow::Result<String> {
    loop {
        match ws.next().await.context("the server closed")?? {
            Message::Text(text) => return Ok(text.to_string()),
            Message::Close(frame) => bail!("the server closed: {frame:?}"),
            _ => {}
        }
    }
}

/// The text frame that sends `event` with `data`, asking for ack `id`.
pub fn event_frame(target: Target, event: &str, data: &Value, id: u64) -> String {
    match target {
        Target::Sockets => json!({"event": event, "data": data, "ack": id}).to_string(),
        Target::Socketio => format!("42{id}{}", json!([event, data])),
    }
}

/// Reads a text frame; answers Socket.IO's pings on the way.
pub async fn read(
    target: Target,
    reader: &mut Reader,
    writer: &mut Writer,
) -> anyhow::Result<Incoming> {
    let text = loop {
        match reader.next().await.context("the server closed")?? {
            Message::Text(text) => break text,
            Message::Close(frame) => bail!("the server closed: {frame:?}"),
            _ => {}
        }
    };
    Ok(match target {
        Target::Sockets => {
            let frame: Value = serde_json::from_str(&text)?;
            if let Some(id) = frame.get("ack").and_then(Value::as_u64) {
                Incoming::Ack {
                    id,
                    ok: frame["ok"] == true,
                }
            } else if let (Some(event), Some(_)) = (frame["event"].as_str(), frame.get("id")) {
                Incoming::Push {
                    event: event.to_owned(),
                    data: frame["data"].clone(),
                }
            } else {
                Incoming::Other
            }
        }
        Target::Socketio => socketio_packet(&text, writer).await?,
    })
}

async fn socketio_packet(text: &str, writer: &mut Writer) -> anyhow::Result<Incoming> {
    if text == "2" {
        writer.send(Message::text("3")).await?;
        return Ok(Incoming::Other);
    }
    if let Some(rest) = text.strip_prefix("43") {
        let digits = rest.find('[').context("an ack without payload")?;
        let id: u64 = rest[..digits].parse()?;
        let payload: Value = serde_json::from_str(&rest[digits..])?;
        return Ok(Incoming::Ack {
            id,
            ok: payload[0]["ok"] == true,
        });
    }
    if let Some(rest) = text.strip_prefix("42") {
        let payload: Value = serde_json::from_str(rest)?;
        if let Some(event) = payload[0].as_str() {
            return Ok(Incoming::Push {
                event: event.to_owned(),
                data: payload[1].clone(),
            });
        }
    }
    Ok(Incoming::Other)
}
