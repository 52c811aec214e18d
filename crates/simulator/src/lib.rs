//! Capacity planning in virtual time: a [`Scenario`]'s arrivals are admitted by Kiln's own quota
//! rules (the tier table and the in-memory quota store, asked at virtual times) and scheduled by Kiln's
//! own scheduler state machine against N simulated GPUs whose calls take the time a calibrated
//! [`StepCost`] predicts. Nothing sleeps: an hour of launch day runs as fast as the events can be
//! processed, on two threads (admission and scheduling, see [`simulate`]), and the outcome is the
//! same report a real load test prints, the same as if one thread had played every event in order.

#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};
use kiln_loadtest::{Arrival, Outcome, OutcomeKind, Scenario};
use kiln_model::{ModelConfig, StepCost};
use kiln_quota::{Charge, Decision, MemoryStore, Refusal, Scope, Settlement, TierTable};
use kiln_scheduler::state::{
    Capacity, Command, FailReason, Job, JobEvent, Output, SchedulerState, SequenceReport,
};
use kiln_scheduler::{SchedulerConfig, Tier};

/// The simulated fleet: how many GPUs, what each holds, how fast it is, and the model's geometry.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub workers: usize,
    pub capacity: Capacity,
    pub cost: StepCost,
    pub model: ModelConfig,
    /// Time every worker call spends outside the model: the protocol's round trip and the
    /// scheduler's turn (0 for the accelerator's time alone).
    pub call_overhead: Duration,
}

/// What went wrong setting a simulation up.
#[derive(Debug, thiserror::Error)]
pub enum SimulationError {
    #[error("quota: {0}")]
    Quota(String),
    #[error("fleet: {0}")]
    Fleet(String),
    #[error("the scheduling thread stopped before admission ended")]
    Stopped,
}

/// How much a simulation did; each request's [`Outcome`] went to the caller as it ended.
pub struct Simulated {
    pub sent: usize,
    /// Events processed (arrivals and worker calls).
    pub events: u64,
    /// How often admission waited for scheduling (an arrival whose answer a settlement could
    /// change), and how long in all (wall time).
    pub admission_waits: u64,
    pub admission_waited: Duration,
    /// How long scheduling waited for arrivals to be handed over (wall time).
    pub scheduling_waited: Duration,
}

/// Arrivals handed from admission to scheduling at once (fewer when scheduling waits for them).
const BATCH: usize = 512;
/// Batches admission may run ahead of scheduling.
const BATCHES_AHEAD: usize = 64;
/// A job's end, as scheduling reports it to admission, which settles its charge: the quota store
/// is admission's alone, so its lock is never contended and scheduling does less.
struct Settled {
    /// The arrival's index, which names the charge (see [`charge_id`]).
    charge: usize,
    user: usize,
    settlement: Settlement,
    at_ms: u64,
}

/// What admission hands to scheduling, in arrival order.
enum Message {
    Admitted {
        at_ns: u64,
        job: Job,
        running: Running,
    },
    Refused {
        at_ns: u64,
        outcome: Outcome,
    },
}

impl Message {
    fn at_ns(&self) -> u64 {
        match self {
            Message::Admitted { at_ns, .. } | Message::Refused { at_ns, .. } => *at_ns,
        }
    }
}

/// How the two threads take turns.
///
/// Scheduling plays events in time order (arrivals before calls at equal times, as one thread
/// would), and plays a call only when every arrival before it has been handed over: the
/// `frontier`. Admission asks the quota store about an arrival at time t without waiting, unless a
/// settlement before t could change the store's answer: the user has a charge in flight (its
/// settlement removes a lease, a refund also a window's charge), or draws on an organisation's
/// pool that has one (any member's). Then admission hands over what it has, moves the frontier to
/// t and waits until scheduling says it has played every event before t and sent their
/// settlements ([`Settled`]), and settles them in the store before it asks.
#[derive(Default)]
struct Handoff {
    /// Every arrival before this time (ns) has been handed over; `u64::MAX` once admission ended.
    frontier: Padded<AtomicU64>,
    /// Published by scheduling while it waits: the messages it has played, outputs included, and
    /// the time before which it has played every call.
    played_messages: Padded<AtomicU64>,
    played_before: Padded<AtomicU64>,
    /// Scheduling waits for arrivals: admission hands over what it has at once.
    hungry: Padded<AtomicBool>,
    /// Scheduling stopped (it panicked): admission must not wait for it.
    scheduling_stopped: AtomicBool,
}

/// A value on cache lines of its own, so that one thread writing it does not slow the other
/// thread's reads of its neighbours.
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Spins a little, then lets the other thread have the core.
fn back_off(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Sets the handoff's flag on drop, however the holder's thread ends.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The arrivals scheduling has been handed and not yet played.
struct Inbox {
    batches: Receiver<VecDeque<Message>>,
    /// Emptied batches go back for reuse.
    spare: SyncSender<VecDeque<Message>>,
    messages: VecDeque<Message>,
    /// Messages taken so far.
    taken: u64,
}

impl Inbox {
    /// Takes the next batch handed over, if there is one (`messages` is empty).
    fn refill(&mut self) -> bool {
        match self.batches.try_recv() {
            Ok(mut batch) => {
                std::mem::swap(&mut self.messages, &mut batch);
                let _ = self.spare.try_send(batch);
                true
            }
            Err(_) => false,
        }
    }
}

/// Scheduling's events in time order: the arrivals handed over, and the worker calls in flight.
/// A GPU has at most one call in flight, so the heap holds (time, order issued, worker) and each
/// call's reports wait in their worker's slot. At equal times arrivals go first, then calls in the
/// order issued.
struct Agenda<'a> {
    inbox: Inbox,
    handoff: &'a Handoff,
    calls: BinaryHeap<Reverse<(u64, u64, u32)>>,
    in_flight: Vec<Vec<SequenceReport>>,
    issued: u64,
    /// Wall time spent waiting for admission.
    waited: Duration,
    /// Jobs ended and not yet reported to admission; sent before scheduling says what it played.
    settled: Vec<Settled>,
    reports: Sender<Vec<Settled>>,
}

