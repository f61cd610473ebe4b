//! Logs (tracing) and the Prometheus recorder.

use std::io::IsTerminal;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tally_actors::telemetry::{
    BATCH_DURATION, CONTROL_PROPAGATION, FLUSH_DURATION, HTTP_DURATION, LATENCY_BUCKETS,
};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Logs to stderr: human-readable on a terminal, JSON otherwise or when
/// asked. `RUST_LOG` filters (default `info`). Fields often carry input
/// (client ids, paths, webhook ids): JSON escapes them, and the text
/// format's lines are escaped by [`OneLine`], so no input can forge a
/// log line.
pub fn init_logging(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if json {
        builder.with_writer(std::io::stderr).json().try_init()
    } else {
        builder.with_writer(OneLine(std::io::stderr)).try_init()
    };
}

/// A writer for the text format that keeps every event on one line: a
/// line break or carriage return inside an event (from a field's value)
/// is written as `\n` / `\r`. The formatter hands over each event whole,
/// ending in its one real line break. (ANSI escapes in field values are
/// escaped by the formatter itself.)
#[derive(Clone, Copy)]
pub struct OneLine<M>(pub M);

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for OneLine<M>
{
    type Writer = OneLineWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter(self.0.make_writer())
    }
}

pub struct OneLineWriter<W>(W);

impl<W: std::io::Write> std::io::Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                other => out.push(other),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::OneLine;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_field_from_input_cannot_forge_a_text_log_line() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(OneLine(move || sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let client = "acme\n2026-12-03T00:00:00Z  INFO tally: admin key created\r";
            tracing::warn!(client_id = %client, "refused");
            tracing::info!("next");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(
                "client_id=acme\\n2026-12-03T00:00:00Z  INFO tally: admin key created\\r"
            ),
            "{text}"
        );
        assert!(lines[1].ends_with("next"), "{text}");
    }
}
