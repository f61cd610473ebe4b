//! Webhook secrets sealed at rest and on the control topic: with
//! `secrets_key` (32 bytes, hex) configured, a webhook's signing secret is
//! stored and published as `sealed:v1:` + base64(nonce ‖ XChaCha20-Poly1305
//! ciphertext), never as itself; without it, as given (and `serve` says
//! so at start-up). A sealed secret that does not open (another key)
//! makes its webhook unreadable, never silently unsigned.

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use super::WebhookConfig;

const PREFIX: &str = "sealed:v1:";

#[derive(Clone, Default)]
pub struct SecretSeal {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for SecretSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SecretSeal({})",
            if self.cipher.is_some() {
                "keyed"
            } else {
                "none"
            }
        )
    }
}

impl SecretSeal {
    /// From the configured key: 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<SecretSeal, String> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return Err("must be 64 hex digits (32 bytes)".into());
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| "must be 64 hex digits (32 bytes)".to_string())?;
        }
        Ok(SecretSeal {
            cipher: Some(XChaCha20Poly1305::new(&key.into())),
        })
    }

    pub fn is_keyed(&self) -> bool {
        self.cipher.is_some()
    }

    fn seal(&self, secret: &str) -> anyhow::Result<String> {
        let Some(cipher) = &self.cipher else {
            return Ok(secret.to_string());
        };
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), secret.as_bytes())
            .map_err(|_| anyhow::anyhow!("cannot seal a webhook secret"))?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{}", STANDARD.encode(bytes)))
    }

    fn open(&self, stored: &str) -> anyhow::Result<String> {
        let Some(body) = stored.strip_prefix(PREFIX) else {
            // Stored before a key was configured.
            return Ok(stored.to_string());
        };
        let cipher = self
            .cipher
            .as_ref()
            .context("a sealed webhook secret, and no secrets_key configured")?;
        let bytes = STANDARD
            .decode(body)
            .context("a sealed secret that is not base64")?;
        if bytes.len() < 24 {
            anyhow::bail!("a sealed secret too short to hold its nonce");
        }
        let (nonce, sealed) = bytes.split_at(24);
        let plain = cipher
            .decrypt(XNonce::from_slice(nonce), sealed)
            .map_err(|_| {
                anyhow::anyhow!("a sealed webhook secret does not open with this secrets_key")
            })?;
        String::from_utf8(plain).context("a sealed secret that is not UTF-8")
    }

    /// The configuration as stored and published: its secret sealed.
    pub fn encode(&self, config: &WebhookConfig) -> anyhow::Result<String> {
        let mut stored = config.clone();
        stored.secret = self.seal(&config.secret)?;
        Ok(serde_json::to_string(&stored)?)
    }

    /// A stored or published configuration, its secret opened.
    pub fn decode(&self, json: &str) -> anyhow::Result<WebhookConfig> {
        let mut config: WebhookConfig =
            serde_json::from_str(json).context("an undecodable webhook configuration")?;
        config.secret = self.open(&config.secret)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret: &str) -> WebhookConfig {
        serde_json::from_value(
            serde_json::json!({"url": "https://hooks.example.test/x", "secret": secret}),
        )
        .unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_with_its_key_only_and_never_shows() {
        let key = "11".repeat(32);
        let seal = SecretSeal::from_hex(&key).unwrap();
        let json = seal.encode(&config("canary-secret-42")).unwrap();
        assert!(!json.contains("canary-secret-42"), "{json}");
        assert!(json.contains("sealed:v1:"));
        assert_eq!(seal.decode(&json).unwrap().secret, "canary-secret-42");
        // Sealing twice gives different text (a fresh nonce each time).
        assert_ne!(json, seal.encode(&config("canary-secret-42")).unwrap());
        let other = SecretSeal::from_hex(&"22".repeat(32)).unwrap();
        assert!(other.decode(&json).is_err());
        assert!(SecretSeal::default().decode(&json).is_err());
        // Tampering is detected.
        let tampered = json.replacen("sealed:v1:", "sealed:v1:A", 1);
        assert!(seal.decode(&tampered).is_err());
    }

    #[test]
    fn without_a_key_secrets_pass_through_and_old_plain_ones_still_read() {
        let plain = SecretSeal::default().encode(&config("s")).unwrap();
        assert!(plain.contains("\"secret\":\"s\""));
        let keyed = SecretSeal::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(keyed.decode(&plain).unwrap().secret, "s");
        assert!(SecretSeal::from_hex("abc").is_err());
        assert!(SecretSeal::from_hex(&"zz".repeat(32)).is_err());
    }
}
