//! Adjustments: usage booked after its period closed (late events from
//! the dead letters, or quantities an operator states), with a reason.
//! A closed report never changes; an adjustment is a dated line of the
//! period it is booked in, priced at the first tier of the plan in force
//! then (the free tier was that closed period's to use).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::bill::Line;
use super::plan::{gigabytes, Plan};

/// Adjustments a client keeps at most (the oldest leave first).
pub const MAX_ADJUSTMENTS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustment {
    pub adjustment_id: String,
    pub booked_at_ms: i64,
    pub reason: String,
    pub requests: u64,
    pub data_transfer_bytes: u64,
    pub compute_units: u64,
    /// Dead letters booked (`partition`, `sequence`): each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<(u16, u64)>,
}

/// The adjustments with `new` appended, bounded.
pub fn book(mut list: Vec<Adjustment>, new: Adjustment) -> Vec<Adjustment> {
    list.push(new);
    let excess = list.len().saturating_sub(MAX_ADJUSTMENTS);
    list.drain(..excess);
    list
}

/// The lines of one adjustment under `plan` (none without prices).
pub fn lines(a: &Adjustment, plan_id: &str, plan: &Plan) -> Vec<Line> {
    let Some(prices) = &plan.prices else {
        return vec![];
    };
    let first = |tiers: &[super::Tier]| tiers.first().map(|t| t.unit_price);
    let metrics = [
        (
            "requests",
            Decimal::from(a.requests),
            first(&prices.requests),
        ),
        (
            "data_transfer_gb",
            gigabytes(u128::from(a.data_transfer_bytes)),
            first(&prices.data_transfer_gb),
        ),
        (
            "compute_units",
            Decimal::from(a.compute_units),
            first(&prices.compute_units),
        ),
    ];
    metrics
        .into_iter()
        .filter_map(|(metric, quantity, price)| {
            let price = price?;
            (!quantity.is_zero()).then(|| Line {
                description: format!("adjustment {}: {}", a.adjustment_id, a.reason),
                metric,
                plan_id: plan_id.to_string(),
                from_ms: a.booked_at_ms,
                to_ms: a.booked_at_ms,
                quantity,
                unit_price: price,
                amount: quantity * price,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::billing::plan::Prices;
    use crate::billing::Tier;

    #[test]
    fn an_adjustment_is_priced_at_the_first_tier_of_each_metric() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        let plan = Plan {
            free_requests: 1_000_000,
            prices: Some(Prices {
                requests: vec![
                    Tier {
                        up_to: Some(d("10")),
                        unit_price: d("0.02"),
                    },
                    Tier {
                        up_to: None,
                        unit_price: d("0.01"),
                    },
                ],
                data_transfer_gb: vec![],
                compute_units: vec![Tier {
                    up_to: None,
                    unit_price: d("0.5"),
                }],
            }),
            ..Plan::default()
        };
        let a = Adjustment {
            adjustment_id: "a1".into(),
            booked_at_ms: 5,
            reason: "late events".into(),
            requests: 30,
            data_transfer_bytes: 9,
            compute_units: 3,
            dead_letters: vec![],
        };
        let got: Vec<(&str, Decimal)> = lines(&a, "p", &plan)
            .iter()
            .map(|l| (l.metric, l.amount))
            .collect();
        // The free tier does not apply; data has no price here.
        assert_eq!(
            got,
            vec![("requests", d("0.6")), ("compute_units", d("1.5"))]
        );
        assert!(lines(&a, "p", &Plan::default()).is_empty());
        let mut list = vec![];
        for i in 0..(MAX_ADJUSTMENTS + 3) {
            list = book(
                list,
                Adjustment {
                    booked_at_ms: i as i64,
                    ..a.clone()
                },
            );
        }
        assert_eq!(list.len(), MAX_ADJUSTMENTS);
        assert_eq!(list[0].booked_at_ms, 3);
    }
}
