//! `tally serve`: the engine plus the HTTP API, with graceful shutdown on
//! SIGTERM/SIGINT: stop accepting, drain in-flight requests, flush every
//! shard, sync RocksDB, exit — within 30 seconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tally_actors::kafka::source::KafkaSource;
use tally_actors::Engine;
use tally_state::Store;

use crate::config::{Config, Settings};
use crate::http::{app, AppState, Shared};

#[derive(Debug, Clone, Args)]
pub struct ServeCommand {
    #[command(flatten)]
    pub settings: Settings,
}

const SHUTDOWN_BUDGET: Duration = Duration::from_secs(30);
/// Part of the budget for handing Kafka partitions over.
const KAFKA_STOP_BUDGET: Duration = Duration::from_secs(15);

pub fn run(cmd: &ServeCommand) -> anyhow::Result<()> {
    let config = Config::resolve(&cmd.settings).map_err(|problems| {
        anyhow::anyhow!("invalid configuration:\n  {}", problems.join("\n  "))
    })?;
    crate::observability::init_logging(config.log_format);
    let prometheus = crate::observability::install_prometheus()?;
    let store = Arc::new(
        Store::open(&config.data_dir, config.store_options())
            .with_context(|| format!("cannot open state in {}", config.data_dir.display()))?,
    );
    // In a cluster, event ids carry this instance's tag.
    let tag = match &config.kafka {
        Some(_) => tally_actors::alerts::cluster_tag(&store.instance_id()?),
        None => 0,
    };
    let alerts = tally_actors::alerts::AlertLog::open(store.clone(), tag)?;
    let mut shard_config = config.shard_config();
    shard_config.limits.alerts = Some(alerts.clone());
    shard_config.detect.alerts = Some(alerts.clone());
    // In Kafka mode the bootstrap key is published once the control
    // topic is read (`attach`), so every instance has it.
    let audit = crate::audit::Audit::start(store.clone(), config.audit_retention)?;
    let access = crate::access::Access::open(
        store.clone(),
        Some(audit.clone()),
        config
            .bootstrap_key
            .as_ref()
            .filter(|_| config.kafka.is_none())
            .map(|k| k.expose()),
        tally_state::retention::wall_clock_ms(),
    )?;
    if let Some(verifier) = crate::jwt::JwtVerifier::from_settings(&config.jwt)? {
        access.accept_jwts(verifier);
    }
    if config.kafka.is_none() {
        refuse_open_public(&config, &access)?;
    }
    let engine = Engine::start(store.clone(), shard_config, config.shard_threads)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let last_store = store.clone();
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local = listener.local_addr()?;
        let ready = Arc::new(AtomicBool::new(true));
        let webhooks = crate::webhooks::Webhooks::start(
            store.clone(),
            alerts.clone(),
            crate::webhooks::configured(&store, &access, config.kafka.is_none())?,
            config.webhook_allow.clone(),
            config.secret_seal.clone(),
        )?;
        crate::webhooks::follow(&access, webhooks.clone());
        if !config.secret_seal.is_keyed() {
            tracing::warn!("no secrets_key: webhook secrets are stored and published as given");
        }
        if let Some(k) = &config.kafka {
            KafkaSource::ensure_topics(k, config.partitions).await?;
        }
        // In Kafka mode, the control topic (held by `access` from here on:
        // every control change goes through it).
        let _control = match &config.kafka {
            Some(k) => {
                let hooks = webhooks.clone();
                let keys = access.clone();
                let control = tally_actors::kafka::control::ControlTopic::start(
                    k,
                    Box::new(move |offset, key, value| {
                        if key.starts_with(crate::access::CONTROL_PREFIX) {
                            keys.apply_published(offset, value);
                        } else if let Some(id) = key.strip_prefix("webhook/") {
                            // A record of an older build: taken unless
                            // the control log has versioned the webhook.
                            let id = tally_pipelines::access::Stream::Webhook(id);
                            if keys.version(id) == 0 {
                                hooks.apply_control(key, value);
                            }
                        }
                    }),
                )?;
                // Nothing is served before this instance has every key
                // the cluster made (else it would answer as if open).
                control
                    .sync(&store.instance_id()?, Duration::from_secs(30))
                    .await
                    .context("reading the control topic to its end")?;
                access
                    .attach(control.clone(), config.bootstrap_key.as_ref().map(|k| k.expose()))
                    .await?;
                refuse_open_public(&config, &access)?;
                Some(control)
            }
            None => None,
        };
        let kafka = match config.kafka.clone() {
            Some(kafka_config) => {
                let validation_config = config.clone();
                tracing::info!(brokers = %kafka_config.brokers, topic = %kafka_config.topic, group = %kafka_config.group, "consuming from Kafka");
                let address = config
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("http://{local}"));
                Some(KafkaSource::start(
                    kafka_config,
                    engine.router(),
                    store.clone(),
                    address,
                    move || validation_config.validation(validation_config.clock.now_ms()),
                )?)
            }
            None => None,
        };
        let alert_topic = match &config.kafka {
            Some(k) => Some(tally_actors::kafka::alert_topic::start(k, store.clone(), alerts.clone())?),
            None => None,
        };
        let cluster_alerts = match &config.kafka {
            Some(k) => Some(tally_actors::kafka::alert_mirror::ClusterAlerts::start(k, config.partitions, store.clone())?),
            None => None,
        };
        let mirror = cluster_alerts.clone();
        let state = AppState::new(Shared {
            shards: engine.router(),
            store: store.clone(),
            config: Arc::new(config.clone()),
            prometheus: prometheus.clone(),
            ready: ready.clone(),
            kafka_ingest: match &config.kafka {
                Some(k) => Some(Arc::new(tally_actors::kafka::ingest::KafkaIngest::new(k, config.partitions, config.partitioner)?)),
                None => None,
            },
            kafka_health: kafka.as_ref().map(|k| k.health()),
            membership: kafka.as_ref().map(|k| k.membership()),
            http_client: reqwest::Client::new(),
            alerts: alerts.clone(),
            cluster_alerts,
            webhooks: webhooks.clone(),
            ingest_gate: crate::http::ingest::IngestGate::new(config.max_ingest_requests, config.max_ingest_bytes),
            subscribers: Arc::new(tokio::sync::Semaphore::new(config.max_subscribers)),
            access,
            audit,
        });
        let state_alerts = alerts;
        let upkeep = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                prometheus.run_upkeep();
            }
        });
        // Adaptive limits follow the mailboxes when gateways report nothing.
        let (adaptive, shards, clock) = (config.adaptive.clone(), engine.router(), config.clock.clone());
        let adaptive_tick = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                adaptive.tick(shards.mailbox_utilization(), clock.now_ms());
            }
        });
        // Billing periods close on time, also for clients nobody asks about.
        let closer = tokio::spawn(crate::billing::close::run_closer(state.clone()));
        tracing::info!(listen = %local, data_dir = %config.data_dir.display(), partitions = config.partitions, "tally serving");
        // Listening for SIGTERM from before the line below: a supervisor
        // (or a test) that stops the service as soon as it is up must get
        // the graceful path, not the default action of the signal.
        #[cfg(unix)]
        let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        #[cfg(not(unix))]
        let terminate = ();
        // Tests and scripts read this line to learn the bound port.
        println!("listening on http://{local}");
        // Whatever the drain leaves of the budget goes to the hand-over and
        // the final flush.
        let drain_budget = SHUTDOWN_BUDGET
            - Duration::from_secs(5)
            - if kafka.is_some() { KAFKA_STOP_BUDGET } else { Duration::ZERO };
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown_signal(terminate).await;
            ready.store(false, Ordering::Relaxed);
            tracing::info!("shutdown requested: draining requests");
            let _ = signalled_tx.send(());
        };
        // The peer address is what key allowlists judge.
        let server = axum::serve(
            listener,
            app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown);
        let served = tokio::spawn(async move { server.await });
        // Drain within the budget; after the signal, a stuck connection must
        // not keep the state from being flushed.
        let drained = async {
            let _ = signalled_rx.await;
            tokio::time::sleep(drain_budget).await;
        };
        tokio::select! {
            result = served => { result??; }
            _ = drained => tracing::warn!("requests still open after the drain budget; closing"),
        }
        upkeep.abort();
        adaptive_tick.abort();
        closer.abort();
        webhooks.stop();
        if let Some(task) = alert_topic {
            task.abort();
        }
        if let Some(mirror) = mirror {
            mirror.stop();
        }
        if let Some(kafka) = kafka {
            // Stop consuming and hand the partitions over (flush, last
            // changelog rounds, leave the membership).
            if tokio::time::timeout(KAFKA_STOP_BUDGET, kafka.stop()).await.is_err() {
                tracing::warn!("Kafka source did not stop in time; flushing anyway");
            }
        }
        tokio::time::timeout(Duration::from_secs(5), engine.shutdown())
            .await
            .context("flushing shards timed out")??;
        state_alerts.close();
        store.sync()?;
        tracing::info!("state flushed; bye");
        anyhow::Ok(())
    });
    // Dropping the runtime waits for its blocking tasks; then RocksDB is
    // closed here, on the main thread, before `exit`: closed by a thread
    // racing `exit` it aborts in its destructor.
    drop(runtime);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&last_store) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if Arc::strong_count(&last_store) > 1 {
        tracing::warn!("the store is still in use at exit; leaving it to the OS");
        // Never closed: everything acknowledged is already synced.
        std::mem::forget(last_store);
    }
    served
}

/// An API with no key is open to whoever reaches it: fine on loopback
/// (the embedded default), refused elsewhere unless `--insecure`.
fn refuse_open_public(config: &Config, access: &crate::access::Access) -> anyhow::Result<()> {
    if !access.enforced() && !config.listen.ip().is_loopback() && !config.insecure {
        anyhow::bail!(
            "no API key exists, so the API would be open to anyone who reaches {}: set TALLY_BOOTSTRAP_KEY (make one with `tally keys create --data-dir {} --name admin --scopes all`), listen on 127.0.0.1, or pass --insecure to serve it open anyway",
            config.listen,
            config.data_dir.display()
        );
    }
    Ok(())
}

#[cfg(unix)]
type Terminate = std::io::Result<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Terminate = ();

async fn shutdown_signal(terminate: Terminate) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match terminate {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = {
        let () = terminate;
        std::future::pending::<()>()
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
