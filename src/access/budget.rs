//! Per-key request budgets: a key with a `rate_limit` spends one unit per
//! request, from its own budget and from every key above it that has one,
//! so that children share their parent's and minting keys cannot bypass
//! a limit. The budgets are Tally's own limiters (the same algorithms as
//! clients' limits), kept in memory by this instance.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tally_pipelines::access::{KeyRateLimit, KeyRing, Principal};
use tally_pipelines::limit::LimiterState;

#[derive(Default)]
pub struct KeyBudgets {
    by_key: Mutex<HashMap<String, LimiterState>>,
}

impl KeyBudgets {
    /// Takes one request from the budget of the key and of every key
    /// above it that has one, or nothing when any of them is spent:
    /// answers the wait in ms then.
    pub fn charge(&self, ring: &KeyRing, principal: &Principal, now_ms: i64) -> Result<(), i64> {
        let limits: Vec<(String, KeyRateLimit)> = principal
            .chain
            .iter()
            .filter_map(|id| ring.get(id))
            .filter_map(|k| k.spec.rate_limit.map(|r| (k.key_id.clone(), r)))
            .collect();
        if limits.is_empty() {
            return Ok(());
        }
        let mut budgets = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        // Peek at all first: a request refused by one level takes nothing
        // from the others.
        let mut wait = 0;
        for (id, r) in &limits {
            let limit = r.limit();
            let state = budgets
                .entry(id.clone())
                .or_insert_with(|| LimiterState::new(r.algorithm, &limit, now_ms));
            if state.algorithm() != r.algorithm {
                *state = LimiterState::new(r.algorithm, &limit, now_ms);
            }
            let d = state.peek(&limit, now_ms, 1);
            if !d.allowed {
                wait = wait.max(d.retry_after_ms.max(1));
            }
        }
        if wait > 0 {
            return Err(wait);
        }
        for (id, r) in &limits {
            if let Some(state) = budgets.get_mut(id) {
                state.check(&r.limit(), now_ms, 1);
            }
        }
        Ok(())
    }

    /// A revoked key's budget is of no more use.
    pub fn forget(&self, key_id: &str) {
        self.by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key_id);
    }
}
