//! `tally replay FILE`: feeds an NDJSON file through the same engine path
//! as live ingest (decode, route, shard, flush). Each shard stores the last
//! line number it applied from the file in the same WriteBatch as the
//! state, so a replay killed at any moment and run again resumes where the
//! durable state ends and reaches exactly the state of an uninterrupted run.
//! With `--telemetry` the file holds telemetry points, fed the same way.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tally_actors::messages::BatchOutcome as Outcome;
use tally_actors::messages::Routable;
use tally_actors::telemetry::EventsRejected;
use tally_actors::{Engine, ShardRouter, Source};
use tally_pipelines::decode::{ndjson_lines, BodyItem};
use tally_pipelines::event::{RequestEvent, ValidationContext};
use tally_pipelines::telemetry::Point;
use tally_state::Store;
use tokio::sync::oneshot;

use crate::config::{Config, Settings};

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// NDJSON file of request events (or, with `--telemetry`, points).
    pub file: PathBuf,
    /// The file holds telemetry points (`series`, `timestamp`, `value`,
    /// `tags`, `point_id`), not request events.
    #[arg(long)]
    pub telemetry: bool,
    #[command(flatten)]
    pub settings: Settings,
    /// Lines decoded and routed per batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_lines: usize,
    /// Print a progress line to stderr every N lines.
    #[arg(long)]
    pub progress_every: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Persist progress at least every N lines. A replay writes no
    /// write-ahead log; its state and positions reach disk when RocksDB
    /// flushes memtables (atomically across column families), so a killed
    /// replay redoes at most this many lines (or a memtable's worth).
    #[arg(long, default_value_t = 5_000_000)]
    pub checkpoint_every: u64,
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
    /// Points of new series beyond a partition's bound.
    #[serde(skip_serializing_if = "is_zero")]
    pub over_series_limit: u64,
    /// Re-read lines that a shard had already applied.
    pub already_applied: u64,
    pub elapsed_seconds: f64,
    pub lines_per_second: f64,
    pub first_errors: Vec<String>,
}

