//! The quota stage: a request is admitted against its caller's limits (user, and organisation pool
//! for team members) in the quota store before it is scheduled, and its charge is settled exactly
//! once afterwards: committed when an image was delivered, refunded otherwise. This module also owns
//! the current tier table (refreshed from the store, so an admin's change reaches every gateway),
//! demand tightening, fail-open/closed behaviour while the store is down, in-flight lease renewal,
//! and idempotent replays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kiln_proto::v1::{QuotaStatus, QuotaWindow};
use kiln_quota::{
    Charge, Decision, FailMode, MemoryStore, QuotaError, QuotaStore, Scope, Settlement, Store,
    TierTable, WindowUsage,
};
use kiln_telemetry as telemetry;
use tokio::task::AbortHandle;
use tracing::{error, info, warn};

use crate::auth::Identity;
use crate::validation::ValidRequest;
use crate::GatewayError;

/// Lets one log line through per second and counts the others, so a store outage that fails every
/// request logs once a second with a count (the metrics count every failure) instead of flooding.
struct LogThrottle {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    const fn new() -> Self {
        LogThrottle {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when this line may be logged.
    fn allow(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

static STORE_DOWN_LOG: LogThrottle = LogThrottle::new();

/// How a request ended, for settling its charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The image reached the caller; `answer` is kept for idempotent retries when the request had
    /// an idempotency key.
    Delivered {
        answer: Option<Vec<u8>>,
    },
    NotDelivered,
}

/// A charge taken at admission; settled once (settling consumes it).
#[derive(Debug)]
pub struct Ticket {
    pub request_id: String,
    charge_id: String,
    tier: &'static str,
    idempotency: Option<String>,
    scopes: Vec<Scope>,
    /// Admitted by the gateway-local limiter while the store was down.
    local: bool,
    /// The tightest window after the charge, for the `x-ratelimit-*` metadata.
    pub headline: Option<WindowUsage>,
    renewal: Option<AbortHandle>,
}

impl Ticket {
    /// Whether the caller sent an idempotency key (so the answer is worth keeping).
    pub fn keeps_answer(&self) -> bool {
        self.idempotency.is_some()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
    }
}

/// The answer to an admission.
#[derive(Debug)]
pub enum Admitted {
    /// Charged: schedule the request, then settle the ticket.
    Charged(Ticket),
    /// A retry of a finished request: send this stored answer again; nothing was charged.
    Replay(Vec<u8>),
}

#[tonic::async_trait]
pub trait Admission: Send + Sync + 'static {
    async fn admit(
        &self,
        identity: &Identity,
        request: &ValidRequest,
    ) -> Result<Admitted, GatewayError>;
    /// Settles a ticket; consuming it makes a second settlement impossible.
    async fn settle(&self, ticket: Ticket, outcome: Outcome);
    /// The caller's limits and usage.
    async fn status(&self, identity: &Identity) -> Result<QuotaStatus, GatewayError>;
}

/// Settings of the quota stage.
#[derive(Clone, Debug)]
pub struct QuotaSettings {
    /// How long an in-flight slot is held without renewal (a dead gateway's slots free after it).
    pub lease: Duration,
    /// Retry hint when a request is refused for having too many in flight.
    pub in_flight_retry: Duration,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            lease: Duration::from_secs(30),
            in_flight_retry: Duration::from_secs(2),
        }
    }
}

/// Counts a store operation that failed because the store was unreachable.
pub fn count_store_error(operation: &str) {
    telemetry::GATEWAY_STORE_ERRORS
        .with_label_values(&[operation])
        .inc();
}

/// Quotas in a [`Store`] (Redis, or memory for `kiln up`), with a local fallback limiter.
pub struct QuotaAdmission {
    store: Arc<dyn Store>,
    /// Used for fail-open tiers while `store` is unreachable.
    local: Arc<MemoryStore>,
    tiers: RwLock<Arc<TierTable>>,
    /// f64 bits of the demand-tightening factor.
    factor: AtomicU64,
    settings: QuotaSettings,
}

impl QuotaAdmission {
    pub fn new(store: Arc<dyn Store>, tiers: TierTable, settings: QuotaSettings) -> Self {
        telemetry::GATEWAY_TIGHTENING.set(1.0);
        QuotaAdmission {
            store,
            local: Arc::new(MemoryStore::new()),
            tiers: RwLock::new(Arc::new(tiers)),
            factor: AtomicU64::new(1f64.to_bits()),
            settings,
        }
    }

