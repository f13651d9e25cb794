//! RFC 6455 frame layout: opcodes, header encoding, masking. Pure functions, no I/O.

use bytes::{BufMut, Bytes, BytesMut};

use super::close::CloseFrame;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Largest header: 2 bytes + 8 bytes of extended length + 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Writes a frame header into `dst`. `mask` is `Some` for client-to-server frames.
pub fn put_header(dst: &mut BytesMut, fin: bool, rsv1: bool, opcode: OpCode, len: usize, mask: Option<[u8; 4]>) {
    let b0 = (fin as u8) << 7 | (rsv1 as u8) << 6 | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    dst.put_u8(b0);
    if len < 126 {
        dst.put_u8(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        dst.put_u8(mask_bit | 126);
        dst.put_u16(len as u16);
    } else {
        dst.put_u8(mask_bit | 127);
        dst.put_u64(len as u64);
    }
    if let Some(m) = mask {
        dst.put_slice(&m);
    }
}

/// Encodes one complete frame (header and payload in one buffer, so a writer sends it as a
/// single slice). Server frames are unmasked; pass `mask` for the client role.
pub fn encode(fin: bool, rsv1: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload.len());
    put_header(&mut buf, fin, rsv1, opcode, payload.len(), mask);
    let start = buf.len();
    buf.put_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut buf[start..], m, 0);
    }
    buf.freeze()
}

/// Encodes a close frame. `None` sends an empty close (no status code).
pub fn encode_close(close: Option<&CloseFrame>, mask: Option<[u8; 4]>) -> Bytes {
    match close {
        None => encode(true, false, OpCode::Close, &[], mask),
        Some(c) => {
            let mut payload = Vec::with_capacity(2 + c.reason.len());
            payload.extend_from_slice(&c.code.0.to_be_bytes());
            payload.extend_from_slice(c.reason.as_bytes());
            encode(true, false, OpCode::Close, &payload, mask)
        }
    }
}

/// XORs `buf` with the masking key, starting at byte `offset` of the key's 4-byte cycle.
/// Works a word at a time; the tail is done bytewise.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = [0u8; 4];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(offset + i) & 3];
    }
    let key8 = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(word) ^ key8;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_use_the_shortest_form() {
        for (len, header) in [(0usize, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut b = BytesMut::new();
            put_header(&mut b, true, false, OpCode::Binary, len, None);
            assert_eq!(b.len(), header, "len {len}");
        }
    }

    #[test]
    fn masking_matches_the_bytewise_definition_at_every_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..37u8).collect();
        for offset in 0..4 {
            let mut fast = data.clone();
            apply_mask(&mut fast, mask, offset);
            let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[(i + offset) % 4]).collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn rfc_example_single_frame_unmasked_text() {
        // RFC 6455 §5.7: "Hello" unmasked.
        assert_eq!(&encode(true, false, OpCode::Text, b"Hello", None)[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        // and masked with 37 fa 21 3d
        assert_eq!(
            &encode(true, false, OpCode::Text, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d]))[..],
            &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }
}
