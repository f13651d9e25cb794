//! RFC 6455 close codes as seen by the framing layer, and their validation.

/// A WebSocket close status code (RFC 6455 §7.4), including the application range 4000–4999
/// that Herald's protocol uses for its own reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    pub const PROTOCOL_ERROR: Self = Self(1002);
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    pub const INVALID_PAYLOAD: Self = Self(1007);
    pub const POLICY_VIOLATION: Self = Self(1008);
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    pub const INTERNAL_ERROR: Self = Self(1011);
    pub const TRY_AGAIN_LATER: Self = Self(1013);

    /// Whether a peer may put this code in a close frame on the wire. 1005, 1006 and 1015 are
    /// reserved for reporting and must never be sent; 1004 and 1016–2999 are unassigned or
    /// reserved for future RFCs; 3000–4999 belong to libraries and applications.
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The payload of a close frame: a code and a UTF-8 reason of at most 123 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: CloseCode,
    pub reason: String,
}

impl CloseFrame {
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        truncate_utf8(&mut reason, 123);
        Self { code, reason }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary (close reasons must fit 123 bytes).
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_codes_match_the_registry() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
            assert!(CloseCode(ok).is_sendable(), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert!(!CloseCode(bad).is_sendable(), "{bad}");
        }
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let f = CloseFrame::new(CloseCode::NORMAL, "é".repeat(100));
        assert!(f.reason.len() <= 123);
        assert_eq!(f.reason.len() % 2, 0);
    }
}
