//! `kiln bench`: the foundation's figures, measured side by side in one run — decode step time per
//! batch size, continuous batching against one-request-at-a-time (and static batching) through the
//! real scheduler and a worker over gRPC, and the scheduler's decision time under a deep queue.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures::StreamExt;
use kiln_model::Engine;
use kiln_scheduler::{JobRequest, JobUpdate, RuntimeConfig, Sampling, SchedulerConfig, Tier};
use tokio::sync::watch;

use crate::cluster;
use crate::config::WorkerOpts;

mod admission;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which figures: all, decode, batching, scheduler or admission.
    #[arg(long, default_value = "all", value_parser = ["all", "decode", "batching", "scheduler", "admission"])]
    pub only: String,
    /// Redis for the admission figures (default: a redis-server started for the run).
    #[arg(long)]
    pub redis: Option<String>,
    /// Concurrent clients of the admission figures.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Requests per admission figure.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Model directory (default: the data directory's default model).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Device for the decode figures: `cpu`, or `cuda:N` in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 24)]
    pub steps: usize,
    /// Images per batching run (all submitted at once; 64 fills one worker's batch).
    #[arg(long, default_value_t = 64)]
    pub jobs: usize,
    /// Image side for the batching runs.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Milliseconds between arrivals in the batching runs (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub arrival_ms: u64,
    /// Alternating repetitions of each batching mode (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn worker_opts(model: &Option<std::path::PathBuf>, max_batch: usize, device: &str) -> WorkerOpts {
    WorkerOpts {
        model: model.clone(),
        device: device.into(),
        kv_blocks: 64 * 96,
        block_size: 16,
        max_batch,
    }
}

pub async fn run(args: BenchArgs, data_dir: &Path) -> Result<()> {
    let model_dir = cluster::ensure_model(&worker_opts(&args.model, 64, "cpu"), data_dir)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "kiln bench: model {}, decode on {}, {threads} CPU threads",
        model_dir.display(),
        args.device
    );
    if matches!(args.only.as_str(), "all" | "decode") {
        decode(&args, &model_dir)?;
    }
    if matches!(args.only.as_str(), "all" | "batching") {
        batching(&args, &model_dir).await?;
    }
    if matches!(args.only.as_str(), "all" | "scheduler") {
        scheduler();
    }
    if matches!(args.only.as_str(), "all" | "admission") {
        admission::run(
            args.redis.as_deref(),
            args.clients.max(1),
            args.requests.max(1),
        )
        .await?;
    }
    Ok(())
}

fn decode(args: &BenchArgs, model_dir: &Path) -> Result<()> {
    println!("\n== decode step, 128x128 image, context ~100-200 tokens ==");
    println!("{:>6} {:>14} {:>16}", "batch", "median step ms", "tokens/s");
    let mut engine = cluster::build_engine(
        &worker_opts(&Some(model_dir.to_path_buf()), 64, &args.device),
        model_dir,
    )?;
    for batch in [1usize, 4, 16, 64] {
        let ids = kiln_benches::decode_fixture(&mut engine, batch, 128, 0.4);
        let mut times = Vec::with_capacity(args.steps);
        for _ in 0..args.steps {
            let start = Instant::now();
            engine.decode(&ids, 1).context("decode step")?;
            times.push(start.elapsed().as_secs_f64());
        }
        engine.release(&ids);
        let m = median(times);
        println!("{batch:>6} {:>14.2} {:>16.0}", m * 1e3, batch as f64 / m);
    }
    Ok(())
}

