//! A telemetry point as it arrives, validated: a series name, a time, a
//! finite value of any sign, and a bounded map of tags. A series is its
//! name plus its sorted tags, written as one key
//! (`cpu{host=a,region=eu}`) that maps it to a partition like a client.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::decode::{BodyItem, CloudEventParts};
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

/// The name and tags of a series key: the inverse of [`series_key`].
pub fn split_series_key(key: &str) -> Option<(String, BTreeMap<String, String>)> {
    // Unescaped text up to a structural character (or the end).
    fn part(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
        let mut out = String::new();
        while let Some(&c) = chars.peek() {
            match c {
                '\\' => {
                    chars.next();
                    if let Some(escaped) = chars.next() {
                        out.push(escaped);
                    }
                }
                '{' | '}' | ',' | '=' => break,
                _ => {
                    out.push(c);
                    chars.next();
                }
            }
        }
        out
    }
    let mut chars = key.chars().peekable();
    let name = part(&mut chars);
    let mut tags = BTreeMap::new();
    match chars.next() {
        None => return Some((name, tags)),
        Some('{') => {}
        Some(_) => return None,
    }
    loop {
        let k = part(&mut chars);
        if chars.next() != Some('=') {
            return None;
        }
        let v = part(&mut chars);
        tags.insert(k, v);
        match chars.next() {
            Some(',') => continue,
            Some('}') if chars.next().is_none() => return Some((name, tags)),
            _ => return None,
        }
    }
}

impl Point {
    /// The point as one JSON object that decodes back to it (the record
    /// of the Kafka telemetry topic).
    pub fn to_wire_json(&self) -> String {
        let (name, tags) = split_series_key(&self.series)
            .unwrap_or_else(|| (self.series.clone(), BTreeMap::new()));
        let mut value = serde_json::json!({
            "series": name,
            "timestamp": self.timestamp_ms,
            "value": self.value,
        });
        if let Some(obj) = value.as_object_mut() {
            if !tags.is_empty() {
                obj.insert("tags".into(), serde_json::json!(tags));
            }
            if let Some(id) = &self.point_id {
                obj.insert("point_id".into(), serde_json::json!(id));
            }
        }
        value.to_string()
    }
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

/// CloudEvents `type` of a telemetry point.
pub const CLOUDEVENT_TYPE: &str = "tally.telemetry.v1";

/// Decodes and validates one JSON point.
pub fn decode_point(json: &str, ctx: &ValidationContext) -> Result<Point, Rejection> {
    decode_point_bytes(json.as_bytes(), ctx)
}

/// [`decode_point`] of bytes (an NDJSON line, an array element).
pub fn decode_point_bytes(json: &[u8], ctx: &ValidationContext) -> Result<Point, Rejection> {
    // serde would also read a struct from a JSON array, by position.
    if !json.trim_ascii_start().starts_with(b"{") {
        return Err(match serde_json::from_slice::<serde_json::Value>(json) {
            Err(e) => Rejection::MalformedJson(e.to_string()),
            Ok(_) => Rejection::Other("a point must be a JSON object".into()),
        });
    }
    let raw: RawPoint<'_> =
        serde_json::from_slice(json).map_err(|e| Rejection::MalformedJson(e.to_string()))?;
    raw.validate(ctx)
}

impl BodyItem for Point {
    const CLOUDEVENT_TYPE: &'static str = CLOUDEVENT_TYPE;

    fn decode_json(json: &[u8], ctx: &ValidationContext) -> Result<Self, Rejection> {
        decode_point_bytes(json, ctx)
    }

    /// The envelope's `id` is the point id unless `data.point_id` is
    /// given, and its `time` the point's time unless `data.timestamp` is.
    fn from_cloudevent(
        env: CloudEventParts<'_>,
        ctx: &ValidationContext,
    ) -> Result<Self, Rejection> {
        let mut raw: RawPoint<'_> = serde_json::from_str(env.data.get())
            .map_err(|e| Rejection::MalformedJson(e.to_string()))?;
        if raw.point_id.is_none() {
            raw.point_id = Some(env.id);
        }
        if raw.timestamp.is_none() {
            if let Some(time) = env.time {
                raw.timestamp = Some(RawTimestamp::Text(time.into_owned()));
            }
        }
        raw.validate(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_survives_its_wire_form_with_structural_characters_in_names_and_tags() {
        let mut tags = BTreeMap::new();
        tags.insert("ho{st".to_string(), "a=b,c".to_string());
        tags.insert("region".to_string(), "eu\\west}".to_string());
        tags.insert("empty".to_string(), String::new());
        for (name, tags) in [("cpu", BTreeMap::new()), ("c,p{u}=\\", tags)] {
            let point = Point {
                series: series_key(name, &tags),
                timestamp_ms: 1_699_999_999_123,
                value: -0.1 + 1e-17,
                point_id: Some("p-1".into()),
            };
            assert_eq!(
                split_series_key(&point.series),
                Some((name.to_string(), tags.clone()))
            );
            let back = decode_point(&point.to_wire_json(), &ctx()).unwrap();
            assert_eq!(back, point);
        }
        assert_eq!(split_series_key("cpu{host"), None);
        assert_eq!(split_series_key("cpu}x"), None);
    }

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
    fn bodies_of_points_in_every_format_keep_the_good_beside_the_bad() {
        use crate::decode::{decode_body_keeping, BodyFormat};
        let good = r#"{"series":"cpu","timestamp":1000,"value":2.5}"#;
        let bad = r#"{"series":"cpu","timestamp":1000,"value":"high"}"#;
        let ndjson = format!("{good}\n\n{bad}\n{good}");
        let d = decode_body_keeping::<Point>(BodyFormat::Ndjson, ndjson.as_bytes(), &ctx(), 10)
            .unwrap();
        assert_eq!(d.indices, [0, 3]);
        assert_eq!(d.rejected_total, 1);
        assert_eq!(d.rejected[0].0, 2);
        let array = format!("[{good},[1,2],{good}]");
        let d =
            decode_body_keeping::<Point>(BodyFormat::Json, array.as_bytes(), &ctx(), 10).unwrap();
        assert_eq!((d.events.len(), d.rejected[0].0), (2, 1));
        assert!(d.rejected[0].1.to_string().contains("JSON object"));
        let ce = r#"[{"specversion":"1.0","type":"tally.telemetry.v1","source":"svc","id":"p-1",
            "time":"1970-01-01T00:00:05Z","data":{"series":"cpu","value":-1}},
            {"specversion":"1.0","type":"tally.request.v1","source":"svc","id":"p-2","data":{}}]"#;
        let d =
            decode_body_keeping::<Point>(BodyFormat::CloudEventBatch, ce.as_bytes(), &ctx(), 10)
                .unwrap();
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].point_id.as_deref(), Some("p-1"));
        assert_eq!(d.events[0].timestamp_ms, 5_000);
        assert!(d.rejected[0].1.to_string().contains("tally.telemetry.v1"));
    }

    #[test]
    fn a_value_is_read_exactly_as_written() {
        // Near 1e9 one unit in the last place is 1.2e-7: a parser off by
        // one ulp moves the variance of 1e-3 noise by 1e-4 relative.
        let mut state = 9u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
            for value in [
                1e9 + (unit - 0.5) * 1e-3,
                (unit - 0.5) * 1e-300,
                unit * 1e300,
            ] {
                let json = serde_json::json!({"series":"s","timestamp":1,"value":value});
                let p = decode_point(&json.to_string(), &ctx()).unwrap();
                assert_eq!(p.value.to_bits(), value.to_bits(), "{json}");
            }
        }
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
