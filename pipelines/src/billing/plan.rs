//! A billing plan: what a period includes (free requests, data transfer,
//! compute units), how compute units are weighted by endpoint, and
//! optional graduated prices for what goes beyond.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::price::{tier_problems, Tier};

/// The longest plan id (bytes).
pub const MAX_PLAN_ID_BYTES: usize = 128;
/// Endpoint weights a plan may list at most.
pub const MAX_WEIGHTS: usize = 10_000;
/// Tiers a price may have at most.
pub const MAX_TIERS: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<Tier>,
    /// Per decimal gigabyte (10^9 bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_transfer_gb: Vec<Tier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compute_units: Vec<Tier>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub free_requests: u64,
    #[serde(default)]
    pub included_data_transfer_bytes: u64,
    #[serde(default)]
    pub included_compute_units: u64,
    /// Compute units per request by endpoint template; an event's own
    /// `compute_units` wins; endpoints not listed weigh 1.
    #[serde(default)]
    pub compute_unit_weights: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<Prices>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

impl Plan {
    /// Every problem, by field (empty when valid).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.compute_unit_weights.len() > MAX_WEIGHTS {
            out.push((
                "compute_unit_weights".into(),
                format!("at most {MAX_WEIGHTS} endpoints"),
            ));
        }
        if let Some(c) = &self.currency {
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                out.push((
                    "currency".into(),
                    "must be an ISO 4217 code, e.g. USD".into(),
                ));
            }
        }
        if let Some(p) = &self.prices {
            for (field, tiers) in [
                ("prices.requests", &p.requests),
                ("prices.data_transfer_gb", &p.data_transfer_gb),
                ("prices.compute_units", &p.compute_units),
            ] {
                if tiers.is_empty() {
                    continue;
                }
                if tiers.len() > MAX_TIERS {
                    out.push((field.into(), format!("at most {MAX_TIERS} tiers")));
                    continue;
                }
                out.extend(tier_problems(field, tiers));
            }
        }
        out
    }

    /// The weight of one request to `endpoint` (without its own units).
    pub fn weight(&self, endpoint: &str) -> u64 {
        self.compute_unit_weights
            .get(endpoint)
            .copied()
            .unwrap_or(1)
    }
}

/// What a plan id may be: 1..=128 bytes of letters, digits, `-_.:`.
pub fn plan_id_problem(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_PLAN_ID_BYTES {
        return Some(format!("must be 1..={MAX_PLAN_ID_BYTES} bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Some("may hold letters, digits and - _ . : only".into());
    }
    None
}

/// Decimal gigabytes (10^9 bytes), exactly.
pub fn gigabytes(bytes: u128) -> Decimal {
    // u128 beyond Decimal's 96 bits cannot come from validated events;
    // saturate rather than fail.
    let b =
        Decimal::from_i128_with_scale(i128::try_from(bytes).unwrap_or(i128::MAX).min(DEC_MAX), 0);
    b / Decimal::from(1_000_000_000u64)
}

/// The largest integer a Decimal holds (2^96 - 1).
const DEC_MAX: i128 = 79_228_162_514_264_337_593_543_950_335;

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn a_plan_reads_prices_as_strings_or_numbers_and_says_what_is_wrong() {
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "free_requests": 1000,
            "compute_unit_weights": {"/v1/search": 5},
            "prices": {"requests": [{"up_to": 10, "unit_price": "0.0001"}, {"up_to": null, "unit_price": 0.00005}]},
            "currency": "EUR"
        }))
        .unwrap();
        assert!(plan.problems().is_empty(), "{:?}", plan.problems());
        let p = plan.prices.as_ref().unwrap();
        assert_eq!(
            p.requests[1].unit_price,
            Decimal::from_str("0.00005").unwrap()
        );
        assert_eq!(plan.weight("/v1/search"), 5);
        assert_eq!(plan.weight("/other"), 1);
        // Prices are written back as strings, exactly.
        let back = serde_json::to_value(&plan).unwrap();
        assert_eq!(back["prices"]["requests"][0]["unit_price"], "0.0001");
        let bad = Plan {
            currency: Some("euro".into()),
            ..plan
        };
        assert_eq!(bad.problems()[0].0, "currency");
        assert!(serde_json::from_value::<Plan>(serde_json::json!({"free": 1})).is_err());
    }

    #[test]
    fn gigabytes_are_decimal_and_exact() {
        assert_eq!(gigabytes(1_500_000_000), Decimal::from_str("1.5").unwrap());
        assert_eq!(gigabytes(1), Decimal::from_str("0.000000001").unwrap());
        assert_eq!(gigabytes(0), Decimal::ZERO);
    }

    #[test]
    fn plan_ids_are_bounded_and_plain() {
        assert!(plan_id_problem("pro-2026").is_none());
        assert!(plan_id_problem("").is_some());
        assert!(plan_id_problem("a/b").is_some());
        assert!(plan_id_problem(&"x".repeat(129)).is_some());
    }
}
