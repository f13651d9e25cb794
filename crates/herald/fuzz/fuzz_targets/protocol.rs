//! Feeds arbitrary bytes to the protocol decoders: `ClientFrame::parse` (what the server reads
//! from every client) and `ServerFrame::parse` (what the Rust client reads). Neither may panic,
//! an error must carry a known code, and a command that parses must survive its own encoding
//! unchanged (what the server understood is what the frame said).
#![no_main]

use herald_protocol::{ClientFrame, ErrorCode, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match ClientFrame::parse(data) {
        Ok(frame) => {
            let again = ClientFrame::parse(frame.encode().as_bytes());
            assert_eq!(again.as_ref(), Ok(&frame), "encode/parse round trip");
        }
        Err(e) => assert!(ErrorCode::from_u16(e.code.as_u16()).is_some()),
    }
    if let Ok(frame) = ServerFrame::parse(data) {
        let _ = frame.encode();
    }
});
