//! Placeholder: the Rust client is being written.
