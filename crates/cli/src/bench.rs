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

use crate::cluster;
use crate::config::WorkerOpts;

mod admission;
mod signing;
mod tracing;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which figures: all, decode, batching, scheduler, admission, shedding, tracing or signing.
    #[arg(long, default_value = "all", value_parser = ["all", "decode", "batching", "scheduler", "admission", "shedding", "tracing", "signing"])]
    pub only: String,
    /// Worker processes in the batching and shedding runs.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Offered load of the shedding run, as a multiple of the measured capacity.
    #[arg(long, default_value_t = 5.0)]
    pub overload: f64,
    /// Seconds the shedding run offers that load.
    #[arg(long, default_value_t = 10.0)]
    pub overload_seconds: f64,
    /// Deadline of every tier in the shedding run, in seconds.
    #[arg(long, default_value_t = 15.0)]
    pub deadline: f64,
    /// The batching and shedding runs' workers speculate with this window (`kiln worker
    /// --speculation`; default: the model's).
    #[arg(long)]
    pub speculation: Option<usize>,
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
    /// Seconds of load per tracing configuration and round.
    #[arg(long, default_value_t = 8.0)]
    pub tracing_seconds: f64,
    /// Alternating repetitions of each batching mode and tracing configuration (medians reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Decode figures beside the PyTorch reference of the same weights (`reference/torch`), the two
    /// alternating `--repeats` times in this run.
    #[arg(long)]
    pub against_torch: bool,
    /// Also time the reference under `torch.compile` (with `--against-torch`).
    #[arg(long)]
    pub torch_compile: bool,
    /// Python interpreter with torch (default: `KILN_TORCH_PYTHON`, else the environment that
    /// `scripts/torch-venv.sh` makes).
    #[arg(long)]
    pub torch_python: Option<std::path::PathBuf>,
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
        backend: "candle".into(),
        step_cost: "cpu-20m".into(),
        speculation: None,
        speculation_rows: kiln_model::engine::DEFAULT_SPECULATION_ROWS,
        tokens_per_pass: None,
    }
}

pub async fn run(args: BenchArgs, data_dir: &Path) -> Result<()> {
    let model_dir = cluster::ensure_benchmark_model(&args.model, data_dir)?;
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
    if matches!(args.only.as_str(), "all" | "shedding") {
        shedding(&args, &model_dir).await?;
    }
    if matches!(args.only.as_str(), "all" | "admission") {
        admission::run(
            args.redis.as_deref(),
            args.clients.max(1),
            args.requests.max(1),
        )
        .await?;
    }
    if matches!(args.only.as_str(), "all" | "signing") {
        signing::run(&model_dir, 128, args.repeats.max(1) * 3).await?;
    }
    if matches!(args.only.as_str(), "all" | "tracing") {
        tracing::run(
            args.clients.max(1),
            args.tracing_seconds,
            args.repeats.max(1),
        )
        .await?;
    }
    Ok(())
}

fn decode(args: &BenchArgs, model_dir: &Path) -> Result<()> {
    if args.against_torch {
        return decode_against_torch(args, model_dir);
    }
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

/// The decode step of Kiln and of the PyTorch reference on the same weights, alternating.
fn decode_against_torch(args: &BenchArgs, model_dir: &Path) -> Result<()> {
    use kiln_benches::torch::{compare_decode, default_torch_python, TorchDecode, TorchMode};
    let python = args
        .torch_python
        .clone()
        .unwrap_or_else(default_torch_python);
    // The engine's thread pool takes every core; the reference gets as many.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut modes = vec![TorchMode::Eager];
    if args.torch_compile {
        modes.push(TorchMode::Compile);
    }
    let mut references = modes
        .iter()
        .map(|&mode| TorchDecode::start(&python, model_dir, threads, mode))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| {
            format!(
                "starting the PyTorch reference with {} (scripts/torch-venv.sh makes one)",
                python.display()
            )
        })?;
    let mut engine = cluster::build_engine(
        &worker_opts(&Some(model_dir.to_path_buf()), 64, &args.device),
        model_dir,
    )?;
    println!(
        "\n== decode step beside PyTorch ({}), 128x128 image, context ~160 tokens, {} rounds of {} steps ==",
        references[0].announced, args.repeats, args.steps
    );
    let rows = compare_decode(
        &mut engine,
        &mut references,
        &[1, 4, 16, 64],
        args.steps,
        args.repeats.max(1),
    )?;
    print!("{:>6} {:>9}", "batch", "kiln ms");
    for mode in &modes {
        print!(
            " {:>11} {:>13}",
            format!("torch {} ms", mode.name()),
            "torch / kiln"
        );
    }
    println!();
    for row in rows {
        let kiln = row.kiln.as_secs_f64() * 1e3;
        print!("{:>6} {kiln:>9.2}", row.batch);
        for (_, torch) in &row.torch {
            let torch = torch.as_secs_f64() * 1e3;
            print!(" {torch:>11.2} {:>12.2}x", torch / kiln);
        }
        println!();
    }
    Ok(())
}

