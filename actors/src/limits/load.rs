//! Reading what a check needs from the store, without the shard's lock.

use std::sync::Arc;

use tally_pipelines::quota::QuotaConfig;
use tally_state::Store;

use super::quota::{quota_usage, PeriodUsage};
use super::Client;
use crate::Error;

/// What a request needs read before it can be served from memory.
#[derive(Debug, Clone)]
pub struct Needs {
    pub client: String,
    /// The client's limit configuration and limiter state.
    pub limiter: bool,
    /// The client's usage in its quota period at this time.
    pub quota_usage: Option<(QuotaConfig, i64)>,
}

/// What [`load`] read.
#[derive(Debug)]
pub struct Loaded {
    pub(super) name: String,
    pub(super) client: Option<Client>,
    pub(super) quota_usage: Option<PeriodUsage>,
}

/// Reads what `needs` lists (store I/O: call it off the async workers and
/// without holding the shard's lock).
pub fn load(store: &Store, partition: u16, needs: &Needs) -> Result<Loaded, Error> {
    let client = if needs.limiter {
        Some(Client {
            config: store.limit_config(partition, &needs.client)?.map(Arc::new),
            limiter: store.limiter(partition, &needs.client)?.unwrap_or_default(),
        })
    } else {
        None
    };
    let quota_usage = match &needs.quota_usage {
        Some((config, now_ms)) => Some(quota_usage(
            store,
            partition,
            &needs.client,
            config,
            *now_ms,
        )?),
        None => None,
    };
    Ok(Loaded {
        name: needs.client.clone(),
        client,
        quota_usage,
    })
}
