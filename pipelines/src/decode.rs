//! Request bodies: one JSON object, a JSON array, NDJSON, and CloudEvents 1.0
//! (structured single and batch). Each element is decoded and validated on
//! its own, so one bad event never costs the good ones beside it. Request
//! events and telemetry points share the formats and the error contract:
//! each is a [`BodyItem`].

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{
    explain_decode_failure, RawEvent, RawTimestamp, Rejection, RequestEvent, ValidationContext,
};
use crate::Error;

/// CloudEvents `type` of a request event.
pub const CLOUDEVENT_TYPE: &str = "tally.request.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson`: one object per line.
    Ndjson,
    /// `application/cloudevents+json`: one structured CloudEvent.
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    CloudEventBatch,
}

impl BodyFormat {
    /// Picks the format from the `Content-Type` header; without one, sniffs
    /// the body (`[` or a single object is JSON, several lines are NDJSON).
    pub fn from_content_type(content_type: Option<&str>, body: &[u8]) -> Result<Self, Error> {
        let Some(ct) = content_type else {
            return Ok(Self::sniff(body));
        };
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" | "text/json" => Ok(BodyFormat::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/jsonlines" => Ok(BodyFormat::Ndjson),
            "application/cloudevents+json" => Ok(BodyFormat::CloudEvent),
            "application/cloudevents-batch+json" => Ok(BodyFormat::CloudEventBatch),
            "" | "application/octet-stream" | "text/plain" => Ok(Self::sniff(body)),
            other => Err(Error::UnsupportedMediaType(other.to_string())),
        }
    }

    fn sniff(body: &[u8]) -> Self {
        let trimmed = body.trim_ascii();
        if trimmed.starts_with(b"[") || !trimmed.contains(&b'\n') {
            BodyFormat::Json
        } else {
            BodyFormat::Ndjson
        }
    }
}

/// What a body holds, one element at a time: request events, telemetry
/// points.
pub trait BodyItem: Sized {
    /// The CloudEvents `type` an envelope of this item must carry.
    const CLOUDEVENT_TYPE: &'static str;
    /// Decodes and validates one JSON element.
    fn decode_json(json: &[u8], ctx: &ValidationContext) -> Result<Self, Rejection>;
    /// Decodes and validates the `data` of a checked CloudEvent envelope.
    fn from_cloudevent(
        envelope: CloudEventParts<'_>,
        ctx: &ValidationContext,
    ) -> Result<Self, Rejection>;
}

/// The attributes of a CloudEvent envelope that passed the checks every
/// item shares (specversion, type, content type, `data` an object).
pub struct CloudEventParts<'a> {
    pub source: Cow<'a, str>,
    pub id: Cow<'a, str>,
    pub time: Option<Cow<'a, str>>,
    pub data: &'a RawValue,
}

impl BodyItem for RequestEvent {
    const CLOUDEVENT_TYPE: &'static str = CLOUDEVENT_TYPE;

    fn decode_json(json: &[u8], ctx: &ValidationContext) -> Result<Self, Rejection> {
        decode_event_bytes(json, ctx)
    }

    /// The envelope's `id` is the event id unless `data.event_id` is
    /// given, and its `time` the event time unless `data.timestamp` is.
    fn from_cloudevent(
        env: CloudEventParts<'_>,
        ctx: &ValidationContext,
    ) -> Result<Self, Rejection> {
        let mut raw: RawEvent = match serde_json::from_str(env.data.get()) {
            Ok(raw) => raw,
            Err(e) => return Err(explain_decode_failure(env.data.get(), &e)),
        };
        if raw.event_id.is_none() {
            raw.event_id = Some(Cow::Owned(env.id.into_owned()));
        }
        if raw.timestamp.is_none() {
            if let Some(time) = env.time {
                raw.timestamp = Some(RawTimestamp::Text(time.into_owned()));
            }
        }
        raw.source = Some(env.source);
        raw.validate(ctx)
    }
}

