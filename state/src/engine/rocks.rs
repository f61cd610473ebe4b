//! [`KvEngine`] on RocksDB: the only module of Tally that names RocksDB
//! types. Column families come from the caller's [`ColumnFamily`]
//! descriptions (merge operators and compaction filters included).

use std::path::Path;

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, ReadOptions, WriteOptions, DB,
};

use super::{BatchOp, ColumnFamily, EngineSnapshot, KvEngine, Scan, ScanIter, WriteBatch};
use crate::{Error, Result};

/// Merge operands one key may gather in a memtable before a write folds
/// them (see `set_max_successive_merges`).
const MAX_SUCCESSIVE_MERGES: usize = 32;

pub(crate) fn rocks(e: rocksdb::Error) -> Error {
    Error::Storage(e.into_string())
}

/// How the database is tuned.
#[derive(Debug, Clone, Copy)]
pub struct RocksOptions {
    pub block_cache_bytes: usize,
    /// Write-ahead log. Without it (bulk replays), commits live in
    /// memtables until RocksDB flushes them, and flushes are atomic across
    /// column families, so a crash loses a suffix of commits, never part
    /// of one.
    pub wal: bool,
    /// All memtables together stay within this (each column family may
    /// otherwise hold two 32 MiB memtables): RocksDB flushes the largest
    /// when the total reaches it.
    pub memtable_budget_bytes: usize,
}

pub struct RocksEngine {
    db: DB,
    names: Vec<&'static str>,
    wal: bool,
}

impl RocksEngine {
    pub fn open(path: &Path, options: RocksOptions, families: Vec<ColumnFamily>) -> Result<Self> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Storage(format!("create {}: {e}", path.display())))?;
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
        let memtables = rocksdb::WriteBufferManager::new_write_buffer_manager(
            options.memtable_budget_bytes,
            false,
        );
        db_opts.set_write_buffer_manager(&memtables);

        let names: Vec<&'static str> = families.iter().map(|f| f.name).collect();
        let descriptors = families
            .into_iter()
            .map(|family| {
                let mut table = BlockBasedOptions::default();
                table.set_block_cache(&cache);
                if family.bloom {
                    table.set_bloom_filter(10.0, false);
                }
                let mut o = Options::default();
                o.set_block_based_table_factory(&table);
                // Fresh (L0/L1) files are rewritten soon by compaction;
                // compress only the levels data settles in, to keep flushes
                // cheap.
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
                if let Some((name, merge)) = family.merge {
                    // A bucket merged into on every flush (a day bucket:
                    // each minute) would otherwise pile up its operands in
                    // the memtable, and every read would fold them all
                    // (1,440 a day). Past this many, the next write folds
                    // them into one value.
                    o.set_max_successive_merges(MAX_SUCCESSIVE_MERGES);
                    o.set_merge_operator_associative(
                        name,
                        move |key: &[u8], existing: Option<&[u8]>, ops: &rocksdb::MergeOperands| {
                            merge(key, existing, &mut ops.iter())
                        },
                    );
                }
                if let Some((name, drop)) = family.drop_on_compaction {
                    o.set_compaction_filter(name, move |_level: u32, key: &[u8], value: &[u8]| {
                        if drop(key, value) {
                            Decision::Remove
                        } else {
                            Decision::Keep
                        }
                    });
                }
                ColumnFamilyDescriptor::new(family.name, o)
            })
            .collect::<Vec<_>>();
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(rocks)?;
        Ok(RocksEngine {
            db,
            names,
            wal: options.wal,
        })
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::Storage(format!("column family {name} missing")))
    }
}

