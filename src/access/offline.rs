//! `tally keys create`, offline: a key appended to a data directory's
//! control log while the service is not running on it.

use std::sync::Arc;

use anyhow::Context as _;
use tally_pipelines::access::{ControlEvent, KeySpec, KeyToken, Principal};
use tally_state::Store;

use super::{Access, Origin};

/// The actor name of keys made offline.
pub const CLI_ACTOR: &str = "cli";

/// Appends a key to the store's control log and returns it. In Kafka
/// mode the service publishes it to the control topic when it next
/// starts (see [`Access::attach`]).
pub fn create_offline(store: Arc<Store>, spec: KeySpec, now_ms: i64) -> anyhow::Result<KeyToken> {
    let access = Access::open(store, None, None, now_ms)?;
    let operator = Principal::operator(CLI_ACTOR);
    let spec = access
        .with_ring(|ring| ring.admit(&operator, spec, now_ms))
        .map_err(|problems| {
            anyhow::anyhow!(
                "{}",
                problems
                    .iter()
                    .map(|(f, r)| format!("{f}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
    let token = KeyToken::generate(&mut rand::rng(), None);
    access
        .record_at_version(
            CLI_ACTOR,
            now_ms,
            ControlEvent::KeyCreated {
                key_id: token.id().to_string(),
                spec,
                hash: token.hash(),
            },
            None,
            Origin::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("recording the key")?;
    Ok(token)
}
