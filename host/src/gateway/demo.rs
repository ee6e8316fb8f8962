//! `/demo`: a chat page for trying the service in a browser, compiled into
//! the binary with the client it uses. In dev mode (no key configured) on a
//! loopback address the page signs in as a user of the directory and plays
//! the backend through two endpoints of its own. They exist nowhere else:
//! there the dev secret is a local one anyway (`sockets-host token` reads
//! it from the data folder). They never mint a token for an admin or a
//! service, and answer only requests addressed to a loopback host (a page
//! that rebinds its own name to 127.0.0.1 is refused).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::publish::{accept, parse};
use crate::store::directory::{User, UserDirectory};

const INDEX_HTML: &str = include_str!("../../demo/page/index.html");
const APP_JS: &str = include_str!("../../demo/page/app.js");
const STYLE_CSS: &str = include_str!("../../demo/page/style.css");
/// The TypeScript client's module, unbuilt: JavaScript with JSDoc types.
pub const CLIENT_JS: &str = include_str!("../../../clients/typescript/src/index.js");

/// Roles the demo signs in as: the people of the marketplace.
const DEMO_ROLES: &[&str] = &["student", "consultant"];
/// Backend events the demo may play: the notifications the page shows.
const DEMO_EVENTS: &[&str] = &["PAYMENT_PROCESSED", "REVIEW_ADDED"];
/// A demo token's lifetime; the page's client asks for a new one before
/// it ends.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Who published an event the demo played, as logged.
const DEMO_PUBLISHER: &str = "demo";

/// What the demo needs beyond the rest of the server.
pub struct Demo {
    /// The sign-in and backend endpoints exist (see [`sign_in_allowed`]).
    pub sign_in: bool,
    /// Where a demo user's role is checked before a token is minted.
    pub directory: Arc<dyn UserDirectory>,
    /// The users the page offers (a users file lists them; MongoDB's
    /// directory is not listed, the page then asks for an id).
    pub users: Vec<User>,
}

/// Whether the page may sign in by itself: in dev mode, listening on a
/// loopback address only (a dev-mode server open to the network would
/// hand its tokens to anyone on it).
pub fn sign_in_allowed(dev_mode: bool, listen: SocketAddr) -> bool {
    dev_mode && listen.ip().is_loopback()
}

/// The demo's routes; the sign-in and backend endpoints only where
/// [`sign_in_allowed`].
pub fn routes(demo: &Demo) -> Router<AppState> {
    let page = Router::new()
        .route("/demo", get(index))
        .route("/demo/", get(index))
        .route("/demo/app.js", get(|| async { javascript(APP_JS) }))
        .route("/demo/client.js", get(|| async { javascript(CLIENT_JS) }))
        .route(
            "/demo/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/demo/session", get(session));
    if demo.sign_in {
        page.route("/demo/token", post(token))
            .route("/demo/events", post(events))
    } else {
        page
    }
}

async fn index() -> Response {
    let mut response = asset("text/html; charset=utf-8", INDEX_HTML);
    // Scripts and styles from this page's own files; sockets to this host.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    response
}

fn javascript(source: &'static str) -> Response {
    asset("text/javascript; charset=utf-8", source)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `{"signIn": bool, "users": [...]}`: whether the page may sign in by
/// itself, and as whom.
async fn session(State(state): State<AppState>) -> Json<Value> {
    let demo = state.demo.as_deref().filter(|demo| demo.sign_in);
    let users: Vec<&User> = demo
        .map(|demo| {
            demo.users
                .iter()
                .filter(|user| is_demo_user(user))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({"signIn": demo.is_some(), "users": users}))
}

#[derive(Deserialize)]
struct TokenRequest {
    user: String,
}

/// `POST /demo/token {"user": "s_1"}` → `{"token": …, "user": {…}}` for a
/// student or consultant of the directory.
async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    require_local(&headers)?;
    let request: TokenRequest = json_body(&headers, &body)?;
    let demo = state
        .demo
        .as_deref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "the demo is off"))?;
    let user = demo.directory.get_user(&request.user).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no user `{}` in the directory", request.user),
        )
    })?;
    if !is_demo_user(&user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "the demo signs in students and consultants only (`{}` is {})",
                user.id, user.role
            ),
        ));
    }
    let token = state
        .auth
        .mint(&user.id, &user.role, DEMO_TOKEN_TTL)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no dev secret to sign with"))?;
    Ok(Json(json!({"token": token, "user": user})))
}

/// `POST /demo/events {"event": "PAYMENT_PROCESSED", "data": {…}}`: the
/// backend's part, for the two notifications the page shows, routed as
/// `POST /api/events` routes.
async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_local(&headers)?;
    require_json(&headers)?;
    let mut publication = parse(&body)?;
    // A page's key must not collide with the real backend's.
    publication.key = None;
    if !DEMO_EVENTS.contains(&publication.event.as_str()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the demo plays {}", DEMO_EVENTS.join(" and ")),
        ));
    }
    accept(&state, publication, DEMO_PUBLISHER.to_owned()).await
}

/// The request names a loopback host: a page of another site whose name
/// was rebound to 127.0.0.1 sends its own name.
fn require_local(headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if is_loopback_host(host) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the demo signs in on a loopback address only (Host: localhost or 127.0.0.1)",
        ))
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_demo_user(user: &User) -> bool {
    DEMO_ROLES.contains(&user.role.as_str())
}

/// A JSON body sent as `application/json`: a page of another site cannot
/// send one without the browser asking this host first (CORS preflight),
/// which it does not allow.
fn json_body<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    require_json(headers)?;
    serde_json::from_slice(body)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid body: {err}")))
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(';')
                .next()
                .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
        });
    if json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send JSON (Content-Type: application/json)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_signs_in_by_itself_in_dev_mode_on_loopback_only() {
        let at = |address: &str| address.parse::<SocketAddr>().unwrap();
        assert!(sign_in_allowed(true, at("127.0.0.1:8080")));
        assert!(sign_in_allowed(true, at("[::1]:8080")));
        assert!(!sign_in_allowed(true, at("0.0.0.0:8080")));
        assert!(!sign_in_allowed(true, at("192.168.1.20:8080")));
        assert!(!sign_in_allowed(false, at("127.0.0.1:8080")));
    }

    #[test]
    fn only_loopback_host_names_are_local() {
        for local in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(local), "{local}");
        }
        for remote in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:80",
            "127.0.0.1.evil.example",
        ] {
            assert!(!is_loopback_host(remote), "{remote}");
        }
    }
}
