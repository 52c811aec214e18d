//! API keys as callers hold them and as the store keeps them: a key is `kiln_` and 40 random hex
//! digits, shown once at creation; the store keeps only SHA-256(pepper + key) and a record of who
//! it belongs to.

use sha2::{Digest, Sha256};

/// The digest under which a key is stored and looked up.
pub fn digest(pepper: &str, key: &str) -> String {
    hex::encode(
        Sha256::new()
            .chain_update(pepper.as_bytes())
            .chain_update(key.as_bytes())
            .finalize(),
    )
}

/// A new random key: 160 bits from the operating system's generator.
pub fn generate() -> String {
    format!("kiln_{}", hex::encode(rand::random::<[u8; 20]>()))
}

/// A short public id for a new key.
pub fn new_id() -> String {
    format!("k-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_digests_depend_on_the_pepper() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with("kiln_") && a.len() == 45);
        assert_eq!(digest("p", &a), digest("p", &a));
        assert_ne!(digest("p", &a), digest("q", &a));
        assert_eq!(digest("p", &a).len(), 64);
    }
}
