//! Kafka moving a partition: the shard lets it go (flushed, memory
//! dropped) or takes it (reloaded from the store, which a restore from the
//! changelog may have rewritten), and resumes a source after a restart.

use actix::{Context, Handler};
use tally_pipelines::dedupe::DedupeIndex;
use tally_pipelines::ingest::PartitionIngest;

use super::points::ShardPoints;
use super::Shard;
use crate::limits::lock;
use crate::messages::PartitionControl;
use crate::top::lock_top;
use crate::Error;

impl Handler<PartitionControl> for Shard {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: PartitionControl, ctx: &mut Context<Self>) -> Self::Result {
        match msg {
            PartitionControl::Release => {
                if self.failed().is_none() {
                    self.flush(ctx)?;
                }
                // Another instance owns the partition now: keep no memory
                // for it. The store keeps the flushed state, which is what
                // the changelog publishes before the revocation completes.
                self.ingest = PartitionIngest::new(
                    self.config.rules,
                    self.config.weights.clone(),
                    None,
                    DedupeIndex::new(1),
                );
                self.positions.clear();
                lock(&self.limits).clear();
                self.detectors.clear();
                lock_top(&self.top).clear();
                self.points = ShardPoints::empty(&self.config);
                self.released = true;
                Ok(())
            }
            PartitionControl::Adopt { epoch } => {
                if !self.released && self.failed().is_none() {
                    // Answer what was applied before reloading.
                    self.flush(ctx)?;
                }
                // A restored (or re-read) state may cure a failed shard.
                self.status.clear_fatal();
                self.reload();
                self.broken_sources.clear();
                self.epoch = epoch;
                self.released = false;
                Ok(())
            }
            PartitionControl::Resume { from_epoch, epoch } => {
                if self.released || self.epoch != from_epoch {
                    return Err(Error::StaleEpoch {
                        shard: self.partition,
                    });
                }
                // Both Kafka topics of the partition resume: each reader
                // sees the new epoch and reads again from its own stored
                // offset (see `PartitionReader::consume`).
                self.broken_sources.clear();
                self.epoch = epoch;
                Ok(())
            }
        }
    }
}
