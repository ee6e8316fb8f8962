//! A walk through the service for newcomers: a student and a consultant
//! connect, exchange `sendMessage`, and the student receives a payment
//! published through the HTTP API.
//!
//! Start the server (`scripts/run.sh`), then in another terminal:
//! `cargo run -p sockets-tests --example demo`
//!
//! Tokens are minted with the server's dev secret (`./data/dev-jwt-secret`,
//! or `SOCKETS_JWT_SECRET`); the server address is `SOCKETS_URL`
//! (default `127.0.0.1:8080`).

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("SOCKETS_URL").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let secret = match std::env::var("SOCKETS_JWT_SECRET") {
        Ok(secret) => secret,
        Err(_) => std::fs::read_to_string("data/dev-jwt-secret")
            .context("no SOCKETS_JWT_SECRET and no data/dev-jwt-secret: start the server with scripts/run.sh first")?
            .trim()
            .to_owned(),
    };
    let token = |sub: &str, role: &str| -> anyhow::Result<String> {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": sub, "role": role, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )?)
    };

    let mut student = connect(&addr, &token("s_1", "student")?).await?;
    let mut consultant = connect(&addr, &token("c_1", "consultant")?).await?;

    say(&mut student, "student", json!({"event": "sendMessage", "data": {"to": "c_1", "text": "Hi! Is 15:00 OK?"}, "ack": 1})).await?;
    listen(&mut student, "student").await?;
    listen(&mut consultant, "consultant").await?;
    say(
        &mut consultant,
        "consultant",
        json!({"event": "sendMessage", "data": {"to": "s_1", "text": "15:00 works."}, "ack": 1}),
    )
    .await?;
    listen(&mut consultant, "consultant").await?;
    listen(&mut student, "student").await?;

    let payment = json!({"event": "PAYMENT_PROCESSED", "id": format!("demo-{}", std::process::id()),
        "data": {"paymentId": "p_1", "studentId": "s_1", "consultantId": "c_1", "amount": 4900, "currency": "USD", "status": "succeeded"}});
    println!("billing service  POST /api/events {payment}");
    let answer = post(&addr, &token("billing", "service")?, &payment).await?;
    println!("billing service  <- {answer}");
    listen(&mut student, "student").await?;
    Ok(())
}

async fn connect(addr: &str, token: &str) -> anyhow::Result<Socket> {
    let url = format!("ws://{addr}/ws?access_token={token}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("cannot connect to ws://{addr}/ws"))?;
    let connected = next(&mut socket).await?;
    println!("connected        <- {connected}");
    Ok(socket)
}

async fn say(socket: &mut Socket, who: &str, frame: Value) -> anyhow::Result<()> {
    println!("{who:<16} -> {frame}");
    socket.send(Message::text(frame.to_string())).await?;
    Ok(())
}

async fn listen(socket: &mut Socket, who: &str) -> anyhow::Result<()> {
    let frame = next(socket).await?;
    println!("{who:<16} <- {frame}");
    Ok(())
}

async fn next(socket: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .context("no frame within 5 s")?;
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("the server closed the connection"),
        }
    }
}

async fn post(addr: &str, token: &str, body: &Value) -> anyhow::Result<String> {
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "POST /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.lines().next().unwrap_or_default().to_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    Ok(format!("{status} {body}"))
}