    pub fn tiers(&self) -> Arc<TierTable> {
        self.tiers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the tier table (already validated).
    pub fn set_tiers(&self, table: TierTable) {
        *self.tiers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    pub fn factor(&self) -> f64 {
        f64::from_bits(self.factor.load(Ordering::Relaxed))
    }

    pub fn set_factor(&self, factor: f64) {
        self.factor.store(factor.to_bits(), Ordering::Relaxed);
        telemetry::GATEWAY_TIGHTENING.set(factor);
    }

    /// Reads the tier table from the store and applies it when it changed; an invalid table is
    /// logged and ignored (the current one stays). Returns whether a new table was applied.
    pub async fn refresh_tiers(&self) -> Result<bool, QuotaError> {
        let Some(text) = self.store.tiers().await? else {
            return Ok(false);
        };
        let table = match TierTable::from_toml(&text) {
            Ok(t) => t,
            Err(e) => {
                error!(error = %e, "ignoring the tier table in the store; keeping the current one");
                return Ok(false);
            }
        };
        if *self.tiers() == table {
            return Ok(false);
        }
        self.set_tiers(table);
        info!("applied a new tier table from the store");
        Ok(true)
    }

    /// Follows the tier table in the store every `period`, forever.
    pub async fn follow_tiers(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh_tiers().await {
                count_store_error("tiers");
                warn!(error = %e, "could not read the tier table; keeping the current one");
            }
        }
    }

    /// Updates the tightening factor from the cluster's queue: waiting jobs per batch slot.
    /// Hysteresis keeps it from flapping: tightened at `enter`, restored at `exit`.
    pub fn observe_load(&self, waiting: u32, slots: u32) {
        let rule = self.tiers().tightening.clone();
        let per_slot = f64::from(waiting) / f64::from(slots.max(1));
        let tightened = self.factor() < 1.0;
        let saturated = per_slot >= rule.enter_queue_per_slot
            || (tightened && per_slot > rule.exit_queue_per_slot);
        let next = if saturated { rule.factor } else { 1.0 };
        if next != self.factor() {
            info!(
                factor = next,
                waiting, slots, "demand tightening factor changed"
            );
            self.set_factor(next);
        }
    }

    /// Follows the cluster's load every `period`, forever, tightening limits while it is saturated.
    pub async fn follow_load(
        self: Arc<Self>,
        backend: Arc<dyn crate::backend::Backend>,
        period: Duration,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(status) = backend.status().await {
                let slots = status.workers.iter().map(|w| w.max_batch).sum();
                self.observe_load(status.waiting, slots);
            }
        }
    }

    fn scopes(&self, tiers: &TierTable, identity: &Identity) -> Result<Vec<Scope>, GatewayError> {
        tiers
            .scopes(
                &identity.user,
                identity.org.as_deref(),
                identity.tier.as_str(),
                self.factor(),
            )
            .map_err(|e| GatewayError::Internal(e.to_string()))
    }

    fn fail_mode(tiers: &TierTable, identity: &Identity) -> FailMode {
        tiers
            .tiers
            .get(identity.tier.as_str())
            .map_or(FailMode::Closed, |t| t.when_store_down)
    }

    fn renewal(
        &self,
        store: Arc<dyn QuotaStore>,
        charge_id: &str,
        scopes: &[Scope],
    ) -> Option<AbortHandle> {
        if scopes.iter().all(|s| s.max_in_flight.is_none()) {
            return None;
        }
        let (charge_id, scopes, lease) =
            (charge_id.to_string(), scopes.to_vec(), self.settings.lease);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = store.renew(&charge_id, &scopes, lease).await {
                    count_store_error("renew");
                    warn!(error = %e, "could not renew an in-flight lease");
                }
            }
        });
        Some(task.abort_handle())
    }
}

/// The window closest to refusing: fewest remaining, then longest until reset.
fn headline(windows: &[WindowUsage]) -> Option<WindowUsage> {
    windows
        .iter()
        .min_by_key(|w| (w.remaining(), std::cmp::Reverse(w.reset_after)))
        .cloned()
}

