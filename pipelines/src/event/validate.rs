//! Validation: a [`RawEvent`] read from the wire becomes a
//! [`RequestEvent`] or a [`Rejection`] that names the field and says what
//! to fix; bounds on every field live here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::*;
use crate::time::parse_rfc3339_ms;

/// Limits that validation needs from the outside.
#[derive(Debug, Clone, Copy)]
pub struct ValidationContext {
    /// The ingest clock (epoch ms), only used to refuse far-future event
    /// times, which would otherwise drag a partition's watermark ahead and
    /// make every honest event late.
    pub now_ms: i64,
    pub max_future_ms: i64,
}

impl ValidationContext {
    /// No future check (for tools that validate offline).
    pub fn lenient() -> Self {
        Self {
            now_ms: i64::MAX / 2,
            max_future_ms: i64::MAX / 2,
        }
    }
}

fn required_text(
    value: Option<Cow<'_, str>>,
    field: &'static str,
    limit: usize,
) -> Result<String, Rejection> {
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
    Ok(value.into_owned())
}

fn bounded(value: Option<i64>, field: &'static str, limit: u64) -> Result<Option<u64>, Rejection> {
    match value {
        None => Ok(None),
        Some(v) if v < 0 => Err(Rejection::Negative { field, value: v }),
        Some(v) if v as u64 > limit => Err(Rejection::AboveLimit {
            field,
            value: v.to_string(),
            limit: limit.to_string(),
        }),
        Some(v) => Ok(Some(v as u64)),
    }
}

fn check_metadata(meta: &BTreeMap<String, String>) -> Result<(), Rejection> {
    if meta.len() > MAX_METADATA_ENTRIES {
        return Err(Rejection::InvalidMetadata(format!(
            "has {} entries, the limit is {MAX_METADATA_ENTRIES}",
            meta.len()
        )));
    }
    for (k, v) in meta {
        if k.len() > MAX_METADATA_KEY_BYTES {
            return Err(Rejection::InvalidMetadata(format!(
                "key of {} bytes, the limit is {MAX_METADATA_KEY_BYTES}",
                k.len()
            )));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return Err(Rejection::InvalidMetadata(format!(
                "value of `{k}` is {} bytes, the limit is {MAX_METADATA_VALUE_BYTES}",
                v.len()
            )));
        }
    }
    Ok(())
}

impl RawTimestamp {
    pub fn to_epoch_ms(&self) -> Result<i64, Rejection> {
        let ms = match self {
            RawTimestamp::EpochMs(ms) => *ms,
            RawTimestamp::EpochMsFloat(f) if f.is_finite() => f.trunc() as i64,
            RawTimestamp::EpochMsFloat(f) => {
                return Err(Rejection::InvalidTimestamp(format!(
                    "{f} is not a finite number"
                )))
            }
            RawTimestamp::Text(s) => parse_rfc3339_ms(s).map_err(|e| {
                Rejection::InvalidTimestamp(format!(
                    "{s:?} is neither RFC 3339 nor epoch milliseconds ({e})"
                ))
            })?,
        };
        if !(0..=crate::time::MAX_EPOCH_MS).contains(&ms) {
            return Err(Rejection::InvalidTimestamp(format!(
                "{ms} is outside 1970-01-01..=9999-12-31"
            )));
        }
        Ok(ms)
    }
}

