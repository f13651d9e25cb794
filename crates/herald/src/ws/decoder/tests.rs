use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::ws::deflate::compress;
use crate::ws::frame::encode;

const MASK: Option<[u8; 4]> = Some([0xa1, 0x5b, 0x07, 0xfe]);

fn server() -> Decoder {
    Decoder::new(Role::Server, Limits::default(), None)
}

fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, ProtocolError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(ev) = d.decode(&mut buf)? {
        out.push(ev);
    }
    Ok(out)
}

fn text(s: &str) -> Event {
    Event::Message(Message::Text(Bytes::copy_from_slice(s.as_bytes())))
}

fn code(r: Result<Vec<Event>, ProtocolError>) -> u16 {
    r.expect_err("must fail").code.0
}

#[test]
fn single_and_fragmented_text_with_an_interleaved_ping() {
    let mut wire = encode(true, false, OpCode::Text, b"hello", MASK).to_vec();
    wire.extend_from_slice(&encode(false, false, OpCode::Text, b"wor", MASK));
    wire.extend_from_slice(&encode(true, false, OpCode::Ping, b"p", MASK));
    wire.extend_from_slice(&encode(true, false, OpCode::Continuation, b"ld", MASK));
    let events = decode_all(&mut server(), &wire).expect("valid");
    assert_eq!(events, vec![text("hello"), Event::Ping(Bytes::from_static(b"p")), text("world")]);
}

#[test]
fn protocol_violations_get_1002() {
    let cases: Vec<Vec<u8>> = vec![
        encode(true, false, OpCode::Text, b"x", None).to_vec(), // unmasked
        {
            let mut f = encode(true, false, OpCode::Text, b"x", MASK).to_vec();
            f[0] |= 0x20; // RSV2
            f
        },
        {
            let mut f = encode(true, false, OpCode::Text, b"x", MASK).to_vec();
            f[0] = (f[0] & 0xf0) | 0x3; // reserved opcode
            f
        },
        encode(true, true, OpCode::Text, b"x", MASK).to_vec(), // RSV1 without deflate
        encode(true, false, OpCode::Continuation, b"x", MASK).to_vec(),
        encode(false, false, OpCode::Ping, b"x", MASK).to_vec(),
        encode(true, false, OpCode::Ping, &[0u8; 126], MASK).to_vec(),
        encode(true, false, OpCode::Close, &[3], MASK).to_vec(),
        encode(true, false, OpCode::Close, &1005u16.to_be_bytes(), MASK).to_vec(),
        {
            let mut f = encode(false, false, OpCode::Text, b"a", MASK).to_vec();
            f.extend_from_slice(&encode(true, false, OpCode::Text, b"b", MASK));
            f
        },
    ];
    for (i, wire) in cases.iter().enumerate() {
        assert_eq!(code(decode_all(&mut server(), wire)), 1002, "case {i}");
    }
}

#[test]
fn invalid_utf8_fails_fast_inside_a_partial_frame() {
    let payload = [b'o', b'k', 0xF4, 0x90, 0x80, 0x80, b'!', b'!'];
    let wire = encode(true, false, OpCode::Text, &payload, MASK);
    let mut d = server();
    // Header plus the valid prefix only: nothing to report yet.
    let mut buf = BytesMut::from(&wire[..6 + 2]);
    assert_eq!(d.decode(&mut buf), Ok(None));
    // The impossible lead bytes arrive: fail now, before the frame ends.
    buf.extend_from_slice(&wire[8..10]);
    assert_eq!(d.decode(&mut buf).expect_err("fails fast").code.0, 1007);
}

#[test]
fn close_frames_are_parsed_and_validated() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice("bye".as_bytes());
    let ev = decode_all(&mut server(), &encode(true, false, OpCode::Close, &payload, MASK)).expect("valid");
    assert_eq!(ev, vec![Event::Close(Some(CloseFrame { code: CloseCode::NORMAL, reason: "bye".into() }))]);
    let ev = decode_all(&mut server(), &encode(true, false, OpCode::Close, &[], MASK)).expect("valid");
    assert_eq!(ev, vec![Event::Close(None)]);
    let mut bad = 1000u16.to_be_bytes().to_vec();
    bad.push(0xff);
    assert_eq!(code(decode_all(&mut server(), &encode(true, false, OpCode::Close, &bad, MASK))), 1007);
}

#[test]
fn limits_close_with_1009() {
    let limits = Limits { max_frame_size: 100, max_message_size: 150, max_fragments: 3 };
    let mut d = Decoder::new(Role::Server, limits, None);
    assert_eq!(code(decode_all(&mut d, &encode(true, false, OpCode::Binary, &[0; 101], MASK))), 1009);
    let mut wire = encode(false, false, OpCode::Binary, &[0; 100], MASK).to_vec();
    wire.extend_from_slice(&encode(true, false, OpCode::Continuation, &[0; 51], MASK));
    assert_eq!(code(decode_all(&mut Decoder::new(Role::Server, limits, None), &wire)), 1009);
    let mut wire = Vec::new();
    wire.extend_from_slice(&encode(false, false, OpCode::Binary, b"a", MASK));
    for _ in 0..3 {
        wire.extend_from_slice(&encode(false, false, OpCode::Continuation, b"a", MASK));
    }
    assert_eq!(code(decode_all(&mut Decoder::new(Role::Server, limits, None), &wire)), 1009);
}

