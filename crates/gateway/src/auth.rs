//! Authentication: an API key in `authorization: Bearer <key>` becomes an [`Identity`]. Keys are
//! looked up by their digest (SHA-256 of pepper + key) in the key store on every request, so a key
//! revoked on one gateway stops working on all of them at once. Neither a key nor its digest is ever
//! logged. While the store is unreachable, identities seen recently are still recognised (so that
//! fail-open tiers keep working); unknown keys are then refused as unavailable, not unauthenticated.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_quota::{keys, KeyRecord, KeyStore, QuotaError};
use kiln_scheduler::Tier;
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use tracing::warn;

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
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Identity, GatewayError>;
}

/// Parses a tier name.
pub fn parse_tier(name: &str) -> Option<Tier> {
    Tier::ALL.into_iter().find(|t| t.as_str() == name)
}

/// The key in `authorization: Bearer <key>`.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, GatewayError> {
    let value = metadata
        .get("authorization")
        .ok_or(GatewayError::MissingApiKey)?;
    let value = value.to_str().map_err(|_| GatewayError::UnknownApiKey)?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(GatewayError::MissingApiKey)?
        .trim();
    if key.is_empty() {
        return Err(GatewayError::MissingApiKey);
    }
    Ok(key)
}

/// How long an identity is trusted from memory while the key store is unreachable.
const OUTAGE_MEMORY: Duration = Duration::from_secs(600);
/// Most identities remembered for outages.
const OUTAGE_MEMORY_ENTRIES: usize = 100_000;

/// Keys in a [`KeyStore`] (Redis, or memory for `kiln up`).
pub struct StoreKeys {
    pepper: String,
    store: Arc<dyn KeyStore>,
    /// digest -> identity and when it was last confirmed by the store; read only during outages.
    recent: Mutex<HashMap<String, (Identity, Instant)>>,
}

impl StoreKeys {
    pub fn new(pepper: String, store: Arc<dyn KeyStore>) -> Self {
        StoreKeys {
            pepper,
            store,
            recent: Mutex::new(HashMap::new()),
        }
    }

    fn remember(&self, digest: &str, identity: &Identity) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= OUTAGE_MEMORY_ENTRIES {
            recent.retain(|_, (_, at)| at.elapsed() < OUTAGE_MEMORY);
            if recent.len() >= OUTAGE_MEMORY_ENTRIES {
                recent.clear();
            }
        }
        recent.insert(digest.to_string(), (identity.clone(), Instant::now()));
    }

    fn forget(&self, digest: &str) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
    }

    fn recalled(&self, digest: &str) -> Option<Identity> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .get(digest)
            .filter(|(_, at)| at.elapsed() < OUTAGE_MEMORY)
            .map(|(i, _)| i.clone())
    }
}

fn identity(record: KeyRecord) -> Result<Identity, GatewayError> {
    let tier = parse_tier(&record.tier).ok_or_else(|| {
        GatewayError::Internal(format!(
            "key {} has unknown tier {:?}",
            record.id, record.tier
        ))
    })?;
    Ok(Identity {
        key_id: record.id,
        user: record.user,
        org: record.org,
        tier,
    })
}

#[tonic::async_trait]
impl Authenticator for StoreKeys {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Identity, GatewayError> {
        let digest = keys::digest(&self.pepper, bearer(metadata)?);
        match self.store.lookup_key(&digest).await {
            Ok(Some(record)) => {
                let identity = identity(record)?;
                self.remember(&digest, &identity);
                Ok(identity)
            }
            Ok(None) => {
                self.forget(&digest);
                Err(GatewayError::UnknownApiKey)
            }
            Err(e @ QuotaError::Unavailable(_)) => {
                crate::admission::count_store_error("auth");
                match self.recalled(&digest) {
                    Some(identity) => Ok(identity),
                    None => {
                        warn!(error = %e, "key store unreachable; cannot check an unfamiliar key");
                        Err(GatewayError::StoreUnavailable(e.to_string()))
                    }
                }
            }
            Err(e) => Err(GatewayError::Internal(e.to_string())),
        }
    }
}

