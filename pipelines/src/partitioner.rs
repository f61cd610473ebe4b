//! The partitioners producers use for keyed records, so that a client
//! lands on the same shard whether its events arrive over HTTP, from a
//! file, or from a Kafka topic keyed by the client id: murmur2 (the Java
//! client's default), CRC-32 (librdkafka's default, `consistent_random`)
//! and FNV-1a (librdkafka's `fnv1a`, Sarama). Tally uses the one its
//! configuration names for the topic everywhere (ingest, checks, query
//! forwarding) and recognizes the others in records that do not fit.

use serde::{Deserialize, Serialize};

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

/// librdkafka's `rd_fnv1a`: 32-bit FNV-1a, made positive as Sarama does.
pub fn fnv1a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811C_9DC5;
    for &b in data {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h as i32).unsigned_abs()
}

/// How the producers of a topic chose a keyed record's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// `murmur2` of the key, made positive: the Java client's default
    /// (also librdkafka's `murmur2` / `murmur2_random`).
    #[default]
    Murmur2,
    /// CRC-32 of the key: librdkafka's default `consistent_random` (also
    /// `consistent`), so confluent-kafka for Python, Go and .NET,
    /// node-rdkafka and the Rust rdkafka crate unless configured.
    Crc32,
    /// FNV-1a of the key: librdkafka's `fnv1a` / `fnv1a_random`, Sarama's
    /// hash partitioner.
    Fnv1a,
}

impl Partitioner {
    pub const ALL: [Partitioner; 3] = [Self::Murmur2, Self::Crc32, Self::Fnv1a];

    /// The partition this partitioner picks for a keyed record.
    pub fn partition(self, key: &str, partitions: u16) -> u16 {
        let key = key.as_bytes();
        let hash = match self {
            Self::Murmur2 => (murmur2(key) & 0x7fff_ffff) as u32,
            Self::Crc32 => crc32fast::hash(key),
            Self::Fnv1a => fnv1a(key),
        };
        (hash % u32::from(partitions.max(1))) as u16
    }

    /// The known partitioners that would have put `key` on `partition`.
    pub fn fitting(key: &str, partition: u16, partitions: u16) -> Vec<Partitioner> {
        Self::ALL
            .into_iter()
            .filter(|p| p.partition(key, partitions) == partition)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Murmur2 => "murmur2",
            Self::Crc32 => "crc32",
            Self::Fnv1a => "fnv1a",
        }
    }

    /// The `partitioner` setting of a librdkafka producer that matches.
    pub fn librdkafka_setting(self) -> &'static str {
        match self {
            Self::Murmur2 => "murmur2_random",
            Self::Crc32 => "consistent_random",
            Self::Fnv1a => "fnv1a_random",
        }
    }
}

impl std::fmt::Display for Partitioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Partitioner {
    type Err = String;

    /// Accepts this enum's names and the librdkafka / Java names of the
    /// same functions.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "murmur2" | "murmur2_random" | "default" | "java" => Ok(Self::Murmur2),
            "crc32" | "consistent" | "consistent_random" => Ok(Self::Crc32),
            "fnv1a" | "fnv1a_random" => Ok(Self::Fnv1a),
            other => Err(format!(
                "unknown partitioner {other:?}: expected murmur2 (Java clients), crc32 (librdkafka's consistent_random default) or fnv1a"
            )),
        }
    }
}

/// The partition Kafka's Java default partitioner (murmur2) picks.
pub fn partition_for(key: &str, partitions: u16) -> u16 {
    Partitioner::Murmur2.partition(key, partitions)
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

    // Expected values are the ones asserted by librdkafka's own unit tests
    // (rdfnv1a.c, taken from Go's hash/fnv, made positive).
    #[test]
    fn fnv1a_matches_librdkafka_reference_values() {
        let unaligned = "PreAmbleWillBeRemoved,ThePrePartThatIs";
        let cases: [(&str, u32); 11] = [
            ("kafka", 0x0d33_c4e1),
            ("giberish123456789", 0x77a5_8295),
            ("1234", 0x023b_dd03),
            ("234", 0x2dea_3cd2),
            ("34", 0x740f_a83e),
            ("4", 0x310c_a263),
            (unaligned, 0x65cb_d69c),
            (&unaligned[1..], 0x6e49_c79a),
            (&unaligned[2..], 0x69ee_d356),
            (&unaligned[3..], 0x6abc_c023),
            ("", 0x7ee3_623b),
        ];
        for (key, expected) in cases {
            assert_eq!(fnv1a(key.as_bytes()), expected, "fnv1a({key:?})");
        }
    }

    // CRC-32 (IEEE, as zlib and librdkafka's rd_crc32): the standard check
    // value, and partitions computed by hand from it.
    #[test]
    fn crc32_partitions_follow_the_standard_checksum() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        // 0xCBF43926 = 3421780262; mod 12 = 2, mod 7 = 5.
        assert_eq!(Partitioner::Crc32.partition("123456789", 12), 2);
        assert_eq!(Partitioner::Crc32.partition("123456789", 7), 5);
    }

    #[test]
    fn names_parse_including_the_client_libraries_own() {
        for (name, want) in [
            ("murmur2", Partitioner::Murmur2),
            ("murmur2_random", Partitioner::Murmur2),
            ("consistent_random", Partitioner::Crc32),
            ("CRC32", Partitioner::Crc32),
            ("fnv1a_random", Partitioner::Fnv1a),
        ] {
            assert_eq!(name.parse::<Partitioner>(), Ok(want), "{name}");
        }
        let err = "random".parse::<Partitioner>().unwrap_err();
        assert!(err.contains("unknown partitioner"), "{err}");
    }

    #[test]
    fn fitting_names_every_partitioner_that_agrees() {
        for i in 0..200 {
            let key = format!("client-{i}");
            for p in Partitioner::ALL {
                let on = p.partition(&key, 12);
                assert!(Partitioner::fitting(&key, on, 12).contains(&p));
            }
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