const FIRST_ERRORS: usize = 10;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub fn run(args: &ReplayArgs) -> anyhow::Result<ReplaySummary> {
    let config = Config::resolve(&args.settings).map_err(|problems| {
        anyhow::anyhow!("invalid configuration:\n  {}", problems.join("\n  "))
    })?;
    crate::observability::init_logging(config.log_format);
    let canonical = std::fs::canonicalize(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    // A replay needs no write-ahead log: it is resumable from the source
    // positions that RocksDB's atomic flushes persist with the state.
    let store_options = tally_state::StoreOptions {
        wal: false,
        ..config.store_options()
    };
    let store = Arc::new(
        Store::open(&config.data_dir, store_options)
            .with_context(|| format!("cannot open state in {}", config.data_dir.display()))?,
    );
    let source = Source::Replay {
        id: if args.telemetry {
            format!("telemetry-file:{}", canonical.display())
        } else {
            format!("file:{}", canonical.display())
        },
    };
    let resume_line = resume_line(&store, &source)?;
    let engine = Engine::start(store.clone(), config.shard_config(), config.shard_threads)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let file = std::fs::File::open(&canonical)
        .with_context(|| format!("cannot open {}", canonical.display()))?;
    let router = engine.router();
    let result = if args.telemetry {
        runtime.block_on(feed::<Point>(
            &router,
            &store,
            &config,
            args,
            source,
            file,
            resume_line,
        ))
    } else {
        runtime.block_on(feed::<RequestEvent>(
            &router,
            &store,
            &config,
            args,
            source,
            file,
            resume_line,
        ))
    };
    let shutdown = runtime.block_on(engine.shutdown());
    drop(router);
    drop(runtime);
    let synced = store.sync();
    close(store);
    let mut summary = result?;
    shutdown?;
    synced?;
    summary.file = canonical.display().to_string();
    Ok(summary)
}

/// Closes RocksDB here, on the calling thread, once the engine's threads
/// have let go of the store: closed by a thread racing `exit`, RocksDB
/// aborts in its destructor ("pthread lock: Invalid argument"; seen in one
/// replay of five in `tests/replay_telemetry.rs`).
fn close(store: Arc<Store>) {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while Arc::strong_count(&store) > 1 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if Arc::strong_count(&store) > 1 {
        tracing::warn!("the store is still in use at exit; leaving it to the OS");
        // Never closed: everything the replay applied is already synced.
        std::mem::forget(store);
    }
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

/// Lines longer than this are rejected without being buffered whole.
const MAX_LINE_BYTES: u64 = 1 << 20;

/// A run of whole lines read from the file, decoded off the async thread.
struct Chunk {
    first_line: u64,
    /// Lines, each ending in `\n` (an over-long line is left empty).
    bytes: Vec<u8>,
    lines: u64,
    oversized: Vec<u64>,
}

/// Reads up to `max_lines` lines. `None` at end of file.
fn read_chunk(
    reader: &mut impl BufRead,
    first_line: u64,
    max_lines: usize,
) -> std::io::Result<Option<Chunk>> {
    let mut chunk = Chunk {
        first_line,
        bytes: Vec::with_capacity(max_lines * 256),
        lines: 0,
        oversized: Vec::new(),
    };
    let mut lines = 0;
    while lines < max_lines {
        let start = chunk.bytes.len();
        let n = (&mut *reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut chunk.bytes)?;
        if n == 0 {
            break;
        }
        if chunk.bytes.last() != Some(&b'\n') {
            if n as u64 > MAX_LINE_BYTES {
                reader.skip_until(b'\n')?;
                chunk.bytes.truncate(start);
                chunk.oversized.push(first_line + lines as u64);
            }
            chunk.bytes.push(b'\n');
        }
        lines += 1;
    }
    chunk.lines = lines as u64;
    Ok((lines > 0).then_some(chunk))
}

struct DecodedChunk<T> {
    lines: u64,
    routed: Vec<(u16, Vec<T>, Vec<u64>)>,
    rejected: Vec<(u64, String)>,
}

fn decode_chunk<T: BodyItem + Routable>(
    chunk: Chunk,
    router: &ShardRouter,
    ctx: &ValidationContext,
) -> DecodedChunk<T> {
    let mut events = Vec::new();
    let mut positions = Vec::new();
    let mut rejected: Vec<(u64, String)> = chunk
        .oversized
        .iter()
        .map(|&n| (n, format!("line exceeds {MAX_LINE_BYTES} bytes")))
        .collect();
    for (index, line) in ndjson_lines(&chunk.bytes) {
        let n = chunk.first_line + index as u64;
        match T::decode_json(line, ctx) {
            Ok(event) => {
                events.push(event);
                positions.push(n);
            }
            Err(reason) => rejected.push((n, reason.to_string())),
        }
    }
    DecodedChunk {
        lines: chunk.lines,
        routed: router.split(events, Some(positions)).per_partition,
        rejected,
    }
}

async fn feed<T: BodyItem + Routable>(
    router: &ShardRouter,
    store: &Store,
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
    while line_no < resume_line {
        if reader.skip_until(b'\n')? == 0 {
            break;
        }
        line_no += 1;
    }
    let decoders = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let batch_lines = args.batch_lines.max(1);
    let mut decoding: VecDeque<tokio::task::JoinHandle<DecodedChunk<T>>> = VecDeque::new();
    let mut acks: VecDeque<oneshot::Receiver<Result<Outcome, tally_actors::Error>>> =
        VecDeque::new();
    let mut outcome = Outcome::default();
    let mut next_progress = args.progress_every.map(|n| line_no + n.max(1));
    let mut eof = false;
    let mut lines_done = line_no;
    let mut next_checkpoint = line_no + args.checkpoint_every.max(1);
    loop {
        // Keep every core decoding while batches go to the shards in file
        // order (shards need ascending positions per source).
        while !eof && decoding.len() < decoders + 1 {
            match read_chunk(&mut reader, line_no, batch_lines)? {
                Some(chunk) => {
                    line_no += chunk.lines;
                    let (router, ctx) = (router.clone(), config.validation(config.clock.now_ms()));
                    decoding.push_back(tokio::task::spawn_blocking(move || {
                        decode_chunk::<T>(chunk, &router, &ctx)
                    }));
                }
                None => eof = true,
            }
        }
        let Some(next) = decoding.pop_front() else {
            break;
        };
        let decoded = next.await?;
        lines_done += decoded.lines;
        summary.rejected += decoded.rejected.len() as u64;
        EventsRejected {
            source: source.label(),
            count: decoded.rejected.len() as u64,
        }
        .emit();
        for (n, reason) in decoded.rejected {
            if summary.first_errors.len() < FIRST_ERRORS {
                summary.first_errors.push(format!("line {n}: {reason}"));
            }
        }
        for (partition, events, positions) in decoded.routed {
            acks.push_back(
                router
                    .send_positioned(partition, source.clone(), events, positions, None)
                    .await?,
            );
        }
        // Collect acknowledgements that have arrived, keeping the list short.
        while let Some(rx) = acks.front_mut() {
            match rx.try_recv() {
                Ok(result) => {
                    outcome.add(&result?);
                    acks.pop_front();
                }
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => {
                    anyhow::bail!("a shard stopped during the replay")
                }
            }
        }
        if lines_done >= next_checkpoint {
            // Shards flush what they applied, then memtables go to disk.
            router.flush_all(Some(source.clone())).await?;
            store.sync()?;
            next_checkpoint = lines_done + args.checkpoint_every.max(1);
        }
        if let Some(next) = next_progress.as_mut() {
            if lines_done >= *next {
                eprintln!("progress: {lines_done} lines");
                *next = lines_done + args.progress_every.unwrap_or(1).max(1);
            }
        }
    }
    router.flush_all(Some(source)).await?;
    for rx in acks {
        outcome.add(
            &rx.await
                .map_err(|_| anyhow::anyhow!("a shard stopped during the replay"))??,
        );
    }
    summary.lines_read = lines_done - resume_line;
    summary.accepted = outcome.accepted;
    summary.duplicates = outcome.duplicates;
    summary.late = outcome.late;
    summary.over_series_limit = outcome.over_series_limit;
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
        if self.over_series_limit > 0 {
            writeln!(f, "  over series limit  {}", self.over_series_limit)?;
        }
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
