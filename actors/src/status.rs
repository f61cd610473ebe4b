//! What a shard shares with the rest of the instance: its mailbox depth
//! (for admission and metrics) and its health (for readiness).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

/// Consecutive failed flushes after which the instance reports not ready.
pub const FAILURES_BEFORE_NOT_READY: u32 = 3;

#[derive(Debug, Default)]
pub struct ShardStatus {
    /// Batches sent to the shard and not yet handled.
    pub queued: AtomicUsize,
    /// Signalled each time the shard takes a batch from its mailbox.
    room: Notify,
    restarts: AtomicU64,
    consecutive_failures: AtomicU32,
    // A std mutex: touched only on failure and by health checks, never
    // across an await.
    last_error: Mutex<Option<String>>,
}

/// A point-in-time view of a shard's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHealth {
    pub queued: usize,
    pub restarts: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl ShardHealth {
    /// Whether the shard is tripped: flushes keep failing across restarts.
    pub fn tripped(&self) -> bool {
        self.consecutive_failures >= FAILURES_BEFORE_NOT_READY
    }
}

impl ShardStatus {
    /// The shard took a batch: one more slot in its mailbox.
    pub fn batch_taken(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.room.notify_waiters();
    }

    /// Waits until fewer than `capacity` batches are queued. (Concurrent
    /// senders may overshoot by one batch each; the bound stays finite.)
    pub async fn wait_for_room(&self, capacity: usize) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued.load(Ordering::Relaxed) < capacity {
                return;
            }
            notified.await;
        }
    }

    pub fn flush_failed(&self, error: &str) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
    }

    pub fn flush_succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ShardHealth {
        ShardHealth {
            queued: self.queued.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|l| l.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_consecutive_failures_and_recovers_on_success() {
        let s = ShardStatus::default();
        for _ in 0..FAILURES_BEFORE_NOT_READY - 1 {
            s.flush_failed("disk full");
        }
        assert!(!s.snapshot().tripped());
        s.flush_failed("disk full");
        let h = s.snapshot();
        assert!(h.tripped());
        assert_eq!(h.last_error.as_deref(), Some("disk full"));
        s.flush_succeeded();
        assert!(!s.snapshot().tripped());
    }
}
