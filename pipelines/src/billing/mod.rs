//! Billing as pure logic: plans ([`plan`]), graduated prices in exact
//! decimals ([`price`]), periods and days in a client's time zone
//! ([`period`]), which plan applies when ([`schedule`]), and the bill of
//! a period's segments ([`bill`]).

pub mod adjustment;
pub mod bill;
pub mod period;
pub mod plan;
pub mod price;
pub mod schedule;

pub use adjustment::Adjustment;
pub use bill::{bill, Bill, BillableMetrics, Line, Segment, SegmentUsage};
pub use period::BillingPeriod;
pub use plan::Plan;
pub use price::Tier;
pub use schedule::Assignment;
