//! The in-memory store: the same semantics as the Redis scripts, for `kiln up`'s embedded default,
//! for a gateway's fail-open limiter while Redis is down, and for unit tests. One mutex makes every
//! operation atomic, as a script is in Redis. Expired entries are dropped as they are met and swept
//! after as many operations as the store holds entries (at least a few thousand), so memory stays
//! within twice the live charges and a sweep costs O(1) per operation.

use std::collections::BTreeMap;

// Seeded and fast: a simulated launch day puts millions of subjects through these maps.
use foldhash::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::{
    Charge, ConfigStore, Decision, KeyRecord, KeyStore, Limit, QuotaStore, Refusal, Settlement,
    Usage, WindowUsage,
};
use crate::tiers::Scope;
use crate::QuotaError;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Charged,
    Committed,
    Refunded,
}

#[derive(Default)]
struct Inner {
    /// subject -> its windows.
    windows: HashMap<String, Vec<Window>>,
    /// subject -> theoretical arrival time (GCRA).
    rates: HashMap<String, u64>,
    /// subject -> charge id -> lease expiry.
    in_flight: HashMap<String, HashMap<String, u64>>,
    /// charge id -> (state, expiry).
    charges: HashMap<String, (State, u64)>,
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

/// One sliding window of a subject: its length in ms, and its charges' times and ids, oldest first.
type Window = (u64, Vec<(u64, String)>);

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
    fn live_window(&mut self, subject: &str, window_ms: u64, now: u64) -> &mut Vec<(u64, String)> {
        // Looked up by `&str` first: a known subject costs no allocation.
        if !self.windows.contains_key(subject) {
            self.windows.insert(subject.to_string(), Vec::new());
        }
        let windows = self.windows.get_mut(subject).expect("inserted above");
        let at = match windows.iter().position(|(w, _)| *w == window_ms) {
            Some(at) => at,
            None => {
                windows.push((window_ms, Vec::new()));
                windows.len() - 1
            }
        };
        let entries = &mut windows[at].1;
        entries.retain(|(t, _)| *t > now.saturating_sub(window_ms));
        entries
    }

    fn live_flights(&mut self, subject: &str, now: u64) -> &mut HashMap<String, u64> {
        if !self.in_flight.contains_key(subject) {
            self.in_flight
                .insert(subject.to_string(), HashMap::default());
        }
        let flights = self.in_flight.get_mut(subject).expect("inserted above");
        flights.retain(|_, expiry| *expiry > now);
        flights
    }

    fn sweep(&mut self, now: u64) {
        self.operations += 1;
        if self.operations < self.next_sweep {
            return;
        }
        self.windows.retain(|_, windows| {
            windows.retain_mut(|(w, e)| {
                e.retain(|(t, _)| *t > now.saturating_sub(*w));
                !e.is_empty()
            });
            !windows.is_empty()
        });
        self.rates.retain(|_, tat| *tat > now);
        self.in_flight.retain(|_, f| {
            f.retain(|_, e| *e > now);
            !f.is_empty()
        });
        self.charges.retain(|_, (_, e)| *e > now);
        self.idempotency.retain(|_, (_, e)| *e > now);
        self.results.retain(|_, (_, e)| *e > now);
        // A sweep costs as much as the store holds: the next one waits as many operations (at least
        // a few thousand), so a store of a million users costs O(1) per operation, not a scan.
        let held = self.windows.len()
            + self.rates.len()
            + self.in_flight.len()
            + self.charges.len()
            + self.idempotency.len()
            + self.results.len();
        self.next_sweep = self.operations + held.max(4096) as u64;
    }
}

