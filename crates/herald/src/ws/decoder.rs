//! The streaming frame decoder: bytes in, whole messages and control frames out. No I/O, so it
//! is property-tested and fuzzed directly. Payload bytes are unmasked and (for text) validated
//! as they arrive, so invalid UTF-8 fails before the frame is complete.

use bytes::{Buf, Bytes, BytesMut};

use super::close::{CloseCode, CloseFrame};
use super::deflate::{InflateError, Inflater};
use super::frame::{apply_mask, OpCode};
use super::utf8::Utf8Validator;

/// Which end of the connection we are: servers require masked frames, clients refuse them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Size limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of one frame.
    pub max_frame_size: usize,
    /// Largest message, after reassembly and after inflation.
    pub max_message_size: usize,
    /// Most frames one message may be split into.
    pub max_fragments: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_frame_size: 64 << 10, max_message_size: 64 << 10, max_fragments: 128 }
    }
}

/// A complete data message. `Text` is guaranteed to be valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
}

impl Message {
    pub fn payload(&self) -> &Bytes {
        match self {
            Self::Text(b) | Self::Binary(b) => b,
        }
    }
}

/// What the decoder hands up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame; `None` when it carried no status code.
    Close(Option<CloseFrame>),
}

/// A violation that ends the connection with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct ProtocolError {
    pub code: CloseCode,
    pub reason: &'static str,
}

fn fail<T>(code: CloseCode, reason: &'static str) -> Result<T, ProtocolError> {
    Err(ProtocolError { code, reason })
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
}

#[derive(Debug)]
enum State {
    Header,
    Payload { fin: bool, mask: Option<[u8; 4]>, remaining: usize, offset: usize },
}

/// A data message being reassembled from frames or from a frame that arrives in pieces.
#[derive(Debug)]
struct Partial {
    text: bool,
    compressed: bool,
    buf: BytesMut,
    fragments: usize,
    utf8: Utf8Validator,
}

/// Decodes one direction of a WebSocket connection.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    inflater: Option<Inflater>,
    state: State,
    partial: Option<Partial>,
}

impl Decoder {
    /// `inflater` is `Some` when permessage-deflate was negotiated (RSV1 then means compressed).
    pub fn new(role: Role, limits: Limits, inflater: Option<Inflater>) -> Self {
        Self { role, limits, inflater, state: State::Header, partial: None }
    }

