//! A client's billing report for a period, from its stored usage and the
//! control plane's plans: the summary the usage queries give, the
//! breakdown by endpoint, the trend by local day, billable metrics, SLA
//! figures, and the priced lines of each plan segment.

use std::collections::BTreeSet;

use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_pipelines::aggregate::{BucketStats, EndpointStats};
use tally_pipelines::billing::{self, BillableMetrics, BillingPeriod, Plan, Segment, SegmentUsage};
use tally_pipelines::time::format_rfc3339_ms;
use tally_state::Store;

use super::cells::read_cells;
use tally_pipelines::billing::{Adjustment, Assignment};

/// Latencies as the usage queries report them (three decimals).
fn latency(ms: f64) -> f64 {
    if ms >= 0.5 {
        (ms * 1000.0).round() / 1000.0
    } else {
        ms
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub total_requests: u64,
    pub successful_requests: u64,
    pub failed_requests: u64,
    pub server_errors: u64,
    pub total_data_transfer_bytes: u128,
    pub compute_units: u128,
    pub average_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    pub unique_endpoints: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointLine {
    pub endpoint: String,
    pub request_count: u64,
    pub error_count: u64,
    pub error_rate: f64,
    pub average_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub total_data_transfer_bytes: u128,
    /// Under the period's plans.
    pub compute_units: u128,
    /// Of those, carried by the events themselves (which win).
    pub compute_units_from_events: u128,
    /// The weight applied to the other requests, and where it came from:
    /// `plan` (its `compute_unit_weights`) or `default` (1). With a plan
    /// change in the period, the last segment's.
    pub compute_unit_weight: u64,
    pub compute_unit_weight_source: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Day {
    pub date: String,
    pub start: String,
    pub requests: u64,
    pub failed_requests: u64,
    pub server_errors: u64,
    pub data_transfer_bytes: u128,
    pub compute_units: u128,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sla {
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
    /// Failed (status >= 400) per request.
    pub error_rate: f64,
    /// Requests not answered with a server error (status < 500), per
    /// request; 1 without requests.
    pub availability: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportLine {
    pub description: String,
    pub metric: String,
    pub plan_id: String,
    pub from: String,
    pub to: String,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub amount: Decimal,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanSegment {
    pub plan_id: Option<String>,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub client_id: String,
    /// The plan at the period's end (`None`: no plan assigned).
    pub plan_id: Option<String>,
    pub plans: Vec<PlanSegment>,
    pub time_zone: String,
    pub billing_period_start: String,
    pub billing_period_end: String,
    pub generated_at: String,
    pub status: &'static str,
    pub currency: Option<String>,
    pub summary: Summary,
    pub endpoint_breakdown: Vec<EndpointLine>,
    pub daily_trend: Vec<Day>,
    pub billable_metrics: BillableMetrics,
    pub sla: Sla,
    pub lines: Vec<ReportLine>,
    pub total_amount: Option<Decimal>,
    pub adjustments: Vec<serde_json::Value>,
}

/// What a report is built from besides the store.
pub struct Inputs<'a> {
    pub client: &'a str,
    pub partition: u16,
    pub tz: Tz,
    pub period: BillingPeriod,
    /// The client's plan schedule and the plans it names (`None`: a plan
    /// id no longer defined, billed as no plan).
    pub schedule: &'a [Assignment],
    pub plan_of: &'a dyn Fn(&str) -> Option<Plan>,
    /// The client's adjustments (those booked in the period are billed).
    pub adjustments: &'a [Adjustment],
    pub now_ms: i64,
    pub closed: bool,
}

/// The plan segments of `[start, end)`: `(plan_id, from, to)`.
fn segments(schedule: &[Assignment], start: i64, end: i64) -> Vec<(Option<String>, i64, i64)> {
    let mut out: Vec<(Option<String>, i64, i64)> = Vec::new();
    let in_force_at_start =
        tally_pipelines::billing::schedule::in_force(schedule, start).map(|a| a.plan_id.clone());
    let mut current = (in_force_at_start, start);
    for a in schedule
        .iter()
        .filter(|a| a.effective_from_ms > start && a.effective_from_ms < end)
    {
        if current.0.as_deref() != Some(a.plan_id.as_str()) {
            out.push((current.0.clone(), current.1, a.effective_from_ms));
            current = (Some(a.plan_id.clone()), a.effective_from_ms);
        }
    }
    out.push((current.0, current.1, end));
    out
}

pub fn build(store: &Store, input: &Inputs<'_>) -> tally_state::Result<Report> {
    let (start, end) = (input.period.start_ms, input.period.end_ms);
    let days = input.period.days(input.tz);
    let segs = segments(input.schedule, start, end);
    let mut boundaries: BTreeSet<i64> = days.iter().map(|d| d.1).collect();
    boundaries.extend(segs.iter().map(|s| s.1));
    let cells = read_cells(
        store,
        input.partition,
        input.client,
        start,
        end,
        &boundaries,
    )?;

    let plans: Vec<Option<Plan>> = segs
        .iter()
        .map(|(id, _, _)| id.as_deref().and_then(input.plan_of))
        .collect();
    let no_plan = Plan::default();
    let plan_at = |i: usize| plans[i].as_ref().unwrap_or(&no_plan);
    let segment_of = |ts: i64| segs.iter().position(|s| ts >= s.1 && ts < s.2).unwrap_or(0);

    let mut per_segment: Vec<BucketStats> = vec![BucketStats::default(); segs.len()];
    let mut per_day: Vec<(u64, u64, u64, u128, u128)> = vec![(0, 0, 0, 0, 0); days.len()];
    for (ts, cell) in &cells {
        let s = segment_of(*ts);
        if let Some(d) = days.iter().position(|d| *ts >= d.1 && *ts < d.2) {
            // Counts only: no latency sketch is merged for a day.
            let plan = plan_at(s);
            let day = &mut per_day[d];
            for (e, st) in cell.endpoints() {
                day.0 += st.requests;
                day.1 += st.failed;
                day.2 += st.server_errors;
                day.3 += st.bytes;
                day.4 += st.units_weighted(plan.weight(e));
            }
        }
        per_segment[s].merge(cell);
    }
    let mut total = BucketStats::default();
    for stats in &per_segment {
        total.merge(stats);
    }

    // Compute units by endpoint, each segment under its own plan.
    let mut units_by_endpoint: std::collections::BTreeMap<String, u128> = Default::default();
    let mut usages = Vec::with_capacity(segs.len());
    for (i, stats) in per_segment.iter().enumerate() {
        let plan = plan_at(i);
        let mut units = 0u128;
        for (e, st) in stats.endpoints() {
            let u = st.units_weighted(plan.weight(e));
            units += u;
            *units_by_endpoint.entry(e.to_string()).or_default() += u;
        }
        let t = stats.totals();
        usages.push(SegmentUsage {
            requests: t.requests,
            bytes: t.bytes,
            compute_units: units,
        });
    }
    let last_plan = plan_at(segs.len() - 1);
    let billed: Vec<Segment<'_>> = segs
        .iter()
        .enumerate()
        .map(|(i, (id, from, to))| Segment {
            plan_id: id.as_deref().unwrap_or("none"),
            plan: plan_at(i),
            from_ms: *from,
            to_ms: *to,
            usage: usages[i],
        })
        .collect();
    let mut bill = billing::bill(start, end, &billed);
    // Adjustments booked in the period: dated lines under the plan in
    // force when booked.
    let booked: Vec<&Adjustment> = input
        .adjustments
        .iter()
        .filter(|a| a.booked_at_ms >= start && a.booked_at_ms < end)
        .collect();
    for a in &booked {
        let i = segment_of(a.booked_at_ms);
        let id = segs[i].0.as_deref().unwrap_or("none");
        let lines = tally_pipelines::billing::adjustment::lines(a, id, plan_at(i));
        if !lines.is_empty() {
            let sum: Decimal = lines.iter().map(|l| l.amount).sum();
            bill.total_amount = Some(bill.total_amount.unwrap_or_default() + sum);
        }
        bill.lines.extend(lines);
    }
    let adjustments = booked
        .iter()
        .map(|a| {
            serde_json::json!({
                "adjustment_id": a.adjustment_id,
                "booked_at": format_rfc3339_ms(a.booked_at_ms),
                "reason": a.reason,
                "requests": a.requests,
                "data_transfer_bytes": a.data_transfer_bytes,
                "compute_units": a.compute_units,
                "dead_letters": a.dead_letters.len(),
            })
        })
        .collect();

    let t: EndpointStats = total.totals();
    let summary = Summary {
        total_requests: t.requests,
        successful_requests: t.requests - t.failed,
        failed_requests: t.failed,
        server_errors: t.server_errors,
        total_data_transfer_bytes: t.bytes,
        compute_units: bill.billable.compute_units,
        average_latency_ms: t.average_latency_ms(),
        p95_latency_ms: latency(t.latency.quantile(0.95).unwrap_or(0.0)),
        p99_latency_ms: latency(t.latency.quantile(0.99).unwrap_or(0.0)),
        unique_endpoints: total.distinct_endpoints(),
    };
    let mut endpoint_breakdown: Vec<EndpointLine> = total
        .endpoints()
        .filter(|(_, s)| s.requests > 0)
        .map(|(e, s)| {
            let listed = last_plan.compute_unit_weights.get(e).copied();
            EndpointLine {
                endpoint: e.to_string(),
                request_count: s.requests,
                error_count: s.failed,
                error_rate: s.failed as f64 / s.requests as f64,
                average_latency_ms: s.average_latency_ms(),
                p95_latency_ms: latency(s.latency.quantile(0.95).unwrap_or(0.0)),
                total_data_transfer_bytes: s.bytes,
                compute_units: units_by_endpoint.get(e).copied().unwrap_or(0),
                compute_units_from_events: s.own_units,
                compute_unit_weight: listed.unwrap_or(1),
                compute_unit_weight_source: if listed.is_some() { "plan" } else { "default" },
            }
        })
        .collect();
    endpoint_breakdown.sort_by(|a, b| {
        b.request_count
            .cmp(&a.request_count)
            .then_with(|| a.endpoint.cmp(&b.endpoint))
    });
    let daily_trend = days
        .iter()
        .zip(per_day)
        .map(|((date, day_start, _), (r, f, s, b, u))| Day {
            date: date.to_string(),
            start: format_rfc3339_ms(*day_start),
            requests: r,
            failed_requests: f,
            server_errors: s,
            data_transfer_bytes: b,
            compute_units: u,
        })
        .collect();
    let sla = Sla {
        p95_latency_ms: summary.p95_latency_ms,
        p99_latency_ms: summary.p99_latency_ms,
        error_rate: if t.requests == 0 {
            0.0
        } else {
            t.failed as f64 / t.requests as f64
        },
        availability: if t.requests == 0 {
            1.0
        } else {
            1.0 - t.server_errors as f64 / t.requests as f64
        },
    };
    let lines = bill
        .lines
        .iter()
        .map(|l| ReportLine {
            description: l.description.clone(),
            metric: l.metric.to_string(),
            plan_id: l.plan_id.clone(),
            from: format_rfc3339_ms(l.from_ms),
            to: format_rfc3339_ms(l.to_ms),
            quantity: l.quantity,
            unit_price: l.unit_price,
            amount: l.amount,
        })
        .collect();
    Ok(Report {
        client_id: input.client.to_string(),
        plan_id: segs.last().and_then(|s| s.0.clone()),
        plans: segs
            .iter()
            .map(|(id, from, to)| PlanSegment {
                plan_id: id.clone(),
                from: format_rfc3339_ms(*from),
                to: format_rfc3339_ms(*to),
            })
            .collect(),
        time_zone: input.tz.name().to_string(),
        billing_period_start: format_rfc3339_ms(start),
        billing_period_end: format_rfc3339_ms(end),
        generated_at: format_rfc3339_ms(input.now_ms),
        status: if input.closed { "closed" } else { "open" },
        currency: last_plan.currency.clone(),
        summary,
        endpoint_breakdown,
        daily_trend,
        billable_metrics: bill.billable,
        sla,
        lines,
        total_amount: bill.total_amount,
        adjustments,
    })
}