/// The outcome of decoding a body: good items with their positions, and
/// the rejected positions with reasons. `index` is the 0-based array element
/// or NDJSON line.
#[derive(Debug)]
pub struct DecodedBody<T = RequestEvent> {
    pub events: Vec<T>,
    pub indices: Vec<usize>,
    /// The first rejections with their reasons (as many as were asked to
    /// be kept: a body of a million bad lines must not hold a million
    /// reasons)...
    pub rejected: Vec<(usize, Rejection)>,
    /// ...and how many there were in all.
    pub rejected_total: u64,
    keep_rejections: usize,
}

impl<T> Default for DecodedBody<T> {
    fn default() -> Self {
        DecodedBody {
            events: Vec::new(),
            indices: Vec::new(),
            rejected: Vec::new(),
            rejected_total: 0,
            keep_rejections: 0,
        }
    }
}

impl<T> DecodedBody<T> {
    fn push(&mut self, index: usize, result: Result<T, Rejection>) {
        match result {
            Ok(e) => {
                self.events.push(e);
                self.indices.push(index);
            }
            Err(r) => {
                self.rejected_total += 1;
                if self.rejected.len() < self.keep_rejections {
                    self.rejected.push((index, r));
                }
            }
        }
    }
}

/// Decodes a body, keeping every rejection's reason.
pub fn decode_body(
    format: BodyFormat,
    body: &[u8],
    ctx: &ValidationContext,
) -> Result<DecodedBody, Error> {
    decode_body_keeping(format, body, ctx, usize::MAX)
}

/// Decodes a body, keeping the reasons of the first `keep_rejections`
/// rejections only (all are counted).
pub fn decode_body_keeping<T: BodyItem>(
    format: BodyFormat,
    body: &[u8],
    ctx: &ValidationContext,
    keep_rejections: usize,
) -> Result<DecodedBody<T>, Error> {
    let mut out = DecodedBody {
        keep_rejections,
        ..DecodedBody::default()
    };
    match format {
        BodyFormat::Ndjson => {
            for (index, line) in ndjson_lines(body) {
                out.push(index, T::decode_json(line, ctx));
            }
        }
        BodyFormat::Json => {
            for (index, element) in json_elements(body)? {
                out.push(index, T::decode_json(element.get().as_bytes(), ctx));
            }
        }
        BodyFormat::CloudEvent => {
            let element = top_level::<&RawValue>(body)?;
            out.push(0, decode_cloudevent_of(element.get().as_bytes(), ctx));
        }
        BodyFormat::CloudEventBatch => {
            let elements = top_level::<Vec<&RawValue>>(body)?;
            for (index, element) in elements.into_iter().enumerate() {
                out.push(index, decode_cloudevent_of(element.get().as_bytes(), ctx));
            }
        }
    }
    Ok(out)
}

/// Non-blank lines of an NDJSON body with their 0-based line numbers
/// (blank lines count, so numbers match what an editor shows minus one).
pub fn ndjson_lines(body: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut start = 0;
    let mut ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    std::iter::from_fn(move || {
        let end = ends.next()?;
        let line = &body[start.min(end)..end];
        start = end + 1;
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
    .enumerate()
    .filter(|(_, line)| !line.trim_ascii().is_empty())
}

fn top_level<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::MalformedBody(e.to_string()))
}

/// A JSON body is one object (index 0) or an array of elements.
fn json_elements(body: &[u8]) -> Result<Vec<(usize, &RawValue)>, Error> {
    if body.trim_ascii_start().starts_with(b"[") {
        let elements: Vec<&RawValue> = top_level(body)?;
        Ok(elements.into_iter().enumerate().collect())
    } else {
        let element: &RawValue = top_level(body)?;
        Ok(vec![(0, element)])
    }
}

