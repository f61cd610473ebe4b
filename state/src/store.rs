//! The store: Tally's state over a [`KvEngine`] (RocksDB, optionally
//! behind fault injection). Column families, their merge operators and
//! retention filters are declared here; everything above talks to
//! [`Store`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::partitioner::Partitioner;
use tally_pipelines::time::Granularity;

use crate::clock::SharedClock;
use crate::codec::{decode, encode};
use crate::engine::faulty::{Faults, FaultyEngine};
use crate::engine::rocks::{RocksEngine, RocksOptions};
use crate::engine::{ColumnFamily, KvEngine, Scan, WriteBatch};
use crate::keys::{
    self, CF_ALERTS, CF_ANOMALIES, CF_CLUSTER_ALERTS, CF_DEAD_LETTER, CF_DEDUPE, CF_LIMITS,
    CF_META, CF_STATS,
};
use crate::retention::{PartitionClocks, Retention};
use crate::snapshot::ChangeTracker;
use crate::{Error, Result};

/// The layout of the data directory. Version 2 keys de-duplication by
/// `(client, source, event_id)` (version 1: `event_id` alone) and holds the
/// event-time clock, detector windows and quota reservations in their
/// current encodings; version 3 adds to each bucket's endpoint cells the
/// compute units events carried themselves (billing weighs the others). A
/// directory of another version cannot be read without misreading it, so
/// it is refused.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub partitions: u16,
    /// Which partition a client's state lives in (the function the Kafka
    /// topic's producers use).
    pub partitioner: Partitioner,
    pub retention: Retention,
    pub block_cache_bytes: usize,
    /// Write-ahead log. Without it (bulk replays), commits live in
    /// memtables until RocksDB flushes them, and flushes are atomic across
    /// column families, so a crash loses a suffix of commits, never part
    /// of one: state and source positions stay consistent, and the replay
    /// resumes from the positions that survived.
    pub wal: bool,
    /// Memory for all memtables together.
    pub memtable_budget_bytes: usize,
    /// Wall clock for dead-letter and alert retention and record times.
    pub clock: SharedClock,
    /// Tests: inject faults into the engine.
    pub faults: Option<Arc<Faults>>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            partitions: 12,
            partitioner: Partitioner::default(),
            retention: Retention::default(),
            block_cache_bytes: 64 << 20,
            wal: true,
            memtable_budget_bytes: 192 << 20,
            clock: crate::clock::system(),
            faults: None,
        }
    }
}

/// What a partition has durably applied: written in the same batch as the
/// state it describes, read back on (re)start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The partition's event-time clock (the watermark is this minus the
    /// allowed lateness).
    pub event_clock_ms: Option<i64>,
    /// Next dead-letter sequence number.
    pub dead_letter_seq: u64,
    /// Last applied position per positioned source (file replays, Kafka
    /// topics).
    pub positions: BTreeMap<String, u64>,
    /// Next dedupe segment sequence number.
    pub dedupe_seq: u64,
    /// Dedupe segments with newest claim before this are deleted.
    pub dedupe_deleted_below_ms: i64,
    /// Minutes before this have been judged by the detectors (closed by the
    /// watermark or the idle timer): events that reach them later are
    /// counted but never judged again.
    pub judged_before_ms: Option<i64>,
}

/// A late event as kept in the dead-letter column family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub partition: u16,
    pub sequence: u64,
    pub reason: String,
    pub event_json: String,
    pub event_ms: i64,
    pub recorded_at_ms: i64,
}

/// What one commit wrote, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitStats {
    pub bytes: usize,
    pub records: usize,
}

pub struct Store {
    pub(crate) engine: Box<dyn KvEngine>,
    partitions: u16,
    partitioner: Partitioner,
    retention: Retention,
    pub(crate) clocks: Arc<PartitionClocks>,
    /// Each partition's telemetry clock (telemetry retention).
    pub(crate) telemetry_clocks: Arc<PartitionClocks>,
    pub(crate) clock: SharedClock,
    /// Set in Kafka mode: which keys changed since the last changelog round.
    pub(crate) changes: OnceLock<ChangeTracker>,
}

