//! A telemetry point as it arrives, validated: a series name, a time, a
//! finite value of any sign, and a bounded map of tags. A series is its
//! name plus its sorted tags, written as one key
//! (`cpu{host=a,region=eu}`) that maps it to a partition like a client.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::event::{RawTimestamp, Rejection, ValidationContext};

pub const MAX_SERIES_BYTES: usize = 256;
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG_KEY_BYTES: usize = 64;
pub const MAX_TAG_VALUE_BYTES: usize = 256;
pub const MAX_POINT_ID_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The series key: name and sorted tags (see [`series_key`]).
    pub series: String,
    pub timestamp_ms: i64,
    pub value: f64,
    /// Optional, for exactly-once across retries (deduplicated like an
    /// event id).
    pub point_id: Option<String>,
}

/// A point as read from the wire, before validation.
#[derive(Debug, Default, Deserialize)]
pub struct RawPoint<'a> {
    #[serde(default, borrow)]
    pub series: Option<Cow<'a, str>>,
    #[serde(default)]
    pub timestamp: Option<RawTimestamp>,
    #[serde(default)]
    pub value: Option<serde_json::Number>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(default, borrow)]
    pub point_id: Option<Cow<'a, str>>,
}

/// Characters that structure a series key, escaped with `\` inside names
/// and tags so that two different series never share a key.
fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '{' | '}' | ',' | '=' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `name{k1=v1,k2=v2}` with tags sorted by key; the bare name without tags.
pub fn series_key(name: &str, tags: &BTreeMap<String, String>) -> String {
    let mut key = String::with_capacity(name.len() + tags.len() * 16);
    escape_into(&mut key, name);
    if !tags.is_empty() {
        key.push('{');
        for (i, (k, v)) in tags.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            escape_into(&mut key, k);
            key.push('=');
            escape_into(&mut key, v);
        }
        key.push('}');
    }
    key
}

fn text<'a>(
    value: Option<Cow<'a, str>>,
    field: &'static str,
    limit: usize,
) -> Result<Cow<'a, str>, Rejection> {
    let value = value.ok_or(Rejection::MissingField(field))?;
    if value.is_empty() {
        return Err(Rejection::Empty(field));
    }
    if value.len() > limit {
        return Err(Rejection::TooLong {
            field,
            len: value.len(),
            limit,
        });
    }
    Ok(value)
}

impl RawPoint<'_> {
    pub fn validate(self, ctx: &ValidationContext) -> Result<Point, Rejection> {
        let name = text(self.series, "series", MAX_SERIES_BYTES)?;
        let timestamp_ms = self
            .timestamp
            .ok_or(Rejection::MissingField("timestamp"))?
            .to_epoch_ms()?;
        if timestamp_ms - ctx.now_ms > ctx.max_future_ms {
            return Err(Rejection::FromTheFuture {
                ahead_ms: timestamp_ms - ctx.now_ms,
                limit_ms: ctx.max_future_ms,
            });
        }
        let value = self
            .value
            .ok_or(Rejection::MissingField("value"))?
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| Rejection::Other("`value` must be a finite number".into()))?;
        let tags = self.tags.unwrap_or_default();
        if tags.len() > MAX_TAGS {
            return Err(Rejection::Other(format!(
                "`tags` has {} entries, the limit is {MAX_TAGS}",
                tags.len()
            )));
        }
        for (k, v) in &tags {
            if k.is_empty() || k.len() > MAX_TAG_KEY_BYTES {
                return Err(Rejection::Other(format!(
                    "tag key {k:?} must be 1..={MAX_TAG_KEY_BYTES} bytes"
                )));
            }
            if v.len() > MAX_TAG_VALUE_BYTES {
                return Err(Rejection::Other(format!(
                    "tag {k:?} is {} bytes, the limit is {MAX_TAG_VALUE_BYTES}",
                    v.len()
                )));
            }
        }
        let point_id = match self.point_id {
            None => None,
            Some(id) => Some(text(Some(id), "point_id", MAX_POINT_ID_BYTES)?.into_owned()),
        };
        Ok(Point {
            series: series_key(&name, &tags),
            timestamp_ms,
            value,
            point_id,
        })
    }
}

/// Decodes and validates one JSON point.
pub fn decode_point(json: &str, ctx: &ValidationContext) -> Result<Point, Rejection> {
    let raw: RawPoint<'_> =
        serde_json::from_str(json).map_err(|e| Rejection::MalformedJson(e.to_string()))?;
    raw.validate(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ValidationContext {
        ValidationContext {
            now_ms: 1_700_000_000_000,
            max_future_ms: 300_000,
        }
    }

    #[test]
    fn a_series_is_its_name_and_sorted_tags() {
        let p = decode_point(
            r#"{"series":"cpu","timestamp":"2023-11-14T22:13:20+01:00","value":-0.5,"tags":{"region":"eu","host":"a"}}"#,
            &ctx(),
        )
        .unwrap();
        assert_eq!(p.series, "cpu{host=a,region=eu}");
        assert_eq!(p.timestamp_ms, 1_699_996_400_000);
        assert_eq!(p.value, -0.5);
        let bare = decode_point(r#"{"series":"cpu","timestamp":5,"value":1}"#, &ctx()).unwrap();
        assert_eq!((bare.series.as_str(), bare.timestamp_ms), ("cpu", 5));
    }

    #[test]
    fn structure_in_names_and_tags_cannot_make_two_series_one() {
        let one = series_key("a", &BTreeMap::from([("b".into(), "c,d=e".into())]));
        let two = series_key(
            "a",
            &BTreeMap::from([("b".into(), "c".into()), ("d".into(), "e".into())]),
        );
        assert_ne!(one, two);
        assert_ne!(
            series_key("a{b=c}", &BTreeMap::new()),
            series_key("a", &BTreeMap::from([("b".into(), "c".into())]))
        );
    }

    #[test]
    fn bad_points_are_refused_with_what_to_fix() {
        let cases = [
            (
                r#"{"timestamp":1,"value":1}"#,
                "missing required field `series`",
            ),
            (
                r#"{"series":"","timestamp":1,"value":1}"#,
                "`series` must not be empty",
            ),
            (
                r#"{"series":"s","value":1}"#,
                "missing required field `timestamp`",
            ),
            (
                r#"{"series":"s","timestamp":1}"#,
                "missing required field `value`",
            ),
            (
                r#"{"series":"s","timestamp":1,"value":1e999}"#,
                "malformed JSON",
            ),
            (
                r#"{"series":"s","timestamp":"yesterday","value":1}"#,
                "`timestamp`",
            ),
            (
                r#"{"series":"s","timestamp":1800000000000,"value":1}"#,
                "ahead of the ingest clock",
            ),
            (
                r#"{"series":"s","timestamp":1,"value":1,"tags":{"":"x"}}"#,
                "tag key",
            ),
        ];
        for (json, want) in cases {
            let err = decode_point(json, &ctx()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let long = format!(
            r#"{{"series":"{}","timestamp":1,"value":1}}"#,
            "x".repeat(257)
        );
        assert!(decode_point(&long, &ctx())
            .unwrap_err()
            .to_string()
            .contains("257 bytes"));
        let many: BTreeMap<String, String> =
            (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        let json =
            serde_json::json!({"series":"s","timestamp":1,"value":1,"tags":many}).to_string();
        assert!(decode_point(&json, &ctx())
            .unwrap_err()
            .to_string()
            .contains("17 entries"));
    }
}