/// Decodes and validates one JSON event given as bytes.
pub fn decode_event_bytes(json: &[u8], ctx: &ValidationContext) -> Result<RequestEvent, Rejection> {
    // serde would also read a struct from a JSON array, by position.
    if !json.trim_ascii_start().starts_with(b"{") {
        let text = String::from_utf8_lossy(json);
        let e = serde_json::from_str::<serde_json::Value>(&text).err();
        return Err(match e {
            Some(e) => Rejection::MalformedJson(e.to_string()),
            None => explain_decode_failure(&text, &serde::de::Error::custom("not an object")),
        });
    }
    match serde_json::from_slice::<RawEvent>(json) {
        Ok(raw) => raw.validate(ctx),
        Err(e) => Err(explain_decode_failure(&String::from_utf8_lossy(json), &e)),
    }
}

#[derive(Deserialize)]
struct CloudEventEnvelope<'a> {
    #[serde(default, borrow)]
    specversion: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    datacontenttype: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    data_base64: Option<serde_json::Value>,
}

fn ce_error(msg: impl Into<String>) -> Rejection {
    Rejection::CloudEvent(msg.into())
}

/// One structured CloudEvent whose `data` is a request event. The envelope's
/// `id` is the event id unless `data.event_id` is given, and its `time` the
/// event time unless `data.timestamp` is given.
pub fn decode_cloudevent(json: &[u8], ctx: &ValidationContext) -> Result<RequestEvent, Rejection> {
    decode_cloudevent_of(json, ctx)
}

