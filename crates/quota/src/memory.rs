//! The in-memory store: the same semantics as the Redis scripts, for `kiln up`'s embedded default,
//! for a gateway's fail-open limiter while Redis is down, and for unit tests. One mutex makes every
//! operation atomic, as a script is in Redis. Expired entries are dropped as they are met and swept
//! after as many operations as the store holds entries (at least a few thousand), so memory stays
//! within twice the live charges and a sweep costs O(1) per operation.

use std::collections::BTreeMap;

// Seeded and fast: a simulated launch day puts millions of subjects through these maps.
use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{
    Charge, ConfigStore, Decision, KeyRecord, KeyStore, Limit, QuotaStore, Refusal, Settlement,
    Usage, WindowUsage,
};
use crate::tiers::Scope;
use crate::QuotaError;

#[derive(Default)]
struct Inner {
    /// subject -> its windows, rate and charges in flight: one lookup per scope of a request
    /// (hashbrown's `entry_ref` finds or makes one in a single probe, allocating only a new name).
    subjects: hashbrown::HashMap<String, Subject>,
    /// charge id -> expiry, for charges not yet settled. A settled charge is forgotten: a second
    /// settlement finds nothing and changes nothing, as it would find a settled record (a launch
    /// day would otherwise keep millions of records for the retention period).
    charges: HashMap<ChargeId, u64>,
    /// idempotency key -> (charge id, expiry).
    idempotency: HashMap<String, (String, u64)>,
    /// charge id -> (answer, expiry).
    results: HashMap<String, (Vec<u8>, u64)>,
    /// key id -> (digest, record).
    keys: BTreeMap<String, (String, KeyRecord)>,
    /// digest -> key id.
    digests: HashMap<String, String>,
    tiers: Option<String>,
    operations: u64,
    /// The operation count at which the next sweep runs.
    next_sweep: u64,
}

/// A charge id, allocated once per admitted charge and shared by every entry that names it.
type ChargeId = Arc<str>;

/// One sliding window of a subject: its length in ms, and its charges' times and ids, oldest first.
type Window = (u64, Vec<(u64, ChargeId)>);

/// What the store holds of one subject (a user or an organisation).
#[derive(Default)]
struct Subject {
    windows: Vec<Window>,
    /// Theoretical arrival time (GCRA); at or before now it means no debt (0: never charged).
    tat: u64,
    /// Charges in flight, with their lease expiry (a handful at most: a list beats a map).
    in_flight: Vec<(ChargeId, u64)>,
}

impl Subject {
    fn live_window(&mut self, window_ms: u64, now: u64) -> &mut Vec<(u64, ChargeId)> {
        let at = match self.windows.iter().position(|(w, _)| *w == window_ms) {
            Some(at) => at,
            None => {
                self.windows.push((window_ms, Vec::new()));
                self.windows.len() - 1
            }
        };
        let entries = &mut self.windows[at].1;
        entries.retain(|(t, _)| *t > now.saturating_sub(window_ms));
        entries
    }

    fn live_flights(&mut self, now: u64) -> &mut Vec<(ChargeId, u64)> {
        self.in_flight.retain(|(_, expiry)| *expiry > now);
        &mut self.in_flight
    }

    /// Drops what has expired; true when nothing is left.
    fn expire(&mut self, now: u64) -> bool {
        self.windows.retain_mut(|(w, e)| {
            e.retain(|(t, _)| *t > now.saturating_sub(*w));
            !e.is_empty()
        });
        self.in_flight.retain(|(_, e)| *e > now);
        self.windows.is_empty() && self.in_flight.is_empty() && self.tat <= now
    }
}

/// Milliseconds on some monotonic clock.
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

pub struct MemoryStore {
    clock: Clock,
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let epoch = Instant::now();
        // Starts well above any window length so that `now - window` never underflows.
        Self::with_clock(Box::new(move || ms(epoch.elapsed()) + (1 << 40)))
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store on the given clock (virtual time for tests and simulations).
    pub fn with_clock(clock: Clock) -> Self {
        MemoryStore {
            clock,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every operation checks, then writes).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn subject(&mut self, name: &str) -> &mut Subject {
        self.subjects.entry_ref(name).or_default()
    }

    fn sweep(&mut self, now: u64) {
        self.operations += 1;
        if self.operations < self.next_sweep {
            return;
        }
        self.subjects.retain(|_, subject| !subject.expire(now));
        self.charges.retain(|_, e| *e > now);
        self.idempotency.retain(|_, (_, e)| *e > now);
        self.results.retain(|_, (_, e)| *e > now);
        // A sweep costs as much as the store holds: the next one waits as many operations (at least
        // a few thousand), so a store of a million users costs O(1) per operation, not a scan.
        let held =
            self.subjects.len() + self.charges.len() + self.idempotency.len() + self.results.len();
        self.next_sweep = self.operations + held.max(4096) as u64;
    }
}

impl MemoryStore {
    /// [`QuotaStore::admit`], synchronously: the memory store never waits, so a driver in virtual
    /// time (the simulator) calls it without an executor or a boxed future.
    pub fn admit_now(&self, charge: &Charge<'_>) -> Decision {
        self.admit_at(charge, self.now())
    }

