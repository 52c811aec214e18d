//! The store's contract, shared by the Redis and in-memory implementations: admit a charge against
//! every scope at once (all or nothing), settle it exactly once, renew its in-flight lease, report
//! usage, keep finished results for idempotent retries, and hold the API keys and the tier table.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tiers::Scope;
use crate::QuotaError;

/// One admission attempt.
#[derive(Clone, Debug)]
pub struct Charge<'a> {
    /// Unique id of this charge (a fresh UUID per attempt, not the caller's request id).
    pub charge_id: &'a str,
    /// Namespaced idempotency key (`<user>/<client key>`), when the caller sent one.
    pub idempotency: Option<&'a str>,
    pub scopes: &'a [Scope],
    /// How long the in-flight slot is held without a renewal (so a dead gateway leaks nothing).
    pub lease: Duration,
    /// How long the charge's settlement record and idempotency key are kept.
    pub retention: Duration,
}

/// Which limit refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limit {
    Window { seconds: u64, images: u32 },
    Rate { interval_ms: u64, burst: u32 },
    InFlight { max: u32 },
}

impl Limit {
    /// Stable name for metrics and `QuotaFailure` subjects.
    pub fn kind(&self) -> &'static str {
        match self {
            Limit::Window { .. } => "window",
            Limit::Rate { .. } => "rate",
            Limit::InFlight { .. } => "in_flight",
        }
    }

    /// What the limit is, for a person.
    pub fn describe(&self) -> String {
        match self {
            Limit::Window { seconds, images } => {
                format!("{images} images per {}", human_seconds(*seconds))
            }
            Limit::Rate { interval_ms, burst } => format!(
                "{:.1} requests per minute (burst {burst})",
                60_000.0 / *interval_ms as f64
            ),
            Limit::InFlight { max } => format!("{max} requests in flight"),
        }
    }
}

fn human_seconds(s: u64) -> String {
    match s {
        s if s % 86400 == 0 && s >= 86400 => format!("{} day(s)", s / 86400),
        s if s % 3600 == 0 && s >= 3600 => format!("{} hour(s)", s / 3600),
        s if s % 60 == 0 && s >= 60 => format!("{} minute(s)", s / 60),
        s => format!("{s} s"),
    }
}

/// A refusal: the limit with the longest wait among those that refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub subject: String,
    pub limit: Limit,
    /// When the request would pass this limit; `None` when it depends on other requests finishing.
    pub retry_after: Option<Duration>,
}

/// What is left in one window after an admission or at a usage query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowUsage {
    pub subject: String,
    pub window_seconds: u64,
    pub limit: u32,
    pub used: u32,
    /// Until the oldest charge in the window expires (zero when the window is empty).
    pub reset_after: Duration,
}

impl WindowUsage {
    pub fn remaining(&self) -> u32 {
        self.limit.saturating_sub(self.used)
    }
}

/// The answer to an admission attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Charged; the windows as they are after the charge.
    Admitted(Vec<WindowUsage>),
    Refused(Refusal),
    /// The idempotency key belongs to an earlier charge; nothing was charged.
    Duplicate {
        charge_id: String,
    },
}

/// How a charge ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// An image was delivered: the charge stands.
    Commit,
    /// Nothing was delivered: the window charges are returned and the idempotency key freed.
    Refund,
}

/// A subject's usage at a query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub windows: Vec<WindowUsage>,
    /// (subject, requests in flight).
    pub in_flight: Vec<(String, u32)>,
}

/// A stored API key (the key itself is never stored, only its digest, which is the lookup key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public key id, shown in listings and logs.
    pub id: String,
    pub user: String,
    #[serde(default)]
    pub org: Option<String>,
    pub tier: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Quota accounting.
#[tonic::async_trait]
pub trait QuotaStore: Send + Sync + 'static {
    /// Checks every limit of every scope and charges them all, or none.
    async fn admit(&self, charge: &Charge<'_>) -> Result<Decision, QuotaError>;
    /// Settles a charge; `Ok(true)` only for the call that settled it (later calls change nothing
    /// but still release the in-flight slot).
    async fn settle(
        &self,
        charge_id: &str,
        idempotency: Option<&str>,
        scopes: &[Scope],
        settlement: Settlement,
    ) -> Result<bool, QuotaError>;
    /// Extends the in-flight lease of a running charge.
    async fn renew(
        &self,
        charge_id: &str,
        scopes: &[Scope],
        lease: Duration,
    ) -> Result<(), QuotaError>;
    /// Current usage of the scopes.
    async fn usage(&self, scopes: &[Scope]) -> Result<Usage, QuotaError>;
    /// Keeps a finished request's answer for idempotent retries.
    async fn save_result(
        &self,
        charge_id: &str,
        bytes: &[u8],
        retention: Duration,
    ) -> Result<(), QuotaError>;
    async fn result(&self, charge_id: &str) -> Result<Option<Vec<u8>>, QuotaError>;
}

/// API keys, by digest.
#[tonic::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key; refuses an id already in use.
    async fn create_key(&self, digest: &str, record: &KeyRecord) -> Result<(), QuotaError>;
    async fn lookup_key(&self, digest: &str) -> Result<Option<KeyRecord>, QuotaError>;
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, QuotaError>;
    /// Deletes a key by id; `Ok(false)` when there was none.
    async fn revoke_key(&self, id: &str) -> Result<bool, QuotaError>;
}

/// Run-time configuration shared by every gateway.
#[tonic::async_trait]
pub trait ConfigStore: Send + Sync + 'static {
    /// The tier table's TOML, when an operator has set one.
    async fn tiers(&self) -> Result<Option<String>, QuotaError>;
    async fn set_tiers(&self, toml: &str) -> Result<(), QuotaError>;
}

/// Everything a gateway keeps in its store.
pub trait Store: QuotaStore + KeyStore + ConfigStore {}
impl<T: QuotaStore + KeyStore + ConfigStore> Store for T {}
