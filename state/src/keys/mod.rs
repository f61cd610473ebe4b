//! Every key Tally writes, in one place.
//!
//! All state keys start with the partition (u16, big-endian) so that a
//! partition's state is one contiguous range and can move as a unit.
//! Integers are big-endian so that byte order equals logical order.
//!
//! | CF            | key                                                      | value              |
//! |---------------|----------------------------------------------------------|--------------------|
//! | `stats`       | partition, granularity, client len (u16), client, bucket start (u64 ms) | bucket stats |
//! | `stats`       | partition, period tag, period start (u64 ms), client len (u16), client | period totals (top consumers) |
//! | `stats`       | partition, `0x21`, resolution (u32 ms), series len (u16), series, bucket start (u64 ms) | telemetry bucket |
//! | `dedupe`      | partition, newest claim time (u64 ms), sequence (u64)   | claims of a flush  |
//! | `dedupe`      | partition, `0xFF`, newest claim time (u64 ms), sequence (u64) | telemetry point ids of a flush |
//! | `dead_letter` | partition, sequence (u64)                                | dead-letter record |
//! | `limits`      | partition, kind (u8), client len (u16), client           | limit config, limiter state, quota config, quota marks, detector state |
//! | `limits`      | partition, kind 7 / 8, client len (u16), client, period start (u64 ms) | closed billing report / its announcement, until logged |
//! | `anomalies`   | partition, detected at (u64 ms), anomaly id              | anomaly record     |
//! | `cluster_alerts` | alert topic partition, offset (u64)                    | event JSON (mirror) |
//! | `meta`        | partition, `0x01`                                        | checkpoint         |
//! | `meta`        | partition, `0x02`                                        | changelog mark     |
//! | `meta`        | partition, `0x03`                                        | telemetry checkpoint |
//! | `meta`        | partition, `0x04`, series                                | a series the partition holds (empty) |
//! | `meta`        | partition, `0x05`, series                                | telemetry detector state |
//! | `meta`        | `0xFFFF`, name                                           | store settings     |
//! | `meta`        | `0xFFFF`, `webhook/` id                                  | webhook config     |
//! | `meta`        | `0xFFFF`, `sink/` sink name                              | sink cursor        |
//! | `meta`        | `0xFFFF`, `control/e/`, sequence (u64)                   | control event (JSON envelope) |
//! | `meta`        | `0xFFFF`, `control/snapshot`                             | projection snapshot |
//! | `meta`        | `0xFFFF`, `control/topic-offset`                         | control topic offset applied (i64) |
//! | `meta`        | `0xFFFF`, `audit/`, time (u64 ms), sequence (u64)        | audit record (JSON) |

use tally_pipelines::time::{Granularity, Period};

mod telemetry;
pub use telemetry::*;

pub const CF_STATS: &str = "stats";
pub const CF_DEDUPE: &str = "dedupe";
pub const CF_DEAD_LETTER: &str = "dead_letter";
pub const CF_META: &str = "meta";
pub const CF_LIMITS: &str = "limits";
pub const CF_ANOMALIES: &str = "anomalies";
/// The alert event log: sequence (u64) -> event JSON. Not per partition.
pub const CF_ALERTS: &str = "alerts";
/// The cluster's alert topic mirrored: topic partition (u16), offset (u64)
/// -> event JSON. Keyed by the alert topic's partitions, not state ones.
pub const CF_CLUSTER_ALERTS: &str = "cluster_alerts";
pub const ALL_CFS: [&str; 8] = [
    CF_ALERTS,
    CF_CLUSTER_ALERTS,
    CF_STATS,
    CF_DEDUPE,
    CF_DEAD_LETTER,
    CF_META,
    CF_LIMITS,
    CF_ANOMALIES,
];

/// An anomaly: partition, detection time (event time), id.
pub fn anomaly_key(partition: u16, detected_at_ms: i64, anomaly_id: &str) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.extend_from_slice(&time_bytes(detected_at_ms));
    key.extend_from_slice(anomaly_id.as_bytes());
    key
}

/// The first anomaly key of `partition` detected at or after `ms`.
pub fn anomalies_from(partition: u16, ms: i64) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.extend_from_slice(&time_bytes(ms));
    key
}

