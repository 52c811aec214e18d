//! The scheduler's decisions as a pure state machine: no I/O, no clock, no tasks. Inputs are method
//! calls (a job arrives or is cancelled, a worker joins, leaves or reports a finished step) with the
//! current time as an argument; outputs are [`Output`]s: commands for workers and events for callers.
//! The live runtime and any simulator drive this same code.
//!
//! Batching is iteration-level: whenever a worker is free for its next call, waiting jobs that fit
//! its free KV blocks and batch slots are prefilled and join the batch; otherwise the whole batch
//! decodes for as many steps as the soonest-finishing sequence needs (capped), so finished sequences
//! leave at once. Every job reserves all the KV blocks it will ever need when it is placed: nothing is
//! preempted and no worker runs out of memory mid-image.

use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};
use std::ops::Bound;

// A seeded fast hasher: these maps are touched for every sequence of every call (SipHash was a
// tenth of a simulated launch day's time).
use foldhash::HashMap;
use std::time::Duration;

/// Time as the driver sees it: real time since start, or virtual time in a simulation.
pub type Time = Duration;

/// Shortest retry delay a shed job is given.
const MIN_RETRY: Duration = Duration::from_secs(1);

/// Scheduler-assigned job id; also the sequence id on the worker.
pub type JobId = u64;

/// Runtime-assigned worker id.
pub type WorkerId = u32;

/// Caller priority class, lowest first: higher tiers are always served before lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Free = 0,
    Plus = 1,
    Pro = 2,
    Team = 3,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Free, Tier::Plus, Tier::Pro, Tier::Team];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Plus => "plus",
            Tier::Pro => "pro",
            Tier::Team => "team",
        }
    }
}

/// What the scheduler needs to know of a job: who asked, and its exact size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub user: String,
    pub tier: Tier,
    pub prompt_tokens: usize,
    pub image_tokens: usize,
}

/// A worker's capacity, as it advertises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub kv_blocks: usize,
    pub block_size: usize,
    pub max_batch: usize,
}

/// Knobs of the batching and shedding policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Longest a job of each tier (indexed by `Tier as usize`) may take from arrival to its last
    /// token; a job predicted to finish later is shed at arrival.
    pub deadlines: [Duration; 4],
    /// Most jobs waiting at once; beyond it the lowest tier's newest job is shed.
    pub max_waiting: usize,
    /// Shed by predicted finish time (the queue bound holds regardless).
    pub shed_by_deadline: bool,
    /// Share of a deadline the prediction may use (below 1: room for prediction error).
    pub deadline_headroom: f64,
    /// Most decode steps in one worker call (more saves round trips, fewer keep progress fresh).
    pub max_steps_per_call: usize,
    /// Most prompt tokens prefilled in one call, so a burst of arrivals does not stall the batch long.
    pub max_prefill_tokens: usize,
    /// Static batching (the baseline): a worker takes new jobs only when its batch is empty.
    pub static_batching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            deadlines: [90, 60, 45, 45].map(Duration::from_secs),
            max_waiting: 4096,
            shed_by_deadline: true,
            deadline_headroom: 0.9,
            max_steps_per_call: 4,
            max_prefill_tokens: 8192,
            static_batching: false,
        }
    }
}

/// A job placed on a worker by a prefill command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    pub kv_blocks: usize,
    /// Image tokens already generated (non-zero when resuming after a worker loss).
    pub resume_from: usize,
}

/// One call for a worker. Releases run first, then the prefill or the decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Prefill {
        release: Vec<JobId>,
        jobs: Vec<Placement>,
    },
    Decode {
        release: Vec<JobId>,
        jobs: Vec<JobId>,
        steps: usize,
    },
    Release {
        release: Vec<JobId>,
    },
}

/// Why a job was shed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// It was predicted to finish after its tier's deadline.
    Deadline,
    /// The queue was at its bound.
    QueueFull,
}

impl ShedReason {
    pub const ALL: [ShedReason; 2] = [ShedReason::Deadline, ShedReason::QueueFull];

    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::Deadline => "deadline",
            ShedReason::QueueFull => "queue_full",
        }
    }
}

/// Why a job ended without an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The job can never fit any worker of the cluster.
    TooLarge { kv_blocks: usize },
    /// The cluster cannot serve it in time; `retry_after` is when it predicts it could.
    Shed {
        reason: ShedReason,
        retry_after: Duration,
    },
    /// The worker refused to take the job (its prefill was rejected as invalid).
    Refused(String),
}

/// What a caller learns about its job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    Queued {
        position: usize,
    },
    Started {
        worker: WorkerId,
    },
    Progress {
        done: usize,
        total: usize,
    },
    /// The last token was generated; the worker's answer carries the image.
    Finished {
        queued_for: Duration,
        ran_for: Duration,
    },
    /// The worker running it was lost; it waits again and resumes from its tokens so far.
    Requeued,
    Failed(FailReason),
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Command { worker: WorkerId, command: Command },
    Event { job: JobId, event: JobEvent },
}

/// Tokens a worker call produced for one sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceReport {
    pub job: JobId,
    pub new_tokens: usize,
    /// Forward passes the sequence took part in (fewer than its tokens with speculative decoding).
    pub passes: usize,
    pub finished: bool,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Waiting,
    Running { worker: WorkerId, started: Time },
}

#[derive(Debug)]
struct JobState {
    job: Job,
    kv_blocks: usize,
    done: usize,
    submitted: Time,
    phase: Phase,
}

impl JobState {
    /// Image tokens still to generate.
    fn remaining(&self) -> usize {
        self.job.image_tokens - self.done
    }
}

#[derive(Debug)]
struct WorkerState {
    capacity: Capacity,
    free_blocks: usize,
    running: Vec<JobId>,
    pending_release: Vec<JobId>,
    /// A command is in flight; the next one waits for its report.
    busy: bool,
    /// Listed in `SchedulerState::idle` (not busy, so holding no job and nothing to release).
    idle: bool,
    /// When the command in flight was issued.
    busy_since: Time,
    /// Measured image tokens per second (moving average over calls; 0 until measured).
    tokens_per_second: f64,
    /// Measured image tokens a sequence advances per decode pass (moving average over decode
    /// calls; 1 until measured, and without speculative decoding).
    tokens_per_pass: f64,
    /// The call in flight is a decode (whose reports measure tokens per pass; a prefill's one
    /// token from one pass says nothing of decoding).
    decoding: bool,
    /// Duration of the last call.
    last_call: Duration,
}

/// Waiting jobs of one tier: first come first served per user, round robin between users.
#[derive(Debug, Default)]
struct TierQueue {
    users: VecDeque<String>,
    per_user: HashMap<String, VecDeque<JobId>>,
    len: usize,
}

impl TierQueue {
    fn push_back(&mut self, user: &str, job: JobId) {
        self.push(user, job, false);
    }

    fn push_front(&mut self, user: &str, job: JobId) {
        self.push(user, job, true);
    }

