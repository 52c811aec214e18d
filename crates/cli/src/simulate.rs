//! `kiln simulate --scenario FILE --workers N`: the scenario of a load test played in virtual time
//! against N simulated GPUs, through Kiln's own scheduler state machine and quota store; prints the
//! same report as `kiln loadtest`. `--find-workers` searches for the smallest fleet that meets the
//! launch targets: free requests shed at most `--target-free-shed` in the busiest phase, paid tiers
//! never shed and their p99 within their deadlines.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kiln_loadtest::{OutcomeKind, Report, Scenario, Tally};
use kiln_quota::TierTable;
use kiln_scheduler::state::Capacity;
use kiln_simulator::{simulate, Fleet};

use crate::config::BatchingOpts;

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Scenario file (TOML), the same as `kiln loadtest` takes.
    #[arg(long)]
    pub scenario: PathBuf,
    /// Simulated GPUs (with --find-workers: the most to consider).
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Step-time calibration of each GPU: `h100-20m`, `cpu-20m` or a TOML file.
    #[arg(long, default_value = "h100-20m")]
    pub step_cost: String,
    /// Image tokens a sequence advances per decode pass, overriding the calibration's (1: plain
    /// decoding; with speculative decoding, what `kiln eval --speculation` measured).
    #[arg(long)]
    pub tokens_per_pass: Option<f64>,
    /// KV-cache blocks per GPU.
    #[arg(long, default_value_t = 4096)]
    pub kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Batch slots per GPU.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Milliseconds each worker call spends outside the GPU (network round trip and the scheduler's
    /// turn); 0 simulates the accelerator's time alone.
    #[arg(long, default_value_t = 0.0)]
    pub call_overhead_ms: f64,
    /// Tier table (TOML); the shipped launch defaults when absent.
    #[arg(long)]
    pub tiers: Option<PathBuf>,
    #[command(flatten)]
    pub batching: BatchingOpts,
    /// Search for the smallest fleet (up to --workers) that meets the targets.
    #[arg(long)]
    pub find_workers: bool,
    /// Largest share of free requests shed in the busiest phase that still meets the target.
    #[arg(long, default_value_t = 0.05)]
    pub target_free_shed: f64,
    /// Where to write the JSON report (of the last run).
    #[arg(long, default_value = "simulation-report.json")]
    pub report: PathBuf,
}

/// Whether `report` meets the launch targets; the reason when it does not.
fn meets_targets(report: &Report, scenario: &Scenario, free_shed: f64) -> Result<(), String> {
    let busiest = scenario
        .phases
        .iter()
        .enumerate()
        .max_by(|a, b| {
            let peak =
                |p: &kiln_loadtest::scenario::Phase| p.rate.max(p.rate_end.unwrap_or(p.rate));
            peak(a.1).total_cmp(&peak(b.1))
        })
        .map_or(0, |(i, _)| i);
    let deadlines = kiln_loadtest::default_deadlines();
    for (index, (phase, tiers)) in report.phases.iter().enumerate() {
        for (tier, f) in tiers {
            let shed = f.outcomes.get(&OutcomeKind::Shed).copied().unwrap_or(0);
            if tier == "free" {
                let share = shed as f64 / f.sent.max(1) as f64;
                if index == busiest && share > free_shed {
                    return Err(format!(
                        "{phase}: {:.1}% of free requests shed",
                        share * 100.0
                    ));
                }
            } else {
                if shed > 0 {
                    return Err(format!("{phase}: {shed} {tier} requests shed"));
                }
                if let (Some(l), Some(d)) = (&f.latency, deadlines.get(tier)) {
                    if l.p99 > *d {
                        return Err(format!(
                            "{phase}: {tier} p99 {:.1} s over its {d} s deadline",
                            l.p99
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

pub fn run(args: SimulateArgs) -> Result<()> {
    args.batching.validate()?;
    if !(args.call_overhead_ms.is_finite() && args.call_overhead_ms >= 0.0) {
        anyhow::bail!(
            "--call-overhead-ms must be a non-negative number, not {}",
            args.call_overhead_ms
        );
    }
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading --scenario {}", args.scenario.display()))?;
    let scenario = Scenario::from_toml(&text)
        .with_context(|| format!("--scenario {}", args.scenario.display()))?;
    let tiers = match &args.tiers {
        Some(path) => TierTable::from_toml(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading --tiers {}", path.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("--tiers {}: {e}", path.display()))?,
        None => TierTable::shipped(),
    };
    let mut cost = kiln_model::StepCost::load(&args.step_cost)
        .map_err(|e| anyhow::anyhow!("--step-cost: {e}"))?;
    if let Some(tpp) = args.tokens_per_pass {
        cost = cost
            .with_tokens_per_pass(tpp)
            .map_err(|e| anyhow::anyhow!("--tokens-per-pass: {e}"))?;
    }
    let prompts = kiln_loadtest::shipped_prompts();
    let fleet = |workers: usize| Fleet {
        workers,
        capacity: Capacity {
            kv_blocks: args.kv_blocks,
            block_size: args.block_size,
            max_batch: args.max_batch,
        },
        cost: cost.clone(),
        model: kiln_model::ModelConfig::random_20m(),
        call_overhead: std::time::Duration::from_secs_f64(args.call_overhead_ms / 1000.0),
    };
    let play = |workers: usize| -> Result<Report> {
        let started = Instant::now();
        let mut tally = Tally::new(&scenario, &kiln_loadtest::default_deadlines());
        let sim = simulate(
            &scenario,
            &fleet(workers),
            &tiers,
            args.batching.to_config(),
            &prompts,
            |outcome| tally.add(outcome),
        )?;
        let report = tally.finish(sim.sent);
        eprintln!(
            "simulated {:.0} s with {workers} GPUs: {} requests, {} events in {:.2} s wall \
             (admission waited for scheduling {} times, {:.2} s; scheduling waited for admission \
             {:.2} s)",
            scenario.duration(),
            sim.sent,
            sim.events,
            started.elapsed().as_secs_f64(),
            sim.admission_waits,
            sim.admission_waited.as_secs_f64(),
            sim.scheduling_waited.as_secs_f64(),
        );
        Ok(report)
    };
    let report = if args.find_workers {
        // The fleet meeting the targets is found by bisection: more GPUs never shed more.
        let (mut lo, mut hi) = (1usize, args.workers.max(1));
        let mut best = play(hi)?;
        if let Err(why) = meets_targets(&best, &scenario, args.target_free_shed) {
            anyhow::bail!("even {hi} GPUs miss the targets ({why}); raise --workers");
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            let report = play(mid)?;
            match meets_targets(&report, &scenario, args.target_free_shed) {
                Ok(()) => {
                    hi = mid;
                    best = report;
                }
                Err(why) => {
                    eprintln!("  {mid} GPUs: {why}");
                    lo = mid + 1;
                }
            }
        }
        println!(
            "smallest fleet meeting the targets: {hi} GPUs ({})",
            cost.name
        );
        best
    } else {
        play(args.workers)?
    };
    print!("{}", report.summary());
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing --report {}", args.report.display()))?;
    std::fs::write(
        args.report.with_extension("html"),
        kiln_loadtest::html::render(&report),
    )?;
    Ok(())
}
