//! Pusher protocol 7 frames: `{"event":..,"channel":..,"data":..}` text messages, where the
//! server's `data` is a string (JSON inside a string) and a client's `data` is an object or a
//! string. Also how Pusher event data is stored as Herald publication data and back.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Pusher's close codes used by this door (4000-4099: do not reconnect; 4100-4199: reconnect
/// after a back-off; 4200-4299: reconnect now).
pub mod close {
    pub const APP_NOT_FOUND: u16 = 4001;
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    pub const NO_PROTOCOL: u16 = 4008;
    pub const UNAUTHORIZED: u16 = 4009;
    pub const OVER_CAPACITY: u16 = 4100;
    pub const GENERIC_RECONNECT: u16 = 4200;
    pub const PONG_TIMEOUT: u16 = 4201;
}

/// `pusher:error` codes for errors that do not close the connection (4300-4399).
pub mod error {
    /// A client event refused by a limit (rate or size).
    pub const CLIENT_EVENT_REJECTED: u16 = 4301;
}

/// One message from a Pusher client.
#[derive(Debug, Deserialize)]
pub struct ClientMessage<'a> {
    pub event: String,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

impl<'a> ClientMessage<'a> {
    pub fn parse(text: &'a [u8]) -> Result<Self, String> {
        serde_json::from_slice(text).map_err(|e| format!("not a Pusher message: {e}"))
    }

    /// `data` as a `T`: given as an object, or as a string holding one (both are seen).
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let raw = self.data.map_or("null", RawValue::get);
        let parsed = match serde_json::from_str::<String>(raw) {
            Ok(inner) => serde_json::from_str(&inner),
            Err(_) => serde_json::from_str(raw),
        };
        parsed.map_err(|e| format!("bad `data` for {}: {e}", self.event))
    }
}

/// `pusher:subscribe` data.
#[derive(Debug, Deserialize)]
pub struct Subscribe {
    pub channel: String,
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub channel_data: Option<String>,
}

/// `pusher:unsubscribe` data.
#[derive(Debug, Deserialize)]
pub struct Unsubscribe {
    pub channel: String,
}

/// `pusher:signin` data.
#[derive(Debug, Deserialize)]
pub struct Signin {
    pub auth: String,
    pub user_data: String,
}

/// A presence subscription's `channel_data`: who the member is.
#[derive(Debug, Deserialize)]
pub struct ChannelData {
    pub user_id: UserId,
    #[serde(default)]
    pub user_info: Option<Box<RawValue>>,
}

/// A user id, given as a string or a number (Pusher accepts both; Laravel sends numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(pub String);

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) if !s.is_empty() => Ok(Self(s)),
            serde_json::Value::Number(n) => Ok(Self(n.to_string())),
            _ => Err(serde::de::Error::custom("`user_id`/`id` must be a non-empty string or a number")),
        }
    }
}

/// `user_data` of `pusher:signin`: at least an `id`.
#[derive(Debug, Deserialize)]
pub struct UserData {
    pub id: UserId,
}

/// A server message: `data` is encoded as a JSON string holding `data_text`.
pub fn event(event: &str, channel: Option<&str>, data_text: &str) -> Bytes {
    let mut v = serde_json::Map::new();
    v.insert("event".into(), event.into());
    if let Some(c) = channel {
        v.insert("channel".into(), c.into());
    }
    v.insert("data".into(), data_text.into());
    Bytes::from(serde_json::Value::Object(v).to_string())
}

/// A server message whose `data` is raw JSON (an object), as `pusher:error` and client events
/// carry it.
pub fn event_raw(event: &str, channel: Option<&str>, data_json: &str, user_id: Option<&str>) -> Bytes {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut out = format!("{{\"event\":{}", quote(event));
    if let Some(c) = channel {
        out.push_str(&format!(",\"channel\":{}", quote(c)));
    }
    out.push_str(&format!(",\"data\":{data_json}"));
    if let Some(u) = user_id {
        out.push_str(&format!(",\"user_id\":{}", quote(u)));
    }
    out.push('}');
    Bytes::from(out)
}

/// `pusher:error` with `{code, message}`.
pub fn error(code: Option<u16>, message: &str) -> Bytes {
    let data = serde_json::json!({ "code": code, "message": message }).to_string();
    event_raw("pusher:error", None, &data, None)
}

/// Pusher event data (a string) as Herald publication data (JSON): JSON text that is not a
/// JSON string is stored as it is (native clients see the object); anything else is stored
/// as a JSON string, so [`data_text`] gives back exactly the text that was sent.
pub fn store_data(text: &str) -> Bytes {
    match serde_json::from_str::<&RawValue>(text) {
        Ok(v) if !v.get().starts_with('"') => Bytes::copy_from_slice(text.as_bytes()),
        _ => Bytes::from(serde_json::Value::from(text).to_string()),
    }
}

/// Herald publication data (JSON) as the string a Pusher client gets: a JSON string's
/// content, any other JSON as its text.
pub fn data_text(json: &[u8]) -> std::borrow::Cow<'_, str> {
    if json.first() == Some(&b'"') {
        if let Ok(s) = serde_json::from_slice::<String>(json) {
            return s.into();
        }
    }
    String::from_utf8_lossy(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pusher_data_round_trips_through_herald_json() {
        for text in
            [r#"{"a":1}"#, "[1,2]", "hello", r#""quoted""#, r#" "spaced" "#, " {\"a\": 1}\n", "42", "", "not { json"]
        {
            let stored = store_data(text);
            assert!(serde_json::from_slice::<serde_json::Value>(&stored).is_ok(), "{text}: stored as JSON");
            assert_eq!(data_text(&stored), text, "round trip");
        }
        assert_eq!(&store_data(r#"{"a":1}"#)[..], br#"{"a":1}"#, "JSON objects stay objects for native clients");
        assert_eq!(data_text(br#""hi""#), "hi", "a native JSON string is the Pusher string");
    }

    #[test]
    fn frames_have_string_data_and_parse_both_forms() {
        let f = event("pusher:connection_established", None, r#"{"socket_id":"1.2"}"#);
        let v: serde_json::Value = serde_json::from_slice(&f).expect("json");
        assert_eq!(v["data"], r#"{"socket_id":"1.2"}"#);
        let m = ClientMessage::parse(br#"{"event":"pusher:subscribe","data":{"channel":"a"}}"#).expect("ok");
        assert_eq!(m.data_as::<Subscribe>().expect("ok").channel, "a");
        let m = ClientMessage::parse(br#"{"event":"pusher:subscribe","data":"{\"channel\":\"b\"}"}"#).expect("ok");
        assert_eq!(m.data_as::<Subscribe>().expect("ok").channel, "b");
        let cd: ChannelData = serde_json::from_str(r#"{"user_id":7}"#).expect("ok");
        assert_eq!(cd.user_id.0, "7");
        assert!(serde_json::from_str::<ChannelData>(r#"{"user_id":""}"#).is_err());
        let e: serde_json::Value = serde_json::from_slice(&error(Some(4009), "no")).expect("json");
        assert_eq!(e["data"]["code"], 4009);
        let c: serde_json::Value =
            serde_json::from_slice(&event_raw("client-x", Some("private-a"), r#"{"k":[1]}"#, Some("u"))).expect("json");
        assert_eq!(c["data"]["k"][0], 1);
        assert_eq!(c["user_id"], "u");
    }
}
