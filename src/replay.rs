//! `tally replay FILE`: feeds an NDJSON file through the same engine path
//! as live ingest (decode, route, shard, flush). Each shard stores the last
//! line number it applied from the file in the same WriteBatch as the
//! state, so a replay killed at any moment and run again resumes where the
//! durable state ends and reaches exactly the state of an uninterrupted run.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tally_actors::messages::BatchOutcome as Outcome;
use tally_actors::telemetry::EventsRejected;
use tally_actors::{Engine, ShardRouter, Source};
use tally_pipelines::decode::decode_event_bytes;
use tally_state::retention::wall_clock_ms;
use tally_state::Store;
use tokio::sync::oneshot;

use crate::config::{Config, EngineArgs, ServeArgs};

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// NDJSON file of request events.
    pub file: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Lines decoded and routed per batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_lines: usize,
    /// Print a progress line to stderr every N lines.
    #[arg(long)]
    pub progress_every: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct ReplaySummary {
    pub file: String,
    /// Lines skipped without decoding because every shard had applied them.
    pub resumed_from_line: u64,
    pub lines_read: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub rejected: u64,
    /// Re-read lines that a shard had already applied.
    pub already_applied: u64,
    pub elapsed_seconds: f64,
    pub lines_per_second: f64,
    pub first_errors: Vec<String>,
}

const FIRST_ERRORS: usize = 10;

pub fn run(args: &ReplayArgs) -> anyhow::Result<ReplaySummary> {
    let config = Config::resolve(&args.engine, &ServeArgs::default()).map_err(|problems| {
        anyhow::anyhow!("invalid configuration:\n  {}", problems.join("\n  "))
    })?;
    crate::observability::init_logging(config.log_format);
    let canonical = std::fs::canonicalize(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let store = Arc::new(
        Store::open(&config.data_dir, config.store_options())
            .with_context(|| format!("cannot open state in {}", config.data_dir.display()))?,
    );
    let source = Source::Replay {
        id: format!("file:{}", canonical.display()),
    };
    let resume_line = resume_line(&store, &source)?;
    let engine = Engine::start(store.clone(), config.shard_config(), config.shard_threads)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let file = std::fs::File::open(&canonical)
        .with_context(|| format!("cannot open {}", canonical.display()))?;
    let result = runtime.block_on(feed(
        &engine.router(),
        &config,
        args,
        source,
        file,
        resume_line,
    ));
    let shutdown = runtime.block_on(engine.shutdown());
    let mut summary = result?;
    shutdown?;
    store.sync()?;
    summary.file = canonical.display().to_string();
    Ok(summary)
}

/// The first line any shard still needs: one past the lowest position
/// stored across partitions (a partition with none needs the whole file).
fn resume_line(store: &Store, source: &Source) -> anyhow::Result<u64> {
    let Some(key) = source.position_key() else {
        return Ok(0);
    };
    let mut lowest: Option<u64> = None;
    for p in 0..store.partitions() {
        match store.load_checkpoint(p)?.positions.get(key) {
            Some(&pos) => lowest = Some(lowest.map_or(pos + 1, |l: u64| l.min(pos + 1))),
            None => return Ok(0),
        }
    }
    Ok(lowest.unwrap_or(0))
}

async fn feed(
    router: &ShardRouter,
    config: &Config,
    args: &ReplayArgs,
    source: Source,
    file: std::fs::File,
    resume_line: u64,
) -> anyhow::Result<ReplaySummary> {
    let started = Instant::now();
    let mut summary = ReplaySummary {
        resumed_from_line: resume_line,
        ..ReplaySummary::default()
    };
    let mut reader = BufReader::with_capacity(4 << 20, file);
    let mut line_no: u64 = 0;
    let mut buf = Vec::with_capacity(1024);
    while line_no < resume_line {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
    }
    let mut pending: VecDeque<oneshot::Receiver<Result<Outcome, tally_actors::Error>>> =
        VecDeque::new();
    let mut outcome = Outcome::default();
    let mut next_progress = args.progress_every.map(|n| line_no + n.max(1));
    let batch_lines = args.batch_lines.max(1);
    loop {
        let ctx = config.validation(wall_clock_ms());
        let mut events = Vec::with_capacity(batch_lines);
        let mut positions = Vec::with_capacity(batch_lines);
        let mut rejected = 0;
        let mut eof = false;
        while events.len() + rejected < batch_lines {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 {
                eof = true;
                break;
            }
            let n = line_no;
            line_no += 1;
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.trim_ascii().is_empty() {
                continue;
            }
            match decode_event_bytes(line, &ctx) {
                Ok(event) => {
                    events.push(event);
                    positions.push(n);
                }
                Err(reason) => {
                    rejected += 1;
                    if summary.first_errors.len() < FIRST_ERRORS {
                        summary.first_errors.push(format!("line {n}: {reason}"));
                    }
                }
            }
        }
        summary.rejected += rejected as u64;
        EventsRejected {
            source: source.label(),
            count: rejected as u64,
        }
        .emit();
        for (partition, events, positions) in router.split(events, Some(positions)).per_partition {
            pending.push_back(
                router
                    .send_positioned(partition, source.clone(), events, positions)
                    .await?,
            );
        }
        // Collect acknowledgements that have arrived, keeping the list short.
        while let Some(rx) = pending.front_mut() {
            match rx.try_recv() {
                Ok(result) => {
                    outcome.add(&result?);
                    pending.pop_front();
                }
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => {
                    anyhow::bail!("a shard stopped during the replay")
                }
            }
        }
        if let Some(next) = next_progress.as_mut() {
            if line_no >= *next {
                eprintln!("progress: {line_no} lines");
                *next = line_no + args.progress_every.unwrap_or(1).max(1);
            }
        }
        if eof {
            break;
        }
    }
    router.flush_all(Some(source)).await?;
    for rx in pending {
        outcome.add(
            &rx.await
                .map_err(|_| anyhow::anyhow!("a shard stopped during the replay"))??,
        );
    }
    summary.lines_read = line_no - resume_line;
    summary.accepted = outcome.accepted;
    summary.duplicates = outcome.duplicates;
    summary.late = outcome.late;
    summary.already_applied = outcome.already_applied;
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    summary.lines_per_second = summary.lines_read as f64 / summary.elapsed_seconds.max(1e-9);
    Ok(summary)
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "replayed {}", self.file)?;
        if self.resumed_from_line > 0 {
            writeln!(f, "  resumed from line  {}", self.resumed_from_line)?;
        }
        writeln!(f, "  lines read         {}", self.lines_read)?;
        writeln!(f, "  accepted           {}", self.accepted)?;
        writeln!(f, "  duplicates         {}", self.duplicates)?;
        writeln!(f, "  late               {}", self.late)?;
        writeln!(f, "  rejected           {}", self.rejected)?;
        writeln!(f, "  already applied    {}", self.already_applied)?;
        writeln!(f, "  elapsed            {:.3} s", self.elapsed_seconds)?;
        write!(
            f,
            "  throughput         {:.0} events/s",
            self.lines_per_second
        )?;
        for e in &self.first_errors {
            write!(f, "\n  rejected: {e}")?;
        }
        Ok(())
    }
}
