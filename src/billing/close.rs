//! Answering and closing billing periods. A period closes once its end
//! has passed by the allowed lateness plus `billing_close_delay`: its
//! report is then built once, stored with the partition's state (so it
//! moves with it), `BILLING_PERIOD_CLOSED` carries its totals on the event
//! channel, and every later request is answered the stored bytes. Closing
//! happens on the first request after that time, or by the closer
//! ([`run_closer`]) for every client with a plan, whichever comes first.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono_tz::Tz;
use serde_json::json;
use tally_actors::alerts::AlertLog;
use tally_pipelines::billing::period::{self, BillingPeriod};
use tally_pipelines::billing::schedule::in_force;
use tally_pipelines::billing::{Adjustment, Assignment, Plan};
use tally_state::Store;

use super::report::{self, Inputs};
use crate::http::AppState;

/// The event type of a finalised period.
pub const BILLING_PERIOD_CLOSED: &str = "BILLING_PERIOD_CLOSED";
/// How often the closer looks for periods to close.
const CLOSER_EVERY: Duration = Duration::from_secs(30);

/// What a client is billed by: its schedule, the plans it names, its
/// zone and reset day.
pub struct ClientBilling {
    pub client: String,
    pub partition: u16,
    pub schedule: Vec<Assignment>,
    pub plans: BTreeMap<String, Plan>,
    pub tz: Tz,
    pub reset_day: u8,
    pub adjustments: Vec<Adjustment>,
}

impl ClientBilling {
    /// Reads what `client` is billed by (blocking: the quota's reset day
    /// is in the store).
    pub fn read(state: &AppState, client: &str, now_ms: i64) -> tally_state::Result<ClientBilling> {
        let (schedule, plans, adjustments) = state.access.with_plane(|p| {
            let schedule = p.schedule(client);
            let plans = schedule
                .iter()
                .filter_map(|a| p.plan(&a.plan_id).map(|plan| (a.plan_id.clone(), plan)))
                .collect();
            (schedule, plans, p.adjustments(client))
        });
        let tz = in_force(&schedule, now_ms)
            .or(schedule.last())
            .and_then(|a| a.time_zone.as_deref())
            .and_then(|z| period::zone(z).ok())
            .unwrap_or(chrono_tz::UTC);
        let partition = state.store.partition_of(client);
        let reset_day = state
            .store
            .quota_config(partition, client)?
            .map_or(1, |q| q.reset_day);
        Ok(ClientBilling {
            client: client.to_string(),
            partition,
            schedule,
            plans,
            tz,
            reset_day,
            adjustments,
        })
    }
}

impl ClientBilling {
    /// The client's report of `period`, built from the store.
    fn build(
        &self,
        store: &Store,
        period: BillingPeriod,
        now_ms: i64,
        closed: bool,
    ) -> tally_state::Result<report::Report> {
        let plan_of = |id: &str| self.plans.get(id).cloned();
        let input = Inputs {
            client: &self.client,
            partition: self.partition,
            tz: self.tz,
            period,
            schedule: &self.schedule,
            plan_of: &plan_of,
            adjustments: &self.adjustments,
            now_ms,
            closed,
        };
        report::build(store, &input)
    }
}

/// Whether this instance owns `partition` (always, running alone).
fn owned_here(state: &AppState, partition: u16) -> bool {
    state.membership.as_ref().is_none_or(|m| {
        matches!(
            m.owner(partition),
            tally_actors::kafka::membership::Owner::Local
        )
    })
}

/// When `period` closes.
pub fn closes_at(state: &AppState, period: &BillingPeriod) -> i64 {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    period
        .end_ms
        .saturating_add(ms(state.config.allowed_lateness))
        .saturating_add(ms(state.config.billing_close_delay))
}

/// One close at a time in this process: a period's report is built and
/// stored once (in Kafka mode only the partition's owner closes).
static CLOSING: Mutex<()> = Mutex::new(());