/// One key of a keys file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyFileEntry {
    pub id: String,
    /// Hex SHA-256 of pepper + key.
    pub sha256: String,
    pub user: String,
    #[serde(default)]
    pub org: Option<String>,
    pub tier: String,
}

/// A keys file (TOML, `[[keys]]` tables): seeds the in-memory key store of a gateway without
/// Redis (`kiln up`'s development key, tests).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyFileEntry>,
}

impl KeysFile {
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| GatewayError::Internal(format!("keys file {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| GatewayError::Internal(format!("keys file {}: {e}", path.display())))
    }

    /// Stores every key of the file in `store`, keeping ids the store already has.
    pub async fn import(&self, store: &dyn KeyStore) -> Result<(), GatewayError> {
        for k in &self.keys {
            if parse_tier(&k.tier).is_none() {
                return Err(GatewayError::Internal(format!(
                    "key {}: unknown tier {:?}",
                    k.id, k.tier
                )));
            }
            let record = KeyRecord {
                id: k.id.clone(),
                user: k.user.clone(),
                org: k.org.clone(),
                tier: k.tier.clone(),
                created_unix: 0,
            };
            // A key imported by an earlier start (or another gateway) is kept as the store has it.
            match store
                .create_key(&k.sha256.to_ascii_lowercase(), &record)
                .await
            {
                Ok(()) | Err(QuotaError::Conflict(_)) => {}
                Err(e) => {
                    return Err(GatewayError::Internal(format!(
                        "importing key {}: {e}",
                        k.id
                    )))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kiln_quota::MemoryStore;

    use super::*;

    async fn keys() -> (StoreKeys, Arc<MemoryStore>) {
        let store = Arc::new(MemoryStore::new());
        let file = KeysFile {
            keys: vec![KeyFileEntry {
                id: "k1".into(),
                sha256: keys::digest("pep", "secret-1"),
                user: "ana".into(),
                org: Some("acme".into()),
                tier: "team".into(),
            }],
        };
        file.import(&*store).await.unwrap();
        (StoreKeys::new("pep".into(), store.clone()), store)
    }

    fn meta(value: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = value {
            m.insert("authorization", v.parse().unwrap());
        }
        m
    }

    #[tokio::test]
    async fn a_known_key_names_the_user_org_and_tier() {
        let (auth, _) = keys().await;
        let id = auth
            .authenticate(&meta(Some("Bearer secret-1")))
            .await
            .unwrap();
        assert_eq!(
            (
                id.user.as_str(),
                id.org.as_deref(),
                id.tier,
                id.key_id.as_str()
            ),
            ("ana", Some("acme"), Tier::Team, "k1")
        );
    }

    #[tokio::test]
    async fn missing_malformed_unknown_and_revoked_keys_are_refused() {
        let (auth, store) = keys().await;
        for (header, missing) in [
            (None, true),
            (Some("secret-1"), true),
            (Some("Bearer "), true),
            (Some("Bearer secret-2"), false),
        ] {
            let err = auth.authenticate(&meta(header)).await.unwrap_err();
            assert_eq!(
                matches!(err, GatewayError::MissingApiKey),
                missing,
                "{header:?}: {err}"
            );
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        assert!(store.revoke_key("k1").await.unwrap());
        assert!(matches!(
            auth.authenticate(&meta(Some("Bearer secret-1"))).await,
            Err(GatewayError::UnknownApiKey)
        ));
        // The digest depends on the pepper: the same key under another pepper is unknown.
        let (_, store) = keys().await;
        let other = StoreKeys::new("other".into(), store);
        assert!(other
            .authenticate(&meta(Some("Bearer secret-1")))
            .await
            .is_err());
    }
}