/// What a `limits` key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Config = 1,
    Limiter = 2,
    Quota = 3,
    /// Quota events raised this period and reservations outstanding.
    QuotaMarks = 4,
    Detector = 5,
    /// A (minute, client) bucket flushed and not judged yet.
    OpenMinute = 6,
    /// A client's finalised billing report of a closed period.
    ClosedReport = 7,
    /// A closed period whose `BILLING_PERIOD_CLOSED` is not logged yet:
    /// written with the report, removed once the announcement is.
    UnannouncedClose = 8,
}

/// Prefix of every `limits` key of one kind in a partition.
pub fn limit_prefix(partition: u16, kind: LimitKind) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(kind as u8);
    key
}

pub fn limit_key(partition: u16, kind: LimitKind, client_id: &str) -> Vec<u8> {
    let client = client_id.as_bytes();
    let len = u16::try_from(client.len()).unwrap_or(u16::MAX);
    let mut key = limit_prefix(partition, kind);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&client[..usize::from(len)]);
    key
}

/// A closed billing period's report: the client's key, then the period's
/// start (u64 ms), so a client's
/// reports are one range.
pub fn closed_report_key(partition: u16, client_id: &str, period_start_ms: i64) -> Vec<u8> {
    let mut key = limit_key(partition, LimitKind::ClosedReport, client_id);
    key.extend_from_slice(&time_bytes(period_start_ms));
    key
}

/// The marker of a closed period not yet announced.
pub fn unannounced_close_key(partition: u16, client_id: &str, period_start_ms: i64) -> Vec<u8> {
    let mut key = limit_key(partition, LimitKind::UnannouncedClose, client_id);
    key.extend_from_slice(&time_bytes(period_start_ms));
    key
}

/// `(client, period start)` of an unannounced-close marker.
pub fn decode_unannounced_close_key(key: &[u8]) -> Option<(String, i64)> {
    let client = limit_key_client(key)?;
    let start = key.get(5 + client.len()..)?;
    let start = u64::from_be_bytes(start.try_into().ok()?);
    Some((client, i64::try_from(start).ok()?))
}

/// A minute bucket waiting to be judged: partition, kind, minute start
/// (u64 ms), client (the rest of the key).
pub fn open_minute_key(partition: u16, minute_start_ms: i64, client_id: &str) -> Vec<u8> {
    let mut key = limit_prefix(partition, LimitKind::OpenMinute);
    key.extend_from_slice(&time_bytes(minute_start_ms));
    key.extend_from_slice(client_id.as_bytes());
    key
}

pub fn decode_open_minute_key(key: &[u8]) -> Option<(i64, String)> {
    if key.get(2) != Some(&(LimitKind::OpenMinute as u8)) {
        return None;
    }
    let minute = u64::from_be_bytes(key.get(3..11)?.try_into().ok()?);
    let client = String::from_utf8(key.get(11..)?.to_vec()).ok()?;
    Some((i64::try_from(minute).ok()?, client))
}

/// The client of a `limits` key.
pub fn limit_key_client(key: &[u8]) -> Option<String> {
    let len = usize::from(u16::from_be_bytes(key.get(3..5)?.try_into().ok()?));
    let client = key.get(5..5 + len)?;
    String::from_utf8(client.to_vec()).ok()
}

const META_CHECKPOINT: u8 = 0x01;
const META_CHANGELOG_MARK: u8 = 0x02;
/// Changelog-only key of a partition's round markers: after the partition
/// but before any granularity tag, so it never names a stats key.
const CHANGELOG_MARKER: u8 = 0xFF;
/// Partition slot for store-wide settings; no real partition reaches it.
const GLOBAL: u16 = u16::MAX;

fn granularity_tag(g: Granularity) -> u8 {
    match g {
        Granularity::Minute => 1,
        Granularity::Hour => 2,
        Granularity::Day => 3,
    }
}

fn granularity_from_tag(tag: u8) -> Option<Granularity> {
    match tag {
        1 => Some(Granularity::Minute),
        2 => Some(Granularity::Hour),
        3 => Some(Granularity::Day),
        _ => None,
    }
}

