//! Starts the actor system: shard actors under supervisors, spread over a
//! few arbiter threads (each shard's RocksDB writes block only its thread),
//! on a thread of their own so that any tokio runtime (axum's, a CLI's)
//! can talk to them through the router.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use actix::{Arbiter, Supervisor, System};
use tally_state::Store;

use crate::limits::{ShardLimits, SharedLimits};
use crate::router::{ShardEndpoint, ShardRouter};
use crate::shard::{Shard, ShardConfig};
use crate::status::ShardStatus;
use crate::top::{ShardTop, SharedTop};
use crate::Error;

pub struct Engine {
    router: ShardRouter,
    system: System,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts one supervised shard per partition of `store`.
    pub fn start(store: Arc<Store>, config: ShardConfig, threads: usize) -> Result<Engine, Error> {
        let partitions = store.partitions();
        let partitioner = store.partitioner();
        let threads = threads.clamp(1, usize::from(partitions));
        let config = Arc::new(config);
        let capacity = config.mailbox_capacity;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tally-actors".into())
            .spawn(move || {
                let system = actix_rt::System::new();
                system.block_on(async move {
                    let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
                    let shards = (0..partitions)
                        .map(|p| {
                            let status = Arc::new(ShardStatus::default());
                            let limits: SharedLimits =
                                Arc::new(Mutex::new(ShardLimits::new(p, config.limits.clone())));
                            let top: SharedTop =
                                Arc::new(Mutex::new(ShardTop::new(p, config.max_ranked_clients)));
                            let (store, config, q, l, t) = (
                                store.clone(),
                                config.clone(),
                                status.clone(),
                                limits.clone(),
                                top.clone(),
                            );
                            let arbiter = &arbiters[usize::from(p) % threads];
                            let addr = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                                Shard::new(p, store, config, q, l, t.clone())
                            });
                            ShardEndpoint {
                                apply: addr.clone().recipient(),
                                flush: addr.clone().recipient(),
                                control: addr.recipient(),
                                limits,
                                top,
                                status,
                                config_writes: Arc::default(),
                            }
                        })
                        .collect::<Vec<_>>();
                    let _ = tx.send((System::current(), shards));
                });
                if let Err(e) = system.run() {
                    tracing::error!(error = %e, "actor system stopped with an error");
                }
            })
            .map_err(|e| Error::Startup(e.to_string()))?;
        let (system, shards) = rx
            .recv()
            .map_err(|_| Error::Startup("actor system did not start".into()))?;
        // Answer nothing before every shard has loaded its state (or
        // stopped because it cannot): readiness is then true or says why.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !shards.iter().all(|s| s.status.is_loaded()) {
            if std::time::Instant::now() > deadline {
                return Err(Error::Startup(
                    "shards did not load their state within 120 s".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(Engine {
            router: ShardRouter::new(shards, capacity, partitioner),
            system,
            thread: Some(thread),
        })
    }

    pub fn router(&self) -> ShardRouter {
        self.router.clone()
    }

    /// Flushes every shard, then stops the actor system.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let flushed = self.router.flush_all(None).await;
        self.stop();
        flushed
    }

    fn stop(&mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
