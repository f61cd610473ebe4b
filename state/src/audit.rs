//! The audit log: who changed what, and which requests were refused,
//! kept for a configured time. Records are opaque JSON here (their shape
//! belongs to the API); keys order them by time, so a query reads one
//! range and retention deletes one.

use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_META};
use crate::store::Store;
use crate::{Error, Result};

/// One stored record: its position (the cursor of a listing) and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at_ms: i64,
    pub seq: u64,
    pub json: Vec<u8>,
}

/// A record's position: `(time ms, sequence)`.
pub type AuditPosition = (i64, u64);

/// A page of records and where the next one starts (`None`: no more).
pub type AuditPage = (Vec<AuditRecord>, Option<AuditPosition>);

impl Store {
    /// Appends records `(at_ms, seq, json)` in one batch. Not synced: an
    /// audit line of a refused request may be lost in a power cut, never
    /// a control change, whose truth is the synced control log.
    pub fn append_audit(&self, records: &[(i64, u64, Vec<u8>)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (at_ms, seq, json) in records {
            batch.put(CF_META, &keys::audit_key(*at_ms, *seq), json);
        }
        self.engine.write(batch, false)
    }

    /// Records from `before` (exclusive; `None`: the newest) back to
    /// `from_ms` (inclusive), newest first, at most `limit` that `keep`
    /// accepts (at most `scan_limit` read, so a filter that matches
    /// little cannot make one request read the whole log); and whether
    /// the scan stopped early.
    pub fn audit_backward(
        &self,
        before: Option<AuditPosition>,
        from_ms: i64,
        limit: usize,
        scan_limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<AuditPage> {
        let prefix = keys::audit_prefix();
        let start = match before {
            Some((at, seq)) if seq > 0 => keys::audit_key(at, seq - 1),
            Some((at, _)) if at > 0 => keys::audit_key(at - 1, u64::MAX),
            Some(_) => return Ok((vec![], None)),
            None => keys::prefix_end(&prefix),
        };
        let lower = keys::audit_key(from_ms, 0);
        let mut out = Vec::new();
        let mut scanned = 0;
        for item in self.engine.scan(CF_META, Scan::backward(start, lower))? {
            let (key, value) = item?;
            let position = decode_position(&key[prefix.len()..])?;
            scanned += 1;
            if keep(&value) {
                out.push(AuditRecord {
                    at_ms: position.0,
                    seq: position.1,
                    json: value.to_vec(),
                });
                if out.len() == limit {
                    return Ok((out, Some(position)));
                }
            }
            if scanned >= scan_limit {
                return Ok((out, Some(position)));
            }
        }
        Ok((out, None))
    }

    /// Deletes records older than `cutoff_ms`.
    pub fn expire_audit(&self, cutoff_ms: i64) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range(
            CF_META,
            &keys::audit_key(0, 0),
            &keys::audit_key(cutoff_ms, 0),
        );
        self.engine.write(batch, false)
    }
}

fn decode_position(rest: &[u8]) -> Result<AuditPosition> {
    let bad = || Error::Corrupt("an audit key without time and sequence".into());
    let at = rest
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(bad)?;
    let seq = rest
        .get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .ok_or_else(bad)?;
    Ok((u64::from_be_bytes(at) as i64, u64::from_be_bytes(seq)))
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreOptions};

    fn json(n: u64) -> Vec<u8> {
        format!("{{\"n\":{n}}}").into_bytes()
    }

    #[test]
    fn records_page_newest_first_filter_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        // Times 1000..=1009, two records at 1005.
        let mut records: Vec<(i64, u64, Vec<u8>)> =
            (0..10).map(|i| (1000 + i as i64, i, json(i))).collect();
        records.push((1005, 100, json(100)));
        store.append_audit(&records).unwrap();

        let (page, next) = store.audit_backward(None, 0, 3, 1000, |_| true).unwrap();
        let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![9, 8, 7]);
        let (page, _) = store.audit_backward(next, 0, 4, 1000, |_| true).unwrap();
        let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            vec![6, 100, 5, 4],
            "same-time records by sequence, newest first"
        );

        // From 1003 on, odd n only.
        let odd = |v: &[u8]| {
            let text = std::str::from_utf8(v).unwrap();
            let n: u64 = text
                .trim_start_matches("{\"n\":")
                .trim_end_matches('}')
                .parse()
                .unwrap();
            n % 2 == 1
        };
        let (page, next) = store.audit_backward(None, 1003, 100, 1000, odd).unwrap();
        let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![9, 7, 5, 3]);
        assert_eq!(next, None);

        // The scan budget stops a sparse filter early, with a cursor.
        let (page, next) = store.audit_backward(None, 0, 100, 2, |_| false).unwrap();
        assert!(page.is_empty());
        assert_eq!(next, Some((1008, 8)));

        store.expire_audit(1005).unwrap();
        let (page, _) = store.audit_backward(None, 0, 100, 1000, |_| true).unwrap();
        let seqs: Vec<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![9, 8, 7, 6, 100, 5]);
    }
}