struct RocksSnapshot<'a> {
    engine: &'a RocksEngine,
    snapshot: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl EngineSnapshot for RocksSnapshot<'_> {
    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = self.engine.cf(cf)?;
        match point_read() {
            Some(read) => self.snapshot.get_cf_opt(handle, key, read),
            None => self.snapshot.get_cf(handle, key),
        }
        .map_err(rocks)
    }

    fn scan(&self, cf: &'static str, scan: Scan) -> Result<ScanIter<'_>> {
        let (read, mode) = read_options(&scan);
        let iter = self
            .snapshot
            .iterator_cf_opt(self.engine.cf(cf)?, read, mode(&scan.from));
        Ok(Box::new(iter.map(|item| item.map_err(rocks))))
    }
}

type ModeOf = for<'k> fn(&'k [u8]) -> IteratorMode<'k>;

thread_local! {
    /// Set while this thread reads in bulk ([`bulk_reads`]).
    static BULK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `read` with this thread's reads kept out of the block cache: a
/// read of everything once (an export over every client) would otherwise
/// grow the cache to its cap and push out what checks and queries keep
/// hot.
pub fn bulk_reads<T>(read: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BULK.with(|b| b.set(self.0));
        }
    }
    let _reset = Reset(BULK.with(|b| b.replace(true)));
    read()
}

fn point_read() -> Option<ReadOptions> {
    BULK.with(|b| b.get()).then(|| {
        let mut read = ReadOptions::default();
        read.fill_cache(false);
        read
    })
}

/// Bounds and direction of a scan.
fn read_options(scan: &Scan) -> (ReadOptions, ModeOf) {
    let mut read = ReadOptions::default();
    read.fill_cache(!BULK.with(|b| b.get()));
    if let Some(to) = &scan.to {
        read.set_iterate_upper_bound(to.clone());
    }
    if let Some(lower) = &scan.lower {
        read.set_iterate_lower_bound(lower.clone());
    }
    let mode: ModeOf = if scan.reverse {
        |from| IteratorMode::From(from, Direction::Reverse)
    } else {
        |from| IteratorMode::From(from, Direction::Forward)
    };
    (read, mode)
}

impl KvEngine for RocksEngine {
    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let handle = self.cf(cf)?;
        match point_read() {
            Some(read) => self.db.get_cf_opt(handle, key, &read),
            None => self.db.get_cf(handle, key),
        }
        .map_err(rocks)
    }

    fn multi_get(&self, cf: &'static str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let handle = self.cf(cf)?;
        self.db
            .multi_get_cf(keys.iter().map(|k| (handle, k.as_slice())))
            .into_iter()
            .map(|r| r.map_err(rocks))
            .collect()
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut rb = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                BatchOp::Put { cf, key, value } => rb.put_cf(self.cf(cf)?, key, value),
                BatchOp::Merge { cf, key, value } => rb.merge_cf(self.cf(cf)?, key, value),
                BatchOp::Delete { cf, key } => rb.delete_cf(self.cf(cf)?, key),
                BatchOp::DeleteRange { cf, from, to } => rb.delete_range_cf(self.cf(cf)?, from, to),
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync && self.wal);
        opts.disable_wal(!self.wal);
        self.db.write_opt(rb, &opts).map_err(rocks)
    }

    fn scan(&self, cf: &'static str, scan: Scan) -> Result<ScanIter<'_>> {
        let (read, mode) = read_options(&scan);
        let iter = self
            .db
            .iterator_cf_opt(self.cf(cf)?, read, mode(&scan.from));
        Ok(Box::new(iter.map(|item| item.map_err(rocks))))
    }

    fn snapshot(&self) -> Box<dyn EngineSnapshot + '_> {
        Box::new(RocksSnapshot {
            engine: self,
            snapshot: self.db.snapshot(),
        })
    }

    fn sync(&self) -> Result<()> {
        if self.wal {
            return self.db.flush_wal(true).map_err(rocks);
        }
        let cfs = self
            .names
            .iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>>>()?;
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &opts).map_err(rocks)
    }

    fn compact(&self) -> Result<()> {
        for name in &self.names {
            self.db
                .compact_range_cf(self.cf(name)?, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let mut total = 0;
        for name in &self.names {
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
}
