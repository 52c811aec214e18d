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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

/// Time as the driver sees it: real time since start, or virtual time in a simulation.
pub type Time = Duration;

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

/// Knobs of the batching policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerConfig {
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

/// Why a job ended without an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The job can never fit any worker of the cluster.
    TooLarge { kv_blocks: usize },
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
    pub finished: bool,
}

#[derive(Debug)]
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

#[derive(Debug)]
struct WorkerState {
    capacity: Capacity,
    free_blocks: usize,
    running: Vec<JobId>,
    pending_release: Vec<JobId>,
    /// A command is in flight; the next one waits for its report.
    busy: bool,
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
    jobs: HashMap<JobId, JobState>,
    workers: BTreeMap<WorkerId, WorkerState>,
}

/// A snapshot for status pages and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub waiting: [usize; 4],
    pub running: usize,
    pub workers: Vec<WorkerSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    pub capacity: Capacity,
    pub free_blocks: usize,
    pub running: usize,
}

impl SchedulerState {
    pub fn new(config: SchedulerConfig) -> Self {
        SchedulerState {
            config,
            ..Default::default()
        }
    }

    /// A job arrives. It is queued (and placed at once where a worker is free).
    pub fn submit(&mut self, job: Job, now: Time) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(largest) = self
            .workers
            .values()
            .map(|w| w.capacity)
            .max_by_key(|c| c.kv_blocks)
        {
            let needed = blocks_for(&job, largest.block_size);
            if needed > largest.kv_blocks {
                out.push(Output::Event {
                    job: job.id,
                    event: JobEvent::Failed(FailReason::TooLarge { kv_blocks: needed }),
                });
                return out;
            }
        }
        let position = self.queues[job.tier as usize..].iter().map(|q| q.len).sum();
        self.queues[job.tier as usize].push_back(&job.user, job.id);
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
        self.schedule_all(now, &mut out);
        out
    }

    /// A caller gave up. A waiting job leaves the queue; a running one is released on its worker.
    pub fn cancel(&mut self, id: JobId, now: Time) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(state) = self.jobs.remove(&id) else {
            return out;
        };
        match state.phase {
            // The queue entry is skipped lazily when it reaches the front.
            Phase::Waiting => self.queues[state.job.tier as usize].len -= 1,
            Phase::Running { worker, .. } => {
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
            },
        );
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
        for job in worker.running.into_iter().rev() {
            let state = self.jobs.get_mut(&job).expect("running jobs are live");
            state.phase = Phase::Waiting;
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
        let Some(w) = self.workers.get_mut(&worker) else {
            return out;
        };
        w.busy = false;
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
            state.done = (state.done + report.new_tokens).min(state.job.image_tokens);
            out.push(Output::Event {
                job: report.job,
                event: JobEvent::Progress {
                    done: state.done,
                    total: state.job.image_tokens,
                },
            });
            if report.finished {
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
            }
        }
        self.schedule(worker, now, &mut out);
        out
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

    /// Waiting jobs per tier (indexed by `Tier as usize`) and running jobs, without allocating.
    pub fn counts(&self) -> ([usize; 4], usize) {
        let running = self.workers.values().map(|w| w.running.len()).sum();
        ([0, 1, 2, 3].map(|t| self.queues[t].len), running)
    }

    /// Waiting jobs (all tiers).
    pub fn waiting(&self) -> usize {
        self.queues.iter().map(|q| q.len).sum()
    }

    pub fn snapshot(&self) -> Snapshot {
        let running = self.workers.values().map(|w| w.running.len()).sum();
        Snapshot {
            waiting: [0, 1, 2, 3].map(|t| self.queues[t].len),
            running,
            workers: self
                .workers
                .iter()
                .map(|(&id, w)| WorkerSnapshot {
                    id,
                    capacity: w.capacity,
                    free_blocks: w.free_blocks,
                    running: w.running.len(),
                })
                .collect(),
        }
    }

    /// Gives every free worker its next command, most free blocks first.
    fn schedule_all(&mut self, now: Time, out: &mut Vec<Output>) {
        let mut idle: Vec<(usize, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.busy)
            .map(|(&id, w)| (w.free_blocks, id))
            .collect();
        idle.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in idle {
            self.schedule(id, now, out);
        }
    }

    /// The next command of one free worker: prefill what fits, else decode the batch, else release.
    fn schedule(&mut self, id: WorkerId, now: Time, out: &mut Vec<Output>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if w.busy {
            return;
        }
        let placements = self.admit(id, now);
        let w = self.workers.get_mut(&id).expect("checked above");
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
            let soonest = w
                .running
                .iter()
                .map(|j| {
                    let s = &self.jobs[j];
                    s.job.image_tokens - s.done
                })
                .min()
                .unwrap_or(1);
            let steps = soonest.clamp(1, self.config.max_steps_per_call.max(1));
            Command::Decode {
                release,
                jobs: w.running.clone(),
                steps,
            }
        } else if !release.is_empty() {
            Command::Release { release }
        } else {
            return;
        };
        w.busy = true;
        out.push(Output::Command {
            worker: id,
            command,
        });
    }

    /// Pops the waiting jobs that fit worker `id`, in tier order and fair order inside a tier. Stops at
    /// the first job that does not fit, so a large job is not overtaken forever by small ones.
    fn admit(&mut self, id: WorkerId, now: Time) -> Vec<Placement> {
        let mut placements = Vec::new();
        let w = self.workers.get_mut(&id).expect("caller checked");
        if self.config.static_batching && !w.running.is_empty() {
            return placements;
        }
        let mut prefill_tokens = 0;
        let jobs = &mut self.jobs;
        for tier in Tier::ALL.iter().rev() {
            let queue = &mut self.queues[*tier as usize];
            while let Some(job) = queue.peek(|j| {
                jobs.get(&j)
                    .is_some_and(|s| matches!(s.phase, Phase::Waiting))
            }) {
                let state = jobs.get_mut(&job).expect("peek checked");
                let blocks = blocks_for(&state.job, w.capacity.block_size);
                let tokens = state.job.prompt_tokens + state.done + 1;
                let over_budget = !placements.is_empty()
                    && prefill_tokens + tokens > self.config.max_prefill_tokens;
                if w.running.len() >= w.capacity.max_batch || blocks > w.free_blocks || over_budget
                {
                    return placements;
                }
                queue.pop_peeked();
                prefill_tokens += tokens;
                w.free_blocks -= blocks;
                w.running.push(job);
                state.kv_blocks = blocks;
                state.phase = Phase::Running {
                    worker: id,
                    started: now,
                };
                placements.push(Placement {
                    job,
                    kv_blocks: blocks,
                    resume_from: state.done,
                });
            }
        }
        placements
    }
}

