//! The HTTP API: every error status, with its JSON body, and the happy paths.

mod common;

use common::*;
use herald::config::Secret;
use herald::Config;
use serde_json::json;

#[tokio::test]
async fn api_errors_by_status() {
    let mut c = Config::default();
    c.api.key = Secret::new("s3cret");
    c.api.max_body_size = 2048;
    c.channels.max_publication_size = 100;
    let server = TestServer::start(c).await;
    let a = server.addr;
    let ok = r#"{"channel":"news","data":1}"#;

    let cases: Vec<(u16, u16, (u16, serde_json::Value))> = vec![
        (401, 101, api(a, "publish", ok, None).await),
        (401, 101, api(a, "publish", ok, Some("wrong")).await),
        (400, 107, api(a, "publish", "{not json", Some("s3cret")).await),
        (400, 107, api(a, "publish", r#"{"channel":"news"}"#, Some("s3cret")).await),
        (400, 107, api(a, "publish", r#"{"channel":"news","data":1,"extra":2}"#, Some("s3cret")).await),
        (400, 102, api(a, "publish", r#"{"channel":"bad name","data":1}"#, Some("s3cret")).await),
        (400, 102, api(a, "broadcast", r#"{"channels":["ok","nope:x"],"data":1}"#, Some("s3cret")).await),
        (404, 104, api(a, "nope", "{}", Some("s3cret")).await),
        (
            413,
            112,
            api(a, "publish", &json!({"channel":"news","data":"x".repeat(200)}).to_string(), Some("s3cret")).await,
        ),
        (
            413,
            112,
            api(a, "publish", &json!({"channel":"news","data":"x".repeat(5000)}).to_string(), Some("s3cret")).await,
        ),
        (
            405,
            114,
            http(
                a,
                "GET /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey s3cret\r\nConnection: close\r\n\r\n",
            )
            .await,
        ),
    ];
    for (i, (status, code, (got_status, body))) in cases.into_iter().enumerate() {
        assert_eq!(got_status, status, "case {i}: {body}");
        assert_eq!(body["error"]["code"], code, "case {i}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "case {i}: {body}");
    }
    let (status, body) = api(a, "publish", ok, Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn channels_info_and_broadcast() {
    let server = TestServer::start(Config::default()).await;
    let mut c1 = Native::connected(server.addr).await;
    let mut c2 = Native::connected(server.addr).await;
    c1.request("subscribe", json!({"channel": "room1"})).await;
    c2.request("subscribe", json!({"channel": "room1"})).await;
    c2.request("subscribe", json!({"channel": "other"})).await;
    let (_, body) = api(server.addr, "channels", r#"{"pattern":"room*"}"#, None).await;
    assert_eq!(body, json!({"channels": [{"channel": "room1", "subscribers": 2}]}));
    let (_, body) = api(server.addr, "channels", "", None).await;
    assert_eq!(body["channels"].as_array().map(Vec::len), Some(2));
    let (_, info) = api(server.addr, "info", "{}", None).await;
    assert_eq!((info["connections"].as_u64(), info["subscriptions"].as_u64()), (Some(2), Some(3)), "{info}");
    let (status, body) =
        api(server.addr, "broadcast", r#"{"channels":["room1","other","empty"],"data":{"b":1}}"#, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["offset"], 1);
    assert_eq!(body["results"][2]["offset"], 1, "kept in history though nobody listens");
    assert_eq!(c1.push().await["push"]["channel"], "room1");
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        got.push(c2.push().await["push"]["channel"].as_str().unwrap_or_default().to_owned());
    }
    got.sort();
    assert_eq!(got, ["other", "room1"]);
    server.shutdown().await;
}
