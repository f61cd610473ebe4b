//! Which plan a client is billed under when: a schedule of assignments,
//! each in force from its `effective_from` until the next. A new
//! assignment replaces every one from its own time on (so setting a plan
//! from the 15th undoes one set earlier for the 20th), and keeps those
//! before it: past periods keep the plans they were billed under.

use serde::{Deserialize, Serialize};

/// Assignments a schedule keeps at most (the oldest leave first: by then
/// their periods are closed and their reports stored).
pub const MAX_ASSIGNMENTS: usize = 240;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub plan_id: String,
    pub effective_from_ms: i64,
    /// The IANA zone the client's periods and days follow (UTC when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// The schedule with `new` applied, in time order.
pub fn assign(mut schedule: Vec<Assignment>, new: Assignment) -> Vec<Assignment> {
    schedule.retain(|a| a.effective_from_ms < new.effective_from_ms);
    schedule.push(new);
    let excess = schedule.len().saturating_sub(MAX_ASSIGNMENTS);
    schedule.drain(..excess);
    schedule
}

/// The assignment in force at `at_ms`.
pub fn in_force(schedule: &[Assignment], at_ms: i64) -> Option<&Assignment> {
    schedule.iter().rev().find(|a| a.effective_from_ms <= at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(plan: &str, from: i64) -> Assignment {
        Assignment {
            plan_id: plan.into(),
            effective_from_ms: from,
            time_zone: None,
        }
    }

    #[test]
    fn a_new_assignment_replaces_those_from_its_time_on() {
        let s = assign(vec![], a("basic", 0));
        let s = assign(s, a("pro", 20));
        let s = assign(s, a("team", 15));
        assert_eq!(s, vec![a("basic", 0), a("team", 15)]);
        assert_eq!(in_force(&s, 14).unwrap().plan_id, "basic");
        assert_eq!(in_force(&s, 15).unwrap().plan_id, "team");
        assert!(in_force(&s, -1).is_none());
        let mut long = vec![];
        for i in 0..(MAX_ASSIGNMENTS as i64 + 5) {
            long = assign(long, a("p", i));
        }
        assert_eq!(long.len(), MAX_ASSIGNMENTS);
        assert_eq!(long[0].effective_from_ms, 5);
    }
}
