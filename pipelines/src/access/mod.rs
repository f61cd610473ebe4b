//! Access control as pure logic: the key format ([`token`]), what a key
//! may do ([`scope`]), the control events that create, rotate and revoke
//! keys and version limits, quotas and webhooks ([`event`]), and their
//! projection ([`plane`]), whose key ring judges every presented key
//! ([`keyring`]). The log itself is stored by `tally-state`; the HTTP
//! layer asks the ring.

pub mod event;
pub mod keyring;
pub mod plane;
pub mod scope;
pub mod token;

pub use event::{ControlEvent, Envelope, KeyRateLimit, KeySpec, Stream};
pub use keyring::{KeyRecord, KeyRing, Principal, Refusal};
pub use plane::{ControlPlane, Versioned};
pub use scope::Scope;
pub use token::KeyToken;