impl<'a> Agenda<'a> {
    fn new(
        inbox: Inbox,
        handoff: &'a Handoff,
        reports: Sender<Vec<Settled>>,
        workers: usize,
    ) -> Self {
        Agenda {
            inbox,
            handoff,
            calls: BinaryHeap::new(),
            in_flight: vec![Vec::new(); workers],
            issued: 0,
            waited: Duration::ZERO,
            settled: Vec::with_capacity(BATCH),
            reports,
        }
    }

    /// The report slot of `worker`'s next call, emptied (its buffer is reused call after call).
    fn reports_of(&mut self, worker: u32) -> &mut Vec<SequenceReport> {
        let slot = &mut self.in_flight[worker as usize];
        slot.clear();
        slot
    }

    /// `worker`'s call, whose reports were written with `reports_of`, ends at `at_ns`.
    fn push_call(&mut self, at_ns: u64, worker: u32) {
        self.issued += 1;
        self.calls.push(Reverse((at_ns, self.issued, worker)));
    }

    /// A job ended: admission settles its charge.
    fn settle(&mut self, settled: Settled) {
        self.settled.push(settled);
        if self.settled.len() >= BATCH {
            self.report_settled();
        }
    }

    fn report_settled(&mut self) {
        if !self.settled.is_empty() {
            let settled = std::mem::replace(&mut self.settled, Vec::with_capacity(BATCH));
            // Admission ended: nothing is asked of the store any more.
            let _ = self.reports.send(settled);
        }
    }

    fn pop_call(&mut self) -> Option<(u64, Event)> {
        let Reverse((at, _, worker)) = self.calls.pop()?;
        Some((at, Event::CallDone(worker)))
    }

    /// The next event, waiting for admission when the next call is not before its frontier. Called
    /// when the previous event and its outputs have been played.
    fn pop(&mut self) -> Option<(u64, Event)> {
        let mut waiting_since: Option<Instant> = None;
        let event = self.pop_waiting(&mut waiting_since);
        if let Some(since) = waiting_since {
            self.waited += since.elapsed();
        }
        event
    }

    fn pop_waiting(&mut self, waiting_since: &mut Option<Instant>) -> Option<(u64, Event)> {
        let mut published = None;
        let mut spins = 0;
        loop {
            let call = self.calls.peek().map(|Reverse((at, _, _))| *at);
            if let Some(at) = self.inbox.messages.front().map(Message::at_ns) {
                if call.is_some_and(|c| c < at) {
                    return self.pop_call();
                }
                let message = self.inbox.messages.pop_front()?;
                self.inbox.taken += 1;
                return Some((at, Event::Arrival(message)));
            }
            // The frontier is read before looking for a batch: one handed over before the frontier
            // moved is then found.
            let frontier = self.handoff.frontier.load(Ordering::Acquire);
            if self.inbox.refill() {
                continue;
            }
            match call {
                Some(c) if c < frontier => return self.pop_call(),
                None if frontier == u64::MAX => return None,
                _ => {}
            }
            // Every event before the frontier is played: say so, and wait for arrivals.
            if published != Some(frontier) {
                self.report_settled();
                let handoff = self.handoff;
                handoff
                    .played_messages
                    .store(self.inbox.taken, Ordering::Release);
                handoff.played_before.store(frontier, Ordering::Release);
                handoff.hungry.store(true, Ordering::Release);
                published = Some(frontier);
                waiting_since.get_or_insert_with(Instant::now);
            }
            back_off(&mut spins);
        }
    }
}

enum Event {
    /// An arrival, admitted or refused.
    Arrival(Message),
    /// A worker's call ended; its reports are in the worker's slot.
    CallDone(u32),
}

/// What a simulated GPU holds of one sequence (a real worker's KV cache, without the cache).
#[derive(Clone, Copy)]
struct Sequence {
    job: u64,
    /// Tokens of context before the first image token.
    prompt_tokens: usize,
    image_tokens: usize,
    /// Image tokens generated so far.
    done: usize,
    /// Fractional tokens carried between passes (see `StepCost::pass_tokens`).
    credit: f64,
}

/// One simulated GPU: the sequences of its batch, in the order the scheduler placed them.
#[derive(Default, Clone)]
struct SimulatedGpu {
    sequences: Vec<Sequence>,
}

impl SimulatedGpu {
    fn position(&self, job: u64, hint: usize) -> Option<usize> {
        // The scheduler lists its batch in placement order, as this vector is kept: the hint is
        // almost always right.
        if self.sequences.get(hint).is_some_and(|s| s.job == job) {
            return Some(hint);
        }
        self.sequences.iter().position(|s| s.job == job)
    }

