//! HTTP errors: every error body on every route is
//! `{"error":{"code":"<code>","message":"<text>"}}`, the code fixed by the
//! status (PROTOCOL.md §5).

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::{AuthError, Authenticator, Claims};
use crate::protocol::{ErrorBody, ErrorCode};

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// The code PROTOCOL fixes for a status.
    pub fn code_for(status: StatusCode) -> ErrorCode {
        match status.as_u16() {
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            413 => ErrorCode::TooLarge,
            422 => ErrorCode::UnknownEvent,
            429 => ErrorCode::RateLimited,
            503 => ErrorCode::Unavailable,
            400..=499 => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }

    /// The HTTP form of a protocol error: the status that fixes its code
    /// (`plugin_failed` has no status of its own and is a `500`).
    pub fn from_body(error: ErrorBody) -> Self {
        let status = match error.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::UnknownEvent => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::PluginFailed | ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.message)
    }
}

/// Verifies the `Authorization: Bearer` token of an HTTP request and that
/// it carries `role`: `401` without a valid token, `403` with another role.
pub async fn require_role(
    auth: &Authenticator,
    headers: &HeaderMap,
    role: &str,
) -> Result<Claims, ApiError> {
    let unauthorized = |message: String| ApiError::new(StatusCode::UNAUTHORIZED, message);
    let header = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized(AuthError::Missing.to_string()))?
        .to_str()
        .map_err(|_| unauthorized(AuthError::NotBearer.to_string()))?;
    let claims = auth
        .verify_bearer_fresh(header)
        .await
        .map_err(|err| unauthorized(err.to_string()))?;
    if claims.role != role {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this API needs a token with role `{role}`"),
        ));
    }
    Ok(claims)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(serde::Serialize)]
        struct Body {
            error: ErrorBody,
        }
        let error = ErrorBody::new(Self::code_for(self.status), self.message);
        (self.status, Json(Body { error })).into_response()
    }
}

/// Unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

/// Known routes, wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}