/// Column families and what each does on merge and compaction.
fn column_families(
    retention: Retention,
    clocks: Arc<PartitionClocks>,
    telemetry_clocks: Arc<PartitionClocks>,
    clock: SharedClock,
) -> Vec<ColumnFamily> {
    let stats_clocks = clocks;
    let stats = ColumnFamily {
        name: CF_STATS,
        bloom: true,
        merge: Some(("tally.bucket_stats.v1", crate::merge::merge_stats)),
        drop_on_compaction: Some((
            "tally.stats_retention",
            Box::new(move |key: &[u8], _value: &[u8]| {
                keys::partition_of(key).is_some_and(|p| {
                    if keys::is_telemetry_key(key) {
                        retention.telemetry_key_expired(key, telemetry_clocks.drop_clock(p))
                    } else {
                        retention.stats_key_expired(key, stats_clocks.drop_clock(p))
                    }
                })
            }),
        )),
    };
    let dead_clock = clock.clone();
    let dead = ColumnFamily {
        drop_on_compaction: Some((
            "tally.dead_letter_retention",
            Box::new(move |_key: &[u8], value: &[u8]| {
                decode::<DeadLetterRecord>(value).is_ok_and(|r| {
                    r.recorded_at_ms < dead_clock.now_ms().saturating_sub(retention.dead_letter_ms)
                })
            }),
        )),
        ..ColumnFamily::plain(CF_DEAD_LETTER)
    };
    // The local log and the cluster's mirror keep events alike.
    let logged_retention =
        |name: &'static str, cf: &'static str, clock: SharedClock| ColumnFamily {
            drop_on_compaction: Some((
                name,
                Box::new(move |_key: &[u8], value: &[u8]| {
                    decode::<(i64, String)>(value).is_ok_and(|(logged_at, _)| {
                        logged_at < clock.now_ms().saturating_sub(retention.alerts_ms)
                    })
                }),
            )),
            ..ColumnFamily::plain(cf)
        };
    let cluster_alerts = logged_retention(
        "tally.cluster_alert_retention",
        CF_CLUSTER_ALERTS,
        clock.clone(),
    );
    let alerts = logged_retention("tally.alert_retention", CF_ALERTS, clock);
    vec![
        stats,
        ColumnFamily::plain(CF_DEDUPE),
        dead,
        ColumnFamily::plain(CF_META),
        ColumnFamily {
            bloom: true,
            ..ColumnFamily::plain(CF_LIMITS)
        },
        ColumnFamily::plain(CF_ANOMALIES),
        alerts,
        cluster_alerts,
    ]
}

impl Store {
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store> {
        if options.partitions == 0 || options.partitions == u16::MAX {
            return Err(Error::InvalidOptions(format!(
                "partitions must be within 1..{}",
                u16::MAX
            )));
        }
        let clocks = Arc::new(PartitionClocks::new(options.partitions));
        let telemetry_clocks = Arc::new(PartitionClocks::new(options.partitions));
        let rocks = RocksEngine::open(
            path,
            RocksOptions {
                block_cache_bytes: options.block_cache_bytes,
                wal: options.wal,
                memtable_budget_bytes: options.memtable_budget_bytes,
            },
            column_families(
                options.retention,
                clocks.clone(),
                telemetry_clocks.clone(),
                options.clock.clone(),
            ),
        )?;
        let engine: Box<dyn KvEngine> = match options.faults {
            Some(faults) => Box::new(FaultyEngine::new(Box::new(rocks), faults)),
            None => Box::new(rocks),
        };
        let store = Store {
            engine,
            partitions: options.partitions,
            partitioner: options.partitioner,
            retention: options.retention,
            clocks,
            telemetry_clocks,
            clock: options.clock,
            changes: OnceLock::new(),
        };
        store.check_layout()?;
        for p in 0..store.partitions {
            // A checkpoint that cannot be read here is reported by the
            // shard that owns it (which then refuses to run); the store
            // itself stays usable for every other partition.
            if let Ok(Some(ms)) = store.load_checkpoint(p).map(|c| c.event_clock_ms) {
                store.clocks.advance(p, ms);
            }
            if let Ok(Some(ms)) = store.load_telemetry_checkpoint(p).map(|c| c.event_clock_ms) {
                store.telemetry_clocks.advance(p, ms);
            }
        }
        Ok(store)
    }

