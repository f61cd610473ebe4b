//! Which clients a partition holds usage of, in key order, one at a time:
//! what an export over every client walks, resumable after any client
//! without holding the list.

use tally_pipelines::time::Granularity;

use crate::engine::Scan;
use crate::keys::{self, CF_STATS};
use crate::store::Store;
use crate::{Error, Result};

impl Store {
    /// The first client of `partition` after `after` (exclusive; `None`:
    /// from the first) that has day buckets, in key order (by id length,
    /// then bytes). One seek per client: the scan stops at the first key.
    pub fn next_client_with_days(
        &self,
        partition: u16,
        after: Option<&str>,
    ) -> Result<Option<String>> {
        let from = match after {
            // Past every bucket of `after`: its prefix, the greatest
            // bucket start, and one byte more.
            Some(client) => {
                let mut key = keys::stats_key(partition, Granularity::Day, client, i64::MAX);
                key.push(0xFF);
                key
            }
            None => keys::granularity_prefix(partition, Granularity::Day),
        };
        let to = keys::granularity_end(partition, Granularity::Day);
        let mut scan = self.engine.scan(CF_STATS, Scan::range(from, to))?;
        match scan.next() {
            None => Ok(None),
            Some(item) => {
                let (key, _) = item?;
                keys::decode_stats_key(&key)
                    .map(|k| Some(k.client_id))
                    .ok_or_else(|| Error::Corrupt(format!("undecodable stats key {key:?}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreOptions;
    use tally_pipelines::aggregate::BucketStats;

    #[test]
    fn clients_are_walked_once_each_in_key_order_and_resumed_after_any() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
        let partition = 0;
        // Written in no particular order, with several days each, and a
        // client with only hour buckets (not a day client).
        let day = tally_pipelines::time::DAY_MS;
        let mut stats = BucketStats::default();
        let event = tally_pipelines::event::decode_event(
            r#"{"client_id":"c","endpoint":"/x","status":200,"latency_ms":1,"timestamp":0}"#,
            &tally_pipelines::event::ValidationContext::lenient(),
        )
        .expect("event");
        stats.record(&event, 1);
        for (client, days) in [("b", 3), ("aa", 1), ("a", 2), ("a,\"x", 1), ("c", 4)] {
            for d in 0..days {
                let key = keys::stats_key(partition, Granularity::Day, client, d * day);
                store
                    .put_raw(
                        CF_STATS,
                        &key,
                        &crate::codec::encode(&stats).expect("encode"),
                    )
                    .expect("put");
            }
        }
        let hour = keys::stats_key(partition, Granularity::Hour, "only-hours", 0);
        store
            .put_raw(
                CF_STATS,
                &hour,
                &crate::codec::encode(&stats).expect("encode"),
            )
            .expect("put");
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        while let Some(next) = store
            .next_client_with_days(partition, after.as_deref())
            .expect("next")
        {
            seen.push(next.clone());
            after = Some(next);
        }
        // By length, then bytes.
        assert_eq!(seen, ["a", "b", "c", "aa", "a,\"x"]);
        assert_eq!(
            store
                .next_client_with_days(partition, Some("c"))
                .expect("next"),
            Some("aa".to_string())
        );
        // A cursor naming a client that is not stored resumes after its place.
        assert_eq!(
            store
                .next_client_with_days(partition, Some("ab"))
                .expect("next"),
            Some("a,\"x".to_string())
        );
        assert_eq!(store.next_client_with_days(1, None).expect("next"), None);
    }
}
