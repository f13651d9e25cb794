//! Golden frames in tests/fixtures/ are the protocol's reference: every one must parse and
//! encode back to the same JSON. The JS SDK's tests read the same files.

use std::path::Path;

use herald_protocol::{ClientFrame, ServerFrame};

fn each(dir: &str, check: impl Fn(&str, &[u8]) -> String) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        let text = std::fs::read(&path).expect("read");
        let encoded = check(&name, &text);
        let want: serde_json::Value = serde_json::from_slice(&text).expect("fixture is JSON");
        let got: serde_json::Value = serde_json::from_str(&encoded).expect("encoding is JSON");
        assert_eq!(got, want, "{name} does not round-trip");
        n += 1;
    }
    n
}

#[test]
fn client_frames_round_trip() {
    let n = each("client", |name, bytes| ClientFrame::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}")).encode());
    assert!(n >= 6);
}

#[test]
fn server_frames_round_trip() {
    let n = each("server", |name, bytes| ServerFrame::parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}")).encode());
    assert!(n >= 10);
}
