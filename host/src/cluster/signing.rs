//! Authentication of messages between nodes. Anything consumed from the
//! broker is input: whoever may publish to the nodes exchange (the broker's
//! default user, another application) could otherwise push frames to any
//! connected user or fake presence. Every cluster message carries an
//! HMAC-SHA256, under the deployment's cluster key, of its kind, its sender
//! and its body; a message without a valid one is dropped and counted.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The AMQP header that carries the signature (lowercase hex).
pub const SIGNATURE_HEADER: &str = "x-sockets-signature";

/// Shortest accepted cluster key, bytes: an HMAC key is only as strong as
/// it is long.
pub const MIN_KEY_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The cluster key, ready to sign and verify.
#[derive(Clone)]
pub struct ClusterKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the cluster key (SOCKETS_CLUSTER_KEY) must be at least {MIN_KEY_BYTES} bytes")]
pub struct KeyTooShort;

impl ClusterKey {
    /// A key from the configured secret.
    pub fn new(secret: &str) -> Result<Self, KeyTooShort> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyTooShort);
        }
        let mac = HmacSha256::new_from_slice(secret.as_bytes()).map_err(|_| KeyTooShort)?;
        Ok(Self { mac })
    }

    /// The signature of a message, as it goes into `SIGNATURE_HEADER`.
    pub fn sign(&self, kind: &str, sender: &str, body: &[u8]) -> String {
        let tag = self.tag(kind, sender, body).finalize().into_bytes();
        tag.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Whether `signature` (hex) is this key's signature of the message;
    /// compared in constant time.
    pub fn verify(&self, kind: &str, sender: &str, body: &[u8], signature: &str) -> bool {
        let Some(tag) = from_hex(signature) else {
            return false;
        };
        self.tag(kind, sender, body).verify_slice(&tag).is_ok()
    }

    /// Each field length-prefixed, so that no two messages share an input.
    fn tag(&self, kind: &str, sender: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        for field in [kind.as_bytes(), sender.as_bytes(), body] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_message_and_key() {
        let key = ClusterKey::new("0123456789abcdef-cluster").unwrap();
        let signature = key.sign("batch", "node-a", b"body");
        assert!(key.verify("batch", "node-a", b"body", &signature));
        assert!(!key.verify("batch", "node-a", b"bodY", &signature));
        assert!(!key.verify("batch", "node-b", b"body", &signature));
        assert!(!key.verify("presence", "node-a", b"body", &signature));
        // Moving bytes between fields changes the input.
        assert!(!key.verify("batc", "hnode-a", b"body", &signature));
        let other = ClusterKey::new("another-key-of-16-bytes").unwrap();
        assert!(!other.verify("batch", "node-a", b"body", &signature));
        assert!(!key.verify("batch", "node-a", b"body", "not hex"));
        assert!(!key.verify("batch", "node-a", b"body", ""));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(ClusterKey::new("short").is_err());
        assert!(ClusterKey::new("").is_err());
    }
}
