//! Role-checked claims as extractors. An extractor runs before the body
//! extractor of the handler it guards, so a request without the right token
//! is answered `401`/`403` before a byte of its body is read (PROTOCOL §6:
//! "the check of the token and role comes before any request body is read").

use std::marker::PhantomData;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::error::{ApiError, require_role};
use crate::auth::Claims;

/// A role an API requires.
pub trait Role: Send + Sync + 'static {
    /// The `role` claim it takes.
    const NAME: &'static str;
}

/// Backend services publishing events (`POST /api/events`).
#[derive(Debug)]
pub enum ServiceRole {}

impl Role for ServiceRole {
    const NAME: &'static str = "service";
}

/// Operators (the admin API, `/readyz` details).
#[derive(Debug)]
pub enum AdminRole {}

impl Role for AdminRole {
    const NAME: &'static str = "admin";
}

/// The claims of a valid bearer token whose role is `R`.
#[derive(Debug)]
pub struct Authorized<R> {
    /// The verified claims.
    pub claims: Claims,
    role: PhantomData<R>,
}

impl<R: Role> FromRequestParts<AppState> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let claims = require_role(&state.auth, &parts.headers, R::NAME).await?;
        Ok(Self {
            claims,
            role: PhantomData,
        })
    }
}

/// An admin's claims, if the request carries a valid admin token; never a
/// rejection (for answers that only add detail for operators).
#[derive(Debug)]
pub struct MaybeAdmin(pub bool);

impl FromRequestParts<AppState> for MaybeAdmin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, std::convert::Infallible> {
        Ok(Self(
            require_role(&state.auth, &parts.headers, AdminRole::NAME)
                .await
                .is_ok(),
        ))
    }
}

/// Which limit a request body is held to.
pub trait BodyLimit: Send + Sync + 'static {
    /// The limit, bytes.
    fn bytes(limits: &crate::config::Limits) -> usize;
}

/// `POST /api/events` and every other request body.
#[derive(Debug)]
pub enum RequestBodyLimit {}

impl BodyLimit for RequestBodyLimit {
    fn bytes(limits: &crate::config::Limits) -> usize {
        limits.max_body_bytes
    }
}

/// Plugin uploads on the admin API.
#[derive(Debug)]
pub enum UploadLimit {}

impl BodyLimit for UploadLimit {
    fn bytes(limits: &crate::config::Limits) -> usize {
        limits.max_plugin_bytes
    }
}

/// A request body of at most `L`'s limit: a larger declared
/// `Content-Length` is refused (`413`) before a byte is read, and a body
/// that turns out larger while it streams in is refused once it passes the
/// limit. Put it last among a handler's extractors, after the claims.
#[derive(Debug)]
pub struct LimitedBody<L> {
    /// The body.
    pub bytes: axum::body::Bytes,
    limit: PhantomData<L>,
}

impl<L: BodyLimit> axum::extract::FromRequest<AppState> for LimitedBody<L> {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let limit = L::bytes(&state.config.limits);
        let too_large = || {
            ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes"),
            )
        };
        let declared = request
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(too_large());
        }
        let body = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|err| {
                let over_limit = std::error::Error::source(&err)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
                if over_limit {
                    too_large()
                } else {
                    ApiError::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        "the request body could not be read",
                    )
                }
            })?;
        Ok(Self {
            bytes: body,
            limit: PhantomData,
        })
    }
}