/// Period totals share the `stats` column family (and its changelog) with
/// the buckets, under tags above the granularity tags; the period start
/// comes before the client so that one period of a partition is one range.
fn period_tag(p: Period) -> u8 {
    match p {
        Period::Hour => 0x11,
        Period::Day => 0x12,
        Period::Week => 0x13,
        Period::Month => 0x14,
    }
}

fn period_from_tag(tag: u8) -> Option<Period> {
    match tag {
        0x11 => Some(Period::Hour),
        0x12 => Some(Period::Day),
        0x13 => Some(Period::Week),
        0x14 => Some(Period::Month),
        _ => None,
    }
}

/// The prefix of every client's totals of one period of a partition.
pub fn period_totals_prefix(partition: u16, period: Period, period_start_ms: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + 1 + 8 + 2 + 16);
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(period_tag(period));
    key.extend_from_slice(&time_bytes(period_start_ms));
    key
}

pub fn period_totals_key(
    partition: u16,
    period: Period,
    period_start_ms: i64,
    client_id: &str,
) -> Vec<u8> {
    let client = client_id.as_bytes();
    let len = u16::try_from(client.len()).unwrap_or(u16::MAX);
    let mut key = period_totals_prefix(partition, period, period_start_ms);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&client[..usize::from(len)]);
    key
}

/// A decoded period-totals key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodTotalsKey {
    pub partition: u16,
    pub period: Period,
    pub period_start_ms: i64,
    pub client_id: String,
}

/// Whether a `stats` key holds period totals (not a bucket).
pub fn is_period_totals_key(key: &[u8]) -> bool {
    key.get(2).copied().and_then(period_from_tag).is_some()
}

pub fn decode_period_totals_key(key: &[u8]) -> Option<PeriodTotalsKey> {
    let partition = u16::from_be_bytes(key.get(0..2)?.try_into().ok()?);
    let period = period_from_tag(*key.get(2)?)?;
    let start = u64::from_be_bytes(key.get(3..11)?.try_into().ok()?);
    let len = usize::from(u16::from_be_bytes(key.get(11..13)?.try_into().ok()?));
    let client = key.get(13..13 + len)?;
    if key.len() != 13 + len {
        return None;
    }
    Some(PeriodTotalsKey {
        partition,
        period,
        period_start_ms: i64::try_from(start).ok()?,
        client_id: String::from_utf8(client.to_vec()).ok()?,
    })
}

/// A decoded `stats` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsKey {
    pub partition: u16,
    pub granularity: Granularity,
    pub client_id: String,
    pub bucket_start_ms: i64,
}

/// The first stats key of one granularity of a partition.
pub fn granularity_prefix(partition: u16, granularity: Granularity) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(granularity_tag(granularity));
    key
}

/// Past every stats key of one granularity of a partition.
pub fn granularity_end(partition: u16, granularity: Granularity) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(granularity_tag(granularity) + 1);
    key
}

/// The prefix shared by all buckets of one client at one granularity.
pub fn stats_prefix(partition: u16, granularity: Granularity, client_id: &str) -> Vec<u8> {
    let client = client_id.as_bytes();
    let len = u16::try_from(client.len()).unwrap_or(u16::MAX);
    let mut key = Vec::with_capacity(2 + 1 + 2 + client.len() + 8);
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(granularity_tag(granularity));
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&client[..usize::from(len)]);
    key
}

pub fn stats_key(
    partition: u16,
    granularity: Granularity,
    client_id: &str,
    bucket_start_ms: i64,
) -> Vec<u8> {
    let mut key = stats_prefix(partition, granularity, client_id);
    key.extend_from_slice(&time_bytes(bucket_start_ms));
    key
}

/// Event times are validated to be >= 0; clamp defensively so order holds.
fn time_bytes(ms: i64) -> [u8; 8] {
    (ms.max(0) as u64).to_be_bytes()
}

