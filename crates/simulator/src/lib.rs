//! Capacity planning in virtual time: a [`Scenario`]'s arrivals are admitted by Kiln's own quota
//! rules (the tier table and the in-memory quota store, on a virtual clock) and scheduled by Kiln's
//! own scheduler state machine against N simulated GPUs whose calls take the time a calibrated
//! [`StepCost`] predicts. Nothing sleeps: an hour of launch day runs as fast as the events can be
//! processed, and the outcome is the same [`Report`] a real load test prints.

#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use foldhash::{HashMap, HashMapExt};
use kiln_loadtest::scenario::Arrivals;
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
}

/// How much a simulation did; each request's [`Outcome`] went to the caller as it ended.
pub struct Simulated {
    pub sent: usize,
    /// Events processed (arrivals and worker calls).
    pub events: u64,
}

/// Events in time order. Arrivals come in time order from the schedule (drawn as they are due, so
/// a launch day's millions are never held at once), so only worker calls need a heap;
/// a GPU has at most one call in flight, so the heap holds (time, order issued, worker) and each
/// call's reports wait in their worker's slot. At equal times arrivals go first, then calls in the
/// order issued.
struct Agenda<'a> {
    arrivals: std::iter::Peekable<Arrivals<'a>>,
    /// Arrivals taken so far: the next one's index.
    taken: usize,
    calls: BinaryHeap<Reverse<(u64, u64, u32)>>,
    in_flight: Vec<Vec<SequenceReport>>,
    issued: u64,
}

