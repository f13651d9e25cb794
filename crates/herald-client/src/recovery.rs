//! A subscription's place in its channel's stream: what to ask for when resubscribing, and
//! which publications to deliver so the application sees each offset once and in order.

use herald_protocol::{Publication, SubscribeRequest, SubscribeResult};

use crate::Event;

/// The last position delivered on one subscription. Offsets only grow within an epoch; a
/// publication at or below the delivered offset is a duplicate (it was recovered and then
/// pushed live, or pushed again around a reconnect).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tracker {
    /// Set once the first subscribe reply arrived.
    known: bool,
    epoch: String,
    offset: u64,
}

impl Tracker {
    /// The `subscribe` to send: a plain one the first time, then one that recovers from the
    /// last delivered position (when the channel has positions at all).
    pub(crate) fn request(&self, channel: &str) -> SubscribeRequest {
        let recover = self.known && !self.epoch.is_empty();
        SubscribeRequest {
            channel: channel.to_owned(),
            recover,
            epoch: recover.then(|| self.epoch.clone()),
            offset: recover.then_some(self.offset),
            token: None,
        }
    }

    /// Applies a subscribe reply. `early` are live publications that arrived before the reply;
    /// returns what to deliver, in order: recovered publications (or a reset marker when
    /// recovery failed), then the new ones among `early`.
    pub(crate) fn subscribed(&mut self, result: SubscribeResult, early: Vec<Publication>) -> Vec<Event> {
        let mut events = Vec::with_capacity(result.publications.len() + early.len() + 1);
        if !self.known {
            self.known = true;
            self.epoch = result.epoch;
            self.offset = result.offset;
        } else if result.recovered == Some(true) && result.epoch == self.epoch {
            events.extend(result.publications.into_iter().filter_map(|p| self.live(p)));
        } else {
            // Missed publications are gone (history trimmed, epoch changed, or the channel
            // keeps no positions): say so, then continue from the channel's position.
            let epoch_changed = result.epoch != self.epoch;
            events.push(Event::Reset { epoch: result.epoch.clone(), offset: result.offset, epoch_changed });
            self.epoch = result.epoch;
            self.offset = result.offset;
        }
        events.extend(early.into_iter().filter_map(|p| self.live(p)));
        events
    }

    /// A live publication: the event to deliver, or `None` for a duplicate. Publications
    /// without an offset cannot be deduplicated and are always delivered.
    pub(crate) fn live(&mut self, publication: Publication) -> Option<Event> {
        if let Some(offset) = publication.offset {
            if offset <= self.offset {
                return None;
            }
            self.offset = offset;
        }
        Some(Event::Publication(publication))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    fn publication(offset: u64) -> Publication {
        let data = RawValue::from_string(offset.to_string()).expect("json");
        Publication { offset: Some(offset), data, info: None }
    }

    fn offsets(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Publication(p) => p.offset.map_or("-".into(), |o| o.to_string()),
                Event::Reset { epoch, offset, .. } => format!("reset {epoch}@{offset}"),
            })
            .collect()
    }

    fn result(epoch: &str, offset: u64, recovered: Option<bool>, pubs: &[u64]) -> SubscribeResult {
        SubscribeResult {
            epoch: epoch.into(),
            offset,
            recovered,
            publications: pubs.iter().map(|o| publication(*o)).collect(),
            ..Default::default()
        }
    }

    fn subscribed_at(epoch: &str, offset: u64) -> Tracker {
        let mut t = Tracker::default();
        assert!(t.subscribed(result(epoch, offset, None, &[]), vec![]).is_empty());
        t
    }

    #[test]
    fn first_subscribe_is_plain_then_recovery_asks_from_the_last_delivered_offset() {
        let t = Tracker::default();
        let first = t.request("news");
        assert!(!first.recover);
        assert_eq!((first.epoch, first.offset), (None, None));

        let mut t = subscribed_at("e1", 10);
        assert!(t.live(publication(11)).is_some());
        let again = t.request("news");
        assert!(again.recover);
        assert_eq!((again.epoch.as_deref(), again.offset), (Some("e1"), Some(11)));
    }

    #[test]
    fn publications_older_than_the_subscription_are_not_delivered() {
        let mut t = Tracker::default();
        // Pushed before the reply: 9 and 10 are before the subscription's position.
        let events = t.subscribed(result("e1", 10, None, &[]), vec![publication(9), publication(10), publication(11)]);
        assert_eq!(offsets(&events), ["11"]);
    }

    #[test]
    fn recovered_publications_come_first_and_duplicates_are_skipped() {
        let mut t = subscribed_at("e1", 0);
        for o in 1..=3 {
            assert!(t.live(publication(o)).is_some());
        }
        // Reconnected: the server resends 3 (already delivered), recovers 4 and 5, and 5 and 6
        // were also pushed live before the reply.
        let events = t.subscribed(result("e1", 5, Some(true), &[3, 4, 5]), vec![publication(5), publication(6)]);
        assert_eq!(offsets(&events), ["4", "5", "6"]);
        // Live duplicates after the reply are skipped too.
        assert!(t.live(publication(6)).is_none());
        assert!(t.live(publication(2)).is_none());
        assert_eq!(offsets(&t.live(publication(7)).into_iter().collect::<Vec<_>>()), ["7"]);
    }

    #[test]
    fn failed_recovery_yields_a_reset_and_continues_from_the_new_position() {
        let mut t = subscribed_at("e1", 40);
        assert!(t.live(publication(41)).is_some());
        let events = t.subscribed(result("e2", 3, Some(false), &[]), vec![publication(3), publication(4)]);
        assert_eq!(offsets(&events), ["reset e2@3", "4"]);
        assert_eq!(t.request("news").epoch.as_deref(), Some("e2"));
        assert!(t.live(publication(5)).is_some(), "offsets of the new epoch are not compared with the old");
    }

    #[test]
    fn recovered_with_another_epoch_is_a_reset() {
        let mut t = subscribed_at("e1", 5);
        let events = t.subscribed(result("e9", 2, Some(true), &[1, 2]), vec![]);
        assert_eq!(offsets(&events), ["reset e9@2"]);
        assert!(matches!(events[0], Event::Reset { epoch_changed: true, .. }), "a new epoch says so");
        // Same epoch, but the gap left the history: a reset that is not an epoch change.
        let events = t.subscribed(result("e9", 40, Some(false), &[]), vec![]);
        assert!(matches!(events[..], [Event::Reset { epoch_changed: false, offset: 40, .. }]), "{events:?}");
    }

    #[test]
    fn channels_without_positions_reset_on_every_resubscribe() {
        let mut t = subscribed_at("", 0);
        assert!(!t.request("c").recover);
        let unpositioned =
            Publication { offset: None, data: RawValue::from_string("1".into()).expect("json"), info: None };
        assert!(t.live(unpositioned.clone()).is_some());
        assert!(t.live(unpositioned).is_some(), "no offset, no deduplication");
        let events = t.subscribed(result("", 0, None, &[]), vec![]);
        assert_eq!(offsets(&events), ["reset @0"]);
    }
}