/// Reports closed and not yet stored: answered only once [`Closings::commit`]
/// has stored them all in one durable write, and announced after it.
/// Holds the close lock meanwhile, so nobody else builds them again.
pub struct Closings {
    _one: std::sync::MutexGuard<'static, ()>,
    partition: u16,
    reports: Vec<(String, i64, Vec<u8>, serde_json::Value)>,
}

impl Closings {
    /// Closes of `partition`'s clients (one partition per batch).
    pub fn begin(partition: u16) -> Closings {
        Closings {
            _one: CLOSING.lock().unwrap_or_else(|e| e.into_inner()),
            partition,
            reports: Vec::new(),
        }
    }

    /// Stores every report with the marker of its announcement (one
    /// synced write), announces each, and once the announcements are
    /// logged removes the markers: a crash in between is made good by
    /// [`announce_unannounced`].
    pub fn commit(self, store: &Store, alerts: &AlertLog, now_ms: i64) -> tally_state::Result<()> {
        if self.reports.is_empty() {
            return Ok(());
        }
        let details: Vec<Vec<u8>> = self
            .reports
            .iter()
            .map(|(_, _, _, totals)| totals.to_string().into_bytes())
            .collect();
        let rows: Vec<(&str, i64, &[u8], &[u8])> = self
            .reports
            .iter()
            .zip(&details)
            .map(|((c, start, bytes, _), d)| (c.as_str(), *start, bytes.as_slice(), d.as_slice()))
            .collect();
        store.put_closed_reports(self.partition, &rows)?;
        for (client, _, _, totals) in &self.reports {
            alerts.publish_waiting(BILLING_PERIOD_CLOSED, client, None, now_ms, totals.clone());
        }
        alerts.flush();
        let done: Vec<(&str, i64)> = self
            .reports
            .iter()
            .map(|(c, start, _, _)| (c.as_str(), *start))
            .collect();
        store.announced(self.partition, &done)
    }
}

/// Announces the closed periods of `partition` whose announcement a crash
/// cut off (their marker is still stored): at least once, never lost.
pub fn announce_unannounced(
    store: &Store,
    alerts: &AlertLog,
    partition: u16,
    now_ms: i64,
) -> tally_state::Result<usize> {
    // Under the close lock: a commit in progress announces its own.
    let _one = CLOSING.lock().unwrap_or_else(|e| e.into_inner());
    let pending = store.unannounced_closes(partition)?;
    if pending.is_empty() {
        return Ok(0);
    }
    for (client, _, details) in &pending {
        let details: serde_json::Value = serde_json::from_slice(details).map_err(|e| {
            tally_state::Error::Corrupt(format!("a close announcement of {client:?}: {e}"))
        })?;
        alerts.publish_waiting(BILLING_PERIOD_CLOSED, client, None, now_ms, details);
    }
    alerts.flush();
    let done: Vec<(&str, i64)> = pending.iter().map(|(c, s, _)| (c.as_str(), *s)).collect();
    store.announced(partition, &done)?;
    Ok(pending.len())
}

/// A report as answered: its JSON bytes, and its request count (an
/// export lists only clients with usage in the period).
pub struct Answer {
    pub bytes: Vec<u8>,
    pub requests: u64,
}

/// The report of `period`: built, or for a closed billing period
/// (`stored`: not a `from`/`to` range) the stored one, closing it first
/// if nobody has. Blocking.
pub fn answer(
    store: &Store,
    alerts: &AlertLog,
    who: &ClientBilling,
    period: BillingPeriod,
    closed: bool,
    stored: bool,
    now_ms: i64,
) -> tally_state::Result<Answer> {
    if !(closed && stored) {
        let report = who.build(store, period, now_ms, closed)?;
        return Ok(Answer {
            bytes: encode(&report)?,
            requests: report.summary.total_requests,
        });
    }
    let mut closings = Closings::begin(who.partition);
    let answer = answer_closed(store, who, period, now_ms, &mut closings)?;
    closings.commit(store, alerts, now_ms)?;
    Ok(answer)
}