    fn push(&mut self, user: &str, job: JobId, front: bool) {
        self.len += 1;
        match self.per_user.get_mut(user) {
            Some(q) if front => q.push_front(job),
            Some(q) => q.push_back(job),
            None => {
                self.per_user
                    .insert(user.to_string(), VecDeque::from([job]));
                if front {
                    self.users.push_front(user.to_string());
                } else {
                    self.users.push_back(user.to_string());
                }
            }
        }
    }

    /// The next job in fair order, skipping ids `live` rejects (cancelled while waiting).
    fn peek(&mut self, live: impl Fn(JobId) -> bool) -> Option<JobId> {
        loop {
            let user = self.users.front()?;
            let q = self
                .per_user
                .get_mut(user)
                .expect("every listed user has a queue");
            match q.front() {
                Some(&job) if live(job) => return Some(job),
                Some(_) => {
                    q.pop_front();
                }
                None => {}
            }
            if q.is_empty() {
                let user = self.users.pop_front().expect("front exists");
                self.per_user.remove(&user);
            }
        }
    }

    /// Removes the job `peek` returned and moves its user to the back of the round.
    fn pop_peeked(&mut self) {
        let user = self.users.pop_front().expect("peek found a user");
        let q = self.per_user.get_mut(&user).expect("listed user");
        q.pop_front();
        self.len -= 1;
        if q.is_empty() {
            self.per_user.remove(&user);
        } else {
            self.users.push_back(user);
        }
    }
}

/// The whole scheduling state.
#[derive(Debug, Default)]
pub struct SchedulerState {
    config: SchedulerConfig,
    /// Indexed by `Tier as usize`.
    queues: [TierQueue; 4],
    /// Arrival order per tier, for shedding the newest first (entries of jobs no longer waiting are
    /// skipped lazily).
    arrivals: [VecDeque<JobId>; 4],
    /// Image tokens still to generate, of waiting jobs per tier and of running jobs.
    waiting_work: [usize; 4],
    running_work: usize,
    /// Jobs shed per tier since start.
    shed: [u64; 4],
    jobs: HashMap<JobId, JobState>,
    /// Unordered: whatever reads the whole fleet and must be reproducible sorts it by id first.
    workers: HashMap<WorkerId, WorkerState>,
    /// Workers with no call in flight, most free blocks first (then highest id): the only ones a new
    /// arrival can start, so an arrival costs nothing per busy worker of a large fleet.
    idle: BTreeSet<IdleKey>,
    /// Sum of the workers' measured tokens per second, kept as they report (read on every arrival).
    tokens_per_second: f64,
    /// The largest worker's capacity (by KV blocks), kept as workers join and leave.
    largest: Option<Capacity>,
    /// Batch lists of decode commands a driver handed back ([`recycle`](Self::recycle)), reused so
    /// that a decode call allocates nothing.
    spare_batches: Vec<Vec<JobId>>,
    /// Skip `JobEvent::Progress` (a driver with no caller to stream to, such as the simulator,
    /// saves an output per sequence per call). Decisions never depend on it.
    no_progress_events: bool,
}

/// Orders idle workers by most free blocks first, then highest id.
type IdleKey = Reverse<(usize, WorkerId)>;

/// A snapshot for status pages and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub waiting: [usize; 4],
    /// How long the oldest waiting job of each tier has waited.
    pub oldest_wait: [Duration; 4],
    pub running: usize,
    pub shed: [u64; 4],
    /// Image tokens per second the cluster was measured to generate.
    pub tokens_per_second: f64,
    /// Predicted seconds to finish all queued and running work.
    pub backlog_seconds: f64,
    pub workers: Vec<WorkerSnapshot>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    pub capacity: Capacity,
    pub free_blocks: usize,
    pub running: usize,
    pub tokens_per_second: f64,
    /// Measured image tokens per decode pass (1 without speculative decoding).
    pub tokens_per_pass: f64,
    pub last_call: Duration,
}

impl SchedulerState {
    pub fn new(config: SchedulerConfig) -> Self {
        SchedulerState {
            config,
            ..Default::default()
        }
    }

    /// The same state machine without `JobEvent::Progress` outputs (for drivers that stream nothing).
    pub fn without_progress_events(mut self) -> Self {
        self.no_progress_events = true;
        self
    }

    /// A job arrives. It is queued (and placed at once where a worker is free).
    pub fn submit(&mut self, job: Job, now: Time) -> Vec<Output> {
        let mut out = Vec::new();
        self.submit_into(job, now, &mut out);
        out
    }

    /// [`submit`](Self::submit), appending to `out` (a driver that reuses one buffer allocates
    /// nothing per call).
    pub fn submit_into(&mut self, job: Job, now: Time, out: &mut Vec<Output>) {
        if let Some(largest) = self.largest {
            let needed = blocks_for(&job, largest.block_size);
            if needed > largest.kv_blocks {
                out.push(Output::Event {
                    job: job.id,
                    event: JobEvent::Failed(FailReason::TooLarge { kv_blocks: needed }),
                });
                return;
            }
        }
        let tier = job.tier as usize;
        if let Some((reason, retry_after)) = self.shed_on_arrival(&job, now, out) {
            self.shed[tier] += 1;
            out.push(Output::Event {
                job: job.id,
                event: JobEvent::Failed(FailReason::Shed {
                    reason,
                    retry_after,
                }),
            });
            return;
        }
        let position = self.queues[tier..].iter().map(|q| q.len).sum();
        self.queues[tier].push_back(&job.user, job.id);
        self.arrivals[tier].push_back(job.id);
        self.waiting_work[tier] += job.image_tokens;
        out.push(Output::Event {
            job: job.id,
            event: JobEvent::Queued { position },
        });
        self.jobs.insert(
            job.id,
            JobState {
                kv_blocks: 0,
                job,
                done: 0,
                submitted: now,
                phase: Phase::Waiting,
            },
        );
        self.shed_overdue(tier, now, out);
        self.schedule_all(now, out);
    }

    /// The part of a tier's deadline that predictions must fit in.
    fn deadline(&self, tier: usize) -> Duration {
        self.config.deadlines[tier].mul_f64(self.config.deadline_headroom.clamp(0.1, 1.0))
    }

