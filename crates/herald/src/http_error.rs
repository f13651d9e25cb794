//! HTTP error answers: a status and `{"error":{"code":..,"message":..}}`.

use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_protocol::{ErrorBody, ErrorCode};
use http::StatusCode;

/// An error answer of the HTTP API or of an endpoint that refuses a request.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// What the answer says (for a log line).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Keeps the code but answers with another status (e.g. 426 for a missing upgrade).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}
