//! Benchmark scenarios shared by `kiln bench` and the criterion benches in this folder: a batch of
//! sequences mid-image for decode-step timing, and a scheduler holding thousands of waiting and
//! running jobs for decision timing. Scenarios only build state and run one unit of work; the callers
//! time them. [`torch`] times Kiln's decode step beside the PyTorch reference of the same model.

use std::time::Duration;

use kiln_model::engine::prompt_tokens;
use kiln_model::{CandleEngine, Engine, EngineInfo, NewSequence, SamplingParams};
use kiln_scheduler::state::{
    Capacity, Command, Job, JobId, Output, SchedulerConfig, SchedulerState, SequenceReport, Tier,
};

pub mod torch;

/// The prompt of every decode fixture sequence (the reference's bench lays out the same prefix).
pub const FIXTURE_PROMPT: &str = "a red triangle above a blue star on a grey background";

/// Tokens a fixture sequence holds in its KV cache once [`decode_fixture`] returns: its prefix, and
/// the image inputs read so far.
pub fn fixture_context(info: &EngineInfo, size: u32, context_fill: f64) -> usize {
    let warm = (info.image_tokens(size, size) as f64 * context_fill) as usize;
    prompt_tokens(FIXTURE_PROMPT.len()) + warm.max(1)
}

/// Prefills `batch` sequences of a `size`x`size` image and decodes them to `context_fill` of their
/// image tokens, so that following decode steps attend over a realistic context. Returns their ids.
pub fn decode_fixture(
    engine: &mut CandleEngine,
    batch: usize,
    size: u32,
    context_fill: f64,
) -> Vec<u64> {
    let info = engine.info();
    let prompt = FIXTURE_PROMPT;
    let seqs: Vec<NewSequence> = (0..batch as u64)
        .map(|id| NewSequence {
            id,
            prompt: prompt.into(),
            width: size,
            height: size,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed: id + 1,
                speculation: None,
            },
            generated: Vec::new(),
            kv_blocks: info.blocks_needed(prompt.len(), size, size),
            partial_images: 0,
        })
        .collect();
    engine.prefill(seqs).expect("fixture fits the engine");
    let ids: Vec<u64> = (0..batch as u64).collect();
    let warm = (info.image_tokens(size, size) as f64 * context_fill) as usize;
    if warm > 1 {
        engine.decode(&ids, warm - 1).expect("fixture decodes");
    }
    ids
}

/// A scheduler with `waiting` queued jobs and `running` jobs spread over workers of 64 slots, every
/// worker busy with a call in flight.
pub struct SchedulerFixture {
    pub state: SchedulerState,
    next_job: JobId,
    /// Per worker, the jobs of its call in flight.
    in_flight: Vec<Vec<JobId>>,
    turn: usize,
    now: Duration,
}

fn job(id: JobId) -> Job {
    Job {
        id,
        user: format!("user-{}", id % 997),
        tier: Tier::ALL[(id % 4) as usize],
        prompt_tokens: 40,
        image_tokens: 256,
    }
}

impl SchedulerFixture {
    pub fn new(waiting: usize, running: usize) -> Self {
        let workers = running.div_ceil(64).max(1);
        let mut state = SchedulerState::new(SchedulerConfig::default());
        let mut in_flight = vec![Vec::new(); workers];
        let mut next_job = 1;
        let now = Duration::ZERO;
        // Each worker has room for exactly its share of running jobs (19 blocks of 16 tokens each), so
        // the queue cannot drain: every finished job lets exactly one waiting job in.
        for w in 0..workers {
            let share = running / workers + usize::from(w < running % workers);
            let capacity = Capacity {
                kv_blocks: share * 19,
                block_size: 16,
                max_batch: 64,
            };
            state.add_worker(w as u32, capacity, now);
            for _ in 0..share {
                let out = state.submit(job(next_job), now);
                next_job += 1;
                record(&out, &mut in_flight);
            }
        }
        for _ in 0..waiting {
            state.submit(job(next_job), now);
            next_job += 1;
        }
        SchedulerFixture {
            state,
            next_job,
            in_flight,
            turn: 0,
            now,
        }
    }

    /// One decision: the next worker reports its call (on every other turn one job finishes and a new
    /// one arrives, keeping the queue at its depth), and the worker gets its next command.
    pub fn decide(&mut self) -> usize {
        self.now += Duration::from_millis(1);
        let w = self.turn % self.in_flight.len();
        self.turn += 1;
        let jobs = std::mem::take(&mut self.in_flight[w]);
        let reports: Vec<SequenceReport> = jobs
            .iter()
            .enumerate()
            .map(|(i, &job)| SequenceReport {
                job,
                new_tokens: 1,
                passes: 1,
                finished: i == 0 && self.turn.is_multiple_of(2),
            })
            .collect();
        let finishes = reports.first().is_some_and(|r| r.finished);
        let mut out = self.state.step_done(w as u32, &reports, self.now);
        if finishes {
            out.extend(self.state.submit(job(self.next_job), self.now));
            self.next_job += 1;
        }
        record(&out, &mut self.in_flight);
        out.len()
    }
}

fn record(out: &[Output], in_flight: &mut [Vec<JobId>]) {
    for o in out {
        if let Output::Command { worker, command } = o {
            let slot = &mut in_flight[*worker as usize];
            match command {
                Command::Prefill { jobs, .. } => *slot = jobs.iter().map(|p| p.job).collect(),
                Command::Decode { jobs, .. } => *slot = jobs.clone(),
                Command::Release { .. } => slot.clear(),
            }
        }
    }
}