    /// Measured image tokens per second of the whole cluster (0 until measured).
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_per_second.max(0.0)
    }

    /// Predicted time to generate `tokens` more tokens behind all running work and the waiting work
    /// of `tier` and above (the work served before a new job of `tier`); `None` until measured.
    fn predicted(&self, tier: usize, tokens: usize) -> Option<Duration> {
        let rate = self.tokens_per_second();
        if rate <= 0.0 {
            return None;
        }
        let ahead: usize = self.running_work + self.waiting_work[tier..].iter().sum::<usize>();
        Some(Duration::from_secs_f64((ahead + tokens) as f64 / rate))
    }

    /// Whether a new job must be shed (and when to retry). A full queue makes room by shedding the
    /// newest job of a lower tier instead, when there is one; a job predicted late is accepted while
    /// lower tiers wait (they are shed after it, see `shed_overdue`), so a higher tier is never shed
    /// while a lower one waits.
    fn shed_on_arrival(
        &mut self,
        job: &Job,
        now: Time,
        out: &mut Vec<Output>,
    ) -> Option<(ShedReason, Duration)> {
        let tier = job.tier as usize;
        let lowest_waiting = (0..4).find(|&t| self.queues[t].len > 0);
        let lower_waits = lowest_waiting.is_some_and(|t| t < tier);
        if self.config.shed_by_deadline && !lower_waits {
            if let Some(eta) = self.predicted(tier, job.image_tokens) {
                let deadline = self.deadline(tier);
                if eta > deadline {
                    return Some((ShedReason::Deadline, (eta - deadline).max(MIN_RETRY)));
                }
            }
        }
        if self.waiting() >= self.config.max_waiting {
            match lowest_waiting.filter(|&t| t < tier) {
                Some(lower) => {
                    self.shed_newest(lower, ShedReason::QueueFull, now, out);
                }
                None => {
                    let retry = self.predicted(tier, 0).unwrap_or(MIN_RETRY);
                    return Some((ShedReason::QueueFull, retry.max(MIN_RETRY)));
                }
            }
        }
        None
    }

    /// After a job of `tier` joined, the waiting jobs below it have more work ahead: shed, lowest
    /// tier first and newest first, those now predicted to miss their deadline. A tier is touched
    /// only once every tier below it is empty.
    fn shed_overdue(&mut self, tier: usize, now: Time, out: &mut Vec<Output>) {
        if !self.config.shed_by_deadline {
            return;
        }
        for lower in 0..tier {
            while let Some(&newest) = self.newest_waiting(lower) {
                let state = &self.jobs[&newest];
                let slack = (state.submitted + self.deadline(lower)).saturating_sub(now);
                match self.predicted(lower, 0) {
                    Some(eta) if eta > slack => {
                        self.shed_newest(lower, ShedReason::Deadline, now, out);
                    }
                    _ => break,
                }
            }
            if self.queues[lower].len > 0 {
                return;
            }
        }
    }

    /// The newest waiting job of a tier (dropping stale arrival entries on the way).
    fn newest_waiting(&mut self, tier: usize) -> Option<&JobId> {
        let jobs = &self.jobs;
        let arrivals = &mut self.arrivals[tier];
        while let Some(&id) = arrivals.back() {
            if jobs
                .get(&id)
                .is_some_and(|s| matches!(s.phase, Phase::Waiting))
            {
                break;
            }
            arrivals.pop_back();
        }
        arrivals.back()
    }

    fn shed_newest(&mut self, tier: usize, reason: ShedReason, now: Time, out: &mut Vec<Output>) {
        let Some(&id) = self.newest_waiting(tier) else {
            return;
        };
        self.arrivals[tier].pop_back();
        let state = self.jobs.remove(&id).expect("newest_waiting checked");
        self.queues[tier].len -= 1;
        self.waiting_work[tier] -= state.remaining();
        self.shed[tier] += 1;
        let slack = (state.submitted + self.deadline(tier)).saturating_sub(now);
        let retry_after = self
            .predicted(tier, 0)
            .map_or(MIN_RETRY, |eta| eta.saturating_sub(slack).max(MIN_RETRY));
        out.push(Output::Event {
            job: id,
            event: JobEvent::Failed(FailReason::Shed {
                reason,
                retry_after,
            }),
        });
    }

    /// A caller gave up. A waiting job leaves the queue; a running one is released on its worker.
    pub fn cancel(&mut self, id: JobId, now: Time) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(state) = self.jobs.remove(&id) else {
            return out;
        };
        let remaining = state.remaining();
        match state.phase {
            // The queue entry is skipped lazily when it reaches the front.
            Phase::Waiting => {
                self.queues[state.job.tier as usize].len -= 1;
                self.waiting_work[state.job.tier as usize] -= remaining;
            }
            Phase::Running { worker, .. } => {
                self.running_work -= remaining;
                let w = self
                    .workers
                    .get_mut(&worker)
                    .expect("running jobs are on known workers");
                w.running.retain(|&j| j != id);
                w.free_blocks += state.kv_blocks;
                w.pending_release.push(id);
                self.schedule(worker, now, &mut out);
            }
        }
        out.push(Output::Event {
            job: id,
            event: JobEvent::Cancelled,
        });
        out
    }

    /// A worker joins with its capacity (and holds no sequence). A worker that rejoins under a known id
    /// lost its sequences: they are requeued first.
    pub fn add_worker(&mut self, id: WorkerId, capacity: Capacity, now: Time) -> Vec<Output> {
        let mut out = self.remove_worker(id, now);
        self.workers.insert(
            id,
            WorkerState {
                capacity,
                free_blocks: capacity.kv_blocks,
                running: Vec::new(),
                pending_release: Vec::new(),
                busy: false,
                idle: false,
                busy_since: now,
                tokens_per_second: 0.0,
                tokens_per_pass: 1.0,
                decoding: false,
                last_call: Duration::ZERO,
            },
        );
        self.largest = self.largest_capacity();
        self.schedule(id, now, &mut out);
        out
    }

    /// A worker is gone (or failed a call): its jobs wait again, at the front of their queues, and
    /// resume from the tokens they had.
    pub fn remove_worker(&mut self, id: WorkerId, now: Time) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(worker) = self.workers.remove(&id) else {
            return out;
        };
        if worker.idle {
            self.idle.remove(&Reverse((worker.free_blocks, id)));
        }
        self.largest = self.largest_capacity();
        self.refresh_tokens_per_second();
        for job in worker.running.into_iter().rev() {
            let state = self.jobs.get_mut(&job).expect("running jobs are live");
            state.phase = Phase::Waiting;
            let remaining = state.remaining();
            self.running_work -= remaining;
            self.waiting_work[state.job.tier as usize] += remaining;
            // Re-queued jobs are the oldest of their tier: the last to be shed.
            self.arrivals[state.job.tier as usize].push_front(job);
            self.queues[state.job.tier as usize].push_front(&state.job.user, job);
            out.push(Output::Event {
                job,
                event: JobEvent::Requeued,
            });
        }
        self.schedule_all(now, &mut out);
        out
    }

    /// A worker answered its call: new tokens per sequence, finished ones gone from its batch.
    pub fn step_done(
        &mut self,
        worker: WorkerId,
        reports: &[SequenceReport],
        now: Time,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        self.step_done_into(worker, reports, now, &mut out);
        out
    }

    /// [`step_done`](Self::step_done), appending to `out`.
    pub fn step_done_into(
        &mut self,
        worker: WorkerId,
        reports: &[SequenceReport],
        now: Time,
        out: &mut Vec<Output>,
    ) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.busy = false;
        let elapsed = now.saturating_sub(w.busy_since);
        let tokens: usize = reports.iter().map(|r| r.new_tokens).sum();
        w.last_call = elapsed;
        if tokens > 0 && !elapsed.is_zero() {
            let measured = tokens as f64 / elapsed.as_secs_f64();
            let before = w.tokens_per_second;
            w.tokens_per_second = if before > 0.0 {
                0.8 * before + 0.2 * measured
            } else {
                measured
            };
            self.tokens_per_second += w.tokens_per_second - before;
        }
        let passes: usize = reports.iter().map(|r| r.passes).sum();
        if w.decoding && passes > 0 && tokens > 0 {
            let measured = (tokens as f64 / passes as f64).max(1.0);
            w.tokens_per_pass = 0.8 * w.tokens_per_pass + 0.2 * measured;
        }
        // The fewest tokens left of the reported jobs still running: when every running job
        // reported (a decode call), the next decode's length without a lookup per job.
        let (mut soonest, mut still_running) = (usize::MAX, 0);
        for report in reports {
            // Reports for jobs cancelled meanwhile are stale: their blocks were already accounted.
            let Some(state) = self.jobs.get_mut(&report.job) else {
                continue;
            };
            let Phase::Running {
                worker: on,
                started,
            } = state.phase
            else {
                continue;
            };
            if on != worker {
                continue;
            }
            let before = state.done;
            state.done = (state.done + report.new_tokens).min(state.job.image_tokens);
            self.running_work -= state.done - before;
            if !self.no_progress_events {
                out.push(Output::Event {
                    job: report.job,
                    event: JobEvent::Progress {
                        done: state.done,
                        total: state.job.image_tokens,
                    },
                });
            }
            if report.finished {
                self.running_work -= state.remaining();
                let blocks = state.kv_blocks;
                let queued_for = started.saturating_sub(state.submitted);
                self.jobs.remove(&report.job);
                w.free_blocks += blocks;
                w.running.retain(|&j| j != report.job);
                out.push(Output::Event {
                    job: report.job,
                    event: JobEvent::Finished {
                        queued_for,
                        ran_for: now.saturating_sub(started),
                    },
                });
            } else {
                soonest = soonest.min(state.remaining());
                still_running += 1;
            }
        }
        // Reports name distinct jobs, so as many still running as the worker runs is all of them.
        let known = (still_running > 0 && still_running == w.running.len()).then_some(soonest);
        self.schedule_with(worker, now, out, known);
    }

    /// A worker refused a prefill as invalid: those jobs fail (their reservations return) and the
    /// worker stays, so one bad job cannot take a worker down or loop through re-queues.
    pub fn prefill_refused(
        &mut self,
        worker: WorkerId,
        jobs: &[JobId],
        reason: &str,
        now: Time,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(w) = self.workers.get_mut(&worker) else {
            return out;
        };
        w.busy = false;
        for &job in jobs {
            let on_this_worker = self.jobs.get(&job).is_some_and(
                |s| matches!(s.phase, Phase::Running { worker: on, .. } if on == worker),
            );
            if let (true, Some(state)) = (on_this_worker, self.jobs.remove(&job)) {
                self.running_work -= state.remaining();
                w.free_blocks += state.kv_blocks;
                w.running.retain(|&j| j != job);
                out.push(Output::Event {
                    job,
                    event: JobEvent::Failed(FailReason::Refused(reason.to_string())),
                });
            }
        }
        self.schedule(worker, now, &mut out);
        out
    }

    /// Hands a carried-out command's buffers back for the next ones (optional: a driver that keeps
    /// its commands loses nothing but an allocation per decode call).
    pub fn recycle(&mut self, command: Command) {
        if let Command::Decode { mut jobs, .. } = command {
            // Enough for every worker's call in flight; more would only hold memory.
            if self.spare_batches.len() < 64 {
                jobs.clear();
                self.spare_batches.push(jobs);
            }
        }
    }

    /// Waiting jobs per tier (indexed by `Tier as usize`) and running jobs, without allocating.
    pub fn counts(&self) -> ([usize; 4], usize) {
        let running = self.workers.values().map(|w| w.running.len()).sum();
        ([0, 1, 2, 3].map(|t| self.queues[t].len), running)
    }

    /// Waiting jobs (all tiers).
    pub fn waiting(&self) -> usize {
        self.queues.iter().map(|q| q.len).sum()
    }

    pub fn snapshot(&self, now: Time) -> Snapshot {
        let running = self.workers.values().map(|w| w.running.len()).sum();
        let mut oldest_wait = [Duration::ZERO; 4];
        for (t, arrivals) in self.arrivals.iter().enumerate() {
            // Arrival order is submission order except re-queued jobs (at the front, older still).
            if let Some(s) = arrivals.iter().find_map(|id| {
                self.jobs
                    .get(id)
                    .filter(|s| matches!(s.phase, Phase::Waiting))
            }) {
                oldest_wait[t] = now.saturating_sub(s.submitted);
            }
        }
        let rate = self.tokens_per_second();
        let backlog = self.running_work + self.waiting_work.iter().sum::<usize>();
        Snapshot {
            waiting: [0, 1, 2, 3].map(|t| self.queues[t].len),
            oldest_wait,
            running,
            shed: self.shed,
            tokens_per_second: rate,
            backlog_seconds: if rate > 0.0 {
                backlog as f64 / rate
            } else {
                0.0
            },
            workers: self
                .workers_by_id()
                .into_iter()
                .map(|(id, w)| WorkerSnapshot {
                    id,
                    capacity: w.capacity,
                    free_blocks: w.free_blocks,
                    running: w.running.len(),
                    tokens_per_second: w.tokens_per_second,
                    tokens_per_pass: w.tokens_per_pass,
                    last_call: w.last_call,
                })
                .collect(),
        }
    }

    /// Gives every free worker its next command, most free blocks first. A free worker holds no job,
    /// so with nothing waiting there is nothing to give, and the walk stops.
    fn schedule_all(&mut self, now: Time, out: &mut Vec<Output>) {
        let mut after: Option<IdleKey> = None;
        while self.waiting() > 0 {
            let next = match after {
                None => self.idle.first().copied(),
                Some(key) => self
                    .idle
                    .range((Bound::Excluded(key), Bound::Unbounded))
                    .next()
                    .copied(),
            };
            let Some(key) = next else {
                return;
            };
            let Reverse((_, id)) = key;
            self.schedule(id, now, out);
            after = Some(key);
        }
    }

    /// The workers in id order (for sums and listings that must not depend on hashing).
    fn workers_by_id(&self) -> Vec<(WorkerId, &WorkerState)> {
        let mut workers: Vec<_> = self.workers.iter().map(|(&id, w)| (id, w)).collect();
        workers.sort_unstable_by_key(|&(id, _)| id);
        workers
    }

    /// The largest worker by KV blocks (the highest id among equals).
    fn largest_capacity(&self) -> Option<Capacity> {
        self.workers
            .iter()
            .max_by_key(|(&id, w)| (w.capacity.kv_blocks, id))
            .map(|(_, w)| w.capacity)
    }

    /// Recounts the fleet's tokens per second (on membership changes, so rounding cannot build up),
    /// in id order so that one run of a simulation gives one result.
    fn refresh_tokens_per_second(&mut self) {
        self.tokens_per_second = self
            .workers_by_id()
            .iter()
            .map(|(_, w)| w.tokens_per_second)
            .sum();
    }

    /// The next command of one free worker: prefill what fits, else decode the batch, else release.
    fn schedule(&mut self, id: WorkerId, now: Time, out: &mut Vec<Output>) {
        self.schedule_with(id, now, out, None);
    }

    /// [`schedule`](Self::schedule), told the fewest tokens any running job has left when the
    /// caller knows it (a decode then looks up no job).
    fn schedule_with(
        &mut self,
        id: WorkerId,
        now: Time,
        out: &mut Vec<Output>,
        soonest_known: Option<usize>,
    ) {
        // One lookup of the worker per call: `admit` borrows the other fields beside it.
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.busy {
            return;
        }
        // Taken before `admit` changes the free blocks the key is made of.
        let idle_key = w.idle.then_some(Reverse((w.free_blocks, id)));
        let placements = if self.queues.iter().all(|q| q.len == 0) {
            Vec::new()
        } else {
            admit(
                &self.config,
                &mut self.queues,
                &mut self.jobs,
                &mut self.waiting_work,
                &mut self.running_work,
                w,
                Phase::Running {
                    worker: id,
                    started: now,
                },
            )
        };
        let release = std::mem::take(&mut w.pending_release);
        let command = if !placements.is_empty() {
            for p in &placements {
                out.push(Output::Event {
                    job: p.job,
                    event: JobEvent::Started { worker: id },
                });
            }
            Command::Prefill {
                release,
                jobs: placements,
            }
        } else if !w.running.is_empty() {
            // Placing nothing left the running jobs as they were when `soonest_known` was taken.
            let soonest = soonest_known.unwrap_or_else(|| {
                w.running
                    .iter()
                    .map(|j| self.jobs[j].remaining())
                    .min()
                    .unwrap_or(1)
            });
            // Passes, not tokens: with speculative decoding a pass advances a sequence by the
            // measured tokens per pass, and the soonest sequence leaves after fewer of them.
            let steps = passes_for(soonest, w.tokens_per_pass)
                .clamp(1, self.config.max_steps_per_call.max(1));
            let mut jobs = self.spare_batches.pop().unwrap_or_default();
            jobs.extend_from_slice(&w.running);
            Command::Decode {
                release,
                jobs,
                steps,
            }
        } else if !release.is_empty() {
            Command::Release { release }
        } else {
            if !w.idle {
                w.idle = true;
                self.idle.insert(Reverse((w.free_blocks, id)));
            }
            return;
        };
        if let Some(key) = idle_key {
            w.idle = false;
            self.idle.remove(&key);
        }
        w.busy = true;
        w.busy_since = now;
        w.decoding = matches!(command, Command::Decode { .. });
        out.push(Output::Command {
            worker: id,
            command,
        });
    }
}

