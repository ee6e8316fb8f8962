//! The accept loop (PROTOCOL §6, HTTP limits): a deadline for request
//! headers, a cap on open connections, `TCP_NODELAY`, graceful shutdown.
//!
//! `axum::serve` has neither a header deadline nor a cap: a socket that
//! sends half a request line held a file descriptor for as long as it liked,
//! and a few thousand of them exhausted the process's descriptors.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

use super::error::ApiError;
use crate::metrics::Metrics;

/// How long accepting pauses after an accept error (out of descriptors):
/// retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Connections beyond the cap that are still answered (`503`, or the
/// operational endpoints) at once; beyond these, a connection is closed as
/// soon as it is accepted, so that the cap bounds descriptors too.
const OVERFLOW_CONNECTIONS: usize = 256;
/// The header deadline of a connection beyond the cap.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long shutdown waits for HTTP requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Routes answered even beyond the cap: a full node is alive and says so.
const OPERATIONAL_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Limits on connections as such, before any request is understood.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections (HTTP and WebSocket) before new ones get `503`.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
}

/// One of the [`ConnectionLimits::max_connections`] slots. Handed to every
/// request in its extensions, so that an upgraded WebSocket keeps its slot
/// after hyper lets go of the connection. A request without one came
/// beyond the cap: the upgrade refuses it (`503`).
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Serves `app` on `listener` until `shutdown` resolves; then closes the
/// listener and lets every connection finish its request in flight (10 s
/// at most).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    // Every connection task holds a receiver; shutdown waits until all are
    // dropped.
    let (stopping, stop_seen) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut accept_failing = false;
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    accept_failing = false;
                    accepted
                }
                Err(err) => {
                    if !accept_failing {
                        tracing::error!("cannot accept connections: {err}");
                        accept_failing = true;
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Frames are small and written as they come: Nagle's algorithm would
        // hold one back behind an unacknowledged one (up to a delayed ACK).
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {err}");
        }
        let admission = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => Admission::Slot(slot),
            Err(_) => {
                metrics.connection_refused_over_cap();
                match Arc::clone(&overflow).try_acquire_owned() {
                    Ok(permit) => Admission::Overflow(permit),
                    // Even the 503 answers are at their bound.
                    Err(_) => continue,
                }
            }
        };
        let app = app.clone();
        let stop_seen = stop_seen.clone();
        tokio::spawn(serve_connection(
            stream, remote, app, admission, limits, stop_seen,
        ));
    }
    // New clients are refused by the kernel from now on, not queued.
    drop(listener);
    drop(stop_seen);
    let _ = stopping.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, stopping.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "HTTP requests still in flight after {DRAIN_TIMEOUT:?}; not waiting for them"
        );
    }
}

/// How a connection was let in.
enum Admission {
    /// Within the cap: it holds a slot until it closes.
    Slot(OwnedSemaphorePermit),
    /// Beyond it: answered `503` (the operational endpoints as usual),
    /// briefly, then closed.
    Overflow(OwnedSemaphorePermit),
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    app: Router,
    admission: Admission,
    limits: ConnectionLimits,
    mut stop_seen: watch::Receiver<bool>,
) {
    let (slot, overflow, header_timeout) = match admission {
        Admission::Slot(permit) => (
            Some(ConnectionSlot(Arc::new(permit))),
            None,
            limits.header_read_timeout,
        ),
        Admission::Overflow(permit) => (None, Some(permit), OVERFLOW_HEADER_TIMEOUT),
    };
    let keep_alive = slot.is_some();
    let service = tower::service_fn(move |mut request: Request<Incoming>| {
        let app = app.clone();
        let slot = slot.clone();
        async move {
            request.extensions_mut().insert(ConnectInfo(remote));
            match slot {
                Some(slot) => {
                    request.extensions_mut().insert(slot);
                }
                None if !OPERATIONAL_PATHS.contains(&request.uri().path()) => {
                    return Ok::<_, Infallible>(over_capacity());
                }
                None => {}
            }
            app.oneshot(request.map(Body::new)).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(keep_alive);
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    let stopping = async move {
        // The guard `wait_for` returns must not live across an await.
        let _ = stop_seen.wait_for(|stop| *stop).await.map(drop);
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopping => {
            // Finishes the request in flight, then closes; an upgraded
            // WebSocket is closed by its own task (1001).
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::trace!("connection from {remote} ended: {err}");
    }
    drop(overflow);
}

/// The answer to every request of a connection beyond the cap.
fn over_capacity() -> Response<Body> {
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many open connections, try again later",
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}
