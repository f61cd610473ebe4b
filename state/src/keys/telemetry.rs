//! Keys of telemetry buckets: partition, their tag, resolution (u32 ms),
//! series length (u16), series, bucket start (u64 ms), in the `stats`
//! column family beside the request buckets.

use super::time_bytes;

/// Telemetry buckets share the `stats` column family (its merge operator
/// and changelog) under their own tag.
const TELEMETRY_TAG: u8 = 0x21;

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