    /// Drops the sequences the scheduler released (cancelled jobs' caches).
    fn release(&mut self, released: &[u64]) {
        if !released.is_empty() {
            self.sequences.retain(|s| !released.contains(&s.job));
        }
    }
}

/// What a user's requests need, made on their first request: their scheduler name, quota scopes
/// and tier (kept here so that a request reads one entry of the million-user population).
struct Identity {
    name: String,
    scopes: Vec<Scope>,
    /// The organisation whose pool the user draws on: its index in admission's count of charges
    /// in flight (after the users').
    org: Option<u32>,
    tier: &'static str,
    /// The store refused this user until then (ms on the store's clock), and nothing has been
    /// refunded to them since. A refusal with a retry time stands until that time: a window keeps
    /// its charges and the rate its debt, as refused requests add to neither, and only a refund
    /// takes a charge back. So the requests before it are refused without asking the store (whose
    /// answer would be the same and would change nothing in it). Kept only for users whose one
    /// scope is their own: an org pool's room also changes with the other members' refunds.
    refused_until_ms: u64,
}

struct Running {
    sent_at: f64,
    user: usize,
    tier: &'static str,
    phase: usize,
    /// The arrival's index, which names its quota charge (see [`charge_id`]).
    charge: usize,
    prompt_tokens: usize,
    image_tokens: usize,
    first_progress: Option<f64>,
}

fn tier_of(name: &str) -> Tier {
    match name {
        "plus" => Tier::Plus,
        "pro" => Tier::Pro,
        "team" => Tier::Team,
        _ => Tier::Free,
    }
}

/// How a run may differ from the plainest one; every choice gives the same outcomes.
#[derive(Clone, Copy)]
struct Options {
    /// Refuse without asking the store until a remembered refusal's retry time (see [`Identity`]).
    remember_refusals: bool,
    /// Admission waits for scheduling before every arrival, as one thread playing every event in
    /// order would.
    lockstep: bool,
}

/// Plays `scenario` against `fleet` with `tiers` and the scheduler's `config`; each request's
/// outcome goes to `on_end` as it ends (in virtual time, in the order of events), e.g. into a
/// report's [`kiln_loadtest::Tally`].
///
/// Two threads play it: admission draws the arrivals, makes each user's identity on their first
/// request and asks the quota store; scheduling runs the state machine, the GPUs' calls and the
/// settlements, and reports. They take turns only where an answer of the store depends on a
/// settlement (see [`Handoff`]), so the outcomes are those of one thread playing every event in
/// time order (a test compares them).
pub fn simulate(
    scenario: &Scenario,
    fleet: &Fleet,
    tiers: &TierTable,
    config: SchedulerConfig,
    prompts: &[String],
    on_end: impl FnMut(&Outcome),
) -> Result<Simulated, SimulationError> {
    let options = Options {
        remember_refusals: true,
        lockstep: false,
    };
    simulate_with(scenario, fleet, tiers, config, prompts, options, on_end)
}

fn simulate_with(
    scenario: &Scenario,
    fleet: &Fleet,
    tiers: &TierTable,
    config: SchedulerConfig,
    prompts: &[String],
    options: Options,
    on_end: impl FnMut(&Outcome),
) -> Result<Simulated, SimulationError> {
    if fleet.workers == 0 {
        return Err(SimulationError::Fleet(
            "at least one worker is needed".into(),
        ));
    }
    // The store is asked and settled at explicit virtual times, by both threads.
    let store = MemoryStore::new();
    let (reports, settled) = channel();
    let handoff = Handoff::default();
    let (batches, inbox) = sync_channel(BATCHES_AHEAD);
    let (spare, spares) = sync_channel(BATCHES_AHEAD + 2);
    let inbox = Inbox {
        batches: inbox,
        spare,
        messages: VecDeque::new(),
        taken: 0,
    };
    let admission = Admission {
        scenario,
        fleet,
        tiers,
        prompts,
        store: &store,
        settled,
        handoff: &handoff,
        batches,
        spares,
        options,
    };
    let (played, admitted) = std::thread::scope(|threads| {
        let admitted = std::thread::Builder::new()
            .name("sim-admission".into())
            .spawn_scoped(threads, || admission.run())
            .map_err(|e| SimulationError::Fleet(format!("starting the admission thread: {e}")))?;
        let played = {
            let _stopped = OnDrop(|| {
                handoff.scheduling_stopped.store(true, Ordering::Release);
            });
            schedule(fleet, config, &handoff, inbox, reports, on_end)
        };
        let admitted = admitted
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((played, admitted))
    })?;
    let admitted = admitted?;
    // A launch day leaves millions of entries in the store and the state machine: the other core
    // frees them while the caller reports.
    let (identities, leftovers) = (admitted.identities, played.leftovers);
    std::thread::spawn(move || drop((store, leftovers, identities)));
    Ok(Simulated {
        sent: admitted.taken,
        events: played.events,
        admission_waits: admitted.waits,
        admission_waited: admitted.waited,
        scheduling_waited: played.waited,
    })
}

