//! Value encoding: a version byte, then bincode (standard configuration,
//! through serde). A value written by an older version is upcast on read
//! here; an unknown version is an error, never a silent misread.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// The current version of every value this crate writes.
pub const VALUE_VERSION: u8 = 1;
/// The first byte of a value the merge operator found undecodable and kept
/// as it was (see [`crate::merge`]).
pub const POISONED: u8 = 0xEE;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![VALUE_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .map_err(|e| Error::Codec(e.to_string()))?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, body)) => {
            let (value, read) =
                bincode::serde::decode_from_slice(body, bincode::config::standard())
                    .map_err(|e| Error::Codec(e.to_string()))?;
            if read != body.len() {
                return Err(Error::Codec(format!(
                    "{} trailing bytes",
                    body.len() - read
                )));
            }
            Ok(value)
        }
        Some((&POISONED, _)) => Err(Error::Corrupt(
            "a stored value could not be decoded when deltas were merged into it; it is kept as found, with the deltas".into(),
        )),
        Some((v, _)) => Err(Error::Codec(format!("unknown value version {v}"))),
        None => Err(Error::Codec("empty value".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_pipelines::aggregate::BucketStats;

    #[test]
    fn round_trip_and_version_check() {
        let mut b = BucketStats::default();
        let e = tally_pipelines::event::decode_event(
            r#"{"client_id":"c","endpoint":"/x","status":200,"latency_ms":1,"timestamp":0}"#,
            &tally_pipelines::event::ValidationContext::lenient(),
        )
        .unwrap();
        b.record(&e, 1);
        let bytes = encode(&b).unwrap();
        assert_eq!(bytes[0], VALUE_VERSION);
        assert_eq!(decode::<BucketStats>(&bytes).unwrap(), b);
        let mut future = bytes.clone();
        future[0] = 99;
        assert!(decode::<BucketStats>(&future).is_err());
        assert!(decode::<BucketStats>(&[]).is_err());
    }
}
