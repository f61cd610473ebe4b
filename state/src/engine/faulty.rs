//! A [`KvEngine`] decorator that injects faults into a real engine, so the
//! failure paths (a flush that cannot write, a value that cannot be
//! decoded, a checkpoint that cannot be read) are tested against RocksDB
//! on disk rather than a stand-in. Tests hold the [`Faults`] handle and arm
//! it while the engine runs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{EngineSnapshot, KvEngine, Scan, ScanIter, WriteBatch};
use crate::{Error, Result};

/// What to break. Shared between the engine and the test.
#[derive(Debug, Default)]
pub struct Faults {
    writes: AtomicU64,
    /// 1-based numbers of the writes (batches) that fail.
    failing_writes: Mutex<BTreeSet<u64>>,
    /// Every write from this number on fails (0 = off).
    fail_from: AtomicU64,
    /// Reads of keys with these `(cf, prefix)` fail.
    failing_reads: Mutex<Vec<(&'static str, Vec<u8>)>>,
    /// Reads of these exact `(cf, key)` return undecodable bytes.
    corrupt: Mutex<Vec<(&'static str, Vec<u8>)>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a corrupted value reads as: an unknown value version and noise.
pub const CORRUPT_BYTES: &[u8] = b"\xEE\x00corrupt";

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::default()
    }

    /// Writes made so far (failed ones included).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// The `n`-th write from now (1 = the next one) fails.
    pub fn fail_write_in(&self, n: u64) {
        let at = self.writes() + n;
        guard(&self.failing_writes).insert(at);
    }

    /// Every write from the next one on fails, until [`Faults::heal`].
    pub fn fail_all_writes(&self) {
        self.fail_from.store(self.writes() + 1, Ordering::SeqCst);
    }

    /// Reads of keys starting with `prefix` in `cf` fail.
    pub fn fail_reads(&self, cf: &'static str, prefix: Vec<u8>) {
        guard(&self.failing_reads).push((cf, prefix));
    }

    /// Reads of `key` in `cf` return [`CORRUPT_BYTES`].
    pub fn corrupt(&self, cf: &'static str, key: Vec<u8>) {
        guard(&self.corrupt).push((cf, key));
    }

    /// Stops every fault.
    pub fn heal(&self) {
        guard(&self.failing_writes).clear();
        self.fail_from.store(0, Ordering::SeqCst);
        guard(&self.failing_reads).clear();
        guard(&self.corrupt).clear();
    }

    fn write_fails(&self) -> Option<u64> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.fail_from.load(Ordering::SeqCst);
        let listed = guard(&self.failing_writes).remove(&n);
        (listed || (from != 0 && n >= from)).then_some(n)
    }

    fn read(
        &self,
        cf: &'static str,
        key: &[u8],
        value: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        if guard(&self.failing_reads)
            .iter()
            .any(|(c, p)| *c == cf && key.starts_with(p))
        {
            return Err(Error::Storage(format!("injected read failure in {cf}")));
        }
        if value.is_some()
            && guard(&self.corrupt)
                .iter()
                .any(|(c, k)| *c == cf && k == key)
        {
            return Ok(Some(CORRUPT_BYTES.to_vec()));
        }
        Ok(value)
    }
}

pub struct FaultyEngine {
    inner: Box<dyn KvEngine>,
    faults: Arc<Faults>,
}

impl FaultyEngine {
    pub fn new(inner: Box<dyn KvEngine>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }
}

struct FaultySnapshot<'a> {
    inner: Box<dyn EngineSnapshot + 'a>,
    faults: &'a Faults,
}

impl EngineSnapshot for FaultySnapshot<'_> {
    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let value = self.inner.get(cf, key)?;
        self.faults.read(cf, key, value)
    }

    fn scan(&self, cf: &'static str, scan: Scan) -> Result<ScanIter<'_>> {
        faulty_scan(self.inner.scan(cf, scan)?, cf, self.faults)
    }
}

/// A scan whose values pass through the injected read faults.
fn faulty_scan<'a>(
    inner: ScanIter<'a>,
    cf: &'static str,
    faults: &'a Faults,
) -> Result<ScanIter<'a>> {
    Ok(Box::new(inner.map(move |item| {
        let (key, value) = item?;
        match faults.read(cf, &key, Some(value.into_vec()))? {
            Some(v) => Ok((key, v.into_boxed_slice())),
            None => Err(Error::Storage("injected fault lost a scanned value".into())),
        }
    })))
}

impl KvEngine for FaultyEngine {
    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let value = self.inner.get(cf, key)?;
        self.faults.read(cf, key, value)
    }

    fn multi_get(&self, cf: &'static str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let values = self.inner.multi_get(cf, keys)?;
        keys.iter()
            .zip(values)
            .map(|(k, v)| self.faults.read(cf, k, v))
            .collect()
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        if let Some(n) = self.faults.write_fails() {
            return Err(Error::Storage(format!("injected failure of write {n}")));
        }
        self.inner.write(batch, sync)
    }

    fn scan(&self, cf: &'static str, scan: Scan) -> Result<ScanIter<'_>> {
        faulty_scan(self.inner.scan(cf, scan)?, cf, &self.faults)
    }

    fn snapshot(&self) -> Box<dyn EngineSnapshot + '_> {
        Box::new(FaultySnapshot {
            inner: self.inner.snapshot(),
            faults: &self.faults,
        })
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn compact(&self) -> Result<()> {
        self.inner.compact()
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rocks::{RocksEngine, RocksOptions};
    use crate::engine::ColumnFamily;

    fn engine(dir: &std::path::Path, faults: Arc<Faults>) -> FaultyEngine {
        let rocks = RocksEngine::open(
            dir,
            RocksOptions {
                block_cache_bytes: 1 << 20,
                wal: true,
                memtable_budget_bytes: 8 << 20,
            },
            vec![ColumnFamily::plain("a")],
        )
        .unwrap();
        FaultyEngine::new(Box::new(rocks), faults)
    }

    fn put(e: &FaultyEngine, key: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put("a", key, b"\x01v");
        e.write(b, false)
    }

    #[test]
    fn the_nth_write_fails_once_and_later_writes_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let e = engine(dir.path(), faults.clone());
        put(&e, b"k1").unwrap();
        faults.fail_write_in(2);
        put(&e, b"k2").unwrap();
        assert!(put(&e, b"k3").is_err());
        put(&e, b"k4").unwrap();
        assert_eq!(
            e.get("a", b"k3").unwrap(),
            None,
            "a failed write wrote nothing"
        );
        assert!(e.get("a", b"k4").unwrap().is_some());
        faults.fail_all_writes();
        assert!(put(&e, b"k5").is_err());
        faults.heal();
        put(&e, b"k5").unwrap();
    }

    #[test]
    fn reads_fail_or_return_corrupt_bytes_where_armed() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let e = engine(dir.path(), faults.clone());
        put(&e, b"p1").unwrap();
        put(&e, b"q1").unwrap();
        faults.corrupt("a", b"q1".to_vec());
        faults.fail_reads("a", b"p".to_vec());
        assert!(e.get("a", b"p1").is_err());
        assert_eq!(e.get("a", b"q1").unwrap().as_deref(), Some(CORRUPT_BYTES));
        assert!(e.snapshot().get("a", b"p1").is_err());
        let scanned: Vec<_> = e
            .scan("a", Scan::range(b"q".to_vec(), b"r".to_vec()))
            .unwrap()
            .collect();
        assert_eq!(scanned.len(), 1);
        assert_eq!(&*scanned[0].as_ref().unwrap().1, CORRUPT_BYTES);
    }
}
