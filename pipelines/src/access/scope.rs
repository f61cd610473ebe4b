//! What a key may do. Scopes are orthogonal (an `admin` key that should
//! also read usage carries `read` too), so a key grants exactly what its
//! list says.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `POST /v1/events`, `/v1/telemetry`.
    Ingest,
    /// `POST /v1/check`.
    Check,
    /// Usage, anomalies, top consumers, alert streams, dead letters.
    Read,
    /// Billing reports.
    Billing,
    /// Limits, quotas, webhooks, keys, queue health.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Ingest,
        Scope::Check,
        Scope::Read,
        Scope::Billing,
        Scope::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Check => "check",
            Scope::Read => "read",
            Scope::Billing => "billing",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn all() -> BTreeSet<Scope> {
        Scope::ALL.into_iter().collect()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_json_form() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.name()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        assert_eq!(Scope::parse("root"), None);
    }
}
