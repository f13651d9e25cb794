//! Feeds arbitrary bytes to the server-side frame decoder, cut into pieces of a fuzzed size,
//! with and without permessage-deflate. It must never panic, never loop, and never hand up a
//! text message that is not UTF-8.
#![no_main]

use bytes::BytesMut;
use herald::ws::deflate::{Inflater, Negotiated};
use herald::ws::{Decoder, Event, Limits, Message, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let inflater = (flags & 1 == 1).then(|| {
        Inflater::for_negotiated(&Negotiated { server_window_bits: 15, client_no_context_takeover: flags & 2 == 0 })
    });
    let piece = usize::from(flags >> 2) + 1;
    let limits = Limits { max_frame_size: 1 << 16, max_message_size: 1 << 16, max_fragments: 64 };
    let mut decoder = Decoder::new(Role::Server, limits, inflater);
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Event::Message(Message::Text(t)))) => assert!(std::str::from_utf8(&t).is_ok()),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
