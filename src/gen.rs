//! `tally gen`: deterministic synthetic request events as NDJSON.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;
use tally_pipelines::synthetic::{Generator, GeneratorConfig};
use tally_pipelines::time::parse_instant;

#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// Number of lines to write.
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
    /// Distinct clients (Zipf-distributed).
    #[arg(long, default_value_t = 10_000)]
    pub clients: u32,
    /// Distinct endpoint templates (Zipf-distributed).
    #[arg(long, default_value_t = 20)]
    pub endpoints: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Event time of the first event (RFC 3339 or epoch ms) [default: so
    /// that the last event is about now].
    #[arg(long)]
    pub start: Option<String>,
    /// Events per second of event time.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Zipf exponent over clients.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub late_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Output file [default: stdout].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &GenArgs) -> anyhow::Result<()> {
    let start_ms = match &args.start {
        Some(s) => parse_instant(s).map_err(|e| anyhow::anyhow!("--start: {e}"))?,
        None => {
            let span_ms = (args.count as f64 * 1000.0 / args.rate.max(f64::MIN_POSITIVE)) as i64;
            tally_state::retention::wall_clock_ms() - span_ms
        }
    };
    let mut generator = Generator::new(GeneratorConfig {
        seed: args.seed,
        clients: args.clients,
        endpoints: args.endpoints,
        start_ms,
        events_per_second: args.rate,
        zipf_exponent: args.zipf,
        duplicate_rate: args.duplicate_rate,
        late_rate: args.late_rate,
        malformed_rate: args.malformed_rate,
    })?;
    let out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(
            std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut line = String::with_capacity(512);
    for _ in 0..args.count {
        line.clear();
        generator.next_line(&mut line);
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}
