//! Whether the topic's producers place records with the partitioner Tally
//! is configured with, judged from the records themselves.
//!
//! A record on a partition its client does not map to (under the
//! configured function) is either one stray record, to be dead-lettered,
//! or the sign that the producers use another partitioner (librdkafka's
//! CRC-32 default where Tally expects Java's murmur2, say), in which case
//! nearly every record misfits and dead-lettering them would drop most of
//! the stream. So until the records have shown which it is, a misfit is
//! not dead-lettered: its partition holds at it (nothing past it is
//! applied or committed) and reads it again later. The verdict:
//!
//! - consistent once [`CONSISTENT_AFTER`] records fit with misfits at most
//!   one in twenty: from then on misfits are dead-lettered, with a reason
//!   naming the partitioner they fit;
//! - mismatched once [`MISMATCH_AFTER`] records misfit and misfits are at
//!   least as many as fits: readiness turns false with the partitioner the
//!   producers use, and every partition holds at its first misfit until the
//!   instance is restarted with `--partitioner` set to it (nothing is lost:
//!   held records are neither applied nor committed).
//!
//! Each record is counted once however often a hold reads it again.

use std::sync::Mutex;

use serde::Serialize;
use tally_pipelines::partitioner::Partitioner;

/// Fitting records after which misfits are stray (dead-lettered).
pub const CONSISTENT_AFTER: u64 = 64;
/// Misfitting records after which the producers' partitioner is judged
/// different from the configured one.
pub const MISMATCH_AFTER: u64 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Too few records yet: misfits are held, not dead-lettered.
    Unsettled,
    Consistent,
    Mismatched,
}

/// What `/health/detailed` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitioningView {
    pub configured: Partitioner,
    pub verdict: Verdict,
    /// The partitioner the misfitting records fit, when one fits them all
    /// (or nearly: 90 %).
    pub producers_use: Option<Partitioner>,
    pub records_fitting: u64,
    pub records_misfitting: u64,
}

impl PartitioningView {
    /// Why the instance is not ready, when the producers' partitioner is
    /// not the configured one.
    pub fn not_ready_reason(&self) -> Option<String> {
        (self.verdict == Verdict::Mismatched).then(|| match self.producers_use {
            Some(p) => format!(
                "the topic's producers place records with the {p} partitioner ({} of {} records checked fit it, not the configured {}); restart with --partitioner {p} (a librdkafka producer's partitioner={} matches it) and a new data directory, or configure the producers; their records are held, not counted or dead-lettered",
                self.records_misfitting,
                self.records_misfitting + self.records_fitting,
                self.configured,
                p.librdkafka_setting(),
            ),
            None => format!(
                "{} of {} records checked are on partitions the configured {} partitioner does not give their client, and no known partitioner explains them; key records by client_id; they are held, not counted or dead-lettered",
                self.records_misfitting,
                self.records_misfitting + self.records_fitting,
                self.configured,
            ),
        })
    }
}

/// Where a record sits relative to the configured partitioner.
pub enum Placement<'a> {
    Fits,
    /// On `partition`, which the configured function does not give the
    /// client; `fitting` are the known partitioners that would.
    Misfits {
        fitting: &'a [Partitioner],
    },
}

#[derive(Debug)]
pub struct PartitionCheck {
    configured: Partitioner,
    tally: Mutex<Tally>,
}

#[derive(Debug)]
struct Tally {
    fits: u64,
    misfits: u64,
    /// Misfits each known partitioner explains, by `Partitioner::ALL` index.
    explained: [u64; 3],
    /// Per partition, the highest offset counted (a held record is read
    /// again, and counted once).
    counted_to: Vec<i64>,
    verdict: Verdict,
}

impl PartitionCheck {
    pub fn new(configured: Partitioner, partitions: u16) -> Self {
        Self {
            configured,
            tally: Mutex::new(Tally {
                fits: 0,
                misfits: 0,
                explained: [0; 3],
                counted_to: vec![-1; usize::from(partitions)],
                verdict: Verdict::Unsettled,
            }),
        }
    }

    /// A check of another topic under the same partitioner and partitions.
    pub fn fresh(&self) -> Self {
        let partitions = self.tally.lock().map_or(0, |t| t.counted_to.len());
        Self::new(
            self.configured,
            u16::try_from(partitions).unwrap_or(u16::MAX),
        )
    }

    pub fn configured(&self) -> Partitioner {
        self.configured
    }