/// `kiln` child processes of a benchmark run, each announcing its address; killed on drop.
#[derive(Default)]
struct Processes {
    children: Vec<std::process::Child>,
}

impl Processes {
    /// Starts `kiln args...` (quiet logs, plus `env`) and returns the `http://` address it
    /// announces on its first stdout line.
    fn spawn(&mut self, env: &[(&str, String)], args: &[&str]) -> Result<String> {
        use std::io::BufRead;
        let exe = std::env::current_exe().context("locating the kiln binary")?;
        let mut child = std::process::Command::new(exe)
            .args(args)
            .env("KILN_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting kiln {}", args[0]))?;
        let stdout = child.stdout.take().context("child stdout")?;
        self.children.push(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .rsplit_once("listening on ")
            .map(|(_, a)| a.to_string())
            .with_context(|| format!("kiln {} did not announce its address", args[0]))?;
        Ok(format!("http://{addr}"))
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Worker processes for a benchmark run.
struct WorkerProcesses {
    _processes: Processes,
    addresses: Vec<String>,
}

impl WorkerProcesses {
    fn start(
        model_dir: &Path,
        count: usize,
        max_batch: usize,
        speculation: Option<usize>,
    ) -> Result<Self> {
        let model = model_dir.to_str().context("model path is not UTF-8")?;
        let (max_batch, kv_blocks) = (max_batch.to_string(), (64 * 96).to_string());
        let speculation = speculation.map(|w| w.to_string());
        let mut processes = Processes::default();
        let mut addresses = Vec::new();
        for i in 0..count {
            let name = format!("bench-worker-{i}");
            let mut args = vec![
                "worker",
                "--listen",
                "127.0.0.1:0",
                "--name",
                &name,
                "--model",
                model,
                "--max-batch",
                &max_batch,
                "--kv-blocks",
                &kv_blocks,
            ];
            if let Some(window) = &speculation {
                args.extend(["--speculation", window]);
            }
            addresses.push(processes.spawn(&[], &args)?);
        }
        Ok(WorkerProcesses {
            _processes: processes,
            addresses,
        })
    }
}

/// What one benchmark run measured.
struct RunFigures {
    /// Seconds from the first arrival to the last answer.
    elapsed: f64,
    /// Seconds from arrival to image, of every admitted request.
    latencies: Vec<f64>,
    shed: usize,
    /// Scheduler time per worker-call time during the run.
    overhead: f64,
}

fn histogram_sums() -> (f64, f64) {
    (
        kiln_telemetry::SCHEDULER_DECISION_DURATION.get_sample_sum(),
        kiln_telemetry::SCHEDULER_WORKER_CALL_DURATION.get_sample_sum(),
    )
}

/// One open-loop run: `jobs` requests arrive `interval` apart at a scheduler driving worker
/// processes; shed requests are counted, not retried.
async fn open_loop_run(
    args: &BenchArgs,
    model_dir: &Path,
    max_batch: usize,
    batching: SchedulerConfig,
    jobs: usize,
    interval: Duration,
) -> Result<RunFigures> {
    let workers = WorkerProcesses::start(model_dir, args.workers, max_batch, args.speculation)?;
    let handle = kiln_scheduler::spawn(RuntimeConfig {
        batching,
        workers: workers.addresses.clone(),
        ..Default::default()
    });
    handle
        .wait_for_model(Duration::from_secs(60))
        .await
        .context("bench workers did not come up")?;
    // Wait until every worker is connected.
    for _ in 0..200 {
        if handle.status().await.map(|s| s.workers.len()).unwrap_or(0) == args.workers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (decisions_before, calls_before) = histogram_sums();
    let start = tokio::time::Instant::now();
    let runs = (0..jobs).map(|i| {
        let handle = handle.clone();
        let job = JobRequest {
            request_id: format!("bench-{i}"),
            user: format!("user-{i}"),
            tier: Tier::Pro,
            prompt: format!("a red triangle above a blue star, variant {i}"),
            width: args.size,
            height: args.size,
            sampling: Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed: i as u64 + 1,
                speculation: None,
            },
            trace: Default::default(),
            partial_images: 0,
        };
        // Open loop: job i arrives at i x interval, however slow the cluster is.
        let arrival = start + interval * i as u32;
        async move {
            tokio::time::sleep_until(arrival).await;
            let mut s = match handle.submit(job).await {
                Ok(s) => s,
                Err(kiln_scheduler::SchedulerError::Shed { .. }) => return Ok(None),
                Err(e) => anyhow::bail!("bench job refused: {e}"),
            };
            loop {
                match s.next().await {
                    Some(Ok(JobUpdate::Completed(_))) => {
                        return Ok(Some(arrival.elapsed().as_secs_f64()))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(kiln_scheduler::SchedulerError::Shed { .. })) => return Ok(None),
                    Some(Err(e)) => anyhow::bail!("bench job failed: {e}"),
                    None => anyhow::bail!("bench job stream ended without an image"),
                }
            }
        }
    });
    let results = futures::future::try_join_all(runs).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let (decisions_after, calls_after) = histogram_sums();
    let calls = calls_after - calls_before;
    let latencies: Vec<f64> = results.iter().flatten().copied().collect();
    Ok(RunFigures {
        elapsed,
        shed: results.len() - latencies.len(),
        latencies,
        overhead: if calls > 0.0 {
            (decisions_after - decisions_before) / calls
        } else {
            0.0
        },
    })
}

async fn batching(args: &BenchArgs, model_dir: &Path) -> Result<()> {
    let arrivals = match args.arrival_ms {
        0 => "all at once".to_string(),
        ms => format!("one every {ms} ms"),
    };
    println!(
        "\n== throughput: {} requests of {}x{} arriving {arrivals}, {} worker processes over gRPC ==",
        args.jobs, args.size, args.size, args.workers
    );
    let modes: [(&str, usize, bool); 3] = [
        ("one-at-a-time", 1, false),
        ("static batch", 64, true),
        ("continuous", 64, false),
    ];
    let mut runs: Vec<Vec<RunFigures>> = (0..modes.len()).map(|_| Vec::new()).collect();
    // Modes alternate inside each repetition so that machine noise hits them alike.
    for _ in 0..args.repeats {
        for (i, (_, max_batch, static_batching)) in modes.iter().enumerate() {
            let batching = SchedulerConfig {
                static_batching: *static_batching,
                shed_by_deadline: false,
                ..Default::default()
            };
            let interval = Duration::from_millis(args.arrival_ms);
            runs[i].push(
                open_loop_run(args, model_dir, *max_batch, batching, args.jobs, interval).await?,
            );
        }
    }
    println!(
        "{:>14} {:>10} {:>10} {:>17} {:>10} {:>10} {:>12}",
        "mode", "median s", "images/s", "vs one-at-a-time", "p50 lat s", "p99 lat s", "sched/step"
    );
    let base = median(runs[0].iter().map(|r| r.elapsed).collect());
    for (i, (name, _, _)) in modes.iter().enumerate() {
        let total = median(runs[i].iter().map(|r| r.elapsed).collect());
        let latencies: Vec<f64> = runs[i].iter().flat_map(|r| r.latencies.clone()).collect();
        let overhead = median(runs[i].iter().map(|r| r.overhead).collect());
        println!(
            "{name:>14} {total:>10.2} {:>10.2} {:>16.2}x {:>10.2} {:>10.2} {:>11.3}%",
            args.jobs as f64 / total,
            base / total,
            percentile(latencies.clone(), 0.5),
            percentile(latencies, 0.99),
            overhead * 100.0
        );
    }
    Ok(())
}

/// Offered load at `overload` times the measured capacity, with deadline shedding and without.
async fn shedding(args: &BenchArgs, model_dir: &Path) -> Result<()> {
    let batching = SchedulerConfig {
        shed_by_deadline: false,
        ..Default::default()
    };
    let capacity_run = open_loop_run(args, model_dir, 64, batching, 64, Duration::ZERO).await?;
    let capacity = 64.0 / capacity_run.elapsed;
    let rate = capacity * args.overload;
    let jobs = (rate * args.overload_seconds).round() as usize;
    let deadline = Duration::from_secs_f64(args.deadline);
    println!(
        "\n== shedding: capacity {capacity:.2} images/s ({}x{}, {} workers); offered {rate:.1}/s ({}x) for {} s = {jobs} requests; deadline {} s ==",
        args.size, args.size, args.workers, args.overload, args.overload_seconds, args.deadline
    );
    println!(
        "{:>16} {:>9} {:>6} {:>10} {:>10} {:>14} {:>10}",
        "mode", "admitted", "shed", "p50 lat s", "p99 lat s", "within deadline", "goodput/s"
    );
    let interval = Duration::from_secs_f64(1.0 / rate);
    for (name, shed_by_deadline) in [("deadline shedding", true), ("no shedding", false)] {
        let batching = SchedulerConfig {
            deadlines: [deadline; 4],
            shed_by_deadline,
            max_waiting: if shed_by_deadline { 4096 } else { usize::MAX },
            ..Default::default()
        };
        let run = open_loop_run(args, model_dir, 64, batching, jobs, interval).await?;
        let within = run
            .latencies
            .iter()
            .filter(|&&l| l <= args.deadline)
            .count();
        println!(
            "{name:>16} {:>9} {:>6} {:>10.2} {:>10.2} {:>13.0}% {:>10.2}",
            run.latencies.len(),
            run.shed,
            percentile(run.latencies.clone(), 0.5),
            percentile(run.latencies.clone(), 0.99),
            100.0 * within as f64 / run.latencies.len().max(1) as f64,
            within as f64 / run.elapsed
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
