//! Reading the event channel's Server-Sent Events stream in tests.

use std::time::{Duration, Instant};

use serde_json::Value;

pub struct SseReader {
    body: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub async fn open(c: &reqwest::Client, url: String, last_event_id: Option<u64>) -> SseReader {
        let mut req = c.get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        SseReader {
            body: resp,
            buffer: String::new(),
        }
    }

    /// The next `n` events as (id, type, data).
    pub async fn take(&mut self, n: usize) -> Vec<(u64, String, Value)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(e) => out.push(e),
                None => panic!("only {} of {n} events within 20 s: {out:?}", out.len()),
            }
        }
        out
    }
}

impl SseReader {
    /// The next event, or `None` when none comes within `quiet`.
    pub async fn next_within(&mut self, quiet: Duration) -> Option<(u64, String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if let Some(id) = id {
                    return Some((id, kind, serde_json::from_str(&data).unwrap()));
                }
                continue;
            }
            let chunk = tokio::time::timeout(quiet, self.body.chunk()).await.ok()?;
            self.buffer.push_str(&String::from_utf8_lossy(
                &chunk.unwrap().expect("stream ended"),
            ));
        }
    }
}
