//! Pusher's signatures: HMAC-SHA256 with the app secret, hex encoded, compared in constant
//! time. Channel auth signs `socket_id:channel[:channel_data]`, user auth
//! `socket_id::user::user_data`, API requests `METHOD\nPATH\nsorted_query`.

use subtle::ConstantTimeEq;

use crate::secret::{hex, hmac_sha256_hex, Secret};

/// Hex HMAC-SHA256 of `message` with `secret`.
pub fn sign(secret: &Secret, message: &str) -> String {
    hmac_sha256_hex(secret.expose().as_bytes(), message.as_bytes())
}

/// Whether `given` (hex) is the signature of `message`, in constant time.
pub fn verify(secret: &Secret, message: &str, given: &str) -> bool {
    let expected = sign(secret, message);
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(given.to_ascii_lowercase().as_bytes()))
}

/// Checks an `auth` field (`<key>:<hex signature>`) against `message`.
pub fn check_auth(key: &str, secret: &Secret, message: &str, auth: &str) -> bool {
    match auth.split_once(':') {
        Some((k, sig)) => bool::from(k.as_bytes().ct_eq(key.as_bytes())) & verify(secret, message, sig),
        None => false,
    }
}

/// The string a private or presence subscription signs.
pub fn channel_message(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// The string `pusher:signin` signs.
pub fn user_message(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

/// Hex MD5 of an API request body.
pub fn body_md5(body: &[u8]) -> String {
    use md5::Digest;
    hex(&md5::Md5::digest(body))
}

/// The string an API request signs: method, path and the query without `auth_signature`,
/// sorted by key (keys lower-cased), values as sent.
pub fn request_message(method: &str, path: &str, query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort();
    let sorted: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{method}\n{path}\n{}", sorted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from Pusher's authentication docs ("Worked examples").
    const KEY: &str = "278d425bdf160c739803";
    fn secret() -> Secret {
        Secret::new("7ad3773142a6692b25b8")
    }

    #[test]
    fn private_channel_example_from_pusher_docs() {
        let msg = channel_message("1234.1234", "private-foobar", None);
        let sig = sign(&secret(), &msg);
        assert_eq!(sig, "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4");
        assert!(check_auth(KEY, &secret(), &msg, &format!("{KEY}:{sig}")));
        assert!(!check_auth(KEY, &secret(), &msg, &format!("other:{sig}")));
        assert!(!check_auth(KEY, &secret(), &msg, &format!("{KEY}:{}", &sig[1..])));
        assert!(!check_auth(KEY, &secret(), &msg, "no colon"));
    }

    // Expected values computed with Python's `hmac` module (an independent implementation).
    #[test]
    fn presence_and_user_strings_sign_as_pythons_hmac_does() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let msg = channel_message("1234.1234", "presence-foobar", Some(data));
        assert_eq!(sign(&secret(), &msg), "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80");
        let msg = user_message("1234.1234", r#"{"id":"12345"}"#);
        assert_eq!(sign(&secret(), &msg), "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba");
    }

    #[test]
    fn api_request_example_from_pusher_docs() {
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body.as_bytes()), "ec365a775a4cd0599faeb73354201b6f");
        let query: Vec<(String, String)> = [
            ("auth_key", KEY),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
            ("auth_signature", "ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let msg = request_message("POST", "/apps/3/events", &query);
        assert_eq!(
            msg,
            "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f"
        );
        assert_eq!(sign(&secret(), &msg), "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c");
    }
}
