//! The contract every engine must keep, as tests. An engine plugs in with one line in its
//! test module: `crate::engine_conformance!(MyEngine::new(...));`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::*;

/// Records every delivery, in the order the engine made them.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) seen: Mutex<Vec<(String, StreamPosition, PublicationRecord)>>,
    pub(crate) notes: Mutex<Vec<(String, Bytes)>>,
    pub(crate) lost: Mutex<Vec<String>>,
}

impl Delivery for Recorder {
    fn deliver(&self, channel: &str, position: &StreamPosition, publication: &PublicationRecord) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push((
            channel.into(),
            position.clone(),
            publication.clone(),
        ));
    }

    fn notify(&self, channel: &str, text: Bytes) {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).push((channel.into(), text));
    }

    fn lost(&self, channel: &str) {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).push(channel.into());
    }
}

impl Recorder {
    /// Waits (bounded) until `n` deliveries were made: a shared engine delivers through its
    /// broker after `publish` returns.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<(String, StreamPosition, PublicationRecord)> {
        for _ in 0..500 {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if seen.len() >= n {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

const KEEP: HistoryPolicy = HistoryPolicy { size: 5, ttl: Duration::from_secs(60) };

fn data(i: u64) -> Bytes {
    Bytes::from(i.to_string())
}

fn with_recorder<E: Engine>(engine: E) -> (E, Arc<Recorder>) {
    let r = Arc::new(Recorder::default());
    engine.set_delivery(r.clone());
    (engine, r)
}

fn since(epoch: &Arc<str>, offset: u64) -> Option<StreamPosition> {
    Some(StreamPosition { epoch: epoch.clone(), offset })
}

pub(crate) async fn offsets_increase_by_one_and_delivery_follows_storage(engine: impl Engine) {
    let (e, rec) = with_recorder(engine);
    e.listen("c").await.expect("listen");
    let first = e.history("c", HistoryQuery::default()).await.expect("read");
    assert_eq!(first.position.offset, 0, "a new channel starts at 0");
    for i in 1..=20 {
        let pos = e.publish("c", Publish::data(data(i)), KEEP).await.expect("publish");
        assert_eq!(pos, StreamPosition { epoch: first.position.epoch.clone(), offset: i }, "same epoch, +1");
    }
    let seen = rec.wait_for(20).await;
    let offsets: Vec<u64> = seen
        .iter()
        .map(|(_, p, r)| {
            assert_eq!(p.offset, r.offset);
            r.offset
        })
        .collect();
    assert_eq!(offsets, (1..=20).collect::<Vec<_>>());
    assert!(seen.iter().all(|(c, _, r)| c == "c" && r.data == data(r.offset)));
}

pub(crate) async fn history_windows(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    for i in 1..=8 {
        e.publish("h", Publish::data(data(i)), KEEP).await.expect("publish");
    }
    let offsets = |h: &History| h.publications.iter().map(|p| p.offset).collect::<Vec<_>>();
    let all = e.history("h", HistoryQuery { limit: 100, ..Default::default() }).await.expect("read");
    assert_eq!(offsets(&all), [4, 5, 6, 7, 8], "bounded by size");
    let epoch = all.position.epoch.clone();
    let q = |s, limit, reverse| HistoryQuery { since: s, limit, reverse };

    let h = e.history("h", q(since(&epoch, 5), 100, false)).await.expect("read");
    assert_eq!((offsets(&h), h.complete), (vec![6, 7, 8], true), "exactly what was missed");
    let h = e.history("h", q(since(&epoch, 8), 100, false)).await.expect("read");
    assert_eq!((offsets(&h), h.complete), (vec![], true), "nothing missed");
    let h = e.history("h", q(since(&epoch, 3), 100, false)).await.expect("read");
    assert!(h.complete, "offset 4 is still kept: 3 is the oldest reachable position");
    let h = e.history("h", q(since(&epoch, 2), 100, false)).await.expect("read");
    assert!(!h.complete, "offset 3 left history: a gap");
    let h = e.history("h", q(since(&epoch, 5), 2, false)).await.expect("read");
    assert_eq!((offsets(&h), h.complete), (vec![6, 7], false), "cut by limit");
    let h = e.history("h", q(since(&Arc::from("other"), 5), 100, false)).await.expect("read");
    assert!(!h.complete && h.publications.is_empty(), "another epoch never matches");
    let h = e.history("h", q(since(&epoch, 99), 100, false)).await.expect("read");
    assert!(!h.complete, "a position from the future does not match");
    let h = e.history("h", q(None, 2, true)).await.expect("read");
    assert_eq!(offsets(&h), [8, 7], "newest first");
}

pub(crate) async fn history_expires_by_age(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    let short = HistoryPolicy { size: 10, ttl: Duration::from_millis(100) };
    let pos = e.publish("t", Publish::data(data(1)), short).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = e
        .history("t", HistoryQuery { since: since(&pos.epoch, 0), limit: 100, ..Default::default() })
        .await
        .expect("read");
    assert!(h.publications.is_empty());
    assert!(!h.complete || h.position.epoch != pos.epoch, "an expired publication cannot be recovered");
}

pub(crate) async fn old_publications_leave_history_before_new_ones(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    let short = HistoryPolicy { size: 100, ttl: Duration::from_millis(400) };
    for i in 1..=3 {
        e.publish("old", Publish::data(data(i)), short).await.expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut epoch = None;
    for i in 4..=5 {
        epoch = Some(e.publish("old", Publish::data(data(i)), short).await.expect("publish").epoch);
    }
    let epoch = epoch.expect("published");
    let offsets = |h: &History| h.publications.iter().map(|p| p.offset).collect::<Vec<_>>();
    let h = e.history("old", HistoryQuery { limit: 100, ..Default::default() }).await.expect("read");
    assert_eq!(offsets(&h), [4, 5], "1 to 3 are past the TTL");
    let h = e.history("old", HistoryQuery { since: since(&epoch, 3), limit: 100, ..Default::default() }).await;
    assert_eq!(h.map(|h| (offsets(&h), h.complete)), Ok((vec![4, 5], true)));
    let h = e.history("old", HistoryQuery { since: since(&epoch, 1), limit: 100, ..Default::default() }).await;
    assert_eq!(h.map(|h| (offsets(&h), h.complete)), Ok((vec![4, 5], false)), "2 and 3 are gone: a gap");
}

pub(crate) async fn tags_are_stored_and_exclusions_only_delivered(engine: impl Engine) {
    let (e, rec) = with_recorder(engine);
    e.listen("tg").await.expect("listen");
    let tags: Arc<Tags> =
        Arc::new([("event".to_owned(), "my-event".to_owned()), ("k".to_owned(), "a\nb".to_owned())].into());
    let info = ClientInfo { user: "u".into(), client: "c".into() };
    let tagged =
        Publish { data: data(1), info: Some(info.clone()), tags: Some(tags.clone()), exclude: Some(7 << 32 | 9) };
    e.publish("tg", tagged, KEEP).await.expect("publish");
    e.publish("tg", Publish::data(data(2)), KEEP).await.expect("publish");
    let seen = rec.wait_for(2).await;
    let live: Vec<_> = seen.iter().map(|(_, _, r)| (r.offset, r.tags.clone(), r.exclude)).collect();
    assert_eq!(live, [(1, Some(tags.clone()), Some(7 << 32 | 9)), (2, None, None)], "delivered with both");
    assert_eq!(seen[0].2.info, Some(info.clone()));
    let h = e.history("tg", HistoryQuery { limit: 10, ..Default::default() }).await.expect("read");
    let stored: Vec<_> = h.publications.iter().map(|r| (r.offset, r.tags.clone(), r.exclude, r.info.clone())).collect();
    assert_eq!(stored, [(1, Some(tags), None, Some(info)), (2, None, None, None)], "tags stored, the exclusion not");
}

pub(crate) async fn channels_without_history_keep_positions(engine: impl Engine) {
    let (e, rec) = with_recorder(engine);
    e.listen("n").await.expect("listen");
    let a = e.publish("n", Publish::data(data(1)), HistoryPolicy::NONE).await.expect("publish");
    let b = e.publish("n", Publish::data(data(2)), HistoryPolicy::NONE).await.expect("publish");
    assert_eq!((b.offset, &b.epoch), (a.offset + 1, &a.epoch));
    let h = e
        .history("n", HistoryQuery { since: since(&b.epoch, b.offset), limit: 100, ..Default::default() })
        .await
        .expect("read");
    assert!(h.complete, "up to date: nothing to recover");
    let h = e
        .history("n", HistoryQuery { since: since(&a.epoch, a.offset), limit: 100, ..Default::default() })
        .await
        .expect("read");
    assert!(!h.complete, "missed one, and nothing is kept");
    assert_eq!(rec.wait_for(2).await.len(), 2, "still delivered live");
}

pub(crate) async fn presence_counts_users_once(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    let entry = |client: &str, user: &str| PresenceEntry { client: client.into(), user: user.into(), info: None };
    let ttl = Duration::from_secs(60);
    assert_eq!(e.presence_add("p", entry("c1", "u1"), ttl).await, Ok(PresenceChange::UserJoined));
    assert_eq!(e.presence_add("p", entry("c2", "u1"), ttl).await, Ok(PresenceChange::Unchanged), "second tab");
    assert_eq!(e.presence_add("p", entry("c3", "u2"), ttl).await, Ok(PresenceChange::UserJoined));
    assert_eq!(e.presence_add("p", entry("c3", "u2"), ttl).await, Ok(PresenceChange::Unchanged), "refresh");
    assert_eq!(e.presence_add("p", entry("a1", ""), ttl).await, Ok(PresenceChange::UserJoined), "anonymous");
    assert_eq!(e.presence_stats("p").await, Ok(PresenceStats { clients: 4, users: 3 }));
    let list = e.presence("p").await.expect("list");
    assert_eq!(list.iter().map(|x| x.client.as_str()).collect::<Vec<_>>(), ["a1", "c1", "c2", "c3"]);
    assert_eq!(e.presence_remove("p", "c1").await.map(|r| r.0), Ok(PresenceChange::Unchanged), "one tab left");
    assert_eq!(e.presence_remove("p", "c2").await.map(|r| r.0), Ok(PresenceChange::UserLeft), "last tab");
    assert_eq!(e.presence_remove("p", "c2").await.map(|r| r.0), Ok(PresenceChange::Unchanged), "idempotent");
    assert_eq!(e.presence_stats("p").await, Ok(PresenceStats { clients: 2, users: 2 }));
    assert_eq!(e.presence_stats("empty").await, Ok(PresenceStats::default()));
}

pub(crate) async fn presence_expires(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    let entry = PresenceEntry { client: "c".into(), user: "u".into(), info: None };
    e.presence_add("x", entry, Duration::from_millis(100)).await.expect("add");
    assert_eq!(e.presence_stats("x").await.map(|s| s.clients), Ok(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e.presence_stats("x").await, Ok(PresenceStats::default()));
}

pub(crate) async fn concurrent_publishers_keep_one_order(engine: impl Engine) {
    let (e, rec) = with_recorder(engine);
    e.listen("race").await.expect("listen");
    let e = Arc::new(e);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let e = e.clone();
            tokio::spawn(async move {
                for i in 0..250 {
                    e.publish("race", Publish::data(data(i)), KEEP).await.expect("publish");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let seen = rec.wait_for(1000).await;
    let offsets: Vec<u64> = seen.iter().map(|(_, _, r)| r.offset).collect();
    assert_eq!(offsets, (1..=1000).collect::<Vec<_>>(), "distinct offsets, delivered in order");
}

pub(crate) async fn reading_creates_nothing_and_the_first_publication_continues(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    let before = e.stats();
    let mut read = None;
    for _ in 0..3 {
        let h = e.history("ghost", HistoryQuery { limit: 10, ..Default::default() }).await.expect("read");
        assert_eq!(h.position.offset, 0);
        assert!(h.publications.is_empty());
        read = Some(h.position);
        e.presence("ghost").await.expect("presence");
        e.presence_stats("ghost").await.expect("stats");
    }
    assert_eq!(e.stats(), before, "reads left no state");
    let read = read.expect("read");
    let h = e.history("ghost", HistoryQuery { since: Some(read.clone()), limit: 10, ..Default::default() }).await;
    assert!(h.expect("read").complete, "nothing missed yet");
    // The first publication continues from the position the readers were told.
    let pos = e.publish("ghost", Publish::data(data(1)), KEEP).await.expect("publish");
    assert_eq!(pos, StreamPosition { epoch: read.epoch.clone(), offset: 1 });
    let h = e.history("ghost", HistoryQuery { since: Some(read), limit: 10, ..Default::default() }).await;
    let h = h.expect("read");
    assert!(h.complete, "a subscriber of the empty channel recovers its first publication");
    assert_eq!(h.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), [1]);
}

pub(crate) async fn broadcasts_reach_listeners(engine: impl Engine) {
    let (e, rec) = with_recorder(engine);
    e.listen("b").await.expect("listen");
    // Any bytes, carried as they are (newlines, not UTF-8).
    let event = Bytes::from_static(b"{\"join\":\n1}\xff\x00p1\n");
    e.broadcast("b", event.clone()).await.expect("broadcast");
    for _ in 0..500 {
        if !rec.notes.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let notes = rec.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(notes, [("b".to_owned(), event)]);
    assert!(rec.seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty(), "not a publication");
}

pub(crate) async fn a_recreated_stream_never_recovers_an_old_position(engine: impl Engine) {
    let (e, _) = with_recorder(engine);
    let short = HistoryPolicy { size: 10, ttl: Duration::from_millis(50) };
    let mut old = None;
    for i in 1..=3 {
        old = Some(e.publish("again", Publish::data(data(i)), short).await.expect("publish"));
    }
    let old = old.expect("published");
    tokio::time::sleep(Duration::from_millis(150)).await;
    e.sweep();
    let empty = e.history("again", HistoryQuery::default()).await.expect("read");
    let new = e.publish("again", Publish::data(data(9)), short).await.expect("publish");
    if new.epoch == old.epoch {
        // The engine kept the stream: it must simply go on.
        assert_eq!(new.offset, old.offset + 1);
    } else {
        assert_eq!(new, StreamPosition { epoch: empty.position.epoch.clone(), offset: 1 }, "continues the read");
        for stale in [old.clone(), StreamPosition { epoch: old.epoch.clone(), offset: 0 }] {
            let q = HistoryQuery { since: Some(stale), limit: 10, ..Default::default() };
            let h = e.history("again", q).await.expect("read");
            assert!(!h.complete, "a position of the forgotten stream never recovers");
        }
    }
}

/// Runs the whole suite against an engine expression (evaluated afresh for every test).
#[macro_export]
#[doc(hidden)]
macro_rules! engine_conformance {
    ($make:expr) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::engine::conformance as suite;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn offsets_increase_by_one_and_delivery_follows_storage() {
                suite::offsets_increase_by_one_and_delivery_follows_storage($make).await;
            }
            #[tokio::test]
            async fn history_windows() {
                suite::history_windows($make).await;
            }
            #[tokio::test]
            async fn history_expires_by_age() {
                suite::history_expires_by_age($make).await;
            }
            #[tokio::test]
            async fn old_publications_leave_history_before_new_ones() {
                suite::old_publications_leave_history_before_new_ones($make).await;
            }
            #[tokio::test]
            async fn tags_are_stored_and_exclusions_only_delivered() {
                suite::tags_are_stored_and_exclusions_only_delivered($make).await;
            }
            #[tokio::test]
            async fn channels_without_history_keep_positions() {
                suite::channels_without_history_keep_positions($make).await;
            }
            #[tokio::test]
            async fn presence_counts_users_once() {
                suite::presence_counts_users_once($make).await;
            }
            #[tokio::test]
            async fn presence_expires() {
                suite::presence_expires($make).await;
            }
            #[tokio::test]
            async fn reading_creates_nothing_and_the_first_publication_continues() {
                suite::reading_creates_nothing_and_the_first_publication_continues($make).await;
            }
            #[tokio::test]
            async fn a_recreated_stream_never_recovers_an_old_position() {
                suite::a_recreated_stream_never_recovers_an_old_position($make).await;
            }
            #[tokio::test]
            async fn broadcasts_reach_listeners() {
                suite::broadcasts_reach_listeners($make).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_publishers_keep_one_order() {
                suite::concurrent_publishers_keep_one_order($make).await;
            }
        }
    };
}
