//! The two wire protocols a run can speak: the sockets host's (PROTOCOL.md
//! §2) and Socket.IO 4's (Engine.IO v4 over a WebSocket), reduced to what
//! the runs need: connect with a token, send an event with an ack id, and
//! read acks and pushes.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
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
    /// A pushed event, its data as received.
    Push { event: String, data: Box<RawValue> },
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
pub fn event_frame(target: Target, event: &str, data: &impl Serialize, id: u64) -> String {
    let frame = match target {
        Target::Sockets => serde_json::to_string(&ClientFrame {
            event,
            data,
            ack: id,
        }),
        Target::Socketio => {
            serde_json::to_string(&(event, data)).map(|json| format!("42{id}{json}"))
        }
    };
    frame.expect("frames serialize")
}

#[derive(Serialize)]
struct ClientFrame<'a, D> {
    event: &'a str,
    data: &'a D,
    ack: u64,
}

/// A server frame of the sockets host (PROTOCOL.md §2), parsed no further
/// than the runs look: typed and borrowed, so that the load generator's
/// own cost per message stays small next to the server's.
#[derive(Deserialize)]
struct ServerFrame<'a> {
    ack: Option<u64>,
    ok: Option<bool>,
    #[serde(borrow)]
    event: Option<std::borrow::Cow<'a, str>>,
    id: Option<IgnoredAny>,
    data: Option<Box<RawValue>>,
}

/// The first argument of a Socket.IO ack.
#[derive(Deserialize)]
struct AckReply {
    ok: Option<bool>,
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
            let frame: ServerFrame<'_> = serde_json::from_str(&text)?;
            match frame {
                ServerFrame {
                    ack: Some(id), ok, ..
                } => Incoming::Ack {
                    id,
                    ok: ok == Some(true),
                },
                ServerFrame {
                    event: Some(event),
                    id: Some(_),
                    data,
                    ..
                } => Incoming::Push {
                    event: event.into_owned(),
                    data: data.unwrap_or_else(null),
                },
                _ => Incoming::Other,
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
        let args: Vec<&RawValue> = serde_json::from_str(&rest[digits..])?;
        let reply = match args.first() {
            Some(first) => serde_json::from_str::<AckReply>(first.get())?.ok,
            None => None,
        };
        return Ok(Incoming::Ack {
            id,
            ok: reply == Some(true),
        });
    }
    if let Some(rest) = text.strip_prefix("42") {
        let args: Vec<&RawValue> = serde_json::from_str(rest)?;
        let event = args
            .first()
            .and_then(|event| serde_json::from_str::<std::borrow::Cow<'_, str>>(event.get()).ok());
        if let Some(event) = event {
            return Ok(Incoming::Push {
                event: event.into_owned(),
                data: args.get(1).map_or_else(null, |data| (*data).to_owned()),
            });
        }
    }
    Ok(Incoming::Other)
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}
