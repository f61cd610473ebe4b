//! `tally keys create`: makes an API key offline, in a data directory the
//! service is not running on (the first admin key of a new deployment,
//! or a way back in when every admin key is lost). It reads the same
//! configuration as `serve`, so the store opens with the same layout.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tally_pipelines::access::{KeySpec, Scope};
use tally_state::Store;

use crate::config::{Config, Settings};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (once: only its hash is kept).
    Create(CreateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What the key is for.
    #[arg(long)]
    pub name: String,
    /// Comma-separated scopes (ingest, check, read, billing, admin) or `all`.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub scopes: Vec<String>,
    /// Only these clients (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub client_ids: Vec<String>,
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: &KeysArgs) -> anyhow::Result<()> {
    match &args.command {
        KeysCommand::Create(create) => {
            let config = Config::resolve(&create.settings).map_err(|problems| {
                anyhow::anyhow!("invalid configuration:\n  {}", problems.join("\n  "))
            })?;
            let mut scopes = BTreeSet::new();
            for s in &create.scopes {
                if s == "all" {
                    scopes.extend(Scope::ALL);
                } else {
                    scopes.insert(Scope::parse(s).with_context(|| {
                        format!(
                            "unknown scope {s:?}; known: ingest, check, read, billing, admin, all"
                        )
                    })?);
                }
            }
            let spec = KeySpec {
                name: create.name.clone(),
                scopes,
                client_ids: (!create.client_ids.is_empty())
                    .then(|| create.client_ids.iter().cloned().collect()),
                parent_key_id: None,
                expires_at_ms: None,
                ip_allowlist: vec![],
                rate_limit: None,
                metadata: Default::default(),
            };
            let store = Arc::new(
                Store::open(&config.data_dir, config.store_options()).with_context(|| {
                    format!(
                        "cannot open state in {} (is `tally serve` running on it?)",
                        config.data_dir.display()
                    )
                })?,
            );
            let now = tally_state::retention::wall_clock_ms();
            let token = crate::access::offline::create_offline(store.clone(), spec, now)?;
            store.sync()?;
            eprintln!(
                "created key {} in {}; it is shown this once:",
                token.id(),
                config.data_dir.display()
            );
            println!("{}", token.reveal());
            Ok(())
        }
    }
}
