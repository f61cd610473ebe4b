//! Billing reports over the store: a client's usage read as cells no
//! boundary cuts ([`cells`]), and the report built from them and the
//! control plane's plans ([`report`]), and closing periods for good
//! ([`close`]). Pure pricing and periods are in
//! `tally_pipelines::billing`.

pub mod cells;
pub mod close;
pub mod report;
