//! How publications and presence entries are stored in Redis and carried by pub/sub.

use std::sync::Arc;

use bytes::Bytes;
use herald_protocol::ClientInfo;

use crate::engine::{PresenceEntry, PublicationRecord, StreamPosition, Tags};

/// What the stream stores and the pub/sub link carries: `[#<tags JSON>\n]<info JSON or
/// nothing>\n<data>`. Neither JSON line holds a raw newline (JSON escapes them in strings),
/// and info JSON starts with `{`, so the `#` line is unambiguous; without tags the body is
/// as short as it can be.
pub(super) fn encode_body(info: Option<&ClientInfo>, tags: Option<&Tags>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    if let Some(tags) = tags {
        out.push(b'#');
        out.extend(serde_json::to_vec(tags).unwrap_or_else(|_| b"{}".to_vec()));
        out.push(b'\n');
    }
    if let Some(info) = info.and_then(|i| serde_json::to_vec(i).ok()) {
        out.extend(info);
    }
    out.push(b'\n');
    out.extend_from_slice(data);
    out
}

pub(super) type Body = (Option<ClientInfo>, Option<Arc<Tags>>, Bytes);

pub(super) fn decode_body(mut body: Bytes) -> Option<Body> {
    let mut tags = None;
    if body.first() == Some(&b'#') {
        let nl = body.iter().position(|b| *b == b'\n')?;
        tags = Some(Arc::new(serde_json::from_slice::<Tags>(&body[1..nl]).ok()?));
        body = body.slice(nl + 1..);
    }
    let nl = body.iter().position(|b| *b == b'\n')?;
    let info = if nl == 0 { None } else { Some(serde_json::from_slice(&body[..nl]).ok()?) };
    Some((info, tags, body.slice(nl + 1..)))
}

/// `<offset>\n<epoch>\n<exclude or nothing>\n<body>` (after the leading `p`); the exclusion
/// (a connection id) travels live only, it is not in the stream.
pub(super) fn decode_publication(payload: Bytes) -> Option<(StreamPosition, PublicationRecord)> {
    let mut lines = payload.splitn(4, |b| *b == b'\n');
    let offset: u64 = std::str::from_utf8(lines.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(lines.next()?).ok()?;
    let exclude = match lines.next()? {
        [] => None,
        x => Some(std::str::from_utf8(x).ok()?.parse().ok()?),
    };
    let rest = lines.next()?;
    let body = payload.slice_ref(rest);
    let (info, tags, data) = decode_body(body)?;
    Some((StreamPosition { epoch: Arc::from(epoch), offset }, PublicationRecord { offset, data, info, tags, exclude }))
}

/// A presence entry as stored: `<user length>:<user><info JSON>`.
pub(super) fn encode_presence(entry: &PresenceEntry) -> Vec<u8> {
    let mut out = format!("{}:{}", entry.user.len(), entry.user).into_bytes();
    if let Some(info) = &entry.info {
        out.extend_from_slice(info);
    }
    out
}

pub(super) fn decode_presence(client: String, v: &[u8]) -> Option<PresenceEntry> {
    let colon = v.iter().position(|b| *b == b':')?;
    let n: usize = std::str::from_utf8(&v[..colon]).ok()?.parse().ok()?;
    let user = std::str::from_utf8(v.get(colon + 1..colon + 1 + n)?).ok()?.to_owned();
    let info = v.get(colon + 1 + n..).filter(|i| !i.is_empty()).map(Bytes::copy_from_slice);
    Some(PresenceEntry { client, user, info })
}
