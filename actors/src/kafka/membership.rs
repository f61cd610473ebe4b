//! Who owns which partition, so that any instance can answer a query for
//! any client: each instance publishes its advertised HTTP address and its
//! partitions on a compacted membership topic (`<topic>.members`, keyed by
//! address) whenever its assignment changes, and reads everyone's records.
//!
//! After a failure, a dead instance's last record still claims its
//! partitions until the survivor publishes; the most recent claim wins.
//! Records are republished every few seconds, so a record that stops being
//! refreshed marks a dead instance, and partitions no live instance claims
//! are visible ([`Membership::orphaned`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::{Deserialize, Serialize};
use tally_state::retention::wall_clock_ms;

use crate::Error;

/// One instance's published ownership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Base URL other instances forward queries to.
    pub address: String,
    pub partitions: Vec<u16>,
    pub updated_at_ms: i64,
}

/// Where a partition's queries are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    Remote(String),
    /// Nobody claims it (a rebalance is in progress).
    Unknown,
}

/// How often an instance republishes its record.
pub const MEMBER_HEARTBEAT: Duration = Duration::from_secs(5);
/// A record not refreshed for this long belongs to a dead instance.
pub const MEMBER_EXPIRY: Duration = Duration::from_secs(15);

pub struct Membership {
    address: String,
    partitions: u16,
    topic: String,
    producer: FutureProducer,
    owned: RwLock<BTreeSet<u16>>,
    members: Arc<RwLock<HashMap<String, MemberRecord>>>,
    stop: Arc<AtomicBool>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Membership {
    pub fn members_topic(topic: &str) -> String {
        format!("{topic}.members")
    }

    /// Starts reading the membership topic in a background thread.
    pub fn start(
        brokers: &str,
        topic: &str,
        partitions: u16,
        address: String,
        producer: FutureProducer,
    ) -> Result<Arc<Membership>, Error> {
        let topic = Self::members_topic(topic);
        let consumer = crate::kafka::control::read_from_beginning(brokers, &topic, "members")?;
        let membership = Arc::new(Membership {
            address,
            partitions,
            topic,
            producer,
            owned: RwLock::new(BTreeSet::new()),
            members: Arc::new(RwLock::new(HashMap::new())),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let m = membership.clone();
        std::thread::Builder::new()
            .name("tally-members".into())
            .spawn(move || m.follow(&consumer))
            .map_err(|e| Error::Startup(e.to_string()))?;
        Ok(membership)
    }

    /// Partitions that neither this instance nor any live one claims.
    pub fn orphaned(&self) -> BTreeSet<u16> {
        let owned = read(&self.owned);
        let expiry = i64::try_from(MEMBER_EXPIRY.as_millis()).unwrap_or(i64::MAX);
        let live_since = wall_clock_ms().saturating_sub(expiry);
        let members = read(&self.members);
        let claimed: BTreeSet<u16> = members
            .values()
            .filter(|m| m.address != self.address && m.updated_at_ms >= live_since)
            .flat_map(|m| m.partitions.iter().copied())
            .collect();
        (0..self.partitions)
            .filter(|p| !owned.contains(p) && !claimed.contains(p))
            .collect()
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The addresses of the other live instances (records refreshed
    /// within [`MEMBER_EXPIRY`]), whether or not they own partitions.
    pub fn live_peers(&self) -> Vec<String> {
        let expiry = i64::try_from(MEMBER_EXPIRY.as_millis()).unwrap_or(i64::MAX);
        let live_since = wall_clock_ms().saturating_sub(expiry);
        let mut peers: Vec<String> = read(&self.members)
            .values()
            .filter(|m| m.address != self.address && m.updated_at_ms >= live_since)
            .map(|m| m.address.clone())
            .collect();
        peers.sort();
        peers
    }

    pub fn owned(&self) -> BTreeSet<u16> {
        read(&self.owned).clone()
    }

    pub fn owner(&self, partition: u16) -> Owner {
        if read(&self.owned).contains(&partition) {
            return Owner::Local;
        }
        read(&self.members)
            .values()
            .filter(|m| m.address != self.address && m.partitions.contains(&partition))
            .max_by_key(|m| m.updated_at_ms)
            .map_or(Owner::Unknown, |m| Owner::Remote(m.address.clone()))
    }

    /// Records and publishes this instance's partitions (blocking, bounded).
    pub fn set_owned(&self, partitions: BTreeSet<u16>) {
        metrics::gauge!(crate::telemetry::OWNED_PARTITIONS).set(partitions.len() as f64);
        *write(&self.owned) = partitions;
        self.announce();
    }

    fn announce(&self) {
        let record = MemberRecord {
            address: self.address.clone(),
            partitions: read(&self.owned).iter().copied().collect(),
            updated_at_ms: wall_clock_ms(),
        };
        match serde_json::to_vec(&record) {
            Ok(payload) => self.publish(Some(&payload)),
            Err(e) => tracing::error!(error = %e, "cannot encode membership record"),
        }
    }

    /// Withdraws this instance's record (clean shutdown).
    pub fn leave(&self) {
        write(&self.owned).clear();
        self.publish(None);
        self.stop.store(true, Ordering::Relaxed);
    }

    fn publish(&self, payload: Option<&[u8]>) {
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .partition(0)
            .key(self.address.as_str());
        if let Some(p) = payload {
            record = record.payload(p);
        }
        let delivery = match self.producer.send_result(record) {
            Ok(d) => d,
            Err((e, _)) => {
                tracing::warn!(error = %e, "cannot publish membership");
                return;
            }
        };
        // Bounded: the producer's `message.timeout.ms` guarantees a report.
        match futures::executor::block_on(delivery) {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => tracing::warn!(error = %e, "membership not published"),
            Err(_) => tracing::warn!("membership delivery cancelled"),
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Membership {
    /// Reads everyone's records and republishes this instance's.
    fn follow(&self, consumer: &BaseConsumer) {
        let mut next_announce = std::time::Instant::now() + MEMBER_HEARTBEAT;
        while !self.stop.load(Ordering::Relaxed) {
            if std::time::Instant::now() >= next_announce {
                self.announce();
                next_announce = std::time::Instant::now() + MEMBER_HEARTBEAT;
            }
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                        continue;
                    };
                    match m.payload().map(serde_json::from_slice::<MemberRecord>) {
                        Some(Ok(record)) => {
                            write(&self.members).insert(key.to_string(), record);
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, member = key, "undecodable membership record")
                        }
                        None => {
                            write(&self.members).remove(key);
                        }
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "membership read error"),
                None => {}
            }
        }
    }
}
