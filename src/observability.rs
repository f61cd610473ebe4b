//! Logs (tracing) and the Prometheus recorder.

use std::io::IsTerminal;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tally_actors::telemetry::{
    BATCH_DURATION, CONTROL_PROPAGATION, FLUSH_DURATION, HTTP_DURATION, LATENCY_BUCKETS,
};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Logs to stderr: human-readable on a terminal, JSON otherwise or when
/// asked. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub fn install_prometheus() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for name in [
        BATCH_DURATION,
        FLUSH_DURATION,
        HTTP_DURATION,
        CONTROL_PROPAGATION,
    ] {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.to_string()), &LATENCY_BUCKETS)?;
    }
    Ok(builder.install_recorder()?)
}
