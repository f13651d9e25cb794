//! Per-subscriber accounting of sequence numbers: what arrived twice, late, or never.

/// Seqs above this are not tracked (a corrupt payload must not allocate gigabytes).
const MAX_SEQ: u64 = 1 << 30;

/// The sequence numbers one subscriber received on its channel, which start at 0.
#[derive(Debug, Default)]
pub(super) struct SeqTracker {
    seen: Vec<u64>,
    distinct: u64,
    duplicated: u64,
    reordered: u64,
    untracked: u64,
    highest: Option<u64>,
}

/// What a subscriber's sequence numbers say, once publishing is over.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SeqReport {
    pub(super) received: u64,
    pub(super) lost: u64,
    pub(super) duplicated: u64,
    pub(super) reordered: u64,
    /// Conflated runs: publications skipped by design (not lost).
    pub(super) skipped: u64,
}

impl SeqTracker {
    /// Notes `seq`; `false` when it arrived before (a duplicate: not a delivery).
    pub(super) fn record(&mut self, seq: u64) -> bool {
        if seq >= MAX_SEQ {
            self.untracked += 1;
            return true;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicated += 1;
            return false;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        match self.highest {
            Some(h) if seq < h => self.reordered += 1,
            _ => self.highest = Some(seq),
        }
        true
    }

    /// `published`: how many publications (seqs 0..published) the server accepted for the
    /// channel. A seq the server accepted but this subscriber never saw is lost.
    #[cfg(test)]
    pub(super) fn report(&self, published: u64) -> SeqReport {
        self.report_as(published, false)
    }

    /// [`SeqTracker::report`]; `conflated`: the channel is in a conflated namespace, where a
    /// subscriber gets the newest value, not every one. Then what it did not see is *skipped*,
    /// and it *lost* (1) only if it never got the newest: the last accepted publication, or
    /// a later one (a publication still in flight when publishing stopped is accepted by the
    /// server, and newer, but not counted as accepted here).
    pub(super) fn report_as(&self, published: u64, conflated: bool) -> SeqReport {
        let seen_of_published: u64 = if published >= MAX_SEQ {
            self.distinct
        } else {
            let full = (published / 64) as usize;
            let mut n: u64 = self.seen.iter().take(full).map(|w| u64::from(w.count_ones())).sum();
            if let Some(w) = self.seen.get(full) {
                n += u64::from((w & ((1u64 << (published % 64)) - 1)).count_ones());
            }
            n
        };
        let missing = published - seen_of_published;
        let (lost, skipped) = match conflated {
            false => (missing, 0),
            true => (u64::from(published > 0 && self.highest.is_none_or(|h| h + 1 < published)), missing),
        };
        SeqReport {
            received: self.distinct + self.duplicated + self.untracked,
            lost,
            duplicated: self.duplicated,
            reordered: self.reordered,
            skipped,
        }
    }
}

impl SeqReport {
    /// A subscriber whose count could not be read at the end (its task did not finish): it
    /// is taken to have lost all `published`, the worst case, rather than left out.
    pub(super) fn unfinished(published: u64) -> Self {
        Self { lost: published, ..Self::default() }
    }

    /// [`SeqReport::unfinished`] in a conflated run: it did not get the newest.
    pub(super) fn unfinished_conflated(published: u64) -> Self {
        Self { lost: published.min(1), skipped: published.saturating_sub(1), ..Self::default() }
    }

    pub(super) fn add(&mut self, other: SeqReport) {
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.skipped += other.skipped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64], published: u64) -> SeqReport {
        let mut t = SeqTracker::default();
        for &s in seqs {
            t.record(s);
        }
        t.report(published)
    }

    #[test]
    fn a_duplicate_is_not_a_delivery() {
        let mut t = SeqTracker::default();
        let new: Vec<bool> = [0, 1, 1, 2, 0].iter().map(|&s| t.record(s)).collect();
        assert_eq!(new, [true, true, false, true, false]);
        assert_eq!(t.report(3), SeqReport { received: 5, lost: 0, duplicated: 2, reordered: 0, skipped: 0 });
    }

    #[test]
    fn a_subscriber_that_did_not_finish_lost_everything() {
        let mut total = run(&[0, 1, 2], 3);
        total.add(SeqReport::unfinished(3));
        assert_eq!(total, SeqReport { received: 3, lost: 3, duplicated: 0, reordered: 0, skipped: 0 });
    }

    #[test]
    fn in_order_and_complete() {
        let all: Vec<u64> = (0..1000).collect();
        assert_eq!(run(&all, 1000), SeqReport { received: 1000, lost: 0, duplicated: 0, reordered: 0, skipped: 0 });
    }

    #[test]
    fn gaps_are_lost() {
        assert_eq!(
            run(&[0, 1, 3, 4, 9], 10),
            SeqReport { received: 5, lost: 5, duplicated: 0, reordered: 0, skipped: 0 }
        );
        // Nothing at all.
        assert_eq!(run(&[], 7).lost, 7);
    }

    #[test]
    fn duplicates_are_counted_once_each() {
        assert_eq!(
            run(&[0, 1, 1, 2, 1, 2], 3),
            SeqReport { received: 6, lost: 0, duplicated: 3, reordered: 0, skipped: 0 }
        );
    }

    #[test]
    fn late_arrivals_are_reordered_not_lost() {
        // 2 and 1 arrive after 3; 64 crosses a word of the bitmap.
        assert_eq!(run(&[0, 3, 2, 1, 64, 4], 65).reordered, 3);
        let r = run(&[0, 3, 2, 1, 64, 4], 65);
        assert_eq!(r.lost, 65 - 6);
        assert_eq!(r.duplicated, 0);
    }

    #[test]
    fn seqs_beyond_published_do_not_hide_losses() {
        // The server accepted 2; the subscriber saw 0 and a stray 5.
        let r = run(&[0, 5], 2);
        assert_eq!(r.lost, 1);
        assert_eq!(run(&[u64::MAX], 1).received, 1);
    }

    #[test]
    fn a_conflated_subscriber_skips_but_loses_only_a_missing_newest() {
        let mut t = SeqTracker::default();
        for s in [0, 4, 9] {
            t.record(s);
        }
        let r = t.report_as(10, true);
        assert_eq!((r.lost, r.skipped, r.received, r.reordered), (0, 7, 3, 0));
        // An 11th publication (seq 10) that never arrived: the newest is missing.
        let r = t.report_as(11, true);
        assert_eq!((r.lost, r.skipped), (1, 8));
        assert_eq!(t.report_as(0, true).lost, 0);
        // A newer one than the last counted as accepted (in flight at the end) is the newest.
        t.record(12);
        assert_eq!(t.report_as(11, true).lost, 0);
        assert_eq!(SeqReport::unfinished_conflated(5), SeqReport { lost: 1, skipped: 4, ..SeqReport::default() });
    }

    #[test]
    fn reports_add_up() {
        let mut total = SeqReport::default();
        total.add(run(&[0, 0], 2));
        total.add(run(&[1, 0], 2));
        assert_eq!(total, SeqReport { received: 4, lost: 1, duplicated: 1, reordered: 1, skipped: 0 });
    }
}