/// KV blocks a job needs for its whole life on a worker with `block_size`-token blocks.
pub fn blocks_for(job: &Job, block_size: usize) -> usize {
    (job.prompt_tokens + job.image_tokens).div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(s.snapshot().workers[0].free_blocks, 100);
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
        assert_eq!(s.snapshot().workers[0].free_blocks, 100 - 5);
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

    proptest! {
        /// Whatever arrives, finishes, is cancelled or loses its worker, a worker's free blocks equal
        /// its capacity minus the reservations of the jobs it runs, and never exceed its batch size.
        #[test]
        fn block_accounting_never_overcommits(ops in proptest::collection::vec((0u8..5, 0u64..40, 1usize..30), 1..200)) {
            let mut s = SchedulerState::new(SchedulerConfig::default());
            let mut in_flight: HashMap<WorkerId, Vec<JobId>> = HashMap::new();
            let mut next = 0;
            let mut now = T0;
            for (op, x, size) in ops {
                now += Duration::from_millis(1);
                let out = match op {
                    0 => { next += 1; s.submit(job(next, &format!("u{}", x % 5), Tier::ALL[(x % 4) as usize], size), now) }
                    1 => s.cancel(x % (next + 1), now),
                    2 => {
                        let w = (x % 3) as u32;
                        match in_flight.remove(&w) {
                            Some(jobs) => {
                                let reports: Vec<_> = jobs.iter().map(|&j| SequenceReport { job: j, new_tokens: size % 4 + 1, finished: size % 3 == 0 }).collect();
                                s.step_done(w, &reports, now)
                            }
                            None => s.add_worker(w, Capacity { kv_blocks: 20, block_size: 4, max_batch: 3 }, now),
                        }
                    }
                    3 => { in_flight.remove(&((x % 3) as u32)); s.remove_worker((x % 3) as u32, now) }
                    _ => Vec::new(),
                };
                for (w, cmd) in commands(&out) {
                    let jobs = match cmd { Command::Prefill { jobs, .. } => jobs.iter().map(|p| p.job).collect(), Command::Decode { jobs, .. } => jobs, Command::Release { .. } => vec![] };
                    prop_assert!(in_flight.insert(w, jobs).is_none(), "two commands in flight on worker {}", w);
                }
                for w in s.snapshot().workers {
                    let reserved: usize = s.jobs.values().filter(|j| matches!(j.phase, Phase::Running { worker, .. } if worker == w.id)).map(|j| j.kv_blocks).sum();
                    prop_assert_eq!(w.free_blocks + reserved, w.capacity.kv_blocks);
                    prop_assert!(w.running <= w.capacity.max_batch);
                }
                let waiting = s.jobs.values().filter(|j| matches!(j.phase, Phase::Waiting)).count();
                prop_assert_eq!(waiting, s.waiting());
            }
        }
    }
}