    /// [`admit_now`](Self::admit_now) at `now` (ms on the store's clock), for a driver with a
    /// clock of its own per caller (the simulator's threads, each at its own virtual time).
    pub fn admit_at(&self, charge: &Charge<'_>, now: u64) -> Decision {
        let mut inner = self.lock();
        inner.sweep(now);
        if let Some(key) = charge.idempotency {
            if let Some((cid, expiry)) = inner.idempotency.get(key) {
                if *expiry > now {
                    return Decision::Duplicate {
                        charge_id: cid.clone(),
                    };
                }
            }
        }
        // The worst refusal so far: (rank, scope, limit, retry); its subject is copied once, at the end.
        let mut worst: Option<(i64, usize, Limit, Option<u64>)> = None;
        let mut refuse = |scope: usize, limit: Limit, retry: Option<u64>| {
            let rank = retry.map_or(-1, |r| r as i64);
            if worst.as_ref().is_none_or(|(w, ..)| rank > *w) {
                worst = Some((rank, scope, limit, retry));
            }
        };
        for (index, scope) in charge.scopes.iter().enumerate() {
            let subject = inner.subject(&scope.subject);
            for &(window_ms, images) in &scope.windows {
                let entries = subject.live_window(window_ms, now);
                let used = entries.len();
                if used >= images as usize {
                    let retry = entries
                        .get(used - images as usize)
                        .map_or(window_ms, |(t, _)| t + window_ms - now);
                    refuse(
                        index,
                        Limit::Window {
                            seconds: window_ms / 1000,
                            images,
                        },
                        Some(retry),
                    );
                }
            }
            if let Some((interval, burst)) = scope.rate {
                let tat = subject.tat.max(now);
                let allow_at = (tat + interval).saturating_sub(interval * u64::from(burst));
                if now < allow_at {
                    refuse(
                        index,
                        Limit::Rate {
                            interval_ms: interval,
                            burst,
                        },
                        Some(allow_at - now),
                    );
                }
            }
            if let Some(max) = scope.max_in_flight {
                if subject.live_flights(now).len() >= max as usize {
                    refuse(index, Limit::InFlight { max }, None);
                }
            }
        }
        if let Some((_, index, limit, retry)) = worst {
            return Decision::Refused(Refusal {
                subject: charge.scopes[index].subject.clone(),
                limit,
                retry_after: retry.map(Duration::from_millis),
            });
        }
        let id: ChargeId = Arc::from(charge.charge_id);
        let mut usage = Vec::with_capacity(charge.scopes.iter().map(|s| s.windows.len()).sum());
        for scope in charge.scopes {
            let subject = inner.subject(&scope.subject);
            for &(window_ms, images) in &scope.windows {
                let entries = subject.live_window(window_ms, now);
                entries.push((now, id.clone()));
                usage.push(WindowUsage {
                    subject: scope.subject.clone(),
                    window_seconds: window_ms / 1000,
                    limit: images,
                    used: entries.len() as u32,
                    reset_after: Duration::from_millis(entries[0].0 + window_ms - now),
                });
            }
            // Scopes name distinct subjects (a user, their organisation), so each debt is its own.
            if let Some((interval, _)) = scope.rate {
                subject.tat = subject.tat.max(now) + interval;
            }
            if scope.max_in_flight.is_some() {
                subject.in_flight.push((id.clone(), now + ms(charge.lease)));
            }
        }
        let keep = now + ms(charge.retention);
        inner.charges.insert(id, keep);
        if let Some(key) = charge.idempotency {
            inner
                .idempotency
                .insert(key.to_string(), (charge.charge_id.to_string(), keep));
        }
        Decision::Admitted(usage)
    }

    /// [`QuotaStore::settle`], synchronously.
    pub fn settle_now(
        &self,
        charge_id: &str,
        idempotency: Option<&str>,
        scopes: &[Scope],
        settlement: Settlement,
    ) -> bool {
        self.settle_at(charge_id, idempotency, scopes, settlement, self.now())
    }