/// Decode passes expected to generate `tokens` at `tokens_per_pass` (at least one).
fn passes_for(tokens: usize, tokens_per_pass: f64) -> usize {
    ((tokens as f64 / tokens_per_pass.max(1.0)).ceil() as usize).max(1)
}

/// Pops the waiting jobs that fit worker `w`, in tier order and fair order inside a tier, and puts
/// them in `running` (the phase naming that worker). Stops at the first job that does not fit, so a
/// large job is not overtaken forever by small ones.
fn admit(
    config: &SchedulerConfig,
    queues: &mut [TierQueue; 4],
    jobs: &mut HashMap<JobId, JobState>,
    waiting_work: &mut [usize; 4],
    running_work: &mut usize,
    w: &mut WorkerState,
    running: Phase,
) -> Vec<Placement> {
    let mut placements = Vec::new();
    if config.static_batching && !w.running.is_empty() {
        return placements;
    }
    let mut prefill_tokens = 0;
    for tier in Tier::ALL.iter().rev() {
        let queue = &mut queues[*tier as usize];
        while let Some(job) = queue.peek(|j| {
            jobs.get(&j)
                .is_some_and(|s| matches!(s.phase, Phase::Waiting))
        }) {
            let state = jobs.get_mut(&job).expect("peek checked");
            let blocks = blocks_for(&state.job, w.capacity.block_size);
            let tokens = state.job.prompt_tokens + state.done + 1;
            let over_budget =
                !placements.is_empty() && prefill_tokens + tokens > config.max_prefill_tokens;
            if w.running.len() >= w.capacity.max_batch || blocks > w.free_blocks || over_budget {
                return placements;
            }
            queue.pop_peeked();
            let remaining = state.remaining();
            waiting_work[*tier as usize] -= remaining;
            *running_work += remaining;
            prefill_tokens += tokens;
            w.free_blocks -= blocks;
            w.running.push(job);
            state.kv_blocks = blocks;
            state.phase = running;
            placements.push(Placement {
                job,
                kv_blocks: blocks,
                resume_from: state.done,
            });
        }
    }
    placements
}

