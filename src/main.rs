//! Tally: an actor-based stream processing engine for API usage.
//!
//! - [`config`]: TOML file, `TALLY_*` environment, flags.
//! - [`http`]: the HTTP API (axum) and its error mapping in [`error`].
//! - [`serve`], [`replay`], [`gen`]: the subcommands.
//! - [`observability`]: logs and the Prometheus recorder.
//!
//! The engine itself lives in the workspace crates: `tally-pipelines`
//! (pure logic), `tally-state` (RocksDB), `tally-actors` (shards).

mod access;
mod audit;
mod billing;
mod config;
mod error;
mod gen;
mod http;
mod jwt;
mod keys;
mod observability;
mod replay;
mod serve;
mod webhooks;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Events are allocated by decoding threads and freed by shard threads;
// jemalloc (as in TiKV) handles that cross-thread traffic far better than
// the system allocator, and returns memory to the OS.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Actor-based stream processing for API usage and telemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (RocksDB under ./data, HTTP on 127.0.0.1:8080 by default).
    Serve(serve::ServeCommand),
    /// Feed an NDJSON file of request events through the engine; resumable.
    Replay(replay::ReplayArgs),
    /// Write deterministic synthetic request events as NDJSON.
    Gen(gen::GenArgs),
    /// Manage API keys offline (the service not running on the data dir).
    Keys(keys::KeysArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(cmd) => serve::run(cmd),
        Command::Replay(args) => replay::run(args).map(|summary| {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                );
            } else {
                println!("{summary}");
            }
        }),
        Command::Gen(args) => gen::run(args),
        Command::Keys(args) => keys::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally: {e:#}");
            ExitCode::FAILURE
        }
    }
}