pub fn decode_stats_key(key: &[u8]) -> Option<StatsKey> {
    let partition = u16::from_be_bytes(key.get(0..2)?.try_into().ok()?);
    let granularity = granularity_from_tag(*key.get(2)?)?;
    let len = usize::from(u16::from_be_bytes(key.get(3..5)?.try_into().ok()?));
    let client = key.get(5..5 + len)?;
    let ts = key.get(5 + len..5 + len + 8)?;
    if key.len() != 5 + len + 8 {
        return None;
    }
    Some(StatsKey {
        partition,
        granularity,
        client_id: String::from_utf8(client.to_vec()).ok()?,
        bucket_start_ms: i64::try_from(u64::from_be_bytes(ts.try_into().ok()?)).ok()?,
    })
}

/// One flush's dedupe claims, ordered by the newest claim's event time so
/// that every segment wholly past the window is one key range.
pub fn dedupe_segment_key(partition: u16, newest_claim_ms: i64, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(&time_bytes(newest_claim_ms));
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The start of the partition's segments whose newest claim is at or after
/// `ms` (and the end of those before it).
pub fn dedupe_segments_from(partition: u16, ms: i64) -> Vec<u8> {
    dedupe_segment_key(partition, ms, 0)
}

/// The end of a partition's request-event dedupe segments: event times
/// stay far below 2^56 ms, so their first time byte is never `0xFF`,
/// where the telemetry segments start.
pub fn dedupe_segments_end(partition: u16) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(TELEMETRY_DEDUPE_TAG);
    key
}

/// The first key after every key of `partition`.
pub fn partition_end(partition: u16) -> Vec<u8> {
    prefix_end(&partition.to_be_bytes())
}

pub fn dead_letter_key(partition: u16, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(10);
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

pub fn checkpoint_key(partition: u16) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(META_CHECKPOINT);
    key
}

pub fn changelog_mark_key(partition: u16) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(META_CHANGELOG_MARK);
    key
}

/// The changelog record key of a partition's round markers (never stored
/// in RocksDB; stats keys carry a granularity tag 1..=3 in its place).
pub fn changelog_marker_key(partition: u16) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(CHANGELOG_MARKER);
    key
}

/// The first key of a partition (every state key starts with it).
pub fn partition_start(partition: u16) -> Vec<u8> {
    partition.to_be_bytes().to_vec()
}