/// The admission thread's share of a run.
struct Admission<'a> {
    scenario: &'a Scenario,
    fleet: &'a Fleet,
    tiers: &'a TierTable,
    prompts: &'a [String],
    store: &'a MemoryStore,
    handoff: &'a Handoff,
    /// Jobs ended, from scheduling, in the order they ended.
    settled: Receiver<Vec<Settled>>,
    batches: SyncSender<VecDeque<Message>>,
    spares: Receiver<VecDeque<Message>>,
    options: Options,
}

/// What admission did: the arrivals drawn, the identities made (to free elsewhere), and its waits
/// for scheduling.
struct Admitted {
    taken: usize,
    identities: Vec<Option<Identity>>,
    waits: u64,
    waited: Duration,
}

impl Admission<'_> {
    /// Draws every arrival, asks the store, and hands each to scheduling in order.
    fn run(self) -> Result<Admitted, SimulationError> {
        let handoff = self.handoff;
        // However admission ends, scheduling stops waiting for it.
        let _ended = OnDrop(|| handoff.frontier.store(u64::MAX, Ordering::Release));
        let (scenario, tiers, options) = (self.scenario, self.tiers, self.options);
        let mut arrivals = scenario.arrival_stream(self.prompts.len()).peekable();
        let mut identities: Vec<Option<Identity>> = Vec::new();
        identities.resize_with(scenario.population.users, || None);
        let mut batch = VecDeque::with_capacity(BATCH);
        let mut handed = 0u64;
        let mut taken = 0usize;
        let mut next_job = 1u64;
        let mut charge_buffer = String::new();
        let (mut waits, mut waited) = (0, Duration::ZERO);
        // Charges admitted and not yet settled in the store, per user (at their population index)
        // and per organisation (after the users, in the order met), and the organisations' places.
        let mut unsettled = vec![0u32; scenario.population.users];
        let mut orgs: HashMap<String, u32> = HashMap::new();
        while let Some(arrival) = arrivals.next() {
            let index = taken;
            taken += 1;
            let at_ns = nanos(arrival.at);
            if identities[arrival.user].is_none() {
                let identity = self.identity(arrival.user, &mut orgs, &mut unsettled)?;
                identities[arrival.user] = Some(identity);
            }
            let org = identities[arrival.user].as_ref().and_then(|i| i.org);
            let waits_for_settlement = |unsettled: &[u32]| {
                options.lockstep
                    || unsettled[arrival.user] != 0
                    || org.is_some_and(|org| unsettled[org as usize] != 0)
            };
            if waits_for_settlement(&unsettled) {
                // A settlement before this arrival may change the store's answer: those already
                // reported may be all there is.
                self.settle_reported(&mut identities, &mut unsettled, &mut charge_buffer);
            }
            if waits_for_settlement(&unsettled) {
                handed += self.hand_over(&mut batch)?;
                handoff.frontier.store(at_ns, Ordering::Release);
                let since = Instant::now();
                self.wait_until_played(handed, at_ns)?;
                waits += 1;
                waited += since.elapsed();
                self.settle_reported(&mut identities, &mut unsettled, &mut charge_buffer);
            }
            let identity = identities[arrival.user].as_mut().expect("made above");
            let now_ms = at_ns / 1_000_000;
            let admitted = if now_ms < identity.refused_until_ms {
                false
            } else {
                let decision = self.store.admit_at(
                    &Charge {
                        charge_id: charge_id(index, &mut charge_buffer),
                        idempotency: None,
                        scopes: &identity.scopes,
                        lease: Duration::from_secs(3600 * 24),
                        retention: tiers.longest_window(),
                    },
                    now_ms,
                );
                if let Decision::Refused(Refusal {
                    retry_after: Some(retry),
                    ..
                }) = &decision
                {
                    if options.remember_refusals && identity.scopes.len() == 1 {
                        identity.refused_until_ms = now_ms + retry.as_millis() as u64;
                    }
                }
                matches!(decision, Decision::Admitted(_))
            };
            batch.push_back(self.message(
                &arrival,
                at_ns,
                index,
                identity,
                admitted,
                &mut next_job,
            ));
            if admitted {
                unsettled[arrival.user] += 1;
                if let Some(org) = identity.org {
                    unsettled[org as usize] += 1;
                }
            }
            if batch.len() >= BATCH || handoff.hungry.load(Ordering::Acquire) {
                handed += self.hand_over(&mut batch)?;
                self.settle_reported(&mut identities, &mut unsettled, &mut charge_buffer);
                let next = arrivals.peek().map_or(u64::MAX, |a| nanos(a.at));
                handoff.frontier.store(next, Ordering::Release);
            }
        }
        self.hand_over(&mut batch)?;
        Ok(Admitted {
            taken,
            identities,
            waits,
            waited,
        })
    }

    /// A user's identity, made on their first request; an organisation met for the first time
    /// gets its place in `unsettled`.
    fn identity(
        &self,
        user: usize,
        orgs: &mut HashMap<String, u32>,
        unsettled: &mut Vec<u32>,
    ) -> Result<Identity, SimulationError> {
        // The store and the state machine are this run's own: the user's name needs no run
        // prefix (as a shared Redis would), and a short key hashes faster.
        let user = self.scenario.user(user);
        let scopes = self
            .tiers
            .scopes(&user.name, user.org.as_deref(), user.tier, 1.0)
            .map_err(|e| SimulationError::Quota(e.to_string()))?;
        // Only a pool's members share its room (a member of an org whose tier has no pool has one
        // scope).
        let org = user.org.filter(|_| scopes.len() > 1).map(|org| {
            *orgs.entry(org).or_insert_with(|| {
                unsettled.push(0);
                (unsettled.len() - 1) as u32
            })
        });
        Ok(Identity {
            name: user.name,
            scopes,
            org,
            tier: user.tier,
            refused_until_ms: 0,
        })
    }

    /// What scheduling is handed of `arrival`: the job to submit, or the refusal to report.
    fn message(
        &self,
        arrival: &Arrival,
        at_ns: u64,
        index: usize,
        identity: &Identity,
        admitted: bool,
        next_job: &mut u64,
    ) -> Message {
        let prompt_tokens = kiln_model::engine::prompt_tokens(
            self.prompts[arrival.prompt % self.prompts.len()].len(),
        );
        let image_tokens = self.fleet.model.image_tokens(arrival.size, arrival.size);
        let running = Running {
            sent_at: arrival.at,
            user: arrival.user,
            tier: identity.tier,
            phase: arrival.phase,
            charge: index,
            prompt_tokens,
            image_tokens,
            first_progress: None,
        };
        if !admitted {
            return Message::Refused {
                at_ns,
                outcome: outcome(&running, OutcomeKind::QuotaRefused, arrival.at),
            };
        }
        let id = *next_job;
        *next_job += 1;
        let job = Job {
            id,
            user: identity.name.clone(),
            tier: tier_of(identity.tier),
            prompt_tokens,
            image_tokens,
        };
        Message::Admitted {
            at_ns,
            job,
            running,
        }
    }

    /// Settles in the store the jobs scheduling has reported ended.
    fn settle_reported(
        &self,
        identities: &mut [Option<Identity>],
        unsettled: &mut [u32],
        buffer: &mut String,
    ) {
        while let Ok(reported) = self.settled.try_recv() {
            for ended in reported {
                let Some(identity) = identities[ended.user].as_mut() else {
                    continue;
                };
                if ended.settlement == Settlement::Refund {
                    // The refund makes room: the store decides this user's next request.
                    identity.refused_until_ms = 0;
                }
                let charge = charge_id(ended.charge, buffer);
                self.store.settle_at(
                    charge,
                    None,
                    &identity.scopes,
                    ended.settlement,
                    ended.at_ms,
                );
                unsettled[ended.user] -= 1;
                if let Some(org) = identity.org {
                    unsettled[org as usize] -= 1;
                }
            }
        }
    }

    /// Hands the batch at hand to scheduling; how many messages it held.
    fn hand_over(&self, batch: &mut VecDeque<Message>) -> Result<u64, SimulationError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let handed = batch.len() as u64;
        let next = self
            .spares
            .try_recv()
            .unwrap_or_else(|_| VecDeque::with_capacity(BATCH));
        self.handoff.hungry.store(false, Ordering::Release);
        self.batches
            .send(std::mem::replace(batch, next))
            .map_err(|_| SimulationError::Stopped)?;
        Ok(handed)
    }

    /// Waits until scheduling has played the `handed` messages and every event before `at_ns`.
    fn wait_until_played(&self, handed: u64, at_ns: u64) -> Result<(), SimulationError> {
        let handoff = self.handoff;
        let mut spins = 0;
        while handoff.played_messages.load(Ordering::Acquire) != handed
            || handoff.played_before.load(Ordering::Acquire) < at_ns
        {
            if handoff.scheduling_stopped.load(Ordering::Acquire) {
                return Err(SimulationError::Stopped);
            }
            back_off(&mut spins);
        }
        Ok(())
    }
}