/// The report of a closed billing period: the stored one, or built and
/// added to `closings` (answer it only once they are committed).
pub fn answer_closed(
    store: &Store,
    who: &ClientBilling,
    period: BillingPeriod,
    now_ms: i64,
    closings: &mut Closings,
) -> tally_state::Result<Answer> {
    if let Some(bytes) = store.closed_report(who.partition, &who.client, period.start_ms)? {
        let requests = stored_requests(&bytes)?;
        return Ok(Answer { bytes, requests });
    }
    let report = who.build(store, period, now_ms, true)?;
    let bytes = encode(&report)?;
    let requests = report.summary.total_requests;
    let totals = json!({
            "plan_id": report.plan_id,
            "billing_period_start": report.billing_period_start,
            "billing_period_end": report.billing_period_end,
            "time_zone": report.time_zone,
            "currency": report.currency,
            "billable_metrics": report.billable_metrics,
            "total_amount": report.total_amount,
            "lines": report.lines,
    });
    closings
        .reports
        .push((who.client.clone(), period.start_ms, bytes.clone(), totals));
    Ok(Answer { bytes, requests })
}

/// The request count of a stored report.
fn stored_requests(bytes: &[u8]) -> tally_state::Result<u64> {
    #[derive(serde::Deserialize)]
    struct Stored {
        summary: StoredSummary,
    }
    #[derive(serde::Deserialize)]
    struct StoredSummary {
        total_requests: u64,
    }
    serde_json::from_slice::<Stored>(bytes)
        .map(|s| s.summary.total_requests)
        .map_err(|e| tally_state::Error::Corrupt(format!("a stored report is not readable: {e}")))
}

fn encode(report: &report::Report) -> tally_state::Result<Vec<u8>> {
    serde_json::to_vec(report)
        .map_err(|e| tally_state::Error::Corrupt(format!("report encoding: {e}")))
}

/// Closes, for every client with a plan whose partition this instance
/// owns, the last period once it is due. Runs until the process ends.
pub async fn run_closer(state: AppState) {
    // Soon after start (a restart catches up at once), then regularly.
    tokio::time::sleep(Duration::from_secs(2)).await;
    loop {
        let s = state.clone();
        let closed = tokio::task::spawn_blocking(move || close_due(&s)).await;
        match closed {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(periods = n, "billing periods closed"),
            Ok(Err(e)) => tracing::error!(error = %e, "closing billing periods failed; retrying"),
            Err(e) => tracing::error!(error = %e, "the billing closer task failed"),
        }
        tokio::time::sleep(CLOSER_EVERY).await;
    }
}

fn close_due(state: &AppState) -> tally_state::Result<usize> {
    let now = state.config.clock.now_ms();
    let mut closed = 0;
    for partition in 0..state.store.partitions() {
        if owned_here(state, partition) {
            let again = announce_unannounced(&state.store, &state.alerts, partition, now)?;
            if again > 0 {
                tracing::warn!(
                    partition,
                    periods = again,
                    "closed periods announced again after an interruption"
                );
            }
        }
    }
    for client in state.access.with_plane(|p| p.planned_clients()) {
        if !owned_here(state, state.store.partition_of(&client)) {
            continue;
        }
        let who = ClientBilling::read(state, &client, now)?;
        let last = BillingPeriod::containing(who.tz, who.reset_day, now).shifted(
            who.tz,
            who.reset_day,
            -1,
        );
        // Nothing to close before the client's first plan.
        let first = who
            .schedule
            .first()
            .map_or(i64::MAX, |a| a.effective_from_ms);
        if last.end_ms <= first || now < closes_at(state, &last) {
            continue;
        }
        if store_has(state, &who, &last)? {
            continue;
        }
        answer(&state.store, &state.alerts, &who, last, true, true, now)?;
        closed += 1;
    }
    Ok(closed)
}

fn store_has(
    state: &AppState,
    who: &ClientBilling,
    p: &BillingPeriod,
) -> tally_state::Result<bool> {
    Ok(state
        .store
        .closed_report(who.partition, &who.client, p.start_ms)?
        .is_some())
}
