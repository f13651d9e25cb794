//! Herald's wire protocol: the types clients and servers exchange, and the one table of error
//! and close codes. No I/O.
//!
//! Layout: `codes` (error codes and close codes with their meaning and retry advice),
//! `error` (the JSON error body shared by the protocol and the HTTP API).

mod codes;
mod error;

pub use codes::{CloseCode, ErrorCode};
pub use error::{ErrorBody, ErrorDetail};