    /// Consumes what it can from `src` and returns the next event, or `None` when more bytes
    /// are needed. After an error the decoder must not be used again.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        loop {
            match self.state {
                State::Header => {
                    let Some((h, header_len)) = parse_header(src)? else { return Ok(None) };
                    self.check(&h)?;
                    if h.opcode.is_control() {
                        if src.len() < header_len + h.len {
                            return Ok(None);
                        }
                        src.advance(header_len);
                        let payload = take_unmasked(src, h.len, h.mask, 0);
                        return control_event(h.opcode, payload).map(Some);
                    }
                    let starts = h.opcode != OpCode::Continuation;
                    if starts && h.fin && src.len() >= header_len + h.len {
                        // The common case: a whole single-frame message is buffered; no copy.
                        src.advance(header_len);
                        let payload = take_unmasked(src, h.len, h.mask, 0);
                        return self.finish(h.opcode == OpCode::Text, h.rsv1, payload, None).map(Some);
                    }
                    src.advance(header_len);
                    if starts {
                        self.partial = Some(Partial {
                            text: h.opcode == OpCode::Text,
                            compressed: h.rsv1,
                            buf: BytesMut::with_capacity(h.len.min(64 << 10)),
                            fragments: 0,
                            utf8: Utf8Validator::new(),
                        });
                    }
                    if let Some(p) = self.partial.as_mut() {
                        p.fragments += 1;
                        p.buf.reserve(h.len.min(64 << 10));
                    }
                    self.state = State::Payload { fin: h.fin, mask: h.mask, remaining: h.len, offset: 0 };
                }
                State::Payload { fin, mask, remaining, offset } => {
                    let n = remaining.min(src.len());
                    if remaining > 0 && n == 0 {
                        return Ok(None);
                    }
                    let chunk = take_unmasked(src, n, mask, offset);
                    let Some(p) = self.partial.as_mut() else {
                        return fail(CloseCode::PROTOCOL_ERROR, "continuation without a message");
                    };
                    if p.text && !p.compressed && p.utf8.feed(&chunk).is_err() {
                        return fail(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message");
                    }
                    p.buf.extend_from_slice(&chunk);
                    if n < remaining {
                        self.state = State::Payload { fin, mask, remaining: remaining - n, offset: offset + n };
                        return Ok(None);
                    }
                    self.state = State::Header;
                    if fin {
                        let Some(mut p) = self.partial.take() else { unreachable!("checked above") };
                        let payload = std::mem::take(&mut p.buf).freeze();
                        return self.finish(p.text, p.compressed, payload, Some(p.utf8)).map(Some);
                    }
                }
            }
        }
    }

    /// Validates a header against the protocol and our limits before any payload is read.
    fn check(&self, h: &Header) -> Result<(), ProtocolError> {
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return fail(CloseCode::PROTOCOL_ERROR, "client frames must be masked"),
            (Role::Client, true) => return fail(CloseCode::PROTOCOL_ERROR, "server frames must not be masked"),
            _ => {}
        }
        if h.opcode.is_control() {
            if !h.fin {
                return fail(CloseCode::PROTOCOL_ERROR, "fragmented control frame");
            }
            if h.len > 125 {
                return fail(CloseCode::PROTOCOL_ERROR, "control frame payload over 125 bytes");
            }
            if h.rsv1 {
                return fail(CloseCode::PROTOCOL_ERROR, "RSV1 set on a control frame");
            }
            return Ok(());
        }
        let continuing = self.partial.is_some();
        match (h.opcode, continuing) {
            (OpCode::Continuation, false) => return fail(CloseCode::PROTOCOL_ERROR, "continuation without a message"),
            (OpCode::Text | OpCode::Binary, true) => {
                return fail(CloseCode::PROTOCOL_ERROR, "new message before the previous one ended")
            }
            _ => {}
        }
        if h.rsv1 && (self.inflater.is_none() || h.opcode == OpCode::Continuation) {
            return fail(CloseCode::PROTOCOL_ERROR, "RSV1 set without a negotiated extension");
        }
        if h.len > self.limits.max_frame_size {
            return fail(CloseCode::MESSAGE_TOO_BIG, "frame too large");
        }
        if let Some(p) = &self.partial {
            if p.buf.len().saturating_add(h.len) > self.limits.max_message_size {
                return fail(CloseCode::MESSAGE_TOO_BIG, "message too large");
            }
            if p.fragments >= self.limits.max_fragments {
                return fail(CloseCode::MESSAGE_TOO_BIG, "too many fragments");
            }
        } else if h.len > self.limits.max_message_size {
            return fail(CloseCode::MESSAGE_TOO_BIG, "message too large");
        }
        Ok(())
    }

    fn finish(
        &mut self,
        text: bool,
        compressed: bool,
        payload: Bytes,
        utf8: Option<Utf8Validator>,
    ) -> Result<Event, ProtocolError> {
        let payload = if compressed {
            let Some(inflater) = self.inflater.as_mut() else {
                return fail(CloseCode::PROTOCOL_ERROR, "RSV1 set without a negotiated extension");
            };
            match inflater.inflate(&payload, self.limits.max_message_size) {
                Ok(v) => Bytes::from(v),
                Err(InflateError::TooBig) => return fail(CloseCode::MESSAGE_TOO_BIG, "message too large"),
                Err(InflateError::Corrupt) => return fail(CloseCode::INVALID_PAYLOAD, "invalid deflate data"),
            }
        } else {
            payload
        };
        if text {
            let valid = match utf8 {
                Some(mut v) if !compressed => v.finish().is_ok(),
                _ => simdutf8::basic::from_utf8(&payload).is_ok(),
            };
            if !valid {
                return fail(CloseCode::INVALID_PAYLOAD, "invalid UTF-8 in text message");
            }
            Ok(Event::Message(Message::Text(payload)))
        } else {
            Ok(Event::Message(Message::Binary(payload)))
        }
    }
}

/// Parses a header if enough bytes are buffered; does not consume them.
fn parse_header(src: &[u8]) -> Result<Option<(Header, usize)>, ProtocolError> {
    if src.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (src[0], src[1]);
    if b0 & 0x30 != 0 {
        return fail(CloseCode::PROTOCOL_ERROR, "reserved bits set");
    }
    let Some(opcode) = OpCode::from_u8(b0 & 0x0f) else {
        return fail(CloseCode::PROTOCOL_ERROR, "reserved opcode");
    };
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if src.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([src[2], src[3]]) as u64, 4)
        }
        127 => {
            if src.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&src[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return fail(CloseCode::PROTOCOL_ERROR, "payload length has the high bit set");
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if src.len() < at + 4 {
            return Ok(None);
        }
        let m = [src[at], src[at + 1], src[at + 2], src[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    // Lengths beyond usize (32-bit targets) saturate and then fail the size limit.
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    Ok(Some((Header { fin: b0 & 0x80 != 0, rsv1: b0 & 0x40 != 0, opcode, len, mask }, at)))
}

fn take_unmasked(src: &mut BytesMut, n: usize, mask: Option<[u8; 4]>, offset: usize) -> Bytes {
    let mut chunk = src.split_to(n);
    if let Some(m) = mask {
        apply_mask(&mut chunk, m, offset);
    }
    chunk.freeze()
}

fn control_event(opcode: OpCode, payload: Bytes) -> Result<Event, ProtocolError> {
    Ok(match opcode {
        OpCode::Ping => Event::Ping(payload),
        OpCode::Pong => Event::Pong(payload),
        _ => Event::Close(parse_close(&payload)?),
    })
}

fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match payload.len() {
        0 => Ok(None),
        1 => fail(CloseCode::PROTOCOL_ERROR, "close payload of one byte"),
        _ => {
            let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
            if !code.is_sendable() {
                return fail(CloseCode::PROTOCOL_ERROR, "invalid close code");
            }
            let Ok(reason) = simdutf8::basic::from_utf8(&payload[2..]) else {
                return fail(CloseCode::INVALID_PAYLOAD, "close reason is not UTF-8");
            };
            Ok(Some(CloseFrame { code, reason: reason.to_owned() }))
        }
    }
}

#[cfg(test)]
mod tests;
