//! Helpers shared by the CLI's integration tests.

use std::process::Command;

/// The `herald` binary under test, without the developer's `HERALD_*` variables (they must
/// not leak into these runs).
pub(crate) fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HERALD_") {
            c.env_remove(k);
        }
    }
    c
}