/// KV blocks a job needs for its whole life on a worker with `block_size`-token blocks.
pub fn blocks_for(job: &Job, block_size: usize) -> usize {
    (job.prompt_tokens + job.image_tokens).div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foldhash::HashMapExt;
    use proptest::prelude::*;

    const T0: Time = Duration::ZERO;

    fn job(id: JobId, user: &str, tier: Tier, image_tokens: usize) -> Job {
        Job {
            id,
            user: user.into(),
            tier,
            prompt_tokens: 4,
            image_tokens,
        }
    }

    fn report(job: JobId, new_tokens: usize, finished: bool) -> SequenceReport {
        SequenceReport {
            job,
            new_tokens,
            passes: new_tokens,
            finished,
        }
    }

    fn cap(kv_blocks: usize, max_batch: usize) -> Capacity {
        Capacity {
            kv_blocks,
            block_size: 4,
            max_batch,
        }
    }

    fn commands(out: &[Output]) -> Vec<(WorkerId, Command)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Command { worker, command } => Some((*worker, command.clone())),
                _ => None,
            })
            .collect()
    }

    fn events(out: &[Output], id: JobId) -> Vec<JobEvent> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event { job, event } if *job == id => Some(event.clone()),
                _ => None,
            })
            .collect()
    }

    fn placed(cmd: &Command) -> Vec<JobId> {
        match cmd {
            Command::Prefill { jobs, .. } => jobs.iter().map(|p| p.job).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn new_jobs_join_the_running_batch_at_the_next_step() {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        s.add_worker(1, cap(100, 8), T0);
        let out = s.submit(job(1, "a", Tier::Free, 16), T0);
        assert_eq!(events(&out, 1)[0], JobEvent::Queued { position: 0 });
        assert_eq!(placed(&commands(&out)[0].1), vec![1]);
        // Worker busy: job 2 waits for the next call.
        let out = s.submit(job(2, "b", Tier::Free, 16), T0);
        assert!(commands(&out).is_empty());
        let out = s.step_done(1, &[report(1, 1, false)], T0);
        assert_eq!(placed(&commands(&out)[0].1), vec![2]);
        let out = s.step_done(1, &[report(2, 1, false)], T0);
        assert_eq!(
            commands(&out)[0].1,
            Command::Decode {
                release: vec![],
                jobs: vec![1, 2],
                steps: 4
            }
        );
    }

    /// Drives a state machine through a few jobs to the end, answering every command as a worker
    /// would (and handing decode buffers back), and returns everything it emitted.
    fn drive(mut s: SchedulerState) -> Vec<Output> {
        let mut all = s.add_worker(1, cap(100, 8), T0);
        for (id, tokens) in [(1, 5), (2, 9), (3, 3)] {
            all.extend(s.submit(job(id, "u", Tier::Free, tokens), T0));
        }
        let mut left: HashMap<JobId, usize> = HashMap::from_iter([(1, 5), (2, 9), (3, 3)]);
        let mut next = 0;
        while let Some(command) = all[next..].iter().find_map(|o| match o {
            Output::Command { command, .. } => Some(command.clone()),
            _ => None,
        }) {
            next = all.len();
            let (jobs, steps): (Vec<JobId>, usize) = match &command {
                Command::Prefill { jobs, .. } => (jobs.iter().map(|p| p.job).collect(), 1),
                Command::Decode { jobs, steps, .. } => (jobs.clone(), *steps),
                Command::Release { .. } => (vec![], 0),
            };
            let reports: Vec<SequenceReport> = jobs
                .iter()
                .map(|id| {
                    let remaining = left.get_mut(id).unwrap();
                    let n = steps.min(*remaining);
                    *remaining -= n;
                    report(*id, n, *remaining == 0)
                })
                .collect();
            s.recycle(command);
            all.extend(s.step_done(1, &reports, T0));
        }
        assert!(left.values().all(|&n| n == 0), "every job ran to its end");
        all
    }

    #[test]
    fn without_progress_events_only_the_progress_events_go() {
        let loud = drive(SchedulerState::new(SchedulerConfig::default()));
        let quiet =
            drive(SchedulerState::new(SchedulerConfig::default()).without_progress_events());
        let is_progress = |o: &Output| {
            matches!(
                o,
                Output::Event {
                    event: JobEvent::Progress { .. },
                    ..
                }
            )
        };
        assert!(loud.iter().any(is_progress));
        assert!(!quiet.iter().any(is_progress));
        let loud_without: Vec<Output> = loud.into_iter().filter(|o| !is_progress(o)).collect();
        assert_eq!(quiet, loud_without);
    }

    #[test]
    fn decode_steps_stop_where_the_soonest_sequence_finishes() {
        let mut s = SchedulerState::new(SchedulerConfig {
            max_steps_per_call: 8,
            ..Default::default()
        });
        s.add_worker(1, cap(100, 8), T0);
        s.submit(job(1, "a", Tier::Free, 4), T0);
        let out = s.step_done(1, &[report(1, 1, false)], T0);
        assert_eq!(
            commands(&out)[0].1,
            Command::Decode {
                release: vec![],
                jobs: vec![1],
                steps: 3
            }
        );
        let out = s.step_done(1, &[report(1, 3, true)], Duration::from_secs(2));
        assert!(matches!(
            events(&out, 1).last(),
            Some(JobEvent::Finished { .. })
        ));
        assert!(commands(&out).is_empty());
        assert_eq!(s.snapshot(T0).workers[0].free_blocks, 100);
    }

    #[test]
    fn speculating_workers_get_calls_of_as_many_passes_as_their_measured_tokens_per_pass_need() {
        let mut s = SchedulerState::new(SchedulerConfig {
            max_steps_per_call: 16,
            ..Default::default()
        });
        s.add_worker(1, cap(1000, 8), T0);
        s.submit(job(1, "a", Tier::Free, 200), T0);
        let decode_steps = |out: &[Output]| match &commands(out)[0].1 {
            Command::Decode { steps, .. } => *steps,
            other => panic!("expected a decode, got {other:?}"),
        };
        // The prefill's one token from one pass measures nothing: plain decoding's plan.
        let out = s.step_done(1, &[report(1, 1, false)], T0);
        assert_eq!(decode_steps(&out), 16);
        assert_eq!(s.snapshot(T0).workers[0].tokens_per_pass, 1.0);
        // Decode calls that accept 4 tokens a pass: the average climbs toward 4.
        let mut left = 199;
        let mut now = T0;
        for _ in 0..12 {
            left -= 8;
            now += Duration::from_millis(10);
            let spec = SequenceReport {
                job: 1,
                new_tokens: 8,
                passes: 2,
                finished: false,
            };
            s.step_done(1, &[spec], now);
        }
        let tpp = s.snapshot(now).workers[0].tokens_per_pass;
        assert!((3.5..=4.0).contains(&tpp), "{tpp}");
        // Near the end, as many passes as the tokens left need at the measured rate.
        let last = SequenceReport {
            job: 1,
            new_tokens: left - 10,
            passes: (left - 10) / 4,
            finished: false,
        };
        let out = s.step_done(1, &[last], now + Duration::from_millis(50));
        assert_eq!(decode_steps(&out), 3, "10 tokens at about 4 a pass");
    }

    #[test]
    fn higher_tiers_go_first_and_users_take_turns_inside_a_tier() {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        // No worker yet: everything waits.
        for (id, user, tier) in [
            (1, "a", Tier::Free),
            (2, "a", Tier::Free),
            (3, "a", Tier::Free),
            (4, "b", Tier::Free),
            (5, "p", Tier::Pro),
        ] {
            s.submit(job(id, user, tier, 8), T0);
        }
        assert_eq!(s.waiting(), 5);
        // Room for exactly one job at a time (3 blocks each, 3 free).
        let mut order: Vec<JobId> = vec![];
        let mut out = s.add_worker(1, cap(3, 8), T0);
        for _ in 0..5 {
            let ids = placed(&commands(&out)[0].1);
            order.extend(&ids);
            out = s.step_done(1, &[report(ids[0], 8, true)], T0);
        }
        assert_eq!(order, vec![5, 1, 4, 2, 3]);
    }

    #[test]
    fn cancelling_frees_the_queue_slot_or_the_worker_blocks() {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        s.add_worker(1, cap(6, 8), T0);
        s.submit(job(1, "a", Tier::Free, 8), T0);
        s.submit(job(2, "b", Tier::Free, 8), T0);
        s.submit(job(3, "c", Tier::Free, 8), T0);
        assert_eq!(s.waiting(), 2);
        assert_eq!(events(&s.cancel(3, T0), 3), vec![JobEvent::Cancelled]);
        assert_eq!(s.waiting(), 1);
        // Cancel the running job while its prefill is in flight: blocks return, release goes out next.
        s.cancel(1, T0);
        let out = s.step_done(1, &[report(1, 1, false)], T0);
        let (_, cmd) = &commands(&out)[0];
        assert_eq!(
            cmd,
            &Command::Prefill {
                release: vec![1],
                jobs: vec![Placement {
                    job: 2,
                    kv_blocks: 3,
                    resume_from: 0
                }]
            }
        );
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_lost_worker_requeues_its_jobs_to_resume_elsewhere() {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        s.add_worker(1, cap(100, 8), T0);
        s.submit(job(1, "a", Tier::Free, 16), T0);
        s.step_done(1, &[report(1, 5, false)], T0);
        let out = s.remove_worker(1, T0);
        assert_eq!(events(&out, 1), vec![JobEvent::Requeued]);
        let out = s.add_worker(2, cap(100, 8), T0);
        let (w, cmd) = &commands(&out)[0];
        assert_eq!(
            (*w, cmd),
            (
                2,
                &Command::Prefill {
                    release: vec![],
                    jobs: vec![Placement {
                        job: 1,
                        kv_blocks: 5,
                        resume_from: 5
                    }]
                }
            )
        );
    }

    #[test]
    fn a_refused_prefill_fails_its_jobs_and_keeps_the_worker() {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        s.add_worker(1, cap(100, 8), T0);
        s.submit(job(1, "a", Tier::Free, 16), T0);
        s.submit(job(2, "b", Tier::Free, 16), T0);
        let out = s.prefill_refused(1, &[1], "bad", T0);
        assert_eq!(
            events(&out, 1),
            vec![JobEvent::Failed(FailReason::Refused("bad".into()))]
        );
        // The worker is free again and takes the next job at once.
        assert_eq!(placed(&commands(&out)[0].1), vec![2]);
        assert_eq!(s.snapshot(T0).workers[0].free_blocks, 100 - 5);
    }

    #[test]
    fn a_job_larger_than_any_worker_fails_at_once() {
        let mut s = SchedulerState::new(SchedulerConfig::default());
        s.add_worker(1, cap(2, 8), T0);
        let out = s.submit(job(1, "a", Tier::Free, 16), T0);
        assert_eq!(
            events(&out, 1),
            vec![JobEvent::Failed(FailReason::TooLarge { kv_blocks: 5 })]
        );
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn static_batching_waits_for_an_empty_batch() {
        let mut s = SchedulerState::new(SchedulerConfig {
            static_batching: true,
            ..Default::default()
        });
        s.add_worker(1, cap(100, 8), T0);
        s.submit(job(1, "a", Tier::Free, 8), T0);
        s.submit(job(2, "b", Tier::Free, 8), T0);
        let out = s.step_done(1, &[report(1, 1, false)], T0);
        assert!(matches!(commands(&out)[0].1, Command::Decode { .. }));
    }

    /// A cluster measured at `rate` tokens/s: one worker whose first decode produced that rate.
    fn measured(rate: usize, config: SchedulerConfig) -> SchedulerState {
        let mut s = SchedulerState::new(config);
        s.add_worker(1, cap(10_000, 64), T0);
        s.submit(job(1_000, "warm", Tier::Team, 10_000), T0);
        s.step_done(1, &[report(1_000, 1, false)], T0);
        s.step_done(1, &[report(1_000, rate, false)], Duration::from_secs(1));
        assert!((s.tokens_per_second() - rate as f64).abs() < 1.0);
        s
    }

    fn events_in_order(out: &[Output]) -> Vec<JobId> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event { job, .. } => Some(*job),
                _ => None,
            })
            .collect()
    }

    fn shed_retry(out: &[Output], id: JobId) -> Option<Duration> {
        events(out, id).into_iter().find_map(|e| match e {
            JobEvent::Failed(FailReason::Shed { retry_after, .. }) => Some(retry_after),
            _ => None,
        })
    }

    #[test]
    fn a_job_predicted_past_its_deadline_is_shed_with_the_predicted_delay() {
        let config = SchedulerConfig {
            deadlines: [Duration::from_secs(10); 4],
            deadline_headroom: 1.0,
            ..Default::default()
        };
        // 100 tokens/s, 10,000 tokens of team work ahead: a free job would end after 100 s.
        let mut s = measured(100, config);
        let now = Duration::from_secs(1);
        let out = s.submit(job(1, "a", Tier::Free, 100), now);
        let retry = shed_retry(&out, 1).expect("shed");
        // (9,899 tokens still running + 100 own) / 100 per s = 100 s; the deadline is 10 s.
        assert!((retry.as_secs_f64() - 90.0).abs() < 0.5, "{retry:?}");
        assert_eq!(s.snapshot(now).shed[0], 1);
    }

    #[test]
    fn a_late_higher_tier_job_is_kept_and_waiting_lower_tiers_are_shed_first() {
        let config = SchedulerConfig {
            deadlines: [
                Duration::from_secs(200),
                Duration::from_secs(200),
                Duration::from_secs(50),
                Duration::from_secs(50),
            ],
            deadline_headroom: 1.0,
            ..Default::default()
        };
        let mut s = measured(100, config);
        let now = Duration::from_secs(1);
        // Free jobs fit their 200 s deadline (~100 s of work ahead).
        for id in 1..=5 {
            let out = s.submit(job(id, "f", Tier::Free, 1000), now);
            assert!(shed_retry(&out, id).is_none(), "free {id} shed");
        }
        // A pro job misses its 50 s deadline, but free jobs wait: it is kept, and the newest free
        // jobs, now predicted past 200 s, are shed instead.
        let out = s.submit(job(10, "p", Tier::Pro, 7000), now);
        assert!(shed_retry(&out, 10).is_none(), "pro shed while free waits");
        // The last free job now ends after (9,899 + 7,000 + 5,000) / 100 = 219 s: shed the newest
        // until the rest fit in 200 s.
        let shed: Vec<JobId> = events_in_order(&out)
            .into_iter()
            .filter(|&id| shed_retry(&out, id).is_some())
            .collect();
        assert_eq!(shed, vec![5, 4], "newest first, until the rest fit");
        // With no lower tier waiting, a late pro job is shed.
        let mut s = measured(100, config);
        let out = s.submit(job(11, "p", Tier::Pro, 5000), now);
        assert!(shed_retry(&out, 11).is_some());
    }

    #[test]
    fn a_full_queue_sheds_the_lowest_tier_to_admit_a_higher_one() {
        let config = SchedulerConfig {
            max_waiting: 2,
            shed_by_deadline: false,
            ..Default::default()
        };
        let mut s = SchedulerState::new(config);
        s.submit(job(1, "a", Tier::Free, 8), T0);
        s.submit(job(2, "b", Tier::Plus, 8), T0);
        // Full: another free job is shed; a pro job takes the free job's place.
        let out = s.submit(job(3, "c", Tier::Free, 8), T0);
        assert!(shed_retry(&out, 3).is_some());
        let out = s.submit(job(4, "d", Tier::Pro, 8), T0);
        assert!(shed_retry(&out, 4).is_none());
        assert!(shed_retry(&out, 1).is_some(), "the free job made room");
        assert_eq!(s.counts().0, [0, 1, 1, 0]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Submit {
            user: u8,
            tier: u8,
            size: usize,
        },
        Cancel(u64),
        Step {
            worker: u32,
            tokens: usize,
            finish: bool,
        },
        Join(u32),
        Leave(u32),
        Wait(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..4, 0u8..4, 1usize..40).prop_map(|(user, tier, size)| Op::Submit { user, tier, size }),
            1 => (0u64..60).prop_map(Op::Cancel),
            5 => (0u32..3, 1usize..8, any::<bool>()).prop_map(|(worker, tokens, finish)| Op::Step { worker, tokens, finish }),
            1 => (0u32..3).prop_map(Op::Join),
            1 => (0u32..3).prop_map(Op::Leave),
            1 => (1u64..3000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Random arrivals, steps, cancels, worker joins and losses, with shedding on:
        /// - a worker's free blocks equal its capacity minus its jobs' reservations, and its batch
        ///   never exceeds its slots;
        /// - every job ends exactly once (image, failure, shed or cancel) and nothing happens to it after;
        /// - a job is placed only when no higher-tier job waits, and shed only when no lower-tier job
        ///   waits;
        /// - the remaining-work sums the shedding uses match a recount.
        #[test]
        fn the_state_machine_keeps_its_invariants(ops in proptest::collection::vec(op(), 1..250)) {
            let config = SchedulerConfig {
                deadlines: [Duration::from_secs(3), Duration::from_secs(2), Duration::from_secs(1), Duration::from_secs(1)],
                max_waiting: 12,
                ..Default::default()
            };
            let mut s = SchedulerState::new(config);
            let mut in_flight: HashMap<WorkerId, Vec<JobId>> = HashMap::new();
            let mut tiers: HashMap<JobId, Tier> = HashMap::new();
            let mut ended: HashMap<JobId, usize> = HashMap::new();
            let mut next = 0;
            let mut now = T0;
            for op in ops {
                now += Duration::from_millis(7);
                let waiting_before = s.waiting();
                let arrival = matches!(op, Op::Submit { .. });
                let out = match op {
                    Op::Submit { user, tier, size } => {
                        next += 1;
                        tiers.insert(next, Tier::ALL[tier as usize]);
                        s.submit(job(next, &format!("u{user}"), Tier::ALL[tier as usize], size), now)
                    }
                    Op::Cancel(id) => s.cancel(id, now),
                    Op::Step { worker, tokens, finish } => match in_flight.remove(&worker) {
                        Some(jobs) => {
                            let reports: Vec<_> = jobs.iter().map(|&j| SequenceReport { job: j, new_tokens: tokens, passes: tokens, finished: finish }).collect();
                            s.step_done(worker, &reports, now)
                        }
                        None => Vec::new(),
                    },
                    Op::Join(w) => {
                        in_flight.remove(&w);
                        s.add_worker(w, Capacity { kv_blocks: 40, block_size: 4, max_batch: 3 }, now)
                    }
                    Op::Leave(w) => { in_flight.remove(&w); s.remove_worker(w, now) }
                    Op::Wait(ms) => { now += Duration::from_millis(ms); Vec::new() }
                };
                let waiting_tiers: Vec<bool> = (0..4).map(|t| s.queues[t].len > 0).collect();
                for o in &out {
                    match o {
                        Output::Command { worker, command } => {
                            let jobs = match command { Command::Prefill { jobs, .. } => jobs.iter().map(|p| p.job).collect(), Command::Decode { jobs, .. } => jobs.clone(), Command::Release { .. } => vec![] };
                            prop_assert!(in_flight.insert(*worker, jobs).is_none(), "two commands in flight on worker {}", worker);
                        }
                        Output::Event { job, event } => {
                            prop_assert_eq!(ended.get(job).copied().unwrap_or(0), 0, "event {:?} after job {} ended", event, job);
                            let tier = tiers[job] as usize;
                            match event {
                                JobEvent::Started { .. } => {
                                    prop_assert!(!waiting_tiers[tier + 1..].iter().any(|&w| w), "tier {} placed while a higher tier waits", tier);
                                }
                                JobEvent::Failed(FailReason::Shed { .. }) => {
                                    prop_assert!(!waiting_tiers[..tier].iter().any(|&w| w), "tier {} shed while a lower tier waits", tier);
                                }
                                _ => {}
                            }
                            if matches!(event, JobEvent::Finished { .. } | JobEvent::Failed(_) | JobEvent::Cancelled) {
                                *ended.entry(*job).or_default() += 1;
                            }
                        }
                    }
                }
                for w in s.snapshot(now).workers {
                    let reserved: usize = s.jobs.values().filter(|j| matches!(j.phase, Phase::Running { worker, .. } if worker == w.id)).map(|j| j.kv_blocks).sum();
                    prop_assert_eq!(w.free_blocks + reserved, w.capacity.kv_blocks);
                    prop_assert!(w.running <= w.capacity.max_batch);
                }
                // The kept indexes match a recount: free workers, fleet speed, largest worker.
                let idle: BTreeSet<IdleKey> = s.workers.iter().filter(|(_, w)| !w.busy).map(|(&id, w)| Reverse((w.free_blocks, id))).collect();
                prop_assert_eq!(&idle, &s.idle);
                prop_assert!(s.workers.values().all(|w| w.busy || w.running.is_empty()), "a free worker holds jobs");
                let speed: f64 = s.workers.values().map(|w| w.tokens_per_second).sum();
                prop_assert!((speed - s.tokens_per_second()).abs() <= 1e-6 * speed.max(1.0));
                prop_assert_eq!(s.largest.map(|c| c.kv_blocks), s.workers.values().map(|w| w.capacity.kv_blocks).max());
                let waiting = s.jobs.values().filter(|j| matches!(j.phase, Phase::Waiting)).count();
                prop_assert_eq!(waiting, s.waiting());
                // Arrivals respect the bound; jobs re-queued from a lost worker may exceed it (they
                // were admitted and are never dropped).
                if arrival {
                    prop_assert!(waiting <= config.max_waiting.max(waiting_before));
                }
                let mut work = [0usize; 4];
                let mut running = 0;
                for j in s.jobs.values() {
                    let rem = j.remaining();
                    match j.phase { Phase::Waiting => work[j.job.tier as usize] += rem, Phase::Running { .. } => running += rem }
                }
                prop_assert_eq!(work, s.waiting_work);
                prop_assert_eq!(running, s.running_work);
                // Live jobs have not ended; ended jobs are gone.
                for id in s.jobs.keys() {
                    prop_assert!(!ended.contains_key(id));
                }
            }
            // Every job that left the state ended exactly once.
            for id in 1..=next {
                if !s.jobs.contains_key(&id) {
                    prop_assert_eq!(ended.get(&id).copied(), Some(1), "job {} vanished", id);
                }
            }
        }
    }
}
