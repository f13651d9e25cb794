//! Engine records as Herald's wire types, for every door that speaks them (the native and
//! Centrifugo sessions, the HTTP API).

use herald_protocol::{PresenceClient, PresenceResult, Publication};
use serde_json::value::RawValue;

use crate::engine::{PresenceEntry, PublicationRecord};

/// A presence list as the protocol carries it.
pub fn presence_result(list: Vec<PresenceEntry>) -> PresenceResult {
    let clients = list
        .into_iter()
        .map(|e| {
            let info = e.info.as_deref().and_then(|b| serde_json::from_slice(b).ok());
            (e.client.clone(), PresenceClient { user: e.user, client: e.client, info })
        })
        .collect();
    PresenceResult { clients }
}

/// A stored publication as the protocol carries it.
pub fn to_wire(p: &PublicationRecord) -> Publication {
    let data = std::str::from_utf8(&p.data)
        .ok()
        .and_then(|s| RawValue::from_string(s.to_owned()).ok())
        .unwrap_or_else(|| RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("null is JSON")));
    Publication { offset: Some(p.offset), data, info: p.info.clone() }
}