#[test]
fn a_length_with_the_high_bit_set_is_refused() {
    let mut wire = vec![0x82, 0xff];
    wire.extend_from_slice(&(1u64 << 63).to_be_bytes());
    wire.extend_from_slice(&[0; 4]);
    assert_eq!(code(decode_all(&mut server(), &wire)), 1002);
}

#[test]
fn compressed_messages_inflate_and_bombs_are_refused() {
    let n = crate::ws::deflate::Negotiated { server_window_bits: 15, client_no_context_takeover: true };
    let limits = Limits { max_frame_size: 1 << 20, max_message_size: 4096, max_fragments: 16 };
    let body = "compress me ".repeat(50);
    let z = compress(body.as_bytes(), 15, 6);
    // Split the compressed payload into two frames: RSV1 only on the first.
    let mut wire = encode(false, true, OpCode::Text, &z[..z.len() / 2], MASK).to_vec();
    wire.extend_from_slice(&encode(true, false, OpCode::Continuation, &z[z.len() / 2..], MASK));
    let mut d = Decoder::new(Role::Server, limits, Some(Inflater::for_negotiated(&n)));
    assert_eq!(decode_all(&mut d, &wire).expect("valid"), vec![text(&body)]);

    let bomb = compress(&vec![b'a'; 1 << 20], 15, 9);
    let mut d = Decoder::new(Role::Server, limits, Some(Inflater::for_negotiated(&n)));
    assert_eq!(code(decode_all(&mut d, &encode(true, true, OpCode::Binary, &bomb, MASK))), 1009);
}

#[test]
fn the_client_role_refuses_masked_frames() {
    let mut d = Decoder::new(Role::Client, Limits::default(), None);
    assert_eq!(code(decode_all(&mut d, &encode(true, false, OpCode::Text, b"x", MASK))), 1002);
    let mut d = Decoder::new(Role::Client, Limits::default(), None);
    assert_eq!(decode_all(&mut d, &encode(true, false, OpCode::Text, b"x", None)).expect("ok"), vec![text("x")]);
}

/// A message as a sequence of frames, for the round-trip property.
#[derive(Debug, Clone)]
struct Msg {
    text: bool,
    payload: Vec<u8>,
    splits: Vec<usize>,
    ping_after_first: bool,
}

fn msg() -> impl Strategy<Value = Msg> {
    (any::<bool>(), prop::collection::vec(any::<u8>(), 0..600), prop::collection::vec(1usize..200, 0..4), any::<bool>())
        .prop_map(|(text, payload, splits, ping_after_first)| {
            let payload = if text { String::from_utf8_lossy(&payload).into_owned().into_bytes() } else { payload };
            Msg { text, payload, splits, ping_after_first }
        })
}

fn wire_for(m: &Msg, mask: [u8; 4]) -> Vec<u8> {
    let mut pieces = Vec::new();
    let mut rest = &m.payload[..];
    for &s in &m.splits {
        let s = s.min(rest.len());
        pieces.push(&rest[..s]);
        rest = &rest[s..];
    }
    pieces.push(rest);
    let mut wire = Vec::new();
    let last = pieces.len() - 1;
    for (i, p) in pieces.iter().enumerate() {
        let op = match (i, m.text) {
            (0, true) => OpCode::Text,
            (0, false) => OpCode::Binary,
            _ => OpCode::Continuation,
        };
        wire.extend_from_slice(&encode(i == last, false, op, p, Some(mask)));
        if i == 0 && m.ping_after_first {
            wire.extend_from_slice(&encode(true, false, OpCode::Ping, b"hi", Some(mask)));
        }
    }
    wire
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Valid streams decode to the same messages however the bytes are cut.
    #[test]
    fn frames_round_trip_under_any_split(msgs in prop::collection::vec(msg(), 1..6), mask in any::<[u8; 4]>(), cuts in prop::collection::vec(1usize..64, 1..20)) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&wire_for(m, mask));
            let payload = Bytes::copy_from_slice(&m.payload);
            let message = Event::Message(if m.text { Message::Text(payload) } else { Message::Binary(payload) });
            let ping = Event::Ping(Bytes::from_static(b"hi"));
            // The ping follows the first frame: before the message unless that frame was all of it.
            match (m.ping_after_first, m.splits.is_empty()) {
                (false, _) => expected.push(message),
                (true, true) => expected.extend([message, ping]),
                (true, false) => expected.extend([ping, message]),
            }
        }
        let mut d = Decoder::new(Role::Server, Limits { max_frame_size: 1 << 16, max_message_size: 1 << 16, max_fragments: 8 }, None);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(ev) = d.decode(&mut buf).expect("valid stream") {
                got.push(ev);
            }
        }
        prop_assert_eq!(got, expected);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes never panic and never yield invalid text.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), deflate in any::<bool>()) {
        let n = crate::ws::deflate::Negotiated { server_window_bits: 15, client_no_context_takeover: true };
        let inflater = deflate.then(|| Inflater::for_negotiated(&n));
        let mut d = Decoder::new(Role::Server, Limits::default(), inflater);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(ev)) = d.decode(&mut buf) {
            if let Event::Message(Message::Text(t)) = ev {
                prop_assert!(std::str::from_utf8(&t).is_ok());
            }
        }
    }
}
