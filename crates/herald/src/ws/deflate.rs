//! RFC 7692 permessage-deflate: offer parsing and negotiation, and compression helpers.
//!
//! Herald always answers with `server_no_context_takeover`, so every message compresses the
//! same way for every connection: a publication is compressed once and the bytes are shared.
//! Compressor and (by default) decompressor state live per thread, reset per message, never
//! per connection.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The tail a sync flush leaves; stripped on send and appended on receive (RFC 7692 §7.2.1).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// permessage-deflate policy (`[websocket.compression]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DeflatePolicy {
    /// Accept clients' permessage-deflate offers. The server always compresses without context
    /// takeover, so each message is compressed once for all subscribers.
    pub enabled: bool,
    /// Ask clients not to keep context between messages, so no inflate window is kept per
    /// connection. When false, a client that wants context takeover gets its own inflater.
    pub client_no_context_takeover: bool,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub threshold: usize,
    /// zlib compression level, 0 (store) to 9 (smallest).
    pub level: u32,
}

impl Default for DeflatePolicy {
    fn default() -> Self {
        Self { enabled: true, client_no_context_takeover: true, threshold: 128, level: 6 }
    }
}

/// What was agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Window we compress with (8–15); 8 is honoured with stored blocks, see [`compress`].
    pub server_window_bits: u8,
    /// The client resets its compressor per message, so we may inflate with shared state.
    pub client_no_context_takeover: bool,
}

impl Negotiated {
    /// The `Sec-WebSocket-Extensions` response value.
    pub fn response_header(&self) -> String {
        let mut s = String::from("permessage-deflate; server_no_context_takeover");
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.server_window_bits != 15 {
            s.push_str(&format!("; server_max_window_bits={}", self.server_window_bits));
        }
        s
    }
}

/// Picks the first acceptable permessage-deflate offer among the `Sec-WebSocket-Extensions`
/// header values. Offers with unknown, duplicated or malformed parameters are declined (RFC 7692
/// §5.1), as are other extensions; `None` means "no compression", never an error.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>, policy: &DeflatePolicy) -> Option<Negotiated> {
    if !policy.enabled {
        return None;
    }
    for header in headers {
        for ext in split_outside_quotes(header, ',') {
            let mut parts = split_outside_quotes(ext, ';').into_iter();
            if !parts.next().is_some_and(|name| name.trim().eq_ignore_ascii_case("permessage-deflate")) {
                continue;
            }
            if let Some(n) = accept_offer(parts, policy) {
                return Some(n);
            }
        }
    }
    None
}

fn accept_offer<'a>(params: impl Iterator<Item = &'a str>, policy: &DeflatePolicy) -> Option<Negotiated> {
    let mut seen: Vec<String> = Vec::new();
    let mut server_bits = 15u8;
    let mut client_nct = policy.client_no_context_takeover;
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(unquote(v.trim())?)),
            None => (param.trim().to_ascii_lowercase(), None),
        };
        if name.is_empty() || seen.contains(&name) {
            return None;
        }
        match name.as_str() {
            "server_no_context_takeover" if value.is_none() => {}
            "client_no_context_takeover" if value.is_none() => client_nct = true,
            "server_max_window_bits" => server_bits = window_bits(value?)?,
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(Negotiated { server_window_bits: server_bits, client_no_context_takeover: client_nct })
}

fn window_bits(v: &str) -> Option<u8> {
    // RFC 7692 §7.1.2: a decimal integer 8–15 with no leading zeros.
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|inner| !inner.contains('"')),
        None => Some(v),
    }
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

thread_local! {
    /// One compressor per window size, created on first use and reset after every message.
    static COMPRESSORS: RefCell<[Option<(u32, Compress)>; 8]> = const { RefCell::new([const { None }; 8]) };
    /// The inflater shared by every connection on this thread that negotiated
    /// `client_no_context_takeover`.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new_with_window_bits(false, 15));
}

/// Compresses one whole message as a single deflate stream, sync-flushed and with the tail
/// stripped: the payload of a message with RSV1 set. A window of 8 bits is honoured with stored
/// blocks (zlib cannot emit a raw 256-byte-window stream; stored blocks never reach back).
pub fn compress(payload: &[u8], window_bits: u8, level: u32) -> Vec<u8> {
    let (bits, level) = if window_bits <= 8 { (9, 0) } else { (window_bits.min(15), level.min(9)) };
    COMPRESSORS.with(|cell| {
        let mut slots = cell.borrow_mut();
        let slot = &mut slots[usize::from(bits - 8)];
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, Compress::new_with_window_bits(Compression::new(level), false, bits)));
        }
        let Some((_, c)) = slot.as_mut() else { unreachable!("slot filled above") };
        let out = deflate_sync(c, payload);
        c.reset();
        out
    })
}

fn deflate_sync(c: &mut Compress, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    let start_in = c.total_in();
    loop {
        let consumed = (c.total_in() - start_in) as usize;
        // Compressing into a Vec cannot fail for a well-formed stream we own; if zlib ever
        // reports an error we fall back to a stored copy below by breaking out.
        if c.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync).is_err() {
            break;
        }
        let consumed = (c.total_in() - start_in) as usize;
        if consumed == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&SYNC_TAIL) {
        out.truncate(out.len() - SYNC_TAIL.len());
    }
    out
}

/// Why an inflate failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The inflated message would exceed the size limit (a compression bomb or just too big).
    TooBig,
    /// Not a valid deflate stream.
    Corrupt,
}

/// Per-connection inflate state: shared per thread when the client resets its context per
/// message, owned when it keeps context across messages.
#[derive(Debug)]
pub enum Inflater {
    Shared,
    Owned(Box<Decompress>),
}