/// One structured CloudEvent whose `data` is a `T`.
pub fn decode_cloudevent_of<T: BodyItem>(
    json: &[u8],
    ctx: &ValidationContext,
) -> Result<T, Rejection> {
    if !json.trim_ascii_start().starts_with(b"{") {
        return Err(ce_error("an event must be a JSON object"));
    }
    let env: CloudEventEnvelope = serde_json::from_slice(json).map_err(|e| {
        match serde_json::from_slice::<serde_json::Value>(json) {
            Err(e) => Rejection::MalformedJson(e.to_string()),
            Ok(serde_json::Value::Object(_)) => ce_error(format!("invalid envelope: {e}")),
            Ok(_) => ce_error("an event must be a JSON object"),
        }
    })?;
    match env.specversion.as_deref() {
        Some("1.0") => {}
        Some(v) => {
            return Err(ce_error(format!(
                "unsupported specversion `{v}`, expected `1.0`"
            )))
        }
        None => return Err(ce_error("missing required attribute `specversion`")),
    }
    match env.kind.as_deref() {
        Some(t) if t == T::CLOUDEVENT_TYPE => {}
        Some(t) => {
            return Err(ce_error(format!(
                "unsupported type `{t}`, expected `{}`",
                T::CLOUDEVENT_TYPE
            )))
        }
        None => return Err(ce_error("missing required attribute `type`")),
    }
    let source = match env.source {
        Some(s) if !s.is_empty() => s,
        _ => return Err(ce_error("missing required attribute `source`")),
    };
    let id = match env.id {
        Some(id) if !id.is_empty() => id,
        _ => return Err(ce_error("missing required attribute `id`")),
    };
    if let Some(ct) = env.datacontenttype.as_deref() {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ce_error(format!(
                "unsupported datacontenttype `{ct}`, expected application/json"
            )));
        }
    }
    if env.data_base64.is_some() {
        return Err(ce_error(
            "`data_base64` is not supported; send `data` as a JSON object",
        ));
    }
    let data = env.data.ok_or_else(|| ce_error("missing `data`"))?;
    if !data.get().starts_with('{') {
        return Err(ce_error("`data` must be a JSON object"));
    }
    T::from_cloudevent(
        CloudEventParts {
            source,
            id,
            time: env.time,
            data,
        },
        ctx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        r#"{"client_id":"a","endpoint":"/x","status":200,"latency_ms":1,"timestamp":1000}"#;
    const B: &str =
        r#"{"client_id":"b","endpoint":"/y","status":500,"latency_ms":2,"timestamp":2000}"#;

    fn ctx() -> ValidationContext {
        ValidationContext::lenient()
    }

    #[test]
    fn single_object_and_array() {
        let d = decode_body(BodyFormat::Json, A.as_bytes(), &ctx()).unwrap();
        assert_eq!(d.events.len(), 1);
        let body = format!("[{A}, {{\"client_id\":\"\"}}, {B}]");
        let d = decode_body(BodyFormat::Json, body.as_bytes(), &ctx()).unwrap();
        assert_eq!(d.events.len(), 2);
        assert_eq!(d.indices, vec![0, 2]);
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].0, 1);
    }

    #[test]
    fn ndjson_indices_are_line_numbers_and_blank_lines_are_skipped() {
        let body = format!("{A}\r\n\nnot json\n{B}\n");
        let d = decode_body(BodyFormat::Ndjson, body.as_bytes(), &ctx()).unwrap();
        assert_eq!(d.indices, vec![0, 3]);
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].0, 2);
        assert!(d.rejected[0].1.to_string().starts_with("malformed JSON"));
    }

    #[test]
    fn only_the_first_rejections_are_kept_but_all_are_counted() {
        let body = format!("{A}\n{}\n{B}\n", "bad\n".repeat(5000));
        let d = decode_body_keeping::<RequestEvent>(BodyFormat::Ndjson, body.as_bytes(), &ctx(), 3)
            .unwrap();
        assert_eq!(d.events.len(), 2);
        assert_eq!(d.rejected_total, 5000);
        assert_eq!(
            d.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn malformed_json_body_is_a_body_error() {
        assert!(matches!(
            decode_body(BodyFormat::Json, b"[{\"a\":1}", &ctx()),
            Err(Error::MalformedBody(_))
        ));
    }

    #[test]
    fn cloudevent_id_and_time_fill_in() {
        let ce = r#"{"specversion":"1.0","type":"tally.request.v1","source":"gw-1","id":"ev-9","time":"1970-01-01T00:00:05Z",
            "datacontenttype":"application/json","data":{"client_id":"a","endpoint":"/x","status":201,"latency_ms":3}}"#;
        let d = decode_body(BodyFormat::CloudEvent, ce.as_bytes(), &ctx()).unwrap();
        let e = &d.events[0];
        assert_eq!(e.event_id.as_deref(), Some("ev-9"));
        assert_eq!(e.timestamp_ms, 5000);
        assert_eq!(e.source.as_deref(), Some("gw-1"));
    }

    #[test]
    fn cloudevent_batch_reports_each_bad_envelope() {
        let good = r#"{"specversion":"1.0","type":"tally.request.v1","source":"s","id":"1","data":{"event_id":"own","client_id":"a","endpoint":"/x","status":200,"latency_ms":1,"timestamp":1}}"#;
        let wrong_type = good.replace("tally.request.v1", "com.example.other");
        let no_id = good.replace("\"id\":\"1\",", "");
        let body = format!("[{good},{wrong_type},{no_id}]");
        let d = decode_body(BodyFormat::CloudEventBatch, body.as_bytes(), &ctx()).unwrap();
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].event_id.as_deref(), Some("own"));
        let reasons: Vec<String> = d.rejected.iter().map(|(_, r)| r.to_string()).collect();
        assert!(reasons[0].contains("unsupported type"), "{reasons:?}");
        assert!(reasons[1].contains("`id`"), "{reasons:?}");
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8"), b"").unwrap(),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("application/x-ndjson"), b"").unwrap(),
            BodyFormat::Ndjson
        );
        assert_eq!(
            BodyFormat::from_content_type(None, b"{}\n{}\n").unwrap(),
            BodyFormat::Ndjson
        );
        assert!(BodyFormat::from_content_type(Some("application/xml"), b"").is_err());
    }
}
