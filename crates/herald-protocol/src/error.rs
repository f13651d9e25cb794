//! The JSON error body: `{"error":{"code":107,"message":"..."}}`.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// An error as the HTTP API and error replies carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: u16,
    pub message: String,
}

impl ErrorBody {
    /// ```
    /// use herald_protocol::{ErrorBody, ErrorCode};
    /// let body = ErrorBody::new(ErrorCode::BadRequest, "missing channel");
    /// assert_eq!(serde_json::to_string(&body).unwrap(),
    ///            r#"{"error":{"code":107,"message":"missing channel"}}"#);
    /// ```
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { code: code.as_u16(), message: message.into() } }
    }
}