fn nanos(seconds: f64) -> u64 {
    (seconds * 1e9) as u64
}

/// What scheduling did: the events played, its wall time waiting for arrivals, and what is left
/// to free.
struct Scheduled {
    events: u64,
    waited: Duration,
    leftovers: (SchedulerState, Vec<SimulatedGpu>),
}

/// The scheduling thread's share of a run: plays every event until admission has ended and no
/// call is in flight.
fn schedule(
    fleet: &Fleet,
    config: SchedulerConfig,
    handoff: &Handoff,
    inbox: Inbox,
    reports: Sender<Vec<Settled>>,
    mut on_end: impl FnMut(&Outcome),
) -> Scheduled {
    // Nobody streams progress in a simulation: the first token is noted when its prefill is issued.
    let mut state = SchedulerState::new(config).without_progress_events();
    let mut agenda = Agenda::new(inbox, handoff, reports, fleet.workers);
    let mut jobs: HashMap<u64, Running> = HashMap::new();
    let mut played = 0u64;
    let mut pending_outputs = Vec::new();
    for w in 0..fleet.workers as u32 {
        pending_outputs.extend(state.add_worker(w, fleet.capacity, Duration::ZERO));
    }
    let mut gpus = vec![SimulatedGpu::default(); fleet.workers];
    let mut scratch = Vec::new();
    let overhead_ns = fleet.call_overhead.as_nanos() as u64;
    let mut now_ns = 0u64;
    loop {
        // Apply what the state machine asked for at `now`, in its order.
        for output in pending_outputs.drain(..) {
            let now_s = now_ns as f64 / 1e9;
            match output {
                Output::Command { worker, command } => {
                    let gpu = &mut gpus[worker as usize];
                    let reports = agenda.reports_of(worker);
                    let call =
                        run_call(&fleet.cost, gpu, &mut jobs, &command, reports, &mut scratch);
                    state.recycle(command);
                    let ends = now_ns + (call.seconds * 1e9) as u64 + overhead_ns;
                    // The first token of a prefilled sequence is the caller's first progress.
                    for job in call.prefilled {
                        if let Some(r) = jobs.get_mut(&job) {
                            r.first_progress
                                .get_or_insert(ends as f64 / 1e9 - r.sent_at);
                        }
                    }
                    agenda.push_call(ends, worker);
                }
                Output::Event { job, event } => {
                    // Progress is recorded when the prefill is issued (above): no lookup per token.
                    let kind = match event {
                        JobEvent::Finished { .. } => OutcomeKind::Completed,
                        JobEvent::Failed(FailReason::Shed { .. }) => OutcomeKind::Shed,
                        JobEvent::Failed(_) => OutcomeKind::Error,
                        _ => continue,
                    };
                    let Some(r) = jobs.remove(&job) else {
                        continue;
                    };
                    agenda.settle(Settled {
                        charge: r.charge,
                        user: r.user,
                        settlement: if kind == OutcomeKind::Completed {
                            Settlement::Commit
                        } else {
                            Settlement::Refund
                        },
                        at_ms: now_ns / 1_000_000,
                    });
                    on_end(&outcome(&r, kind, now_s));
                }
            }
        }
        let Some((at, event)) = agenda.pop() else {
            break;
        };
        now_ns = at;
        let now = Duration::from_nanos(now_ns);
        played += 1;
        match event {
            Event::Arrival(Message::Refused { outcome, .. }) => on_end(&outcome),
            Event::Arrival(Message::Admitted { job, running, .. }) => {
                jobs.insert(job.id, running);
                state.submit_into(job, now, &mut pending_outputs);
            }
            Event::CallDone(worker) => {
                let reports = &agenda.in_flight[worker as usize];
                state.step_done_into(worker, reports, now, &mut pending_outputs);
            }
        }
    }
    // Jobs still held when the events ran out would be a scheduler bug: count them as errors.
    let end = now_ns as f64 / 1e9;
    for r in jobs.into_values() {
        on_end(&outcome(&r, OutcomeKind::Error, end));
    }
    Scheduled {
        events: played,
        waited: agenda.waited,
        leftovers: (state, gpus),
    }
}

