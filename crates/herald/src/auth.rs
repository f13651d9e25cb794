//! Connection tokens: being written.