#[tonic::async_trait]
impl QuotaStore for MemoryStore {
    async fn admit(&self, charge: &Charge<'_>) -> Result<Decision, QuotaError> {
        let now = self.now();
        let mut inner = self.lock();
        inner.sweep(now);
        if let Some(key) = charge.idempotency {
            if let Some((cid, expiry)) = inner.idempotency.get(key) {
                if *expiry > now {
                    return Ok(Decision::Duplicate {
                        charge_id: cid.clone(),
                    });
                }
            }
        }
        let mut worst: Option<(i64, Refusal)> = None;
        let mut refuse = |subject: &str, limit: Limit, retry: Option<u64>| {
            let rank = retry.map_or(-1, |r| r as i64);
            if worst.as_ref().is_none_or(|(w, _)| rank > *w) {
                worst = Some((
                    rank,
                    Refusal {
                        subject: subject.to_string(),
                        limit,
                        retry_after: retry.map(Duration::from_millis),
                    },
                ));
            }
        };
        let mut new_tats = Vec::new();
        for scope in charge.scopes {
            for &(window_ms, images) in &scope.windows {
                let entries = inner.live_window(&scope.subject, window_ms, now);
                let used = entries.len();
                if used >= images as usize {
                    let retry = entries
                        .get(used - images as usize)
                        .map_or(window_ms, |(t, _)| t + window_ms - now);
                    refuse(
                        &scope.subject,
                        Limit::Window {
                            seconds: window_ms / 1000,
                            images,
                        },
                        Some(retry),
                    );
                }
            }
            if let Some((interval, burst)) = scope.rate {
                let tat = inner
                    .rates
                    .get(&scope.subject)
                    .copied()
                    .unwrap_or(0)
                    .max(now);
                let allow_at = (tat + interval).saturating_sub(interval * u64::from(burst));
                if now < allow_at {
                    refuse(
                        &scope.subject,
                        Limit::Rate {
                            interval_ms: interval,
                            burst,
                        },
                        Some(allow_at - now),
                    );
                }
                new_tats.push((scope.subject.clone(), tat + interval));
            }
            if let Some(max) = scope.max_in_flight {
                if inner.live_flights(&scope.subject, now).len() >= max as usize {
                    refuse(&scope.subject, Limit::InFlight { max }, None);
                }
            }
        }
        if let Some((_, refusal)) = worst {
            return Ok(Decision::Refused(refusal));
        }
        let mut usage = Vec::new();
        for scope in charge.scopes {
            for &(window_ms, images) in &scope.windows {
                let entries = inner.live_window(&scope.subject, window_ms, now);
                entries.push((now, charge.charge_id.to_string()));
                usage.push(WindowUsage {
                    subject: scope.subject.clone(),
                    window_seconds: window_ms / 1000,
                    limit: images,
                    used: entries.len() as u32,
                    reset_after: Duration::from_millis(entries[0].0 + window_ms - now),
                });
            }
            if scope.max_in_flight.is_some() {
                inner
                    .live_flights(&scope.subject, now)
                    .insert(charge.charge_id.to_string(), now + ms(charge.lease));
            }
        }
        inner.rates.extend(new_tats);
        let keep = now + ms(charge.retention);
        inner
            .charges
            .insert(charge.charge_id.to_string(), (State::Charged, keep));
        if let Some(key) = charge.idempotency {
            inner
                .idempotency
                .insert(key.to_string(), (charge.charge_id.to_string(), keep));
        }
        Ok(Decision::Admitted(usage))
    }

    async fn settle(
        &self,
        charge_id: &str,
        idempotency: Option<&str>,
        scopes: &[Scope],
        settlement: Settlement,
    ) -> Result<bool, QuotaError> {
        let now = self.now();
        let mut inner = self.lock();
        for scope in scopes {
            if let Some(f) = inner.in_flight.get_mut(&scope.subject) {
                f.remove(charge_id);
            }
        }
        let Some((state, expiry)) = inner.charges.get(charge_id).copied() else {
            return Ok(false);
        };
        if state != State::Charged || expiry <= now {
            return Ok(false);
        }
        let next = match settlement {
            Settlement::Commit => State::Committed,
            Settlement::Refund => {
                for scope in scopes {
                    if let Some(windows) = inner.windows.get_mut(&scope.subject) {
                        for (window_ms, entries) in windows.iter_mut() {
                            if scope.windows.iter().any(|(w, _)| w == window_ms) {
                                entries.retain(|(_, id)| id != charge_id);
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
                State::Refunded
            }
        };
        if let Some(record) = inner.charges.get_mut(charge_id) {
            record.0 = next;
        }
        Ok(true)
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
            if let Some(expiry) = inner.live_flights(&scope.subject, now).get_mut(charge_id) {
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
            for &(window_ms, images) in &scope.windows {
                let entries = inner.live_window(&scope.subject, window_ms, now);
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
            let flights = inner.live_flights(&scope.subject, now).len() as u32;
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