impl<'a> Agenda<'a> {
    fn new(arrivals: Arrivals<'a>, workers: usize) -> Self {
        Agenda {
            arrivals: arrivals.peekable(),
            taken: 0,
            calls: BinaryHeap::new(),
            in_flight: vec![Vec::new(); workers],
            issued: 0,
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

    fn pop(&mut self) -> Option<(u64, Event)> {
        let arrival = self.arrivals.peek().map(|a| (a.at * 1e9) as u64);
        let call = self.calls.peek().map(|Reverse((at, _, _))| *at);
        match (arrival, call) {
            (Some(a), c) if c.is_none_or(|c| a <= c) => {
                let arrival = self.arrivals.next()?;
                self.taken += 1;
                Some((a, Event::Arrival(self.taken - 1, arrival)))
            }
            (_, Some(_)) => {
                let Reverse((at, _, worker)) = self.calls.pop()?;
                Some((at, Event::CallDone(worker)))
            }
            _ => None,
        }
    }
}

enum Event {
    /// The arrival and its index in the schedule.
    Arrival(usize, Arrival),
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

/// Plays `scenario` against `fleet` with `tiers` and the scheduler's `config`; each request's
/// outcome goes to `on_end` as it ends (in virtual time), e.g. into a report's
/// [`kiln_loadtest::Tally`].
pub fn simulate(
    scenario: &Scenario,
    fleet: &Fleet,
    tiers: &TierTable,
    config: SchedulerConfig,
    prompts: &[String],
    on_end: impl FnMut(&Outcome),
) -> Result<Simulated, SimulationError> {
    simulate_with(scenario, fleet, tiers, config, prompts, true, on_end)
}

/// [`simulate`]; `remember_refusals` off asks the store about every request (the tests check that
/// remembering changes no outcome).
fn simulate_with(
    scenario: &Scenario,
    fleet: &Fleet,
    tiers: &TierTable,
    config: SchedulerConfig,
    prompts: &[String],
    remember_refusals: bool,
    mut on_end: impl FnMut(&Outcome),
) -> Result<Simulated, SimulationError> {
    if fleet.workers == 0 {
        return Err(SimulationError::Fleet(
            "at least one worker is needed".into(),
        ));
    }
    let clock_ms = Arc::new(AtomicU64::new(0));
    let store = {
        let clock = clock_ms.clone();
        MemoryStore::with_clock(Box::new(move || clock.load(Ordering::Relaxed)))
    };
    // Nobody streams progress in a simulation: the first token is noted when its prefill is issued.
    let mut state = SchedulerState::new(config).without_progress_events();
    let mut agenda = Agenda::new(scenario.arrival_stream(prompts.len()), fleet.workers);
    let mut jobs: HashMap<u64, Running> = HashMap::new();
    let mut identities: Vec<Option<Identity>> = Vec::new();
    identities.resize_with(scenario.population.users, || None);
    let mut next_job = 1u64;
    let mut processed = 0u64;
    let mut pending_outputs = Vec::new();
    for w in 0..fleet.workers as u32 {
        pending_outputs.extend(state.add_worker(w, fleet.capacity, Duration::ZERO));
    }
    let mut gpus = vec![SimulatedGpu::default(); fleet.workers];
    let mut scratch = Vec::new();
    let mut charge_buffer = String::new();
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
                Output::Event { job, event } => match event {
                    // Recorded when the prefill was issued (above): no lookup per decoded token.
                    JobEvent::Progress { .. } => {}
                    JobEvent::Finished { .. } => {
                        if let Some(r) = jobs.remove(&job) {
                            settle(
                                &store,
                                &r,
                                &identities,
                                &mut charge_buffer,
                                Settlement::Commit,
                            );
                            on_end(&outcome(&r, OutcomeKind::Completed, now_s));
                        }
                    }
                    JobEvent::Failed(reason) => {
                        if let Some(r) = jobs.remove(&job) {
                            settle(
                                &store,
                                &r,
                                &identities,
                                &mut charge_buffer,
                                Settlement::Refund,
                            );
                            // The refund makes room: the store decides this user's next request.
                            if let Some(identity) = identities[r.user].as_mut() {
                                identity.refused_until_ms = 0;
                            }
                            let kind = match reason {
                                FailReason::Shed { .. } => OutcomeKind::Shed,
                                _ => OutcomeKind::Error,
                            };
                            on_end(&outcome(&r, kind, now_s));
                        }
                    }
                    _ => {}
                },
            }
        }
        let Some((at, event)) = agenda.pop() else {
            break;
        };
        now_ns = at;
        clock_ms.store(now_ns / 1_000_000, Ordering::Relaxed);
        let now = Duration::from_nanos(now_ns);
        processed += 1;
        match event {
            Event::Arrival(i, arrival) => {
                if identities[arrival.user].is_none() {
                    // The store and the state machine are this run's own: the user's name needs
                    // no run prefix (as a shared Redis would), and a short key hashes faster.
                    let user = scenario.user(arrival.user);
                    let name = user.name;
                    let scopes = tiers
                        .scopes(&name, user.org.as_deref(), user.tier, 1.0)
                        .map_err(|e| SimulationError::Quota(e.to_string()))?;
                    identities[arrival.user] = Some(Identity {
                        name,
                        scopes,
                        tier: user.tier,
                        refused_until_ms: 0,
                    });
                }
                let identity = identities[arrival.user].as_mut().expect("made above");
                let now_ms = now_ns / 1_000_000;
                let decision = if now_ms < identity.refused_until_ms {
                    None
                } else {
                    let decision = store.admit_now(&Charge {
                        charge_id: charge_id(i, &mut charge_buffer),
                        idempotency: None,
                        scopes: &identity.scopes,
                        lease: Duration::from_secs(3600 * 24),
                        retention: tiers.longest_window(),
                    });
                    if let Decision::Refused(Refusal {
                        retry_after: Some(retry),
                        ..
                    }) = &decision
                    {
                        if remember_refusals && identity.scopes.len() == 1 {
                            identity.refused_until_ms = now_ms + retry.as_millis() as u64;
                        }
                    }
                    Some(decision)
                };
                let prompt_tokens = kiln_model::engine::prompt_tokens(
                    prompts[arrival.prompt % prompts.len()].len(),
                );
                let image_tokens = fleet.model.image_tokens(arrival.size, arrival.size);
                let running = Running {
                    sent_at: arrival.at,
                    user: arrival.user,
                    tier: identity.tier,
                    phase: arrival.phase,
                    charge: i,
                    prompt_tokens,
                    image_tokens,
                    first_progress: None,
                };
                if !matches!(decision, Some(Decision::Admitted(_))) {
                    on_end(&outcome(&running, OutcomeKind::QuotaRefused, arrival.at));
                    continue;
                }
                let id = next_job;
                next_job += 1;
                let job = Job {
                    id,
                    user: identity.name.clone(),
                    tier: tier_of(identity.tier),
                    prompt_tokens,
                    image_tokens,
                };
                jobs.insert(id, running);
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
    // A launch day leaves millions of entries in the store and the state machine: the other core
    // frees them while the caller reports.
    std::thread::spawn(move || drop((store, state, identities, gpus)));
    Ok(Simulated {
        sent: agenda.taken,
        events: processed,
    })
}

/// The quota charge id of arrival `index`, written into `buffer` (no allocation per request).
fn charge_id(index: usize, buffer: &mut String) -> &str {
    use std::fmt::Write;
    buffer.clear();
    write!(buffer, "sim-{index}").expect("writing to a String cannot fail");
    buffer
}

fn settle(
    store: &MemoryStore,
    r: &Running,
    identities: &[Option<Identity>],
    buffer: &mut String,
    settlement: Settlement,
) {
    let scopes = identities[r.user]
        .as_ref()
        .map_or(&[][..], |i| &i.scopes[..]);
    let charge = charge_id(r.charge, buffer);
    store.settle_now(charge, None, scopes, settlement);
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
                });
                let finished = done >= r.image_tokens;
                if finished {
                    gpu.sequences.pop();
                }
                reports.push(SequenceReport {
                    job: p.job,
                    new_tokens: 1,
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
            // How many of the call's steps each sequence takes part in (it stops at its last token)
            // and its context at the first step, gathered per step count: `scratch[n]` is the number
            // of sequences taking part in exactly n steps and the sum of their first contexts. The
            // sums are integers, so each step's cost is what a walk over the sequences would give.
            let steps = (*steps).max(1);
            scratch.clear();
            scratch.resize(steps + 1, (0, 0));
            for (i, id) in batch.iter().enumerate() {
                let Some(at) = gpu.position(*id, i) else {
                    continue;
                };
                let seq = &mut gpu.sequences[at];
                let n = steps.min(seq.image_tokens.saturating_sub(seq.done));
                scratch[n].0 += 1;
                scratch[n].1 += seq.prompt_tokens + seq.done;
                seq.done += n;
                reports.push(SequenceReport {
                    job: *id,
                    new_tokens: n,
                    finished: seq.done >= seq.image_tokens,
                });
            }
            gpu.sequences.retain(|s| s.done < s.image_tokens);
            for step in 0..steps {
                let (active, first_contexts) = scratch[step + 1..]
                    .iter()
                    .fold((0, 0), |(a, c), &(n, sum)| (a + n, c + sum));
                if active == 0 {
                    break;
                }
                call.seconds += cost.decode_seconds(active, first_contexts + step * active);
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
"#;

    fn run(workers: usize) -> Report {
        let scenario = Scenario::from_toml(SPIKE).unwrap();
        let tiers = TierTable::from_toml(TIERS).unwrap();
        let config = SchedulerConfig {
            max_waiting: 16,
            ..Default::default()
        };
        let prompts = kiln_loadtest::shipped_prompts();
        let mut tally = Tally::new(&scenario, &default_deadlines());
        let sim = simulate(&scenario, &fleet(workers), &tiers, config, &prompts, |o| {
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
    fn remembering_refusals_changes_no_outcome() {
        // The shipped tiers (daily windows, a rate, in-flight limits, an org pool) and the tests'
        // (a window of two a day, so that refunds of shed requests reopen it); one GPU, so that
        // requests are shed and refunded.
        let scenario = Scenario::from_toml(SPIKE).unwrap();
        let prompts = kiln_loadtest::shipped_prompts();
        let config = SchedulerConfig {
            max_waiting: 16,
            ..Default::default()
        };
        for tiers in [TierTable::shipped(), TierTable::from_toml(TIERS).unwrap()] {
            let run = |remember| {
                let mut outcomes = Vec::new();
                let sim = simulate_with(
                    &scenario,
                    &fleet(1),
                    &tiers,
                    config,
                    &prompts,
                    remember,
                    |o| outcomes.push(o.clone()),
                )
                .unwrap();
                assert_eq!(sim.sent, outcomes.len());
                outcomes
            };
            let (remembered, asked) = (run(true), run(false));
            let kinds =
                |outcomes: &[Outcome], kind| outcomes.iter().filter(|o| o.kind == kind).count();
            assert!(kinds(&asked, OutcomeKind::QuotaRefused) > 100);
            assert!(kinds(&asked, OutcomeKind::Shed) > 0);
            assert_eq!(remembered, asked);
        }
    }

    #[test]
    fn calls_end_in_time_order_then_in_the_order_issued() {
        let scenario = Scenario::from_toml(SPIKE).unwrap();
        let mut agenda = Agenda::new(scenario.arrival_stream(1), 8);
        for (at_ns, worker) in [(5, 3), (2, 7), (5, 1), (2, 0), (3, u32::MAX)] {
            agenda.push_call(at_ns, worker);
        }
        let mut order = Vec::new();
        while let Some((at, Event::CallDone(worker))) = agenda.pop() {
            order.push((at, worker));
        }
        assert_eq!(order, [(2, 7), (2, 0), (3, u32::MAX), (5, 3), (5, 1)]);
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
}