    /// [`settle_now`](Self::settle_now) at `now` (ms on the store's clock).
    pub fn settle_at(
        &self,
        charge_id: &str,
        idempotency: Option<&str>,
        scopes: &[Scope],
        settlement: Settlement,
        now: u64,
    ) -> bool {
        let mut inner = self.lock();
        for scope in scopes {
            if let Some(subject) = inner.subjects.get_mut(&scope.subject) {
                subject.in_flight.retain(|(id, _)| &**id != charge_id);
            }
        }
        let Some(expiry) = inner.charges.remove(charge_id) else {
            return false;
        };
        if expiry <= now {
            return false;
        }
        match settlement {
            Settlement::Commit => {}
            Settlement::Refund => {
                for scope in scopes {
                    if let Some(subject) = inner.subjects.get_mut(&scope.subject) {
                        for (window_ms, entries) in subject.windows.iter_mut() {
                            if scope.windows.iter().any(|(w, _)| w == window_ms) {
                                entries.retain(|(_, id)| &**id != charge_id);
                            }
                        }
                    }
                }
                if let Some(key) = idempotency {
                    if inner
                        .idempotency
                        .get(key)
                        .is_some_and(|(c, _)| c == charge_id)
                    {
                        inner.idempotency.remove(key);
                    }
                }
            }
        }
        true
    }
}

#[tonic::async_trait]
impl QuotaStore for MemoryStore {
    async fn admit(&self, charge: &Charge<'_>) -> Result<Decision, QuotaError> {
        Ok(self.admit_now(charge))
    }

    async fn settle(
        &self,
        charge_id: &str,
        idempotency: Option<&str>,
        scopes: &[Scope],
        settlement: Settlement,
    ) -> Result<bool, QuotaError> {
        Ok(self.settle_now(charge_id, idempotency, scopes, settlement))
    }

    async fn renew(
        &self,
        charge_id: &str,
        scopes: &[Scope],
        lease: Duration,
    ) -> Result<(), QuotaError> {
        let now = self.now();
        let mut inner = self.lock();
        for scope in scopes {
            let flights = inner.subject(&scope.subject).live_flights(now);
            if let Some((_, expiry)) = flights.iter_mut().find(|(id, _)| &**id == charge_id) {
                *expiry = now + ms(lease);
            }
        }
        Ok(())
    }

    async fn usage(&self, scopes: &[Scope]) -> Result<Usage, QuotaError> {
        let now = self.now();
        let mut inner = self.lock();
        let mut usage = Usage::default();
        for scope in scopes {
            let subject = inner.subject(&scope.subject);
            for &(window_ms, images) in &scope.windows {
                let entries = subject.live_window(window_ms, now);
                usage.windows.push(WindowUsage {
                    subject: scope.subject.clone(),
                    window_seconds: window_ms / 1000,
                    limit: images,
                    used: entries.len() as u32,
                    reset_after: Duration::from_millis(
                        entries.first().map_or(0, |(t, _)| t + window_ms - now),
                    ),
                });
            }
            let flights = subject.live_flights(now).len() as u32;
            usage.in_flight.push((scope.subject.clone(), flights));
        }
        Ok(usage)
    }

    async fn save_result(
        &self,
        charge_id: &str,
        bytes: &[u8],
        retention: Duration,
    ) -> Result<(), QuotaError> {
        let expiry = self.now() + ms(retention);
        self.lock()
            .results
            .insert(charge_id.to_string(), (bytes.to_vec(), expiry));
        Ok(())
    }

    async fn result(&self, charge_id: &str) -> Result<Option<Vec<u8>>, QuotaError> {
        let now = self.now();
        Ok(self
            .lock()
            .results
            .get(charge_id)
            .filter(|(_, e)| *e > now)
            .map(|(b, _)| b.clone()))
    }
}

#[tonic::async_trait]
impl KeyStore for MemoryStore {
    async fn create_key(&self, digest: &str, record: &KeyRecord) -> Result<(), QuotaError> {
        let mut inner = self.lock();
        if inner.keys.contains_key(&record.id) {
            return Err(QuotaError::Conflict(format!(
                "a key with id {:?} exists",
                record.id
            )));
        }
        inner
            .keys
            .insert(record.id.clone(), (digest.to_string(), record.clone()));
        inner.digests.insert(digest.to_string(), record.id.clone());
        Ok(())
    }