/// One run: `jobs` requests arrive `arrival_ms` apart; returns seconds until the last image and the
/// median latency of one image.
async fn batching_run(
    args: &BenchArgs,
    model_dir: &Path,
    max_batch: usize,
    static_batching: bool,
) -> Result<(f64, f64)> {
    let engine = cluster::build_engine(
        &worker_opts(&Some(model_dir.to_path_buf()), max_batch, "cpu"),
        model_dir,
    )?;
    let listener = cluster::bind("127.0.0.1:0".parse()?, "bench worker").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = watch::channel(false);
    let mut wait = stopped.clone();
    let worker = tokio::spawn(kiln_worker::run(
        "bench-worker".into(),
        engine,
        listener,
        async move {
            let _ = wait.wait_for(|s| *s).await;
        },
    ));
    let batching = SchedulerConfig {
        static_batching,
        ..Default::default()
    };
    let handle = kiln_scheduler::spawn(RuntimeConfig {
        batching,
        workers: vec![address],
        ..Default::default()
    });
    handle
        .wait_for_model(Duration::from_secs(30))
        .await
        .context("bench worker did not come up")?;
    let start = tokio::time::Instant::now();
    let interval = Duration::from_millis(args.arrival_ms);
    let runs = (0..args.jobs).map(|i| {
        let handle = handle.clone();
        let job = JobRequest {
            request_id: format!("bench-{i}"),
            user: format!("user-{i}"),
            tier: Tier::Free,
            prompt: format!("a red triangle above a blue star, variant {i}"),
            width: args.size,
            height: args.size,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed: i as u64 + 1,
            },
        };
        // Open loop: job i arrives at i x interval, however slow the cluster is.
        let arrival = start + interval * i as u32;
        async move {
            tokio::time::sleep_until(arrival).await;
            let mut s = handle.submit(job).await?;
            loop {
                match s.next().await {
                    Some(Ok(JobUpdate::Completed(_))) => {
                        return Ok(arrival.elapsed().as_secs_f64())
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => anyhow::bail!("bench job failed: {e}"),
                    None => anyhow::bail!("bench job stream ended without an image"),
                }
            }
        }
    });
    let latencies = futures::future::try_join_all(runs).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = worker.await;
    Ok((elapsed, median(latencies)))
}

async fn batching(args: &BenchArgs, model_dir: &Path) -> Result<()> {
    let arrivals = match args.arrival_ms {
        0 => "all at once".to_string(),
        ms => format!("one every {ms} ms"),
    };
    println!(
        "\n== throughput: {} requests of {}x{} arriving {arrivals}, one worker over gRPC ==",
        args.jobs, args.size, args.size
    );
    let modes: [(&str, usize, bool); 3] = [
        ("one-at-a-time", 1, false),
        ("static batch", 64, true),
        ("continuous", 64, false),
    ];
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    // Modes alternate inside each repetition so that machine noise hits them alike.
    for _ in 0..args.repeats {
        for (i, (_, max_batch, static_batching)) in modes.iter().enumerate() {
            runs[i].push(batching_run(args, model_dir, *max_batch, *static_batching).await?);
        }
    }
    println!(
        "{:>14} {:>10} {:>10} {:>17} {:>18}",
        "mode", "median s", "images/s", "vs one-at-a-time", "median latency s"
    );
    let base = median(runs[0].iter().map(|r| r.0).collect());
    for (i, (name, _, _)) in modes.iter().enumerate() {
        let total = median(runs[i].iter().map(|r| r.0).collect());
        let latency = median(runs[i].iter().map(|r| r.1).collect());
        println!(
            "{name:>14} {total:>10.2} {:>10.2} {:>16.2}x {latency:>18.2}",
            args.jobs as f64 / total,
            base / total
        );
    }
    Ok(())
}

fn scheduler() {
    println!("\n== scheduler decision, 10,000 waiting and 1,000 running ==");
    let mut fixture = kiln_benches::SchedulerFixture::new(10_000, 1_000);
    for _ in 0..1_000 {
        fixture.decide();
    }
    let mut times = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let start = Instant::now();
        std::hint::black_box(fixture.decide());
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let snapshot = fixture.state.snapshot(Duration::ZERO);
    println!(
        "decisions: 20000, median {:.2} us, p99 {:.2} us (after: {} waiting, {} running)",
        median(times.clone()),
        percentile(times, 0.99),
        snapshot.waiting.iter().sum::<usize>(),
        snapshot.running
    );
}