#[tonic::async_trait]
impl Admission for QuotaAdmission {
    async fn admit(
        &self,
        identity: &Identity,
        request: &ValidRequest,
    ) -> Result<Admitted, GatewayError> {
        let started = Instant::now();
        // One snapshot of the table for the whole admission, even if an admin replaces it meanwhile.
        let tiers = self.tiers();
        let scopes = self.scopes(&tiers, identity)?;
        let charge_id = uuid::Uuid::new_v4().simple().to_string();
        let idempotency = request
            .idempotency_key
            .as_ref()
            .map(|k| format!("{}/{k}", identity.user));
        let charge = Charge {
            charge_id: &charge_id,
            idempotency: idempotency.as_deref(),
            scopes: &scopes,
            lease: self.settings.lease,
            retention: tiers.longest_window(),
        };
        let tier = identity.tier.as_str();
        let (decision, store, local): (_, Arc<dyn QuotaStore>, _) = match self
            .store
            .admit(&charge)
            .await
        {
            Ok(d) => (d, self.store.clone(), false),
            Err(e @ QuotaError::Unavailable(_)) => {
                count_store_error("admit");
                match Self::fail_mode(&tiers, identity) {
                    FailMode::Closed => {
                        if let Some(suppressed) = STORE_DOWN_LOG.allow() {
                            warn!(error = %e, tier, suppressed, "quota store unreachable; tier fails closed");
                        }
                        return Err(GatewayError::StoreUnavailable(e.to_string()));
                    }
                    FailMode::Open => {
                        if let Some(suppressed) = STORE_DOWN_LOG.allow() {
                            warn!(error = %e, tier, suppressed, "quota store unreachable; admitting against the local limiter");
                        }
                        telemetry::GATEWAY_QUOTA_FAIL_OPEN
                            .with_label_values(&[tier])
                            .inc();
                        let local: Arc<dyn QuotaStore> = self.local.clone();
                        let d = local
                            .admit(&charge)
                            .await
                            .map_err(|e| GatewayError::Internal(e.to_string()))?;
                        (d, local, true)
                    }
                }
            }
            Err(e) => return Err(GatewayError::Internal(e.to_string())),
        };
        let label = match &decision {
            Decision::Admitted(_) => "admitted",
            Decision::Refused(_) => "refused",
            Decision::Duplicate { .. } => "duplicate",
        };
        telemetry::GATEWAY_ADMISSION_DURATION
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        match decision {
            Decision::Admitted(windows) => Ok(Admitted::Charged(Ticket {
                request_id: request.request_id.clone(),
                renewal: self.renewal(store, &charge_id, &scopes),
                charge_id,
                tier,
                idempotency,
                scopes,
                local,
                headline: headline(&windows),
            })),
            Decision::Refused(mut refusal) => {
                let scope = refusal.subject.split(':').next().unwrap_or("user");
                telemetry::GATEWAY_QUOTA_REFUSALS
                    .with_label_values(&[tier, refusal.limit.kind(), scope])
                    .inc();
                refusal.retry_after = refusal.retry_after.or(Some(self.settings.in_flight_retry));
                Err(GatewayError::QuotaExhausted(refusal))
            }
            Decision::Duplicate { charge_id } => match store.result(&charge_id).await {
                Ok(Some(answer)) => {
                    telemetry::GATEWAY_IDEMPOTENT_REPLAYS.inc();
                    Ok(Admitted::Replay(answer))
                }
                Ok(None) => Err(GatewayError::DuplicateInFlight(
                    request.idempotency_key.clone().unwrap_or_default(),
                )),
                Err(e) => Err(GatewayError::StoreUnavailable(e.to_string())),
            },
        }
    }

