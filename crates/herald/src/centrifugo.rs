//! The Centrifugo door's server side: its encoder (publications and join/leave in Centrifugo's
//! shapes, encoded once per publication for every centrifuge-js subscriber). The commands run
//! in `session` under `Dialect::Centrifugo`; the wire translation is
//! `herald_protocol::centrifugo`.

use herald_protocol::centrifugo::{encode_pub_push, encode_push, ReplyContext};
use herald_protocol::PushBody;

use crate::engine::PublicationRecord;
use crate::hub::{ChannelEvent, Encoder, Frame};

/// Encodes for subscribers on `/connection/websocket`.
#[derive(Debug)]
pub struct CentrifugoEncoder;

/// The one Centrifugo encoder, shared by every Centrifugo subscription.
pub static CENTRIFUGO: CentrifugoEncoder = CentrifugoEncoder;

impl Encoder for CentrifugoEncoder {
    fn slot(&self) -> usize {
        4
    }

    fn publication(&self, channel: &str, _epoch: &str, record: &PublicationRecord) -> Frame {
        let tags = record.tags.as_deref();
        Frame::text(encode_pub_push(channel, Some(record.offset), &record.data, record.info.as_ref(), tags))
    }

    fn event(&self, channel: &str, event: &ChannelEvent) -> Option<Frame> {
        let (body, info) = match event {
            ChannelEvent::Join { client, info } => (PushBody::Join(client.clone()), info.as_deref()),
            ChannelEvent::Leave { client } => (PushBody::Leave(client.clone()), None),
            // Pusher's client events have no Centrifugo counterpart.
            ChannelEvent::Client { .. } => return None,
        };
        let ctx = ReplyContext { now: 0, client: "", version: "", expires_at: 0, recoverable: false };
        let mut push = encode_push(channel, &body, &ctx);
        // The joining connection's info, as Centrifugo's `conn_info`.
        if let Some(info) = info.and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok()) {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&push) {
                v["push"]["join"]["info"]["conn_info"] = info;
                push = v.to_string().into_bytes();
            }
        }
        Some(Frame::text(push))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use bytes::Bytes;
    use herald_protocol::ClientInfo;

    use super::*;

    fn text(frame: Frame) -> serde_json::Value {
        let Frame::Ws(prepared) = frame else { panic!("a WebSocket frame") };
        let wire = prepared.frame_for(&crate::ws::SendMode::PLAIN);
        let at = if wire[1] & 0x7f == 126 { 4 } else { 2 };
        serde_json::from_slice(&wire[at..]).expect("json")
    }

    #[test]
    fn publications_carry_offset_info_and_tags() {
        let record = PublicationRecord {
            offset: 3,
            data: Bytes::from_static(br#"{"a":1}"#),
            info: Some(ClientInfo { user: "u".into(), client: "c".into() }),
            tags: Some(Arc::new(BTreeMap::from([("event".to_owned(), "x".to_owned())]))),
            exclude: None,
        };
        let v = text(CENTRIFUGO.publication("ch", "e", &record));
        assert_eq!(
            v,
            serde_json::json!({"push":{"channel":"ch","pub":{"offset":3,"data":{"a":1},"info":{"user":"u","client":"c"},"tags":{"event":"x"}}}})
        );
    }

    #[test]
    fn joins_carry_conn_info_and_client_events_are_not_shown() {
        let client = ClientInfo { user: "u".into(), client: "c".into() };
        let join = ChannelEvent::Join { client: client.clone(), info: Some(r#"{"name":"U"}"#.into()) };
        let v = text(CENTRIFUGO.event("ch", &join).expect("join"));
        assert_eq!(v["push"]["join"]["info"], serde_json::json!({"user":"u","client":"c","conn_info":{"name":"U"}}));
        let leave = text(CENTRIFUGO.event("ch", &ChannelEvent::Leave { client }).expect("leave"));
        assert_eq!(leave["push"]["leave"]["info"]["user"], "u");
        let event = ChannelEvent::Client { event: "client-x".into(), data: "1".into(), user: None, exclude: None };
        assert!(CENTRIFUGO.event("ch", &event).is_none());
    }
}