    /// Counts one record (once per offset) and answers whether a misfit
    /// is to be held rather than dead-lettered.
    pub fn observe(&self, partition: u16, offset: i64, placement: Placement<'_>) -> Verdict {
        let Ok(mut t) = self.tally.lock() else {
            return Verdict::Unsettled;
        };
        let fresh = t
            .counted_to
            .get_mut(usize::from(partition))
            .is_some_and(|c| {
                let fresh = offset > *c;
                *c = (*c).max(offset);
                fresh
            });
        if fresh {
            match placement {
                Placement::Fits => t.fits += 1,
                Placement::Misfits { fitting } => {
                    t.misfits += 1;
                    for (i, p) in Partitioner::ALL.iter().enumerate() {
                        if fitting.contains(p) {
                            t.explained[i] += 1;
                        }
                    }
                }
            }
            if t.verdict == Verdict::Unsettled {
                if t.misfits >= MISMATCH_AFTER && t.misfits >= t.fits {
                    t.verdict = Verdict::Mismatched;
                    let view = view_of(self.configured, &t);
                    tracing::error!(
                        configured = %self.configured,
                        producers_use = ?view.producers_use.map(|p| p.name()),
                        "{}",
                        view.not_ready_reason().unwrap_or_default()
                    );
                } else if t.fits >= CONSISTENT_AFTER && t.misfits * 20 <= t.fits {
                    t.verdict = Verdict::Consistent;
                }
            }
        }
        t.verdict
    }

    pub fn view(&self) -> PartitioningView {
        match self.tally.lock() {
            Ok(t) => view_of(self.configured, &t),
            Err(_) => PartitioningView {
                configured: self.configured,
                verdict: Verdict::Unsettled,
                producers_use: None,
                records_fitting: 0,
                records_misfitting: 0,
            },
        }
    }
}

fn view_of(configured: Partitioner, t: &Tally) -> PartitioningView {
    let producers_use = Partitioner::ALL
        .iter()
        .zip(t.explained)
        .filter(|(p, n)| **p != configured && t.misfits > 0 && n * 10 >= t.misfits * 9)
        .max_by_key(|(_, n)| *n)
        .map(|(p, _)| *p);
    PartitioningView {
        configured,
        verdict: t.verdict,
        producers_use,
        records_fitting: t.fits,
        records_misfitting: t.misfits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as a producer with `producer` places them on 12 partitions,
    /// observed by a check configured with `configured`: the verdict after
    /// each, computed independently of the check's counters.
    fn run(configured: Partitioner, producer: Partitioner, records: u64) -> PartitionCheck {
        let check = PartitionCheck::new(configured, 12);
        let mut offsets = [0i64; 12];
        for i in 0..records {
            let client = format!("client-{i}");
            let p = producer.partition(&client, 12);
            let fitting = Partitioner::fitting(&client, p, 12);
            let placement = if configured.partition(&client, 12) == p {
                Placement::Fits
            } else {
                Placement::Misfits { fitting: &fitting }
            };
            check.observe(p, offsets[usize::from(p)], placement);
            offsets[usize::from(p)] += 1;
        }
        check
    }

    #[test]
    fn a_librdkafka_default_producer_is_named_within_a_few_records() {
        let check = run(Partitioner::Murmur2, Partitioner::Crc32, 20);
        let view = check.view();
        assert_eq!(view.verdict, Verdict::Mismatched);
        assert_eq!(view.producers_use, Some(Partitioner::Crc32));
        let reason = view.not_ready_reason().unwrap();
        assert!(reason.contains("--partitioner crc32"), "{reason}");
        assert!(reason.contains("consistent_random"), "{reason}");
    }

    #[test]
    fn matching_producers_settle_consistent_and_stay_ready() {
        for p in Partitioner::ALL {
            let view = run(p, p, 200).view();
            assert_eq!(view.verdict, Verdict::Consistent, "{p}");
            assert_eq!(view.records_misfitting, 0);
            assert_eq!(view.not_ready_reason(), None);
        }
    }

    #[test]
    fn a_record_read_again_is_counted_once() {
        let check = PartitionCheck::new(Partitioner::Murmur2, 12);
        let fitting = [Partitioner::Crc32];
        for _ in 0..50 {
            check.observe(3, 7, Placement::Misfits { fitting: &fitting });
        }
        let view = check.view();
        assert_eq!(view.records_misfitting, 1);
        assert_eq!(view.verdict, Verdict::Unsettled);
    }

    #[test]
    fn stray_records_after_the_verdict_do_not_turn_it() {
        let check = run(Partitioner::Murmur2, Partitioner::Murmur2, 100);
        let fitting = [Partitioner::Fnv1a];
        for o in 1_000..1_010 {
            let v = check.observe(0, o, Placement::Misfits { fitting: &fitting });
            assert_eq!(v, Verdict::Consistent);
        }
    }
}