/// The quota charge id of arrival `index`, written into `buffer` (no allocation per request).
fn charge_id(index: usize, buffer: &mut String) -> &str {
    use std::fmt::Write;
    buffer.clear();
    write!(buffer, "sim-{index}").expect("writing to a String cannot fail");
    buffer
}

fn outcome(r: &Running, kind: OutcomeKind, end: f64) -> Outcome {
    Outcome {
        sent_at: r.sent_at,
        phase: r.phase,
        user: r.user,
        tier: r.tier,
        kind,
        code: (kind == OutcomeKind::Error).then(|| "Simulation".into()),
        first_progress: r.first_progress,
        latency: end - r.sent_at,
    }
}

/// What one simulated call took, and the jobs it prefilled (their first token comes with it).
struct Call {
    seconds: f64,
    prefilled: Vec<u64>,
}

/// What a simulated GPU does with one call: its duration, and the tokens it reports in `reports`.
/// `scratch` is reused between calls.
fn run_call(
    cost: &StepCost,
    gpu: &mut SimulatedGpu,
    jobs: &mut HashMap<u64, Running>,
    command: &Command,
    reports: &mut Vec<SequenceReport>,
    scratch: &mut Vec<(usize, usize)>,
) -> Call {
    let mut call = Call {
        seconds: 0.0,
        prefilled: Vec::new(),
    };
    match command {
        Command::Release { release } => gpu.release(release),
        Command::Prefill {
            jobs: placed,
            release,
        } => {
            gpu.release(release);
            let mut tokens = 0;
            for p in placed {
                let Some(r) = jobs.get(&p.job) else {
                    continue;
                };
                tokens += r.prompt_tokens + p.resume_from;
                let done = p.resume_from + 1;
                gpu.sequences.push(Sequence {
                    job: p.job,
                    prompt_tokens: r.prompt_tokens,
                    image_tokens: r.image_tokens,
                    done,
                    credit: 0.0,
                });
                let finished = done >= r.image_tokens;
                if finished {
                    gpu.sequences.pop();
                }
                reports.push(SequenceReport {
                    job: p.job,
                    new_tokens: 1,
                    passes: 1,
                    finished,
                });
                call.prefilled.push(p.job);
            }
            call.seconds = cost.prefill_seconds(tokens);
        }
        Command::Decode {
            jobs: batch,
            steps,
            release,
        } => {
            gpu.release(release);
            // Each pass's batch and context, gathered per pass: `scratch[k]` is the number of
            // sequences taking part in pass k and the sum of their contexts then. A sequence
            // advances `cost.tokens_per_pass` tokens a pass on average (1 without speculative
            // decoding) and stops at its last token.
            let steps = (*steps).max(1);
            scratch.clear();
            scratch.resize(steps, (0, 0));
            for (i, id) in batch.iter().enumerate() {
                let Some(at) = gpu.position(*id, i) else {
                    continue;
                };
                let seq = &mut gpu.sequences[at];
                let (start, mut passes) = (seq.done, 0);
                while passes < steps && seq.done < seq.image_tokens {
                    scratch[passes].0 += 1;
                    scratch[passes].1 += seq.prompt_tokens + seq.done;
                    let (tokens, credit) =
                        cost.pass_tokens(None, seq.credit, seq.image_tokens - seq.done);
                    seq.done += tokens;
                    seq.credit = credit;
                    passes += 1;
                }
                reports.push(SequenceReport {
                    job: *id,
                    new_tokens: seq.done - start,
                    passes,
                    finished: seq.done >= seq.image_tokens,
                });
            }
            gpu.sequences.retain(|s| s.done < s.image_tokens);
            for &(active, contexts) in scratch.iter().take_while(|(active, _)| *active > 0) {
                call.seconds += cost.decode_seconds(active, contexts);
            }
        }
    }
    call
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_loadtest::{default_deadlines, Report, Tally};

    fn fleet(workers: usize) -> Fleet {
        Fleet {
            workers,
            capacity: Capacity {
                kv_blocks: 4096,
                block_size: 16,
                max_batch: 8,
            },
            cost: StepCost::load("h100-20m").unwrap(),
            model: ModelConfig::tiny(),
            call_overhead: Duration::ZERO,
        }
    }

    const SPIKE: &str = r#"
name = "sim"
seed = 3
[population]
users = 200
tiers = { free = 0.8, pro = 0.2 }
[requests]
sizes = [64]
[[phases]]
name = "baseline"
seconds = 20
rate = 5
[[phases]]
name = "spike"
seconds = 20
rate = 80
"#;

    /// Every tier, organisations of five, and users who come back often: admission meets users
    /// with charges in flight and pools whose members' refunds change its answers.
    const CROWD: &str = r#"
name = "crowd"
seed = 5
[population]
users = 400
tiers = { free = 0.6, plus = 0.15, pro = 0.15, team = 0.1 }
org_size = 5
[requests]
sizes = [64, 128]
[[phases]]
name = "baseline"
seconds = 30
rate = 20
[[phases]]
name = "spike"
seconds = 30
rate = 300
"#;

    const TIERS: &str = r#"
[tiers.free]
windows = [{ seconds = 86400, images = 2 }]
[tiers.plus]
windows = [{ seconds = 86400, images = 1000 }]
[tiers.pro]
windows = [{ seconds = 86400, images = 1000 }]
[tiers.team]
windows = [{ seconds = 86400, images = 1000 }]
org_pool = true
[org]
windows = [{ seconds = 86400, images = 40 }]
max_in_flight = 3
"#;

    fn run(workers: usize) -> Report {
        run_with(fleet(workers))
    }

    fn run_with(fleet: Fleet) -> Report {
        let scenario = Scenario::from_toml(SPIKE).unwrap();
        let tiers = TierTable::from_toml(TIERS).unwrap();
        let config = SchedulerConfig {
            max_waiting: 16,
            ..Default::default()
        };
        let prompts = kiln_loadtest::shipped_prompts();
        let mut tally = Tally::new(&scenario, &default_deadlines());
        let sim = simulate(&scenario, &fleet, &tiers, config, &prompts, |o| {
            tally.add(o)
        })
        .unwrap();
        tally.finish(sim.sent)
    }

    fn count(report: &Report, tier: &str, kind: OutcomeKind) -> usize {
        report
            .phases
            .iter()
            .filter_map(|(_, tiers)| tiers.get(tier))
            .map(|f| f.outcomes.get(&kind).copied().unwrap_or(0))
            .sum()
    }

    #[test]
    fn every_request_ends_once_and_the_rules_of_the_real_cluster_hold() {
        let report = run(2);
        assert!(report.accounted);
        assert_eq!(count(&report, "free", OutcomeKind::Error), 0);
        assert!(count(&report, "free", OutcomeKind::QuotaRefused) > 0);
        assert!(
            count(&report, "free", OutcomeKind::Shed) > 0,
            "{}",
            report.summary()
        );
        assert_eq!(
            count(&report, "pro", OutcomeKind::Shed),
            0,
            "{}",
            report.summary()
        );
        assert!(report.most_images_per_user["free"] <= 2);
    }

    #[test]
    fn outcomes_are_those_of_one_thread_playing_every_event_in_order() {
        // The plainest run asks the store about every arrival, and its admission waits for
        // scheduling before each one: one thread's order. Remembering refusals and admitting ahead
        // of scheduling must change no outcome, nor their order. Played with the shipped tiers
        // (daily windows, rates, in-flight limits, an org pool) and the tests' (a window of two a
        // day, so that refunds of shed requests reopen it); few GPUs, so that requests are shed
        // and refunded.
        let prompts = kiln_loadtest::shipped_prompts();
        let config = SchedulerConfig {
            max_waiting: 16,
            ..Default::default()
        };
        for (scenario, workers) in [(SPIKE, 1), (CROWD, 3)] {
            let scenario = Scenario::from_toml(scenario).unwrap();
            for tiers in [TierTable::shipped(), TierTable::from_toml(TIERS).unwrap()] {
                let run = |remember_refusals, lockstep| {
                    let mut outcomes = Vec::new();
                    let options = Options {
                        remember_refusals,
                        lockstep,
                    };
                    let sim = simulate_with(
                        &scenario,
                        &fleet(workers),
                        &tiers,
                        config,
                        &prompts,
                        options,
                        |o| outcomes.push(o.clone()),
                    )
                    .unwrap();
                    assert_eq!(sim.sent, outcomes.len());
                    outcomes
                };
                let plainest = run(false, true);
                let kinds = |kind| plainest.iter().filter(|o| o.kind == kind).count();
                assert!(kinds(OutcomeKind::QuotaRefused) > 100);
                assert!(kinds(OutcomeKind::Shed) > 0);
                assert!(kinds(OutcomeKind::Completed) > 0);
                assert!(run(true, true) == plainest, "remembering refusals");
                assert!(run(false, false) == plainest, "admitting ahead");
                assert!(run(true, false) == plainest, "both");
            }
        }
    }

    /// An agenda whose admission has ended, holding `arrivals` (their times in ns).
    fn agenda<'a>(handoff: &'a Handoff, arrivals: &[u64]) -> Agenda<'a> {
        handoff.frontier.store(u64::MAX, Ordering::Release);
        let (_, batches) = sync_channel(1);
        let (spare, _) = sync_channel(1);
        let messages = arrivals
            .iter()
            .map(|&at_ns| {
                let outcome = Outcome {
                    sent_at: at_ns as f64 / 1e9,
                    phase: 0,
                    user: 0,
                    tier: "free",
                    kind: OutcomeKind::QuotaRefused,
                    code: None,
                    first_progress: None,
                    latency: 0.0,
                };
                Message::Refused { at_ns, outcome }
            })
            .collect();
        let inbox = Inbox {
            batches,
            spare,
            messages,
            taken: 0,
        };
        Agenda::new(inbox, handoff, channel().0, 8)
    }

    #[test]
    fn calls_end_in_time_order_then_in_the_order_issued_and_arrivals_go_first() {
        let handoff = Handoff::default();
        let mut agenda = agenda(&handoff, &[2, 4]);
        for (at_ns, worker) in [(5, 3), (2, 7), (5, 1), (2, 0), (3, u32::MAX)] {
            agenda.push_call(at_ns, worker);
        }
        let mut order = Vec::new();
        while let Some((at, event)) = agenda.pop() {
            order.push(match event {
                Event::CallDone(worker) => (at, Some(worker)),
                Event::Arrival(_) => (at, None),
            });
        }
        assert_eq!(
            order,
            [
                (2, None),
                (2, Some(7)),
                (2, Some(0)),
                (3, Some(u32::MAX)),
                (4, None),
                (5, Some(3)),
                (5, Some(1))
            ]
        );
    }

    #[test]
    fn no_call_is_played_before_the_arrivals_before_it_are_handed_over() {
        let handoff = Handoff::default();
        let mut agenda = agenda(&handoff, &[]);
        handoff.frontier.store(10, Ordering::Release);
        agenda.push_call(4, 1);
        agenda.push_call(10, 2);
        assert!(matches!(agenda.pop(), Some((4, Event::CallDone(1)))));
        // The call at 10 waits: an arrival at 10 may still come, and would go first.
        let waiting = std::thread::scope(|threads| {
            let played = threads.spawn(|| agenda.pop().map(|(at, _)| at));
            while handoff.played_before.load(Ordering::Acquire) < 10 {
                std::thread::yield_now();
            }
            let waiting = !played.is_finished();
            handoff.frontier.store(u64::MAX, Ordering::Release);
            assert_eq!(played.join().unwrap(), Some(10));
            waiting
        });
        assert!(waiting);
        assert_eq!(handoff.played_messages.load(Ordering::Acquire), 0);
    }

    #[test]
    fn more_gpus_shed_less() {
        let small = run(1);
        let large = run(8);
        let shed = |r: &Report| count(r, "free", OutcomeKind::Shed);
        assert!(
            shed(&large) < shed(&small),
            "{} vs {}",
            shed(&large),
            shed(&small)
        );
        assert_eq!(run(2).totals, run(2).totals, "one scenario, one result");
    }

    #[test]
    fn more_tokens_per_pass_shed_less_and_every_image_still_ends() {
        let speculating = |tpp: f64| Fleet {
            cost: StepCost::load("h100-20m")
                .unwrap()
                .with_tokens_per_pass(tpp)
                .unwrap(),
            ..fleet(1)
        };
        let plain = run_with(speculating(1.0));
        let fast = run_with(speculating(3.0));
        assert!(fast.accounted);
        assert_eq!(count(&fast, "free", OutcomeKind::Error), 0);
        let shed = |r: &Report| count(r, "free", OutcomeKind::Shed);
        let done = |r: &Report| {
            count(r, "free", OutcomeKind::Completed) + count(r, "pro", OutcomeKind::Completed)
        };
        assert!(
            shed(&fast) < shed(&plain) && done(&fast) > done(&plain),
            "3 tokens a pass: {} shed, {} done; 1: {} shed, {} done",
            shed(&fast),
            done(&fast),
            shed(&plain),
            done(&plain)
        );
        assert_eq!(
            plain.totals,
            run(1).totals,
            "1 token a pass is plain decoding"
        );
    }
}
