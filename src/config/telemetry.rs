//! The `[telemetry]` settings resolved: stored resolutions with their
//! retention, the series bound, and what series are watched for.

use std::time::Duration;

use tally_pipelines::telemetry::ingest::TelemetryRules;
use tally_pipelines::telemetry::watch::WatchRules;
use tally_state::retention::MAX_TELEMETRY_RESOLUTIONS;

use super::ms;
use super::settings::{ResolutionSetting, TelemetrySettings};

pub(super) struct Resolved {
    pub rules: TelemetryRules,
    /// Retention of each resolution, in its order.
    pub retention: Vec<Duration>,
    pub watch: WatchRules,
}

fn duration(name: &str, text: &str, problems: &mut Vec<String>) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| {
        problems.push(format!(
            "{name}: {text:?} is not a duration such as 5m or 250ms ({e})"
        ));
        Duration::ZERO
    })
}

/// Every problem is pushed onto `problems`.
pub(super) fn resolve(s: &TelemetrySettings, problems: &mut Vec<String>) -> Resolved {
    let settings = s.resolutions.clone().unwrap_or_else(|| {
        [
            ("10s", "48h"),
            ("1m", "30days"),
            ("1h", "400days"),
            ("1d", "1830days"),
        ]
        .iter()
        .map(|(w, r)| ResolutionSetting {
            width: w.to_string(),
            retention: r.to_string(),
        })
        .collect()
    });
    let mut resolutions_ms = Vec::new();
    let mut retention = Vec::new();
    for r in &settings {
        let width = duration("telemetry.resolutions.width", &r.width, problems);
        retention.push(duration(
            "telemetry.resolutions.retention",
            &r.retention,
            problems,
        ));
        resolutions_ms.push(u32::try_from(width.as_millis()).unwrap_or(u32::MAX));
    }
    let rules = TelemetryRules {
        resolutions_ms,
        max_series: s.max_series.unwrap_or(100_000),
    };
    if rules.resolutions_ms.is_empty() || rules.resolutions_ms.len() > MAX_TELEMETRY_RESOLUTIONS {
        problems.push(format!(
            "telemetry.resolutions: give 1..={MAX_TELEMETRY_RESOLUTIONS} resolutions"
        ));
    } else if let Some(problem) = rules.problem() {
        problems.push(format!("telemetry.resolutions: {problem}"));
    }
    if rules.max_series == 0 {
        problems.push("telemetry.max_series must be at least 1".into());
    }
    let anomaly_k = s.anomaly_k.unwrap_or(4.0);
    if !(anomaly_k.is_finite() && anomaly_k > 0.0) {
        problems.push(format!(
            "telemetry.anomaly_k must be a positive number of standard deviations, got {anomaly_k}"
        ));
    }
    let cooldown = duration(
        "telemetry.anomaly_cooldown",
        s.anomaly_cooldown.as_deref().unwrap_or("1m"),
        problems,
    );
    let watch = WatchRules {
        anomaly_k,
        anomaly_cooldown_ms: ms(cooldown),
        drift: s
            .drift
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.pattern, r.detector))
            .collect(),
        ..Default::default()
    };
    Resolved {
        rules,
        retention,
        watch,
    }
}
