//! The merge operators of the `stats` column family: bucket deltas into
//! buckets, period-total deltas into period totals, and telemetry bucket
//! deltas into telemetry buckets.
//!
//! A value that cannot be decoded is never replaced by an empty one (that
//! would erase a client's usage silently): the merge keeps the stored bytes
//! and every operand in a *poisoned* value, which every read reports as
//! corrupt, so the shard that meets it stops and readiness names it, and
//! nothing written is lost for whoever repairs it.

use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::top::PeriodTotals;

use crate::codec::{decode, encode, POISONED};
use crate::keys;

/// Merges `stats` values: period totals or buckets, by key.
pub(crate) fn merge_stats(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: &mut dyn Iterator<Item = &[u8]>,
) -> Option<Vec<u8>> {
    let operands: Vec<&[u8]> = operands.collect();
    // One delta onto nothing is that delta: kept as written, without a
    // decode and an encode (a bucket still in the memtable is read this
    // way). A value of another version goes the whole way, to be kept
    // poisoned if it does not decode.
    if let ([only], None) = (operands.as_slice(), existing) {
        if only.first() == Some(&crate::codec::VALUE_VERSION) {
            return Some(only.to_vec());
        }
    }
    let merged = if keys::is_period_totals_key(key) {
        merge_as::<PeriodTotals>(existing, &operands, |a, b| a.add(b))
    } else if keys::is_telemetry_key(key) {
        merge_as::<tally_pipelines::telemetry::Bucket>(existing, &operands, |a, b| a.merge(b))
    } else {
        merge_as::<BucketStats>(existing, &operands, |a, b| a.merge(b))
    };
    match merged {
        Some(value) => Some(value),
        None => {
            tracing::error!(key = ?key, "undecodable stats value: kept as a poisoned value, reads will report it");
            Some(poison(existing, &operands))
        }
    }
}

/// Sums everything, or `None` if anything does not decode.
fn merge_as<T: Default + serde::Serialize + serde::de::DeserializeOwned>(
    existing: Option<&[u8]>,
    operands: &[&[u8]],
    add: impl Fn(&mut T, &T),
) -> Option<Vec<u8>> {
    let mut acc = match existing {
        Some(bytes) => decode::<T>(bytes).ok()?,
        None => T::default(),
    };
    for op in operands {
        add(&mut acc, &decode::<T>(op).ok()?);
    }
    encode(&acc).ok()
}

/// A poisoned value: the tag, then each part (the stored value's own parts
/// if it was poisoned already, else the stored value; then the operands),
/// each as a big-endian u32 length and its bytes.
fn poison(existing: Option<&[u8]>, operands: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![POISONED];
    match existing {
        Some(e) if e.first() == Some(&POISONED) => out.extend_from_slice(&e[1..]),
        Some(e) => push_part(&mut out, e),
        None => {}
    }
    for op in operands {
        push_part(&mut out, op);
    }
    out
}

fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(part);
}

/// The parts a poisoned value keeps (for repair tools and tests).
pub fn poisoned_parts(value: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut rest = value.strip_prefix(&[POISONED])?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        parts.push(rest.get(4..4 + len)?.to_vec());
        rest = &rest[4 + len..];
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_pipelines::event::{decode_event, ValidationContext};
    use tally_pipelines::time::Granularity;

    fn bucket(n: usize) -> Vec<u8> {
        let mut b = BucketStats::default();
        let e = decode_event(
            r#"{"client_id":"c","endpoint":"/x","status":200,"latency_ms":1,"timestamp":0}"#,
            &ValidationContext::lenient(),
        )
        .unwrap();
        for _ in 0..n {
            b.record(&e, 1);
        }
        encode(&b).unwrap()
    }

    fn requests(value: &[u8]) -> u64 {
        decode::<BucketStats>(value).unwrap().totals().requests
    }

    #[test]
    fn deltas_add_up() {
        let key = keys::stats_key(0, Granularity::Minute, "c", 0);
        let (a, b, c) = (bucket(1), bucket(2), bucket(3));
        let merged = merge_stats(
            &key,
            Some(&a),
            &mut [b.as_slice(), c.as_slice()].into_iter(),
        );
        assert_eq!(requests(&merged.unwrap()), 6);
        // One delta onto nothing is kept as written.
        let alone = merge_stats(&key, None, &mut [a.as_slice()].into_iter());
        assert_eq!(alone.as_deref(), Some(a.as_slice()));
    }

    /// An earlier main replaced an undecodable bucket with an empty one.
    #[test]
    fn an_undecodable_bucket_is_kept_poisoned_with_every_operand_not_emptied() {
        let key = keys::stats_key(0, Granularity::Minute, "c", 0);
        let garbage = b"\x01\xFF\xFF\xFF".to_vec();
        let (b, c) = (bucket(2), bucket(3));
        let poisoned = merge_stats(&key, Some(&garbage), &mut [b.as_slice()].into_iter()).unwrap();
        assert!(decode::<BucketStats>(&poisoned).is_err(), "reads report it");
        // Later merges keep it poisoned and keep their operands too.
        let again = merge_stats(&key, Some(&poisoned), &mut [c.as_slice()].into_iter()).unwrap();
        assert_eq!(poisoned_parts(&again).unwrap(), vec![garbage, b, c]);
        assert!(matches!(
            decode::<BucketStats>(&again),
            Err(crate::Error::Corrupt(_))
        ));
    }
}