    async fn lookup_key(&self, digest: &str) -> Result<Option<KeyRecord>, QuotaError> {
        let inner = self.lock();
        Ok(inner
            .digests
            .get(digest)
            .and_then(|id| inner.keys.get(id))
            .map(|(_, r)| r.clone()))
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, QuotaError> {
        Ok(self.lock().keys.values().map(|(_, r)| r.clone()).collect())
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, QuotaError> {
        let mut inner = self.lock();
        let Some((digest, _)) = inner.keys.remove(id) else {
            return Ok(false);
        };
        inner.digests.remove(&digest);
        Ok(true)
    }
}

#[tonic::async_trait]
impl ConfigStore for MemoryStore {
    async fn tiers(&self) -> Result<Option<String>, QuotaError> {
        Ok(self.lock().tiers.clone())
    }

    async fn set_tiers(&self, toml: &str) -> Result<(), QuotaError> {
        self.lock().tiers = Some(toml.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Admit { user: usize },
        Settle { charge: usize, refund: bool },
        Advance { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize).prop_map(|user| Op::Admit { user }),
            3 => (0..64usize, any::<bool>()).prop_map(|(charge, refund)| Op::Settle { charge, refund }),
            3 => (0..40_000u64).prop_map(|ms| Op::Advance { ms }),
        ]
    }

    const WINDOWS: [(u64, u32); 2] = [(60_000, 3), (10_000, 2)];
    const RATE: (u64, u32) = (5_000, 2);
    const IN_FLIGHT: u32 = 2;
    const LEASE: u64 = 30_000;

    fn scope(user: usize) -> Scope {
        Scope {
            subject: format!("user:{user}"),
            windows: WINDOWS.to_vec(),
            rate: Some(RATE),
            max_in_flight: Some(IN_FLIGHT),
        }
    }

    /// What the model remembers of one admitted charge.
    struct Admitted {
        user: usize,
        at: u64,
        settled: bool,
        refunded: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Against a plain model of the rules, under random admissions, settlements (repeated
        /// ones included) and time steps: every decision is the model's, so no limit is ever
        /// exceeded, nothing is refused that had room, and each charge is settled once.
        #[test]
        fn decisions_follow_the_model(ops in proptest::collection::vec(op(), 1..120)) {
            let clock = Arc::new(AtomicU64::new(1 << 40));
            let time = clock.clone();
            let store = MemoryStore::with_clock(Box::new(move || time.load(Ordering::SeqCst)));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut charges: Vec<Admitted> = Vec::new();
            let mut admits: Vec<Vec<u64>> = vec![Vec::new(); 3];
            let mut tat = [0u64; 3];
            for op in ops {
                let now = clock.load(Ordering::SeqCst);
                match op {
                    Op::Advance { ms } => {
                        clock.fetch_add(ms, Ordering::SeqCst);
                    }
                    Op::Admit { user } => {
                        let live = |c: &&Admitted| c.user == user && !c.refunded;
                        let window_room = WINDOWS.iter().all(|&(w, limit)| {
                            charges.iter().filter(live).filter(|c| c.at > now - w).count() < limit as usize
                        });
                        let flying = charges
                            .iter()
                            .filter(|c| c.user == user && !c.settled && c.at + LEASE > now)
                            .count();
                        let t = tat[user].max(now);
                        let rate_room = now + RATE.0 * u64::from(RATE.1) >= t + RATE.0;
                        let expected = window_room && flying < IN_FLIGHT as usize && rate_room;
                        let id = charges.len().to_string();
                        let scopes = [scope(user)];
                        let decision = rt.block_on(store.admit(&Charge {
                            charge_id: &id,
                            idempotency: None,
                            scopes: &scopes,
                            lease: Duration::from_millis(LEASE),
                            retention: Duration::from_secs(86_400),
                        })).unwrap();
                        prop_assert_eq!(matches!(decision, Decision::Admitted(_)), expected, "{:?}", decision);
                        if expected {
                            // A refused request spends no rate.
                            tat[user] = t + RATE.0;
                            charges.push(Admitted { user, at: now, settled: false, refunded: false });
                            admits[user].push(now);
                        }
                    }
                    Op::Settle { charge, refund } => {
                        let Some(c) = charges.get_mut(charge) else { continue };
                        let settlement = if refund { Settlement::Refund } else { Settlement::Commit };
                        let settled = rt.block_on(store.settle(
                            &charge.to_string(), None, &[scope(c.user)], settlement,
                        )).unwrap();
                        prop_assert_eq!(settled, !c.settled, "settled exactly once");
                        if !c.settled {
                            c.settled = true;
                            c.refunded = refund;
                        }
                    }
                }
            }
            // GCRA's guarantee: in any span of t ms, at most burst + t / interval admissions.
            for times in &admits {
                for (i, &start) in times.iter().enumerate() {
                    for span in [0, 5_000, 10_000, 30_000] {
                        let n = times[i..].iter().take_while(|&&t| t <= start + span).count() as u64;
                        prop_assert!(n <= u64::from(RATE.1) + span / RATE.0, "{} in {} ms", n, span);
                    }
                }
            }
        }
    }
}