    /// State is laid out by partition and encoded in one format version;
    /// reading it with another partition count or format would misread it,
    /// so refuse.
    fn check_layout(&self) -> Result<()> {
        let partitions_key = keys::setting_key("partitions");
        let format_key = keys::setting_key("format");
        let partitioner_key = keys::setting_key("partitioner");
        let stored_partitions = self.engine.get(CF_META, &partitions_key)?;
        let stored_format = self.engine.get(CF_META, &format_key)?;
        match (stored_partitions, stored_format) {
            (None, _) => {
                let mut batch = WriteBatch::default();
                batch.put(CF_META, &partitions_key, &encode(&self.partitions)?);
                batch.put(CF_META, &format_key, &encode(&FORMAT_VERSION)?);
                batch.put(
                    CF_META,
                    &partitioner_key,
                    self.partitioner.name().as_bytes(),
                );
                self.engine.write(batch, true)?;
            }
            (Some(p), format) => {
                let found: u32 = match format {
                    Some(f) => decode(&f)?,
                    None => 1,
                };
                if found != FORMAT_VERSION {
                    return Err(Error::UnsupportedFormat {
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                let stored: u16 = decode(&p)?;
                if stored != self.partitions {
                    return Err(Error::PartitionMismatch {
                        stored,
                        configured: self.partitions,
                    });
                }
                // Directories from before the setting laid clients out by
                // murmur2, the only partitioner then.
                let stored = match self.engine.get(CF_META, &partitioner_key)? {
                    Some(name) => String::from_utf8_lossy(&name)
                        .parse::<Partitioner>()
                        .map_err(Error::Corrupt)?,
                    None => Partitioner::Murmur2,
                };
                if stored != self.partitioner {
                    return Err(Error::PartitionerMismatch {
                        stored,
                        configured: self.partitioner,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    pub fn partitioner(&self) -> Partitioner {
        self.partitioner
    }

    /// This data directory's identity: made once, at first use, and kept
    /// with the data, so an instance restarted on the same directory is the
    /// same member of its Kafka consumer group (static membership) and a
    /// copy of the directory made before that use is a different one.
    pub fn instance_id(&self) -> Result<String> {
        let key = keys::setting_key("instance_id");
        if let Some(id) = self.engine.get(CF_META, &key)? {
            return String::from_utf8(id)
                .map_err(|e| Error::Corrupt(format!("instance id is not UTF-8: {e}")));
        }
        let id = format!("{:016x}", rand::random::<u64>());
        let mut batch = WriteBatch::default();
        batch.put(CF_META, &key, id.as_bytes());
        self.engine.write(batch, true)?;
        Ok(id)
    }

    /// The partition a client's state lives in.
    pub fn partition_of(&self, client_id: &str) -> u16 {
        self.partitioner.partition(client_id, self.partitions)
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The wall clock the store stamps records with.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    pub fn load_checkpoint(&self, partition: u16) -> Result<Checkpoint> {
        match self.engine.get(CF_META, &keys::checkpoint_key(partition))? {
            Some(v) => decode(&v).map_err(|e| {
                Error::Corrupt(format!(
                    "the checkpoint of partition {partition} cannot be decoded ({e})"
                ))
            }),
            None => Ok(Checkpoint::default()),
        }
    }

    /// Forward scan of `[from, to)` in `cf`, decoding each value.
    pub(crate) fn scan_decoded<T: serde::de::DeserializeOwned>(
        &self,
        cf: &'static str,
        from: Vec<u8>,
        to: Vec<u8>,
    ) -> Result<Vec<(Box<[u8]>, T)>> {
        self.engine
            .scan(cf, Scan::range(from, to))?
            .map(|item| {
                let (key, value) = item?;
                Ok((key, decode(&value)?))
            })
            .collect()
    }

    /// Dedupe claims of a partition with event time at or after
    /// `cutoff_ms`, to rebuild its in-memory index.
    pub fn load_dedupe_claims(
        &self,
        partition: u16,
        cutoff_ms: Option<i64>,
    ) -> Result<Vec<(u128, i64)>> {
        let cutoff = cutoff_ms.unwrap_or(0);
        self.dedupe_claims_in(
            keys::dedupe_segments_from(partition, cutoff),
            keys::dedupe_segments_end(partition),
            cutoff,
        )
    }

    /// The claims at or after `cutoff_ms` of the dedupe segments in
    /// `[from, to)` (request events' or telemetry's).
    pub(crate) fn dedupe_claims_in(
        &self,
        from: Vec<u8>,
        to: Vec<u8>,
        cutoff_ms: i64,
    ) -> Result<Vec<(u128, i64)>> {
        let mut out = Vec::new();
        for (_, claims) in self.scan_decoded::<Vec<(u128, i64)>>(CF_DEDUPE, from, to)? {
            out.extend(claims.into_iter().filter(|&(_, ts)| ts >= cutoff_ms));
        }
        Ok(out)
    }

    /// One bucket (a point read: cheaper than a range when the start is
    /// known), `None` when empty or past retention.
    pub fn read_bucket(
        &self,
        partition: u16,
        client_id: &str,
        granularity: Granularity,
        start_ms: i64,
    ) -> Result<Option<BucketStats>> {
        if self
            .retention
            .bucket_expired(granularity, start_ms, self.clocks.get(partition))
        {
            return Ok(None);
        }
        let key = keys::stats_key(partition, granularity, client_id, start_ms);
        match self.engine.get(CF_STATS, &key)? {
            Some(v) => {
                let stats: BucketStats = decode(&v).map_err(|e| corrupt_bucket(partition, e))?;
                Ok((!stats.is_empty()).then_some(stats))
            }
            None => Ok(None),
        }
    }

    /// Buckets of one client at one granularity with start in `[from, to)`,
    /// ascending, excluding buckets past retention.
    pub fn read_buckets(
        &self,
        partition: u16,
        client_id: &str,
        granularity: Granularity,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, BucketStats)>> {
        if to_ms <= from_ms {
            return Ok(Vec::new());
        }
        let start = keys::stats_key(partition, granularity, client_id, from_ms);
        let end = keys::stats_key(partition, granularity, client_id, to_ms);
        let clock = self.clocks.get(partition);
        let mut out = Vec::new();
        for item in self.engine.scan(CF_STATS, Scan::range(start, end))? {
            let (key, value) = item?;
            let Some(k) = keys::decode_stats_key(&key) else {
                return Err(Error::Corrupt(format!("undecodable stats key {key:?}")));
            };
            if self
                .retention
                .bucket_expired(granularity, k.bucket_start_ms, clock)
            {
                continue;
            }
            let stats: BucketStats = decode(&value).map_err(|e| corrupt_bucket(partition, e))?;
            if !stats.is_empty() {
                out.push((k.bucket_start_ms, stats));
            }
        }
        Ok(out)
    }

    /// Dead letters of a partition, newest first, at most `limit`, starting
    /// below sequence `before` (exclusive; `None` = from the newest).
    pub fn dead_letters(
        &self,
        partition: u16,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>> {
        let from = match before {
            Some(0) => return Ok(Vec::new()),
            Some(seq) => keys::dead_letter_key(partition, seq - 1),
            None => keys::dead_letter_key(partition, u64::MAX),
        };
        let lower = keys::dead_letter_key(partition, 0);
        let mut out = Vec::new();
        for item in self
            .engine
            .scan(CF_DEAD_LETTER, Scan::backward(from, lower))?
            .take(limit)
        {
            let (_, value) = item?;
            out.push(decode(&value)?);
        }
        Ok(out)
    }

    /// Approximate bytes on disk and in memtables, for `/metrics`.
    pub fn size_bytes(&self) -> u64 {
        self.engine.size_bytes()
    }

    /// Makes everything written so far durable (used at the end of a replay
    /// and at shutdown).
    pub fn sync(&self) -> Result<()> {
        self.engine.sync()
    }

    /// Forces a full compaction (retention tests, maintenance).
    pub fn compact(&self) -> Result<()> {
        self.engine.compact()
    }

    pub fn partition_clock(&self, partition: u16) -> Option<i64> {
        self.clocks.get(partition)
    }

    /// Writes raw bytes under a key, bypassing every encoding (repair
    /// tooling, and tests that simulate on-disk corruption).
    pub fn put_raw(&self, cf: &'static str, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(cf, key, value);
        self.engine.write(batch, true)
    }
}

fn corrupt_bucket(partition: u16, e: Error) -> Error {
    Error::Corrupt(format!(
        "a usage bucket of partition {partition} cannot be decoded ({e})"
    ))
}
