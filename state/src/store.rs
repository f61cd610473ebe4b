//! The RocksDB store. This module and [`crate::snapshot`] are the only ones
//! that touch RocksDB types; everything above talks to [`Store`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, MergeOperands, Options, ReadOptions, DB,
};
use serde::{Deserialize, Serialize};
use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::time::Granularity;

use crate::codec::{decode, encode};
use crate::keys::{
    self, CF_ALERTS, CF_ANOMALIES, CF_DEAD_LETTER, CF_DEDUPE, CF_LIMITS, CF_META, CF_STATS,
};
use crate::retention::{wall_clock_ms, PartitionClocks, Retention};
use crate::snapshot::ChangeTracker;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub partitions: u16,
    pub retention: Retention,
    pub block_cache_bytes: usize,
    /// Write-ahead log. Without it (bulk replays), commits live in
    /// memtables until RocksDB flushes them, and flushes are atomic across
    /// column families, so a crash loses a suffix of commits, never part
    /// of one: state and source positions stay consistent, and the replay
    /// resumes from the positions that survived.
    pub wal: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            partitions: 12,
            retention: Retention::default(),
            block_cache_bytes: 64 << 20,
            wal: true,
        }
    }
}

/// What a partition has durably applied: written in the same batch as the
/// state it describes, read back on (re)start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Highest accepted event time (the watermark is this minus lateness).
    pub max_event_ms: Option<i64>,
    /// Next dead-letter sequence number.
    pub dead_letter_seq: u64,
    /// Last applied position per positioned source (file replays, later
    /// Kafka topics).
    pub positions: BTreeMap<String, u64>,
    /// Next dedupe segment sequence number.
    pub dedupe_seq: u64,
    /// Dedupe segments with newest claim before this are deleted.
    pub dedupe_deleted_below_ms: i64,
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
    pub(crate) db: DB,
    partitions: u16,
    retention: Retention,
    pub(crate) clocks: Arc<PartitionClocks>,
    pub(crate) wal: bool,
    /// Set in Kafka mode: which keys changed since the last changelog round.
    pub(crate) changes: OnceLock<ChangeTracker>,
}

pub(crate) fn rocks(e: rocksdb::Error) -> Error {
    Error::Storage(e.into_string())
}

/// The `stats` CF holds buckets and period totals; each merges its own way.
fn merge_stats(key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    if keys::is_period_totals_key(key) {
        crate::top::merge_period_totals(key, existing, operands)
    } else {
        merge_buckets(key, existing, operands)
    }
}

/// Merges stored bucket stats with deltas. A value that fails to decode is
/// logged and skipped instead of failing every read of the key.
fn merge_buckets(key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut acc = match existing.map(decode::<BucketStats>) {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            tracing::error!(error = %e, key = ?key, "dropping undecodable stored bucket");
            BucketStats::default()
        }
        None => BucketStats::default(),
    };
    for op in operands.iter() {
        match decode::<BucketStats>(op) {
            Ok(delta) => acc.merge(&delta),
            Err(e) => tracing::error!(error = %e, key = ?key, "dropping undecodable bucket delta"),
        }
    }
    encode(&acc).ok()
}

impl Store {
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store> {
        if options.partitions == 0 || options.partitions == u16::MAX {
            return Err(Error::InvalidOptions(format!(
                "partitions must be within 1..{}",
                u16::MAX
            )));
        }
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Storage(format!("create {}: {e}", path.display())))?;
        let clocks = Arc::new(PartitionClocks::new(options.partitions));
        let retention = options.retention;
        let cache = Cache::new_lru_cache(options.block_cache_bytes);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        // One commit spans column families (stats, dedupe, positions); a
        // flush must never persist some of them without the others.
        db_opts.set_atomic_flush(true);

