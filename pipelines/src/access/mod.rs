//! Access control as pure logic: the key format ([`token`]), what a key
//! may do ([`scope`]), the control events that create, rotate and revoke
//! keys ([`event`]) and their projection, which judges every presented
//! key ([`keyring`]). The log itself is stored by `tally-state`; the HTTP
//! layer asks the ring.

pub mod event;
pub mod keyring;
pub mod scope;
pub mod token;

pub use event::{ControlEvent, Envelope, KeyRateLimit, KeySpec};
pub use keyring::{KeyRecord, KeyRing, Principal, Refusal};
pub use scope::Scope;
pub use token::KeyToken;
