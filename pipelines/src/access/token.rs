//! The API key format: `tly_` + key id (12) + secret (32) + checksum (6),
//! all base62, 54 characters in all.
//!
//! The prefix makes a leaked key recognisable to secret scanners; the
//! checksum (CRC32 of everything before it) refuses a mistyped or
//! truncated key without a lookup, as GitHub's token format does. The id
//! is public (it names the key in the API and the audit log); the secret
//! carries ~190 bits of entropy, so a plain SHA-256 of the whole token is
//! what is stored: a slow password hash buys nothing against a brute force
//! of 2^190 and would cost microseconds on every request.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "tly_";
pub const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
pub const TOKEN_LEN: usize = PREFIX.len() + ID_LEN + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// SHA-256 of a whole token: what the key ring keeps instead of it.
pub type TokenHash = [u8; 32];

/// A key's secret, as handed to its owner once. `Debug` and `Display`
/// never show the secret part.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyToken(String);

impl KeyToken {
    /// A new token for a new key (random id) or a rotated one (`id` kept).
    pub fn generate(rng: &mut impl Rng, id: Option<&str>) -> KeyToken {
        let mut body = String::with_capacity(TOKEN_LEN);
        body.push_str(PREFIX);
        match id {
            Some(id) => body.push_str(id),
            None => push_random(rng, &mut body, ID_LEN),
        }
        push_random(rng, &mut body, SECRET_LEN);
        let sum = checksum(body.as_bytes());
        body.push_str(&sum);
        KeyToken(body)
    }

    /// The whole token, to show its owner once.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    pub fn id(&self) -> &str {
        &self.0[PREFIX.len()..PREFIX.len() + ID_LEN]
    }

    pub fn hash(&self) -> TokenHash {
        hash(&self.0)
    }
}

impl std::fmt::Debug for KeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyToken({PREFIX}{}…redacted)", self.id())
    }
}

fn push_random(rng: &mut impl Rng, out: &mut String, n: usize) {
    for _ in 0..n {
        out.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
}

/// CRC32 of `body` as six base62 digits (62^6 > 2^32).
fn checksum(body: &[u8]) -> String {
    let mut n = u64::from(crc32fast::hash(body));
    let mut digits = [b'0'; CHECKSUM_LEN];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits.iter().map(|&b| b as char).collect()
}

pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time equality of two hashes (no early exit on the first
/// differing byte, so timing tells an attacker nothing).
pub fn hashes_equal(a: &TokenHash, b: &TokenHash) -> bool {
    a.ct_eq(b).into()
}

/// Why a presented string is not a well-formed key (said to nobody but
/// the log and the audit: the client only learns "refused").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Prefix,
    Length,
    Alphabet,
    Checksum,
}

/// Checks a presented key's shape and checksum; answers its id.
pub fn parse(presented: &str) -> Result<&str, Malformed> {
    if !presented.starts_with(PREFIX) {
        return Err(Malformed::Prefix);
    }
    if presented.len() != TOKEN_LEN {
        return Err(Malformed::Length);
    }
    let rest = &presented.as_bytes()[PREFIX.len()..];
    if !rest.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Malformed::Alphabet);
    }
    let (body, sum) = presented.split_at(TOKEN_LEN - CHECKSUM_LEN);
    if checksum(body.as_bytes()) != sum {
        return Err(Malformed::Checksum);
    }
    Ok(&presented[PREFIX.len()..PREFIX.len() + ID_LEN])
}

/// Whether `id` could be a key id (the path of `/v1/keys/{id}`).
pub fn is_key_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_generated_token_parses_to_its_id_and_hashes_to_its_hash() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let token = KeyToken::generate(&mut rng, None);
        assert_eq!(token.reveal().len(), 54);
        assert!(token.reveal().starts_with("tly_"));
        assert_eq!(parse(token.reveal()), Ok(token.id()));
        // The hash is SHA-256 of the whole text, computed here by hand.
        let expected: [u8; 32] = Sha256::digest(token.reveal().as_bytes()).into();
        assert_eq!(token.hash(), expected);
    }

    #[test]
    fn a_rotated_token_keeps_the_id_and_changes_the_secret() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let first = KeyToken::generate(&mut rng, None);
        let second = KeyToken::generate(&mut rng, Some(first.id()));
        assert_eq!(first.id(), second.id());
        assert_ne!(first.reveal(), second.reveal());
        assert_eq!(parse(second.reveal()), Ok(first.id()));
    }

    #[test]
    fn every_single_character_typo_is_refused_by_the_checksum() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let token = KeyToken::generate(&mut rng, None);
        let text = token.reveal().as_bytes().to_vec();
        for i in PREFIX.len()..text.len() {
            for &c in BASE62.iter().filter(|&&c| c != text[i]) {
                let mut typo = text.clone();
                typo[i] = c;
                let typo = String::from_utf8(typo).unwrap();
                assert_eq!(parse(&typo), Err(Malformed::Checksum), "{typo}");
            }
        }
    }

    #[test]
    fn malformed_keys_say_what_is_wrong() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let token = KeyToken::generate(&mut rng, None);
        let text = token.reveal();
        assert_eq!(
            parse(&text.replacen("tly_", "tlx_", 1)),
            Err(Malformed::Prefix)
        );
        assert_eq!(parse(&text[..53]), Err(Malformed::Length));
        assert_eq!(parse(&format!("{text}0")), Err(Malformed::Length));
        let mut bad = text.to_string();
        bad.replace_range(10..11, "-");
        assert_eq!(parse(&bad), Err(Malformed::Alphabet));
        assert_eq!(parse(""), Err(Malformed::Prefix));
        // Multi-byte text of the right byte length is not base62.
        let odd = format!("tly_{}", "é".repeat(25));
        assert_eq!(parse(&odd), Err(Malformed::Alphabet));
    }

    #[test]
    fn the_checksum_is_crc32_in_six_base62_digits() {
        // crc32("123456789") = 0xCBF43926 = 3421780262 (the standard
        // CRC-32 check value), worked by hand in base 62:
        // 3*62^5 + 45*62^4 + 35*62^3 + 27*62^2 + 22*62 + 14 = "3" "j" "Z" "R" "M" "E".
        assert_eq!(checksum(b"123456789"), "3jZRME");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let token = KeyToken::generate(&mut rng, None);
        let shown = format!("{token:?}");
        assert!(shown.contains(token.id()));
        assert!(!shown.contains(&token.reveal()[PREFIX.len() + ID_LEN..]));
    }

    #[test]
    fn hashes_compare_equal_only_when_equal() {
        let a = hash("a");
        let mut b = a;
        assert!(hashes_equal(&a, &b));
        b[31] ^= 1;
        assert!(!hashes_equal(&a, &b));
    }
}