        let table = |bloom: bool| {
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            if bloom {
                t.set_bloom_filter(10.0, false);
            }
            t
        };
        let base = |bloom: bool| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table(bloom));
            // Fresh (L0/L1) files are rewritten soon by compaction; compress
            // only the levels data settles in, to keep flushes cheap.
            o.set_compression_per_level(&[
                DBCompressionType::None,
                DBCompressionType::None,
                DBCompressionType::Lz4,
                DBCompressionType::Lz4,
                DBCompressionType::Lz4,
                DBCompressionType::Lz4,
                DBCompressionType::Lz4,
            ]);
            // Files that age without compaction are still rewritten, so
            // retention filters run even on idle data.
            o.set_periodic_compaction_seconds(86_400);
            // Bounded memtables: peak memory matters more than write
            // amplification at this size.
            o.set_write_buffer_size(32 << 20);
            o.set_max_write_buffer_number(2);
            o
        };

        let mut stats = base(true);
        stats.set_merge_operator_associative("tally.bucket_stats.v1", merge_stats);
        let stats_clocks = clocks.clone();
        stats.set_compaction_filter(
            "tally.stats_retention",
            move |_level: u32, key: &[u8], _value: &[u8]| {
                let expired = match keys::decode_stats_key(key) {
                    Some(k) => retention.bucket_expired(
                        k.granularity,
                        k.bucket_start_ms,
                        stats_clocks.get(k.partition),
                    ),
                    None => keys::decode_period_totals_key(key).is_some_and(|k| {
                        retention.period_expired(
                            k.period,
                            k.period_start_ms,
                            stats_clocks.get(k.partition),
                        )
                    }),
                };
                if expired {
                    Decision::Remove
                } else {
                    Decision::Keep
                }
            },
        );

        let dedupe = base(false);

        let mut dead = base(false);
        dead.set_compaction_filter(
            "tally.dead_letter_retention",
            move |_level: u32, _key: &[u8], value: &[u8]| match decode::<DeadLetterRecord>(value) {
                Ok(r)
                    if r.recorded_at_ms
                        < wall_clock_ms().saturating_sub(retention.dead_letter_ms) =>
                {
                    Decision::Remove
                }
                _ => Decision::Keep,
            },
        );

        let mut alerts = base(false);
        alerts.set_compaction_filter(
            "tally.alert_retention",
            move |_level: u32, _key: &[u8], value: &[u8]| match decode::<(i64, String)>(value) {
                Ok((logged_at, _))
                    if logged_at < wall_clock_ms().saturating_sub(retention.alerts_ms) =>
                {
                    Decision::Remove
                }
                _ => Decision::Keep,
            },
        );

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_STATS, stats),
            ColumnFamilyDescriptor::new(CF_DEDUPE, dedupe),
            ColumnFamilyDescriptor::new(CF_DEAD_LETTER, dead),
            ColumnFamilyDescriptor::new(CF_META, base(false)),
            ColumnFamilyDescriptor::new(CF_LIMITS, base(true)),
            ColumnFamilyDescriptor::new(CF_ANOMALIES, base(false)),
            ColumnFamilyDescriptor::new(CF_ALERTS, alerts),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(rocks)?;
        let store = Store {
            db,
            partitions: options.partitions,
            retention,
            clocks,
            wal: options.wal,
            changes: OnceLock::new(),
        };
        store.check_partition_count()?;
        for p in 0..store.partitions {
            if let Some(ms) = store.load_checkpoint(p)?.max_event_ms {
                store.clocks.advance(p, ms);
            }
        }
        Ok(store)
    }

    /// State is laid out by partition; reading it with another partition
    /// count would misplace every client, so refuse.
    fn check_partition_count(&self) -> Result<()> {
        let key = keys::setting_key("partitions");
        let meta = self.cf(CF_META)?;
        match self.db.get_cf(meta, &key).map_err(rocks)? {
            Some(v) => {
                let stored: u16 = decode(&v)?;
                if stored != self.partitions {
                    return Err(Error::PartitionMismatch {
                        stored,
                        configured: self.partitions,
                    });
                }
            }
            None => self
                .db
                .put_cf(meta, &key, encode(&self.partitions)?)
                .map_err(rocks)?,
        }
        Ok(())
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Storage(format!("column family {name} missing")))
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    pub fn load_checkpoint(&self, partition: u16) -> Result<Checkpoint> {
        match self
            .db
            .get_cf(self.cf(CF_META)?, keys::checkpoint_key(partition))
            .map_err(rocks)?
        {
            Some(v) => decode(&v),
            None => Ok(Checkpoint::default()),
        }
    }

    /// Dedupe claims of a partition with event time at or after
    /// `cutoff_ms`, to rebuild its in-memory index.
    pub fn load_dedupe_claims(
        &self,
        partition: u16,
        cutoff_ms: Option<i64>,
    ) -> Result<Vec<(u128, i64)>> {
        let cutoff = cutoff_ms.unwrap_or(0);
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::partition_end(partition));
        let start = keys::dedupe_segments_from(partition, cutoff);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_DEDUPE)?,
            read,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (_, value) = item.map_err(rocks)?;
            let claims: Vec<(u128, i64)> = decode(&value)?;
            out.extend(claims.into_iter().filter(|&(_, ts)| ts >= cutoff));
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
        match self.db.get_cf(self.cf(CF_STATS)?, key).map_err(rocks)? {
            Some(v) => {
                let stats: BucketStats = decode(&v)?;
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
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(end);
        let clock = self.clocks.get(partition);
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_STATS)?,
            read,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (key, value) = item.map_err(rocks)?;
            let Some(k) = keys::decode_stats_key(&key) else {
                return Err(Error::Corrupt(format!("undecodable stats key {key:?}")));
            };
            if self
                .retention
                .bucket_expired(granularity, k.bucket_start_ms, clock)
            {
                continue;
            }
            let stats: BucketStats = decode(&value)?;
            if !stats.is_empty() {
                out.push((k.bucket_start_ms, stats));
            }
        }
        Ok(out)
    }

    /// The most recent dead letters of a partition, newest first.
    pub fn dead_letters(&self, partition: u16, limit: usize) -> Result<Vec<DeadLetterRecord>> {
        let start = keys::dead_letter_key(partition, 0);
        let end = keys::dead_letter_key(partition, u64::MAX);
        let mut read = ReadOptions::default();
        read.set_iterate_lower_bound(start);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(
                self.cf(CF_DEAD_LETTER)?,
                read,
                IteratorMode::From(&end, Direction::Reverse),
            )
            .take(limit)
        {
            let (_, value) = item.map_err(rocks)?;
            out.push(decode(&value)?);
        }
        Ok(out)
    }

    /// Approximate bytes on disk and in memtables, for `/metrics`.
    pub fn size_bytes(&self) -> u64 {
        let mut total = 0;
        for name in keys::ALL_CFS {
            if let Ok(cf) = self.cf(name) {
                for prop in [
                    "rocksdb.total-sst-files-size",
                    "rocksdb.size-all-mem-tables",
                ] {
                    total += self
                        .db
                        .property_int_value_cf(cf, prop)
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                }
            }
        }
        total
    }

    /// Makes everything written so far durable (used at the end of a replay
    /// and at shutdown).
    pub fn sync(&self) -> Result<()> {
        if self.wal {
            return self.db.flush_wal(true).map_err(rocks);
        }
        let cfs = keys::ALL_CFS
            .iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>>>()?;
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &opts).map_err(rocks)
    }

    /// Forces a full compaction (retention tests, maintenance).
    pub fn compact(&self) -> Result<()> {
        for name in keys::ALL_CFS {
            self.db
                .compact_range_cf(self.cf(name)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    pub fn partition_clock(&self, partition: u16) -> Option<i64> {
        self.clocks.get(partition)
    }
}
