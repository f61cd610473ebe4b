//! The live projection against the log it is built from.

use std::sync::Arc;

use tally_pipelines::access::{ControlEvent, ControlPlane, Stream};
use tally_state::{Store, StoreOptions};

use super::{Access, Origin, Stale, SNAPSHOT_EVERY};

fn limits(client: &str, requests: u64) -> ControlEvent {
    ControlEvent::LimitsSet {
        client_id: client.into(),
        config: serde_json::json!({"requests": requests}),
    }
}

fn json(plane: &ControlPlane) -> serde_json::Value {
    serde_json::to_value(plane).unwrap()
}

#[test]
fn the_projection_rebuilt_from_the_log_equals_the_live_one_past_a_snapshot_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let access = Access::open(store.clone(), None, None, 0).unwrap();
    // A reference count of versions, kept by this test.
    let mut versions = std::collections::BTreeMap::<String, u64>::new();
    let mut stale = 0;
    // A fifth are refused (not logged): enough left to pass a snapshot.
    let events = SNAPSHOT_EVERY * 3 / 2;
    for i in 0..events {
        let client = format!("c{}", i % 7);
        let (event, stream_key) = match i % 3 {
            0 => (limits(&client, i), format!("limits/{client}")),
            1 => (
                ControlEvent::QuotaSet {
                    client_id: client.clone(),
                    config: serde_json::json!({"monthly_requests": i}),
                },
                format!("quota/{client}"),
            ),
            _ => (
                ControlEvent::WebhookSet {
                    webhook_id: format!("w{}", i % 4),
                    config: format!("{{\"n\":{i}}}"),
                },
                format!("webhook/w{}", i % 4),
            ),
        };
        let current = versions.get(&stream_key).copied().unwrap_or(0);
        // Every fifth change names a version one behind: refused.
        let expected = if i % 5 == 4 {
            Some(current.wrapping_sub(1))
        } else if i % 2 == 0 {
            Some(current)
        } else {
            None
        };
        match access.record_at_version("k", i as i64, event, expected, Origin::default()) {
            Ok(applied) => {
                assert_ne!(expected, Some(current.wrapping_sub(1)), "event {i}");
                versions.insert(stream_key.clone(), current + 1);
                assert_eq!(applied.version, current + 1, "event {i}");
            }
            Err(Stale::Version { current: c }) => {
                assert_eq!(expected, Some(current.wrapping_sub(1)), "event {i}");
                assert_eq!(c, current);
                stale += 1;
            }
            Err(e) => panic!("event {i}: {e:?}"),
        }
    }
    assert!(stale > 0);
    let live = access.with_plane(json);
    let rebuilt = json(&access.plane_at(i64::MAX).unwrap());
    assert_eq!(live, rebuilt);
    for (key, version) in &versions {
        let (kind, name) = key.split_once('/').unwrap();
        let stream = match kind {
            "limits" => Stream::Limits(name),
            "quota" => Stream::Quota(name),
            _ => Stream::Webhook(name),
        };
        assert_eq!(access.version(stream), *version, "{key}");
    }
    // A restart reads the snapshot and the events after it.
    assert!(store.control_snapshot().unwrap().is_some());
    drop(access);
    let reopened = Access::open(store, None, None, 0).unwrap();
    assert_eq!(reopened.with_plane(json), live);
}
