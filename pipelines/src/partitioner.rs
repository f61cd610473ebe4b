//! Kafka's default partitioner (murmur2 of the key, made positive, modulo the
//! partition count), so that a client lands on the same shard whether its
//! events arrive over HTTP, from a file, or from a Kafka topic keyed by the
//! client id.

/// Kafka's `Utils.murmur2` (a 32-bit MurmurHash2 with Kafka's seed).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for a keyed record.
pub fn partition_for(key: &str, partitions: u16) -> u16 {
    let positive = (murmur2(key.as_bytes()) & 0x7fff_ffff) as u32;
    (positive % u32::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values are the ones asserted by Apache Kafka's own UtilsTest.
    #[test]
    fn murmur2_matches_kafka_reference_values() {
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()), expected, "murmur2({key:?})");
        }
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        for i in 0..1000 {
            let key = format!("client-{i}");
            let p = partition_for(&key, 12);
            assert!(p < 12);
            assert_eq!(p, partition_for(&key, 12));
        }
        assert_eq!(partition_for("anything", 1), 0);
    }
}
