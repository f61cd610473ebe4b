//! What a shard shares with the rest of the instance: its mailbox depth
//! (for admission and metrics) and its health (for readiness).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
    /// Why the shard stopped for good (its state cannot be read); set by
    /// the shard, or by a reader that found its stored state corrupt.
    fatal: Mutex<Option<String>>,
    /// `fatal` is set (checked on every batch without the lock).
    stopped: AtomicBool,
    /// When the last successful flush started (ingest clock, ms): every
    /// change made before it is durable.
    flushed_from_ms: AtomicI64,
    /// The shard has loaded its state once (or failed to, and stopped).
    loaded: AtomicBool,
}

/// A point-in-time view of a shard's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHealth {
    pub queued: usize,
    pub restarts: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Set when the shard stopped because its state cannot be read.
    pub fatal: Option<String>,
    /// Every change made before this time (ms) is durable.
    pub durable_before_ms: Option<i64>,
}

impl ShardHealth {
    /// Whether the shard is tripped: flushes keep failing across restarts,
    /// or it stopped because its state cannot be read.
    pub fn tripped(&self) -> bool {
        self.consecutive_failures >= FAILURES_BEFORE_NOT_READY || self.fatal.is_some()
    }

    /// Why the shard is tripped, for readiness.
    pub fn reason(&self) -> Option<String> {
        if let Some(f) = &self.fatal {
            return Some(f.clone());
        }
        self.tripped().then(|| {
            format!(
                "{} consecutive flush failures, last: {}",
                self.consecutive_failures,
                self.last_error.as_deref().unwrap_or("unknown")
            )
        })
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

    /// A flush that started at `started_ms` committed.
    pub fn flush_succeeded(&self, started_ms: i64) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.flushed_from_ms
            .fetch_max(started_ms, Ordering::Relaxed);
    }

    /// The shard has tried to load its state (it runs, or it stopped).
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// The shard stopped because its state cannot be read.
    pub fn set_fatal(&self, reason: &str) {
        if let Ok(mut f) = self.fatal.lock() {
            if f.is_none() {
                *f = Some(reason.to_string());
            }
        }
        self.stopped.store(true, Ordering::SeqCst);
    }

    pub fn clear_fatal(&self) {
        if let Ok(mut f) = self.fatal.lock() {
            *f = None;
        }
        self.stopped.store(false, Ordering::SeqCst);
    }

    /// Why the shard is stopped, if it is.
    pub fn stopped(&self) -> Option<String> {
        if !self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        self.fatal
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .or_else(|| Some("stopped".into()))
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
            fatal: self.fatal.lock().ok().and_then(|f| f.clone()),
            durable_before_ms: match self.flushed_from_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(ms),
            },
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
        s.flush_succeeded(5);
        assert!(!s.snapshot().tripped());
        assert_eq!(s.snapshot().durable_before_ms, Some(5));
    }
}
