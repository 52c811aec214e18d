//! Authentication: an API key in `authorization: Bearer <key>` becomes an [`Identity`]. Keys are
//! stored only as SHA-256 digests of pepper + key; neither a key nor its digest is ever logged.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use kiln_scheduler::Tier;

use crate::GatewayError;

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Key id (never the key itself), for logs.
    pub key_id: String,
    pub user: String,
    /// Team organisation, when the user belongs to one.
    pub org: Option<String>,
    pub tier: Tier,
}

/// Resolves the caller of a request.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, metadata: &MetadataMap) -> Result<Identity, GatewayError>;
}

/// One stored key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    /// Hex SHA-256 of pepper + key.
    pub sha256: String,
    pub user: String,
    #[serde(default)]
    pub org: Option<String>,
    pub tier: String,
}

/// The keys file (TOML): `[[keys]]` tables of [`KeyRecord`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

/// Digest under which a key is stored.
pub fn hash_key(pepper: &str, key: &str) -> String {
    hex::encode(
        Sha256::new()
            .chain_update(pepper.as_bytes())
            .chain_update(key.as_bytes())
            .finalize(),
    )
}

/// Parses a tier name.
pub fn parse_tier(name: &str) -> Option<Tier> {
    Tier::ALL.into_iter().find(|t| t.as_str() == name)
}

/// Keys loaded from a file at start.
pub struct StaticKeys {
    pepper: String,
    by_hash: HashMap<String, Identity>,
}

impl StaticKeys {
    pub fn new(pepper: String, file: KeysFile) -> Result<Self, GatewayError> {
        let mut by_hash = HashMap::new();
        for k in file.keys {
            let tier = parse_tier(&k.tier).ok_or_else(|| {
                GatewayError::Internal(format!("key {}: unknown tier {:?}", k.id, k.tier))
            })?;
            by_hash.insert(
                k.sha256.to_ascii_lowercase(),
                Identity {
                    key_id: k.id,
                    user: k.user,
                    org: k.org,
                    tier,
                },
            );
        }
        Ok(StaticKeys { pepper, by_hash })
    }

    pub fn load(pepper: String, path: &Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| GatewayError::Internal(format!("keys file {}: {e}", path.display())))?;
        let file: KeysFile = toml::from_str(&text)
            .map_err(|e| GatewayError::Internal(format!("keys file {}: {e}", path.display())))?;
        Self::new(pepper, file)
    }
}

impl Authenticator for StaticKeys {
    fn authenticate(&self, metadata: &MetadataMap) -> Result<Identity, GatewayError> {
        let value = metadata
            .get("authorization")
            .ok_or(GatewayError::MissingApiKey)?;
        let value = value.to_str().map_err(|_| GatewayError::UnknownApiKey)?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(GatewayError::MissingApiKey)?;
        self.by_hash
            .get(&hash_key(&self.pepper, key.trim()))
            .cloned()
            .ok_or(GatewayError::UnknownApiKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> StaticKeys {
        let file = KeysFile {
            keys: vec![KeyRecord {
                id: "k1".into(),
                sha256: hash_key("pep", "secret-1"),
                user: "ana".into(),
                org: None,
                tier: "plus".into(),
            }],
        };
        StaticKeys::new("pep".into(), file).unwrap()
    }

    fn meta(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[test]
    fn a_known_key_names_the_user_and_tier() {
        let id = keys().authenticate(&meta(Some("Bearer secret-1"))).unwrap();
        assert_eq!(
            (id.user.as_str(), id.tier, id.key_id.as_str()),
            ("ana", Tier::Plus, "k1")
        );
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_refused() {
        assert!(matches!(
            keys().authenticate(&meta(None)),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            keys().authenticate(&meta(Some("secret-1"))),
            Err(GatewayError::MissingApiKey)
        ));
        assert!(matches!(
            keys().authenticate(&meta(Some("Bearer secret-2"))),
            Err(GatewayError::UnknownApiKey)
        ));
        // The digest depends on the pepper: the same key under another pepper is unknown.
        let file = KeysFile {
            keys: vec![KeyRecord {
                id: "k".into(),
                sha256: hash_key("other", "secret-1"),
                user: "u".into(),
                org: None,
                tier: "free".into(),
            }],
        };
        let other = StaticKeys::new("pep".into(), file).unwrap();
        assert!(other.authenticate(&meta(Some("Bearer secret-1"))).is_err());
    }
}
