//! Incremental UTF-8 validation across fragments and partial frames, so an invalid text
//! message fails as soon as the offending byte arrives (Autobahn 6.4.x: fail fast).

/// Validates a text message chunk by chunk. Keeps at most three bytes of an unfinished
/// character between chunks.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// The text is not UTF-8 (or could never become UTF-8, whatever follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the message.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = self.pending_len as usize;
            let width = char_width(self.pending[0]);
            let need = width - have;
            let take = need.min(chunk.len());
            self.pending[have..have + take].copy_from_slice(&chunk[..take]);
            self.pending_len += take as u8;
            chunk = &chunk[take..];
            let bytes = &self.pending[..self.pending_len as usize];
            if take < need {
                // Still unfinished: it must at least be a valid prefix.
                return match simdutf8::compat::from_utf8(bytes) {
                    Err(e) if e.error_len().is_none() => Ok(()),
                    _ => Err(InvalidUtf8),
                };
            }
            if simdutf8::basic::from_utf8(bytes).is_err() {
                return Err(InvalidUtf8);
            }
            self.pending_len = 0;
        }
        // Fast path: the whole chunk is valid.
        if simdutf8::basic::from_utf8(chunk).is_ok() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &chunk[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Ends the message: an unfinished character is an error.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let unfinished = self.pending_len != 0;
        self.pending_len = 0;
        if unfinished {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// The encoded length announced by a lead byte; invalid lead bytes never reach here because
/// the validator only keeps prefixes that simdutf8 reported as incomplete (not invalid).
fn char_width(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(bytes: &[u8], sizes: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut rest = bytes;
        for &n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = n.clamp(1, rest.len());
            v.feed(&rest[..n])?;
            rest = &rest[n..];
        }
        v.finish()
    }

    #[test]
    fn valid_text_in_every_split_is_accepted() {
        let text = "κόσμε ascii 𝄞 日本語 €".as_bytes();
        for step in 1..8 {
            assert_eq!(feed_split(text, &[step]), Ok(()), "step {step}");
        }
    }

    #[test]
    fn an_impossible_prefix_fails_before_the_message_ends() {
        // 0xF4 0x90 would encode a code point above U+10FFFF: reject at the second byte.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[b'a', 0xF4]), Ok(()));
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
    }

    #[test]
    fn a_truncated_character_fails_at_the_end() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(&[0xE2, 0x82]), Ok(()));
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }

    #[test]
    fn agrees_with_std_on_random_bytes() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let len = (seed % 12) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(if seed % 3 == 0 {
                    (seed >> 8) as u8
                } else {
                    (b'a' + (seed % 5) as u8) | ((seed >> 20) as u8 & 0x80)
                });
            }
            let expect = std::str::from_utf8(&bytes).is_ok();
            for step in 1..4 {
                assert_eq!(feed_split(&bytes, &[step]).is_ok(), expect, "{bytes:x?} step {step}");
            }
        }
    }
}
