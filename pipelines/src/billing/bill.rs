//! From usage to billable metrics and priced lines. A period under one
//! plan is one segment; a plan change splits it, and each segment is
//! billed under its own plan, with that plan's included amounts prorated
//! by the share of the period the segment covers (floored to whole units),
//! so that changing plans mid-period buys no second free tier.

use rust_decimal::Decimal;
use serde::Serialize;

use super::plan::{gigabytes, Plan};
use super::price::{graduated, Tier};

/// What a segment used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentUsage {
    pub requests: u64,
    pub bytes: u128,
    /// Weighted by the segment's plan.
    pub compute_units: u128,
}

/// A part of a period under one plan: `[from_ms, to_ms)`.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    pub plan_id: &'a str,
    pub plan: &'a Plan,
    pub from_ms: i64,
    pub to_ms: i64,
    pub usage: SegmentUsage,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Overage {
    pub requests_over_limit: u64,
    pub data_transfer_over_limit_gb: Decimal,
    pub compute_units_over_limit: u128,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BillableMetrics {
    pub total_requests: u64,
    /// Beyond the free tier.
    pub billable_requests: u64,
    /// Decimal gigabytes (10^9 bytes).
    pub data_transfer_gb: Decimal,
    pub compute_units: u128,
    pub overage: Overage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub description: String,
    pub metric: &'static str,
    pub plan_id: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub amount: Decimal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Bill {
    pub billable: BillableMetrics,
    pub lines: Vec<Line>,
    /// When any plan of the period has prices.
    pub total_amount: Option<Decimal>,
}

/// `included` for a segment `part` of a period `whole` long, floored.
fn prorated(included: u64, part: i64, whole: i64) -> u128 {
    if whole <= 0 || part >= whole {
        return u128::from(included);
    }
    u128::from(included) * u128::try_from(part.max(0)).unwrap_or(0)
        / u128::try_from(whole).unwrap_or(1)
}

fn dec(n: u128) -> Decimal {
    Decimal::from_i128_with_scale(i128::try_from(n).unwrap_or(i128::MAX), 0)
}

/// Bills the segments of a period `[period_start, period_end)`.
pub fn bill(period_start: i64, period_end: i64, segments: &[Segment<'_>]) -> Bill {
    let whole = period_end - period_start;
    let mut out = Bill::default();
    let mut priced = false;
    for s in segments {
        let part = s.to_ms - s.from_ms;
        let free = prorated(s.plan.free_requests, part, whole);
        let included_bytes = prorated(s.plan.included_data_transfer_bytes, part, whole);
        let included_units = prorated(s.plan.included_compute_units, part, whole);
        let requests = u128::from(s.usage.requests);
        let over_requests = requests.saturating_sub(free);
        let gb = gigabytes(s.usage.bytes);
        let over_gb = (gb - gigabytes(included_bytes)).max(Decimal::ZERO);
        let over_units = s.usage.compute_units.saturating_sub(included_units);

        let b = &mut out.billable;
        b.total_requests = b.total_requests.saturating_add(s.usage.requests);
        let over_requests_u64 = u64::try_from(over_requests).unwrap_or(u64::MAX);
        b.billable_requests = b.billable_requests.saturating_add(over_requests_u64);
        b.data_transfer_gb += gb;
        b.compute_units = b.compute_units.saturating_add(s.usage.compute_units);
        b.overage.requests_over_limit = b
            .overage
            .requests_over_limit
            .saturating_add(over_requests_u64);
        b.overage.data_transfer_over_limit_gb += over_gb;
        b.overage.compute_units_over_limit = b
            .overage
            .compute_units_over_limit
            .saturating_add(over_units);

        let Some(prices) = &s.plan.prices else {
            continue;
        };
        priced = true;
        let metrics: [(&'static str, &str, Decimal, &Vec<Tier>); 3] = [
            (
                "requests",
                "API requests beyond the free tier",
                dec(over_requests),
                &prices.requests,
            ),
            (
                "data_transfer_gb",
                "data transfer beyond the included amount (GB, 10^9 bytes)",
                over_gb,
                &prices.data_transfer_gb,
            ),
            (
                "compute_units",
                "compute units beyond the included amount",
                dec(over_units),
                &prices.compute_units,
            ),
        ];
        for (metric, what, quantity, tiers) in metrics {
            if tiers.is_empty() {
                continue;
            }
            let charges = graduated(quantity, tiers);
            let several = tiers.len() > 1;
            for (i, c) in charges.into_iter().enumerate() {
                let tier = if several {
                    match c.to {
                        Some(to) => format!(", tier {} ({}-{})", i + 1, c.from, to),
                        None => format!(", tier {} (above {})", i + 1, c.from),
                    }
                } else {
                    String::new()
                };
                out.lines.push(Line {
                    description: format!("{what}, plan {}{tier}", s.plan_id),
                    metric,
                    plan_id: s.plan_id.to_string(),
                    from_ms: s.from_ms,
                    to_ms: s.to_ms,
                    quantity: c.quantity,
                    unit_price: c.unit_price,
                    amount: c.amount,
                });
            }
        }
    }
    if priced {
        out.total_amount = Some(out.lines.iter().map(|l| l.amount).sum());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::billing::plan::Prices;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn plan(free: u64, price: &str) -> Plan {
        Plan {
            free_requests: free,
            included_data_transfer_bytes: 2_000_000_000,
            prices: Some(Prices {
                requests: vec![Tier {
                    up_to: None,
                    unit_price: d(price),
                }],
                data_transfer_gb: vec![Tier {
                    up_to: None,
                    unit_price: d("0.09"),
                }],
                compute_units: vec![],
            }),
            ..Plan::default()
        }
    }

    fn one(plan: &Plan, requests: u64, bytes: u128) -> Bill {
        bill(
            0,
            100,
            &[Segment {
                plan_id: "p",
                plan,
                from_ms: 0,
                to_ms: 100,
                usage: SegmentUsage {
                    requests,
                    bytes,
                    compute_units: 0,
                },
            }],
        )
    }

    #[test]
    fn the_free_tier_boundary_one_below_at_and_one_above() {
        let p = plan(1000, "0.002");
        let below = one(&p, 999, 0);
        assert_eq!(below.billable.billable_requests, 0);
        assert!(below.lines.iter().all(|l| l.metric != "requests"));
        assert_eq!(below.total_amount, Some(d("0")));
        let at = one(&p, 1000, 0);
        assert_eq!(at.billable.billable_requests, 0);
        assert_eq!(at.billable.overage.requests_over_limit, 0);
        let above = one(&p, 1001, 0);
        assert_eq!(above.billable.billable_requests, 1);
        let line = above.lines.iter().find(|l| l.metric == "requests").unwrap();
        assert_eq!(
            (line.quantity, line.unit_price, line.amount),
            (d("1"), d("0.002"), d("0.002"))
        );
        assert_eq!(above.total_amount, Some(d("0.002")));
    }

    #[test]
    fn data_transfer_is_billed_in_decimal_gigabytes_beyond_the_included() {
        let p = plan(0, "0");
        // 2 GB included: 2.5 GB used is 0.5 over, 0.045 at 0.09/GB.
        let b = one(&p, 0, 2_500_000_000);
        assert_eq!(b.billable.data_transfer_gb, d("2.5"));
        assert_eq!(b.billable.overage.data_transfer_over_limit_gb, d("0.5"));
        let line = b
            .lines
            .iter()
            .find(|l| l.metric == "data_transfer_gb")
            .unwrap();
        assert_eq!(line.amount, d("0.045"));
        // Exactly the included amount: nothing over.
        let b = one(&p, 0, 2_000_000_000);
        assert_eq!(b.billable.overage.data_transfer_over_limit_gb, d("0"));
    }

    #[test]
    fn a_plan_change_splits_the_period_and_prorates_what_each_plan_includes() {
        let basic = plan(1000, "0.01");
        let pro = plan(10_000, "0.001");
        // A 30-unit period, basic for the first 10 (a third: 333 free),
        // pro for the last 20 (two thirds: 6666 free).
        let segments = [
            Segment {
                plan_id: "basic",
                plan: &basic,
                from_ms: 0,
                to_ms: 10,
                usage: SegmentUsage {
                    requests: 400,
                    ..Default::default()
                },
            },
            Segment {
                plan_id: "pro",
                plan: &pro,
                from_ms: 10,
                to_ms: 30,
                usage: SegmentUsage {
                    requests: 7000,
                    ..Default::default()
                },
            },
        ];
        let b = bill(0, 30, &segments);
        let lines: Vec<(&str, Decimal, Decimal)> = b
            .lines
            .iter()
            .filter(|l| l.metric == "requests")
            .map(|l| (l.plan_id.as_str(), l.quantity, l.amount))
            .collect();
        assert_eq!(
            lines,
            vec![("basic", d("67"), d("0.67")), ("pro", d("334"), d("0.334"))]
        );
        assert_eq!(b.billable.total_requests, 7400);
        assert_eq!(b.billable.billable_requests, 401);
        assert_eq!(b.total_amount, Some(d("1.004")));
    }

    #[test]
    fn without_prices_there_are_metrics_but_no_amount() {
        let p = Plan {
            free_requests: 5,
            ..Plan::default()
        };
        let b = one(&p, 8, 0);
        assert_eq!(b.billable.billable_requests, 3);
        assert!(b.lines.is_empty());
        assert_eq!(b.total_amount, None);
    }
}