pub fn setting_key(name: &str) -> Vec<u8> {
    let mut key = GLOBAL.to_be_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// The prefix of the control log's events; [`control_event_key`] appends
/// the sequence, big-endian, so the log scans in order.
pub fn control_event_prefix() -> Vec<u8> {
    setting_key("control/e/")
}

pub fn control_event_key(seq: u64) -> Vec<u8> {
    let mut key = control_event_prefix();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub fn control_snapshot_key() -> Vec<u8> {
    setting_key("control/snapshot")
}

/// The prefix of the audit log; [`audit_key`] appends time and sequence,
/// big-endian, so the log scans in time order and retention is one range.
pub fn audit_prefix() -> Vec<u8> {
    setting_key("audit/")
}

pub fn audit_key(at_ms: i64, seq: u64) -> Vec<u8> {
    let mut key = audit_prefix();
    key.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub fn control_topic_offset_key() -> Vec<u8> {
    setting_key("control/topic-offset")
}

/// The partition every state key starts with.
pub fn partition_of(key: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(key.get(0..2)?.try_into().ok()?))
}

/// The first key after every key that starts with `prefix` (an exclusive
/// upper bound for a prefix scan).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_granularity() -> impl Strategy<Value = Granularity> {
        prop_oneof![
            Just(Granularity::Minute),
            Just(Granularity::Hour),
            Just(Granularity::Day)
        ]
    }

    proptest! {
        #[test]
        fn stats_key_round_trips(p in 0u16..u16::MAX, g in any_granularity(), client in "\\PC{1,40}", ts in 0i64..=tally_pipelines::time::MAX_EPOCH_MS) {
            let key = stats_key(p, g, &client, ts);
            let decoded = decode_stats_key(&key).unwrap();
            prop_assert_eq!(decoded, StatsKey { partition: p, granularity: g, client_id: client.clone(), bucket_start_ms: ts });
            prop_assert_eq!(partition_of(&key), Some(p));
            prop_assert!(key.starts_with(&stats_prefix(p, g, &client)));
        }

        #[test]
        fn byte_order_is_time_order(client in "\\PC{1,20}", a in 0i64..1_000_000_000_000_000, b in 0i64..1_000_000_000_000_000) {
            let (ka, kb) = (stats_key(3, Granularity::Minute, &client, a), stats_key(3, Granularity::Minute, &client, b));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn dead_letter_keys_sort_by_sequence(a: u64, b: u64) {
            prop_assert_eq!(dead_letter_key(1, a).cmp(&dead_letter_key(1, b)), a.cmp(&b));
        }
    }

    #[test]
    fn period_totals_keys_round_trip_and_are_no_bucket_keys() {
        for period in [Period::Hour, Period::Day, Period::Week, Period::Month] {
            let key = period_totals_key(4, period, 1_767_225_600_000, "клиент/1");
            assert_eq!(
                decode_period_totals_key(&key),
                Some(PeriodTotalsKey {
                    partition: 4,
                    period,
                    period_start_ms: 1_767_225_600_000,
                    client_id: "клиент/1".into()
                })
            );
            assert!(is_period_totals_key(&key));
            assert_eq!(decode_stats_key(&key), None);
            assert!(key.starts_with(&period_totals_prefix(4, period, 1_767_225_600_000)));
            assert!(key < partition_end(4));
        }
        assert!(!is_period_totals_key(&stats_key(
            4,
            Granularity::Day,
            "c",
            0
        )));
        assert_eq!(decode_period_totals_key(&changelog_marker_key(4)), None);
    }

    #[test]
    fn open_minute_keys_round_trip() {
        let key = open_minute_key(3, 1_767_225_600_000, "a/b c");
        assert_eq!(
            decode_open_minute_key(&key),
            Some((1_767_225_600_000, "a/b c".to_string()))
        );
        assert!(key.starts_with(&limit_prefix(3, LimitKind::OpenMinute)));
        assert_eq!(
            decode_open_minute_key(&limit_key(3, LimitKind::Detector, "x")),
            None
        );
    }

    #[test]
    fn a_client_prefix_never_captures_a_longer_client() {
        // "ab" and "abc" differ in the length field, so prefixes cannot collide.
        let short = stats_prefix(0, Granularity::Day, "ab");
        let long = stats_key(0, Granularity::Day, "abc", 0);
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn partitions_are_contiguous_ranges() {
        let p1 = stats_key(1, Granularity::Day, "zzz", i64::MAX);
        let p2 = dedupe_segment_key(2, 0, 0);
        assert!(p1 < p2);
        assert!(setting_key("partitions") > checkpoint_key(u16::MAX - 1));
    }

    #[test]
    fn dedupe_segments_sort_by_newest_claim() {
        assert!(dedupe_segment_key(1, 5, 9) < dedupe_segment_key(1, 6, 0));
        assert!(dedupe_segment_key(1, 6, 0) < dedupe_segment_key(1, 6, 1));
        assert!(dedupe_segment_key(1, i64::MAX, u64::MAX) < partition_end(1));
        assert!(dedupe_segments_from(1, 6) <= dedupe_segment_key(1, 6, 0));
    }

    #[test]
    fn the_marker_key_is_no_stats_key() {
        assert_eq!(decode_stats_key(&changelog_marker_key(7)), None);
        assert_eq!(partition_of(&changelog_marker_key(7)), Some(7));
        assert_ne!(changelog_mark_key(7), checkpoint_key(7));
    }

    #[test]
    fn control_event_keys_sort_by_sequence_and_stay_under_their_prefix() {
        let prefix = control_event_prefix();
        let end = prefix_end(&prefix);
        let (a, b) = (control_event_key(255), control_event_key(256));
        assert!(a < b, "byte order is sequence order");
        assert!(a.starts_with(&prefix) && b < end);
        assert!(control_snapshot_key() >= end || control_snapshot_key() < prefix);
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(&[1, 2]), vec![1, 3]);
        assert_eq!(prefix_end(&[1, 255]), vec![2]);
        let prefix = stats_prefix(0, Granularity::Hour, "c");
        assert!(stats_key(0, Granularity::Hour, "c", i64::MAX) < prefix_end(&prefix));
    }
}