impl Inflater {
    pub fn for_negotiated(n: &Negotiated) -> Self {
        if n.client_no_context_takeover {
            Self::Shared
        } else {
            Self::Owned(Box::new(Decompress::new_with_window_bits(false, 15)))
        }
    }

    /// Inflates one message payload (tail not included) into a new buffer of at most `max`
    /// bytes.
    pub fn inflate(&mut self, payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        match self {
            Self::Shared => INFLATER.with(|cell| {
                let mut d = cell.borrow_mut();
                let r = inflate_message(&mut d, payload, max);
                d.reset(false);
                r
            }),
            Self::Owned(d) => {
                let r = inflate_message(d, payload, max);
                if r.is_err() {
                    d.reset(false);
                }
                r
            }
        }
    }
}

fn inflate_message(d: &mut Decompress, payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::with_capacity((payload.len() * 3).clamp(64, max.saturating_add(1).max(64)));
    for input in [payload, &SYNC_TAIL[..]] {
        let start_in = d.total_in();
        loop {
            let consumed = (d.total_in() - start_in) as usize;
            let before_out = out.len();
            let status = d
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            if out.len() > max {
                return Err(InflateError::TooBig);
            }
            let consumed_now = (d.total_in() - start_in) as usize;
            if status == Status::StreamEnd {
                // A final block ends the stream; anything after it in this message is invalid
                // except the sync tail we appended ourselves.
                if input.len() > consumed_now && input.as_ptr() != SYNC_TAIL.as_ptr() {
                    return Err(InflateError::Corrupt);
                }
                d.reset(false);
                return Ok(out);
            }
            if consumed_now == input.len() && out.len() < out.capacity() {
                break;
            }
            if out.len() == out.capacity() {
                let grow = out.capacity().max(64).min(max + 1 - out.len().min(max));
                out.reserve(grow.max(1));
            } else if consumed_now == consumed && out.len() == before_out {
                return Err(InflateError::Corrupt);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DeflatePolicy {
        DeflatePolicy::default()
    }

    #[test]
    fn a_plain_offer_is_accepted_without_context_takeover() {
        let n = negotiate(["permessage-deflate; client_max_window_bits"], &policy()).expect("accepted");
        assert_eq!(n, Negotiated { server_window_bits: 15, client_no_context_takeover: true });
        assert_eq!(n.response_header(), "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    }

    #[test]
    fn the_server_window_limit_is_honoured_and_echoed() {
        let n = negotiate(["permessage-deflate; server_max_window_bits=10"], &policy()).expect("accepted");
        assert_eq!(n.server_window_bits, 10);
        assert!(n.response_header().ends_with("server_max_window_bits=10"));
    }

    #[test]
    fn bad_offers_are_declined_and_the_next_one_is_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; mystery",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(negotiate([bad], &policy()), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; server_max_window_bits=\"12\"");
            assert_eq!(negotiate([two.as_str()], &policy()).map(|n| n.server_window_bits), Some(12), "{two}");
        }
    }

    #[test]
    fn context_takeover_is_allowed_when_the_config_permits_it() {
        let p = DeflatePolicy { client_no_context_takeover: false, ..policy() };
        let n = negotiate(["permessage-deflate"], &p).expect("accepted");
        assert!(!n.client_no_context_takeover);
        assert!(matches!(Inflater::for_negotiated(&n), Inflater::Owned(_)));
        let n = negotiate(["permessage-deflate; client_no_context_takeover"], &p).expect("accepted");
        assert!(n.client_no_context_takeover);
    }

    #[test]
    fn disabled_policy_declines_everything() {
        let p = DeflatePolicy { enabled: false, ..policy() };
        assert_eq!(negotiate(["permessage-deflate"], &p), None);
    }

    #[test]
    fn compress_then_inflate_round_trips_at_every_window() {
        let text = "the quick brown fox jumps over the lazy dog; ".repeat(200);
        for bits in 8..=15 {
            let c = compress(text.as_bytes(), bits, 6);
            if bits > 8 {
                assert!(c.len() < text.len() / 4, "bits {bits}: {}", c.len());
            }
            let back = Inflater::Shared.inflate(&c, 1 << 20).expect("inflates");
            assert_eq!(back, text.as_bytes());
        }
        assert!(Inflater::Shared.inflate(&compress(b"", 15, 6), 10).expect("empty").is_empty());
    }

    #[test]
    fn inflate_enforces_the_size_cap() {
        let zeros = vec![0u8; 1 << 20];
        let c = compress(&zeros, 15, 9);
        assert!(c.len() < 2048);
        assert_eq!(Inflater::Shared.inflate(&c, 1000), Err(InflateError::TooBig));
        assert_eq!(Inflater::Shared.inflate(&c, 1 << 20).map(|v| v.len()), Ok(1 << 20));
    }

    #[test]
    fn garbage_is_corrupt_and_the_shared_state_recovers() {
        assert_eq!(Inflater::Shared.inflate(&[0xff, 0xff, 0xff, 0x07], 1000), Err(InflateError::Corrupt));
        let c = compress(b"hello hello hello", 15, 6);
        assert_eq!(Inflater::Shared.inflate(&c, 1000).expect("ok"), b"hello hello hello");
    }

    #[test]
    fn an_owned_inflater_keeps_context_across_messages() {
        let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
        let m1 = deflate_sync(&mut c, b"shared words shared words");
        let m2 = deflate_sync(&mut c, b"shared words again");
        let mut inf = Inflater::Owned(Box::new(Decompress::new_with_window_bits(false, 15)));
        assert_eq!(inf.inflate(&m1, 100).expect("m1"), b"shared words shared words");
        assert_eq!(inf.inflate(&m2, 100).expect("m2"), b"shared words again");
    }
}
