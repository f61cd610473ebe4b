//! Keys of telemetry buckets: partition, their tag, resolution (u32 ms),
//! series length (u16), series, bucket start (u64 ms), in the `stats`
//! column family beside the request buckets.

use super::{prefix_end, time_bytes};

/// Telemetry buckets share the `stats` column family (its merge operator
/// and changelog) under their own tag.
const TELEMETRY_TAG: u8 = 0x21;
/// After the partition in `dedupe`: the telemetry point-id segments (see
/// [`super::dedupe_segments_end`]).
pub(super) const TELEMETRY_DEDUPE_TAG: u8 = 0xFF;
const META_TELEMETRY_CHECKPOINT: u8 = 0x03;
const META_TELEMETRY_SERIES: u8 = 0x04;
const META_TELEMETRY_DETECTOR: u8 = 0x05;

/// The drift and anomaly state of one series.
pub fn telemetry_detector_key(partition: u16, series: &str) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(META_TELEMETRY_DETECTOR);
    key.extend_from_slice(series.as_bytes());
    key
}

/// One flush's telemetry point ids, by newest claim time like the request
/// events' segments.
pub fn telemetry_dedupe_segment_key(
    partition: u16,
    newest_claim_ms: i64,
    sequence: u64,
) -> Vec<u8> {
    let mut key = Vec::with_capacity(19);
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(TELEMETRY_DEDUPE_TAG);
    key.extend_from_slice(&time_bytes(newest_claim_ms));
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

pub fn telemetry_dedupe_segments_from(partition: u16, ms: i64) -> Vec<u8> {
    telemetry_dedupe_segment_key(partition, ms, 0)
}

/// Every telemetry key of `partition` in `meta` (checkpoint, registry,
/// detectors): `[from, to)`.
pub fn telemetry_meta_range(partition: u16) -> (Vec<u8>, Vec<u8>) {
    let mut from = partition.to_be_bytes().to_vec();
    let mut to = from.clone();
    from.push(META_TELEMETRY_CHECKPOINT);
    to.push(META_TELEMETRY_DETECTOR + 1);
    (from, to)
}

pub fn telemetry_checkpoint_key(partition: u16) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(META_TELEMETRY_CHECKPOINT);
    key
}

/// The registry entry of one series of a partition: series in byte order,
/// so a name prefix is one key range.
pub fn telemetry_series_key(partition: u16, series: &str) -> Vec<u8> {
    let mut key = telemetry_series_prefix(partition);
    key.extend_from_slice(series.as_bytes());
    key
}

pub fn telemetry_series_prefix(partition: u16) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.push(META_TELEMETRY_SERIES);
    key
}

/// The series of a registry key.
pub fn decode_telemetry_series_key(key: &[u8]) -> Option<String> {
    if key.get(2) != Some(&META_TELEMETRY_SERIES) {
        return None;
    }
    String::from_utf8(key.get(3..)?.to_vec()).ok()
}

/// Registry keys of `partition` whose series starts with `prefix`:
/// `[from, to)`.
pub fn telemetry_series_range(partition: u16, prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let from = telemetry_series_key(partition, prefix);
    let to = if prefix.is_empty() {
        prefix_end(&telemetry_series_prefix(partition))
    } else {
        prefix_end(&from)
    };
    (from, to)
}

/// The prefix of one series' buckets at one resolution.
pub fn telemetry_prefix(partition: u16, resolution_ms: u32, series: &str) -> Vec<u8> {
    let name = series.as_bytes();
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut key = Vec::with_capacity(2 + 1 + 4 + 2 + name.len() + 8);
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(TELEMETRY_TAG);
    key.extend_from_slice(&resolution_ms.to_be_bytes());
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&name[..usize::from(len)]);
    key
}

pub fn telemetry_key(partition: u16, resolution_ms: u32, series: &str, start_ms: i64) -> Vec<u8> {
    let mut key = telemetry_prefix(partition, resolution_ms, series);
    key.extend_from_slice(&time_bytes(start_ms));
    key
}

/// The first telemetry key of one resolution of a partition, and past the
/// last.
pub fn telemetry_resolution_range(partition: u16, resolution_ms: u32) -> (Vec<u8>, Vec<u8>) {
    let mut from = partition.to_be_bytes().to_vec();
    from.push(TELEMETRY_TAG);
    let mut to = from.clone();
    from.extend_from_slice(&resolution_ms.to_be_bytes());
    match resolution_ms.checked_add(1) {
        Some(next) => to.extend_from_slice(&next.to_be_bytes()),
        None => {
            to = {
                let mut t = partition.to_be_bytes().to_vec();
                t.push(TELEMETRY_TAG + 1);
                t
            }
        }
    }
    (from, to)
}

/// `(resolution, bucket start)` of a telemetry key, without the series.
pub fn decode_telemetry_key_time(key: &[u8]) -> Option<(u32, i64)> {
    if !is_telemetry_key(key) {
        return None;
    }
    let resolution = u32::from_be_bytes(key.get(3..7)?.try_into().ok()?);
    let start = key.len().checked_sub(8).and_then(|at| key.get(at..))?;
    let start = i64::try_from(u64::from_be_bytes(start.try_into().ok()?)).ok()?;
    Some((resolution, start))
}

/// Every telemetry bucket of `partition`: `[from, to)`.
pub fn telemetry_range(partition: u16) -> (Vec<u8>, Vec<u8>) {
    let mut from = partition.to_be_bytes().to_vec();
    let mut to = from.clone();
    from.push(TELEMETRY_TAG);
    to.push(TELEMETRY_TAG + 1);
    (from, to)
}

pub fn is_telemetry_key(key: &[u8]) -> bool {
    key.get(2) == Some(&TELEMETRY_TAG)
}

/// `(series, bucket start)` of a telemetry key.
pub fn decode_telemetry_key(key: &[u8]) -> Option<(String, i64)> {
    if !is_telemetry_key(key) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes(key.get(7..9)?.try_into().ok()?));
    let series = key.get(9..9 + len)?;
    let start = key.get(9 + len..)?;
    if start.len() != 8 {
        return None;
    }
    let start = u64::from_be_bytes(start.try_into().ok()?);
    Some((
        String::from_utf8(series.to_vec()).ok()?,
        i64::try_from(start).ok()?,
    ))
}