    async fn settle(&self, mut ticket: Ticket, outcome: Outcome) {
        if let Some(renewal) = ticket.renewal.take() {
            renewal.abort();
        }
        let store: Arc<dyn QuotaStore> = if ticket.local {
            self.local.clone()
        } else {
            self.store.clone()
        };
        let settlement = match outcome {
            Outcome::Delivered { answer } => {
                if let Some(answer) = answer.filter(|_| ticket.keeps_answer()) {
                    let keep = self.tiers().longest_window();
                    if let Err(e) = store.save_result(&ticket.charge_id, &answer, keep).await {
                        warn!(error = %e, "could not keep the answer for idempotent retries");
                    }
                }
                Settlement::Commit
            }
            Outcome::NotDelivered => Settlement::Refund,
        };
        // Settlement is idempotent in the store, so it is retried until it gets through.
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=10 {
            match store
                .settle(
                    &ticket.charge_id,
                    ticket.idempotency.as_deref(),
                    &ticket.scopes,
                    settlement,
                )
                .await
            {
                Ok(settled) => {
                    if settled && settlement == Settlement::Refund {
                        telemetry::GATEWAY_QUOTA_REFUNDS
                            .with_label_values(&[ticket.tier])
                            .inc();
                        info!(request_id = %ticket.request_id, "charge refunded");
                    }
                    return;
                }
                Err(e) => {
                    count_store_error("settle");
                    warn!(error = %e, attempt, request_id = %ticket.request_id, "settlement failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        error!(request_id = %ticket.request_id, ?settlement, "gave up settling a charge; the in-flight lease will expire");
    }

    async fn status(&self, identity: &Identity) -> Result<QuotaStatus, GatewayError> {
        let tiers = self.tiers();
        let scopes = self.scopes(&tiers, identity)?;
        let usage = match self.store.usage(&scopes).await {
            Ok(u) => u,
            Err(e @ QuotaError::Unavailable(_)) => {
                count_store_error("usage");
                match Self::fail_mode(&tiers, identity) {
                    FailMode::Closed => return Err(GatewayError::StoreUnavailable(e.to_string())),
                    FailMode::Open => self
                        .local
                        .usage(&scopes)
                        .await
                        .map_err(|e| GatewayError::Internal(e.to_string()))?,
                }
            }
            Err(e) => return Err(GatewayError::Internal(e.to_string())),
        };
        let tier = identity.tier.as_str();
        let own = &scopes[0];
        let (rpm, burst) = own.rate.map_or((0.0, 0), |(interval, burst)| {
            (60_000.0 / interval as f64, burst)
        });
        Ok(QuotaStatus {
            user: identity.user.clone(),
            organisation: identity.org.clone().unwrap_or_default(),
            tier: tier.to_string(),
            windows: usage
                .windows
                .iter()
                .map(|w| QuotaWindow {
                    subject: w.subject.clone(),
                    window_seconds: w.window_seconds,
                    limit: w.limit,
                    used: w.used,
                    remaining: w.remaining(),
                    reset_seconds: w.reset_after.as_secs_f64(),
                })
                .collect(),
            requests_per_minute: rpm,
            burst,
            max_in_flight: own.max_in_flight.unwrap_or(0),
            in_flight: usage.in_flight.first().map_or(0, |(_, n)| *n),
            tightening_factor: tiers.factor_for(tier, self.factor()),
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_log_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let throttle = LogThrottle::new();
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        throttle.next_ms.store(0, Ordering::Relaxed); // a second later
        assert_eq!(throttle.allow(), Some(2));
    }
    use kiln_scheduler::Tier;

    use super::*;
    use crate::validation::tests::valid_request;

    fn identity(user: &str, tier: Tier) -> Identity {
        Identity {
            key_id: "k".into(),
            user: user.into(),
            org: None,
            tier,
        }
    }

    fn admission() -> QuotaAdmission {
        let mut tiers = TierTable::shipped();
        tiers.tiers.get_mut("free").unwrap().rate = None;
        QuotaAdmission::new(
            Arc::new(MemoryStore::new()),
            tiers,
            QuotaSettings::default(),
        )
    }

    async fn charge(q: &QuotaAdmission, who: &Identity) -> Result<Ticket, GatewayError> {
        match q.admit(who, &valid_request()).await? {
            Admitted::Charged(t) => Ok(t),
            Admitted::Replay(_) => panic!("unexpected replay"),
        }
    }

    #[tokio::test]
    async fn a_free_user_gets_three_images_and_a_refund_gives_one_back() {
        let q = admission();
        let ana = identity("ana", Tier::Free);
        // The free tier allows one request in flight: settle each before the next.
        for n in (0..3).rev() {
            let t = charge(&q, &ana).await.unwrap();
            assert_eq!(t.headline.as_ref().unwrap().remaining(), n);
            q.settle(t, Outcome::Delivered { answer: None }).await;
        }
        let err = charge(&q, &ana).await.unwrap_err();
        let GatewayError::QuotaExhausted(r) = &err else {
            panic!("{err}")
        };
        assert!(r.retry_after.is_some());
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn tightening_has_hysteresis() {
        let q = admission();
        q.observe_load(10, 10);
        assert_eq!(q.factor(), 1.0);
        q.observe_load(20, 10);
        assert_eq!(q.factor(), 0.5);
        q.observe_load(15, 10);
        assert_eq!(q.factor(), 0.5, "between exit and enter: stays tightened");
        q.observe_load(10, 10);
        assert_eq!(q.factor(), 1.0);
    }
}
