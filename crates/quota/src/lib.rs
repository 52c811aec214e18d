//! Accounts and quotas, the gateway's memory of callers: API-key records (stored by digest, never
//! in clear), the tier table (limits per tier, the organisation pool, demand tightening), and the
//! quota store that admits a request against every limit at once and settles it exactly once. Two
//! implementations share one contract: Redis for clusters ([`RedisStore`], Lua scripts run with
//! EVALSHA) and memory for `kiln up` and fail-open limiting ([`MemoryStore`]). It knows nothing of
//! gRPC requests or of the scheduler; the gateway maps its answers to statuses.

#![forbid(unsafe_code)]

pub mod keys;
pub mod memory;
pub mod redis_store;
pub mod store;
pub mod tiers;

pub use memory::MemoryStore;
pub use redis_store::{RedisConfig, RedisStore};
pub use store::{
    Charge, ConfigStore, Decision, KeyRecord, KeyStore, Limit, QuotaStore, Refusal, Settlement,
    Store, Usage, WindowUsage,
};
pub use tiers::{FailMode, Scope, TierTable};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("invalid tier table: {0}")]
    InvalidTiers(String),
    /// The store cannot be reached (connection refused, timeout): a gateway applies its tier's
    /// fail mode.
    #[error("quota store unreachable: {0}")]
    Unavailable(String),
    #[error("quota store error: {0}")]
    Store(String),
    #[error("{0}")]
    Conflict(String),
}
