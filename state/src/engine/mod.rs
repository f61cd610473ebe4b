//! The narrow boundary between Tally's state logic and the key-value
//! engine under it, the way TiKV's `engine_traits` stands in front of
//! `engine_rocks`: point reads, range scans, atomic write batches,
//! snapshots and maintenance, over named column families.
//!
//! - [`rocks`]: the RocksDB implementation, the only module of Tally that
//!   names RocksDB types.
//! - [`faulty`]: a decorator that injects faults (fail the Nth write,
//!   corrupt a value, fail a read), for tests of the failure paths.
//!
//! Merge operators and compaction filters are described here as plain
//! functions ([`ColumnFamily`]) and installed by the implementation.

pub mod faulty;
pub mod rocks;

use crate::Result;

/// A raw entry read from the engine.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Combines a stored value with merge operands (oldest first); `None`
/// fails the merge.
pub type MergeFn = fn(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: &mut dyn Iterator<Item = &[u8]>,
) -> Option<Vec<u8>>;

/// Whether compaction may drop an entry (`true` = drop).
pub type DropFn = Box<dyn Fn(&[u8], &[u8]) -> bool + Send + Sync>;

/// How a column family is set up.
pub struct ColumnFamily {
    pub name: &'static str,
    /// Point reads dominate: worth a bloom filter.
    pub bloom: bool,
    pub merge: Option<(&'static str, MergeFn)>,
    pub drop_on_compaction: Option<(&'static str, DropFn)>,
}

impl ColumnFamily {
    pub fn plain(name: &'static str) -> Self {
        Self {
            name,
            bloom: false,
            merge: None,
            drop_on_compaction: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Put,
    Merge,
    Delete,
    DeleteRange,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    cf: &'static str,
    /// `key` (or range start) and `value` (or range end) in `buf`.
    key: (usize, usize),
    value: (usize, usize),
}

/// An atomic batch of writes. Keys and values are copied into one buffer
/// (as RocksDB's own batch does), so building a batch costs one copy and
/// no allocation per entry.
#[derive(Debug, Default)]
pub struct WriteBatch {
    buf: Vec<u8>,
    ops: Vec<Op>,
}

/// One write of a batch, as the engine applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp<'a> {
    Put {
        cf: &'static str,
        key: &'a [u8],
        value: &'a [u8],
    },
    Merge {
        cf: &'static str,
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        cf: &'static str,
        key: &'a [u8],
    },
    /// Deletes keys in `[from, to)`.
    DeleteRange {
        cf: &'static str,
        from: &'a [u8],
        to: &'a [u8],
    },
}

impl WriteBatch {
    fn push(&mut self, kind: OpKind, cf: &'static str, key: &[u8], value: &[u8]) {
        let k = self.buf.len();
        self.buf.extend_from_slice(key);
        let v = self.buf.len();
        self.buf.extend_from_slice(value);
        self.ops.push(Op {
            kind,
            cf,
            key: (k, v),
            value: (v, self.buf.len()),
        });
    }

    pub fn put(&mut self, cf: &'static str, key: &[u8], value: &[u8]) {
        self.push(OpKind::Put, cf, key, value);
    }

    pub fn merge(&mut self, cf: &'static str, key: &[u8], value: &[u8]) {
        self.push(OpKind::Merge, cf, key, value);
    }

    pub fn delete(&mut self, cf: &'static str, key: &[u8]) {
        self.push(OpKind::Delete, cf, key, &[]);
    }

    pub fn delete_range(&mut self, cf: &'static str, from: &[u8], to: &[u8]) {
        self.push(OpKind::DeleteRange, cf, from, to);
    }

    /// Entries in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The writes in order.
    pub fn ops(&self) -> impl Iterator<Item = BatchOp<'_>> {
        self.ops.iter().map(|op| {
            let key = &self.buf[op.key.0..op.key.1];
            let value = &self.buf[op.value.0..op.value.1];
            match op.kind {
                OpKind::Put => BatchOp::Put {
                    cf: op.cf,
                    key,
                    value,
                },
                OpKind::Merge => BatchOp::Merge {
                    cf: op.cf,
                    key,
                    value,
                },
                OpKind::Delete => BatchOp::Delete { cf: op.cf, key },
                OpKind::DeleteRange => BatchOp::DeleteRange {
                    cf: op.cf,
                    from: key,
                    to: value,
                },
            }
        })
    }
}

/// A range scan: forward from `from` up to (excluding) `to`, or with
/// `reverse`, backward from `from` (inclusive) down to `lower`.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub from: Vec<u8>,
    /// Exclusive upper bound (forward scans).
    pub to: Option<Vec<u8>>,
    /// Inclusive lower bound (reverse scans).
    pub lower: Option<Vec<u8>>,
    pub reverse: bool,
}

impl Scan {
    /// Keys in `[from, to)`, ascending.
    pub fn range(from: Vec<u8>, to: Vec<u8>) -> Self {
        Self {
            from,
            to: Some(to),
            ..Self::default()
        }
    }

    /// Keys from `from` down to `lower` (both inclusive), descending.
    pub fn backward(from: Vec<u8>, lower: Vec<u8>) -> Self {
        Self {
            from,
            lower: Some(lower),
            reverse: true,
            ..Self::default()
        }
    }
}

pub type ScanIter<'a> = Box<dyn Iterator<Item = Result<KeyValue>> + 'a>;

/// A consistent, read-only view.
pub trait EngineSnapshot {
    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    fn scan(&self, cf: &'static str, scan: Scan) -> Result<ScanIter<'_>>;
}

/// What the state logic needs of a key-value engine.
pub trait KvEngine: Send + Sync {
    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Point reads of many keys of one column family at once.
    fn multi_get(&self, cf: &'static str, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>>;

    /// Applies the batch atomically. `sync` makes it durable against power
    /// loss (when the engine keeps a write-ahead log at all).
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;

    fn scan(&self, cf: &'static str, scan: Scan) -> Result<ScanIter<'_>>;

    fn snapshot(&self) -> Box<dyn EngineSnapshot + '_>;

    /// Makes everything written so far durable.
    fn sync(&self) -> Result<()>;

    /// Full compaction (retention tests, maintenance).
    fn compact(&self) -> Result<()>;

    /// Approximate bytes on disk and in memory.
    fn size_bytes(&self) -> u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_hands_back_its_writes_in_order() {
        let mut b = WriteBatch::default();
        b.put("a", b"k1", b"v1");
        b.merge("b", b"k2", b"v2");
        b.delete("a", b"k3");
        b.delete_range("c", b"x", b"y");
        assert_eq!(b.len(), 4);
        assert_eq!(b.size_in_bytes(), 12);
        let ops: Vec<BatchOp> = b.ops().collect();
        assert_eq!(
            ops,
            vec![
                BatchOp::Put {
                    cf: "a",
                    key: b"k1",
                    value: b"v1"
                },
                BatchOp::Merge {
                    cf: "b",
                    key: b"k2",
                    value: b"v2"
                },
                BatchOp::Delete {
                    cf: "a",
                    key: b"k3"
                },
                BatchOp::DeleteRange {
                    cf: "c",
                    from: b"x",
                    to: b"y"
                },
            ]
        );
    }
}
