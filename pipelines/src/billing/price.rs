//! Graduated pricing: a quantity is split across tiers, each priced at
//! its own unit price (the first `up_to` units at the first price, the
//! next ones up to the second tier's `up_to` at the second, ...). Exact
//! decimals throughout: no float ever touches money.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One tier: units up to `up_to` (cumulative; `None`: without end) at
/// `unit_price`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(default, deserialize_with = "exact::optional")]
    pub up_to: Option<Decimal>,
    #[serde(deserialize_with = "exact::required")]
    pub unit_price: Decimal,
}

/// Reads a decimal from a JSON string (`"0.0001"`, exact) or number (its
/// shortest decimal form, which is what was written); writes strings.
pub mod exact {
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use serde::de::{self, Visitor};
    use serde::Deserializer;

    struct Exact;

    fn parse<E: de::Error>(text: &str) -> Result<Decimal, E> {
        let parsed = if text.contains(['e', 'E']) {
            Decimal::from_scientific(text)
        } else {
            Decimal::from_str(text)
        };
        parsed.map_err(|e| E::custom(format!("{text:?} is not a decimal number: {e}")))
    }

    impl Visitor<'_> for Exact {
        type Value = Decimal;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a decimal number, as a string (\"0.0001\") or a number")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
            parse(v.trim())
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Decimal, E> {
            if !v.is_finite() {
                return Err(E::custom("not a finite number"));
            }
            // Rust prints the shortest form that reads back as `v`: the
            // digits the writer meant.
            parse(&v.to_string())
        }
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        d.deserialize_any(Exact)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        struct Maybe;
        impl<'de> Visitor<'de> for Maybe {
            type Value = Option<Decimal>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a decimal number or null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                required(d).map(Some)
            }
        }
        d.deserialize_option(Maybe)
    }
}

/// The part of a quantity one tier prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierCharge {
    /// The tier's units: `(from, to]` of the quantity.
    pub from: Decimal,
    pub to: Option<Decimal>,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub amount: Decimal,
}

/// What is wrong with a list of tiers (empty when nothing).
pub fn tier_problems(field: &str, tiers: &[Tier]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if tiers.is_empty() {
        out.push((field.to_string(), "needs at least one tier".to_string()));
        return out;
    }
    let mut previous = Decimal::ZERO;
    for (i, t) in tiers.iter().enumerate() {
        let name = format!("{field}[{i}]");
        if t.unit_price.is_sign_negative() {
            out.push((format!("{name}.unit_price"), "must not be negative".into()));
        }
        let last = i + 1 == tiers.len();
        match t.up_to {
            Some(up_to) if up_to <= previous => out.push((
                format!("{name}.up_to"),
                format!("must be above the tier before ({previous})"),
            )),
            Some(up_to) => previous = up_to,
            None if !last => out.push((
                format!("{name}.up_to"),
                "only the last tier may be without end".into(),
            )),
            None => {}
        }
        if last && t.up_to.is_some() {
            out.push((
                format!("{name}.up_to"),
                "the last tier must be without end (null), so every quantity has a price".into(),
            ));
        }
    }
    out
}

/// Prices `quantity` over `tiers` (validated by [`tier_problems`]): the
/// charges of the tiers it reaches, in order.
pub fn graduated(quantity: Decimal, tiers: &[Tier]) -> Vec<TierCharge> {
    let mut out = Vec::new();
    let mut from = Decimal::ZERO;
    for t in tiers {
        if quantity <= from {
            break;
        }
        let to = t.up_to.map_or(quantity, |u| u.min(quantity));
        let units = to - from;
        out.push(TierCharge {
            from,
            to: t.up_to,
            quantity: units,
            unit_price: t.unit_price,
            amount: units * t.unit_price,
        });
        match t.up_to {
            Some(u) => from = u,
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn tiers() -> Vec<Tier> {
        vec![
            Tier {
                up_to: Some(d("1000")),
                unit_price: d("0.01"),
            },
            Tier {
                up_to: Some(d("11000")),
                unit_price: d("0.005"),
            },
            Tier {
                up_to: None,
                unit_price: d("0.001"),
            },
        ]
    }

    fn total(q: &str) -> Decimal {
        graduated(d(q), &tiers()).iter().map(|c| c.amount).sum()
    }

    #[test]
    fn hand_worked_boundaries_of_graduated_tiers() {
        assert_eq!(total("0"), d("0"));
        assert!(graduated(d("0"), &tiers()).is_empty());
        assert_eq!(total("1"), d("0.01"));
        // One below, at, one above the first boundary.
        assert_eq!(total("999"), d("9.99"));
        assert_eq!(total("1000"), d("10"));
        assert_eq!(total("1001"), d("10.005"));
        assert_eq!(graduated(d("1000"), &tiers()).len(), 1);
        assert_eq!(graduated(d("1001"), &tiers()).len(), 2);
        // 1000 x 0.01 + 10000 x 0.005 = 60; then 0.001 each.
        assert_eq!(total("11000"), d("60"));
        assert_eq!(total("11001"), d("60.001"));
        assert_eq!(total("1000000"), d("60") + d("989000") * d("0.001"));
        // Fractional quantities (GB) are priced exactly.
        assert_eq!(total("0.000000001"), d("0.00000000001"));
    }

    #[test]
    fn tiers_must_rise_and_end_without_a_bound() {
        assert!(tier_problems("p", &tiers()).is_empty());
        assert_eq!(tier_problems("p", &[]).len(), 1);
        let bounded_last = vec![Tier {
            up_to: Some(d("5")),
            unit_price: d("1"),
        }];
        assert_eq!(tier_problems("p", &bounded_last)[0].0, "p[0].up_to");
        let falling = vec![
            Tier {
                up_to: Some(d("5")),
                unit_price: d("1"),
            },
            Tier {
                up_to: Some(d("5")),
                unit_price: d("1"),
            },
            Tier {
                up_to: None,
                unit_price: d("-1"),
            },
        ];
        let problems: Vec<String> = tier_problems("p", &falling)
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(problems, vec!["p[1].up_to", "p[2].unit_price"]);
    }
}