impl RawEvent<'_> {
    pub fn validate(self, ctx: &ValidationContext) -> Result<RequestEvent, Rejection> {
        if let Some(v) = self.schema_version {
            if v != u64::from(SCHEMA_VERSION) {
                return Err(Rejection::UnsupportedSchema(v));
            }
        }
        let client_id = required_text(self.client_id, "client_id", MAX_CLIENT_ID_BYTES)?;
        let endpoint = required_text(self.endpoint, "endpoint", MAX_ENDPOINT_BYTES)?;
        let event_id = match self.event_id {
            None => None,
            Some(id) => Some(required_text(Some(id), "event_id", MAX_EVENT_ID_BYTES)?),
        };
        let status = self.status.ok_or(Rejection::MissingField("status"))?;
        if !(100..=599).contains(&status) {
            return Err(Rejection::StatusOutOfRange(status));
        }
        let latency_ms = self
            .latency_ms
            .ok_or(Rejection::MissingField("latency_ms"))?;
        if !latency_ms.is_finite() || latency_ms < 0.0 {
            return Err(Rejection::InvalidLatency(latency_ms));
        }
        if latency_ms > MAX_LATENCY_MS {
            return Err(Rejection::AboveLimit {
                field: "latency_ms",
                // Exponent form for huge values (1e300, not 301 digits).
                value: if latency_ms >= 1e15 {
                    format!("{latency_ms:e}")
                } else {
                    latency_ms.to_string()
                },
                limit: format!("{MAX_LATENCY_MS} (24 hours)"),
            });
        }
        let timestamp_ms = self
            .timestamp
            .ok_or(Rejection::MissingField("timestamp"))?
            .to_epoch_ms()?;
        let ahead_ms = timestamp_ms.saturating_sub(ctx.now_ms);
        if ahead_ms > ctx.max_future_ms {
            return Err(Rejection::FromTheFuture {
                ahead_ms,
                limit_ms: ctx.max_future_ms,
            });
        }
        if let Some(meta) = &self.metadata {
            check_metadata(meta)?;
        }
        let source = match self.source {
            None => None,
            Some(s) => Some(required_text(Some(s), "source", MAX_SOURCE_BYTES)?),
        };
        Ok(RequestEvent {
            event_id,
            client_id,
            api_key_id: self.api_key_id.map(Cow::into_owned),
            endpoint,
            method: self.method.map(Cow::into_owned),
            status: status as u16,
            request_bytes: bounded(self.request_bytes, "request_bytes", MAX_BYTES)?.unwrap_or(0),
            response_bytes: bounded(self.response_bytes, "response_bytes", MAX_BYTES)?.unwrap_or(0),
            latency_ms,
            compute_units: bounded(self.compute_units, "compute_units", MAX_COMPUTE_UNITS)?,
            timestamp_ms,
            metadata: self.metadata,
            source,
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Explains why `json` did not deserialize as a [`RawEvent`]: names the
/// field and the expected type, which serde's own message does not. Only
/// called on the slow path, for bad input.
pub fn explain_decode_failure(json: &str, serde_error: &serde_json::Error) -> Rejection {
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return Rejection::MalformedJson(e.to_string()),
    };
    let serde_json::Value::Object(map) = &value else {
        return Rejection::NotAnObject(json_kind(&value));
    };
    const STRINGS: [&str; 6] = [
        "event_id",
        "client_id",
        "api_key_id",
        "endpoint",
        "method",
        "source",
    ];
    const INTEGERS: [&str; 5] = [
        "status",
        "request_bytes",
        "response_bytes",
        "compute_units",
        "schema_version",
    ];
    for (field, v) in map {
        let expected = if STRINGS.contains(&field.as_str()) {
            (!v.is_string() && !v.is_null()).then_some("string")
        } else if INTEGERS.contains(&field.as_str()) {
            if v.is_u64() && !v.is_i64() {
                // Beyond i64: larger than every bound.
                return Rejection::AboveLimit {
                    field: INTEGERS.into_iter().find(|f| f == field).unwrap_or("value"),
                    value: v.to_string(),
                    limit: match field.as_str() {
                        "compute_units" => MAX_COMPUTE_UNITS.to_string(),
                        _ => MAX_BYTES.to_string(),
                    },
                };
            }
            (!v.is_i64() && !v.is_u64() && !v.is_null()).then_some("integer")
        } else if field == "latency_ms" {
            (!v.is_number() && !v.is_null()).then_some("number")
        } else if field == "timestamp" {
            (!v.is_number() && !v.is_string() && !v.is_null())
                .then_some("epoch milliseconds or RFC 3339 string")
        } else if field == "metadata" {
            let ok = v.is_null()
                || v.as_object()
                    .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            (!ok).then_some("object of string values")
        } else {
            None
        };
        if let Some(expected) = expected {
            return Rejection::WrongType {
                field: field.clone(),
                expected,
                got: json_kind(v),
            };
        }
    }
    Rejection::Other(serde_error.to_string())
}
