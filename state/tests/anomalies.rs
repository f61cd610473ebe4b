//! Stored anomalies: read back newest first without gaps, and moved
//! with their partition by the changelog.

use tally_pipelines::time::{DAY_MS, MINUTE_MS};
use tally_state::{Store, StoreOptions};

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap()
}

/// Anomalies are read newest first, page by page, from a cursor that is
/// the last anomaly of the previous page (detection time, then id): every
/// anomaly once, none skipped at a tie of detection times.
#[test]
fn anomalies_page_newest_first_without_gaps_at_equal_times() {
    use tally_pipelines::detect::{Anomaly, AnomalyType, Severity};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let anomalies: Vec<Anomaly> = (0..25)
        .map(|i| Anomaly {
            anomaly_id: format!("an-{i:032x}"),
            client_id: format!("c{}", i % 4),
            endpoint: None,
            anomaly_type: AnomalyType::SpikeInRequests,
            severity: if i % 5 == 0 {
                Severity::High
            } else {
                Severity::Low
            },
            // Five per minute: ties are the rule, not the exception.
            detected_at_ms: 10 * DAY_MS + (i / 5) as i64 * MINUTE_MS,
            description: String::new(),
            baseline: 1.0,
            observed: 2.0,
            deviation_percent: 100.0,
        })
        .collect();
    store.put_anomalies(2, &anomalies).unwrap();
    let mut want: Vec<(i64, String)> = anomalies
        .iter()
        .map(|a| (a.detected_at_ms, a.anomaly_id.clone()))
        .collect();
    want.sort_by(|a, b| b.cmp(a));
    let mut got = Vec::new();
    let mut cursor: Option<(i64, String)> = None;
    loop {
        let page = store
            .anomalies_newest_first(
                2,
                0,
                cursor.as_ref().map(|(t, id)| (*t, id.as_str())),
                4,
                |_| true,
            )
            .unwrap();
        if page.is_empty() {
            break;
        }
        cursor = page
            .last()
            .map(|a| (a.detected_at_ms, a.anomaly_id.clone()));
        got.extend(page.into_iter().map(|a| (a.detected_at_ms, a.anomaly_id)));
    }
    assert_eq!(got, want);
    // A filter applies while reading; the window's start bounds it.
    let high = store
        .anomalies_newest_first(2, 10 * DAY_MS + MINUTE_MS, None, 100, |a| {
            a.severity == Severity::High
        })
        .unwrap();
    assert_eq!(high.len(), 4, "five highs, one before the window");
}

/// What the detectors found moves with its partition: a changelog round
/// publishes the anomalies stored since the last one, and a restore on
/// another store replaces that partition's anomalies with them (a stale
/// one there is gone), leaving its other partitions alone.
#[test]
fn found_anomalies_move_with_their_partition() {
    use tally_pipelines::detect::{Anomaly, AnomalyType, Severity};
    use tally_state::changelog::{StateStore, STATE_STORES};
    use tally_state::restore::Restore;

    let anomaly = |id: u32, client: &str, at: i64| Anomaly {
        anomaly_id: format!("an-{id:032x}"),
        client_id: client.to_string(),
        endpoint: None,
        anomaly_type: AnomalyType::SpikeInRequests,
        severity: Severity::High,
        detected_at_ms: at,
        description: format!("finding {id}"),
        baseline: 1.0,
        observed: 2.0,
        deviation_percent: 100.0,
    };
    let ids =
        |found: Vec<Anomaly>| -> Vec<String> { found.into_iter().map(|a| a.anomaly_id).collect() };
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (open(src_dir.path()), open(dst_dir.path()));
    src.track_changes();
    dst.track_changes();
    let t = 10 * DAY_MS;
    dst.put_anomalies(2, &[anomaly(9, "stale", t)]).unwrap();
    dst.put_anomalies(5, &[anomaly(8, "kept", t)]).unwrap();

    let prev = src.snapshot();
    let found = [anomaly(1, "a", t), anomaly(2, "b", t + MINUTE_MS)];
    src.put_anomalies(2, &found).unwrap();
    src.put_anomalies(3, &[anomaly(3, "elsewhere", t)]).unwrap();
    let prepared = src
        .prepare_round(2, &prev, 1, "kafka:t", Default::default(), &[])
        .unwrap();
    let published: Vec<&(StateStore, Vec<u8>, Vec<u8>)> = prepared
        .changes
        .iter()
        .filter(|(s, _, _)| *s == StateStore::Anomalies)
        .collect();
    assert_eq!(published.len(), 2, "the two anomalies of partition 2");

    let mut restore = Restore::replacing(&dst, 2, usize::MAX);
    for (store, key, value) in &prepared.changes {
        restore.apply(*store, key, Some(value)).unwrap();
    }
    restore
        .apply(
            StateStore::Stats,
            &tally_state::keys::changelog_marker_key(2),
            Some(&prepared.marker),
        )
        .unwrap();
    restore.finish([0; STATE_STORES]).unwrap();
    assert_eq!(
        ids(dst.anomalies(2, 0, 10).unwrap()),
        vec![found[0].anomaly_id.clone(), found[1].anomaly_id.clone()]
    );
    assert_eq!(dst.anomalies(2, 0, 10).unwrap()[1].description, "finding 2");
    assert_eq!(
        ids(dst.anomalies(5, 0, 10).unwrap()),
        vec![format!("an-{:032x}", 8)]
    );
    assert!(dst.anomalies(3, 0, 10).unwrap().is_empty());
}
