//! The `kiln` binary: parses flags and calls the library crates. Each subcommand is a thin launcher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_telemetry::env_names as env;
use tracing::info;

// mimalloc instead of the system allocator: the simulator's and the gateway's many small, short-lived
// allocations cost a fraction as much (measured in docs/load-testing.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod bench;
mod cluster;
mod config;
mod generate;
mod loadtest;
mod simulate;
mod status;
mod train;
mod verify;

use cluster::Shutdown;
use config::{BatchingOpts, EtcdOpts, GatewayOpts, TracingOpts, WorkerOpts};

/// Kiln: a cluster that serves autoregressive image generation.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    /// Config file (TOML): `[worker]`, `[scheduler]`, `[gateway]`, `[up]` tables of flag names.
    #[arg(long, global = true, env = env::CONFIG)]
    config: Option<PathBuf>,
    /// Where `kiln up` keeps its default model and development API key.
    #[arg(long, global = true, env = env::DATA_DIR, default_value = ".kiln")]
    data_dir: PathBuf,
    #[command(flatten)]
    tracing: TracingOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run gateway, scheduler and workers in one process on the embedded default.
    Up {
        /// Public gateway address.
        #[arg(long, env = env::UP_LISTEN, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Prometheus `/metrics` address, or `off` [default: 127.0.0.1:9464, or a free port
        /// when that one is taken]
        #[arg(long, env = env::UP_METRICS_LISTEN)]
        metrics_listen: Option<cluster::OptionalListen>,
        /// OpenAI-compatible HTTP API address (`/v1/images/generations`), or `off` [default:
        /// 127.0.0.1:8080, or a free port when that one is taken]
        #[arg(long, env = env::UP_HTTP_LISTEN)]
        http_listen: Option<cluster::OptionalListen>,
        /// Workers to start (each its own gRPC server on loopback).
        #[arg(long, env = env::UP_WORKERS, default_value_t = 1)]
        workers: usize,
        #[command(flatten)]
        worker: WorkerOpts,
        #[command(flatten)]
        batching: BatchingOpts,
        #[command(flatten)]
        gateway: GatewayOpts,
        /// Generate one image with this prompt through the gateway, write it, and stop.
        #[arg(long)]
        generate: Option<String>,
        /// Where `--generate` writes its PNG.
        #[arg(long, short, default_value = "kiln.png")]
        output: PathBuf,
        /// Image side in pixels for `--generate` (0: the model's default).
        #[arg(long, default_value_t = 0)]
        size: u32,
        /// Sampling seed for `--generate` (0: the gateway picks one and reports it).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run the public gateway against a scheduler in another process.
    Gateway {
        #[arg(long, env = env::GATEWAY_LISTEN, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Prometheus `/metrics` address, or `off` [default: 127.0.0.1:9461, or a free port
        /// when that one is taken]
        #[arg(long, env = env::GATEWAY_METRICS_LISTEN)]
        metrics_listen: Option<cluster::OptionalListen>,
        /// OpenAI-compatible HTTP API address (`/v1/images/generations`), or `off` [default: off]
        #[arg(long, env = env::GATEWAY_HTTP_LISTEN)]
        http_listen: Option<cluster::OptionalListen>,
        /// Scheduler address (ignored with --etcd: the gateway follows the elected leader).
        #[arg(long, env = env::GATEWAY_SCHEDULER, default_value = "http://127.0.0.1:50061")]
        scheduler: String,
        #[command(flatten)]
        gateway: GatewayOpts,
        #[command(flatten)]
        etcd: EtcdOpts,
    },
    /// Run the scheduler against workers in other processes.
    Scheduler {
        #[arg(long, env = env::SCHEDULER_LISTEN, default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// Prometheus `/metrics` address, or `off` [default: 127.0.0.1:9462, or a free port
        /// when that one is taken]
        #[arg(long, env = env::SCHEDULER_METRICS_LISTEN)]
        metrics_listen: Option<cluster::OptionalListen>,
        /// Worker addresses (repeat the flag, or comma-separate); with --etcd, workers registered
        /// there join and leave by themselves.
        #[arg(long = "worker", env = env::SCHEDULER_WORKERS, value_delimiter = ',')]
        workers: Vec<String>,
        /// Seconds a worker call may take before the worker is treated as lost.
        #[arg(long, env = env::SCHEDULER_CALL_TIMEOUT, default_value_t = 60)]
        call_timeout: u64,
        #[command(flatten)]
        batching: BatchingOpts,
        #[command(flatten)]
        etcd: EtcdOpts,
    },
    /// Run one worker serving the internal worker protocol.
    Worker {
        #[arg(long, env = env::WORKER_LISTEN, default_value = "127.0.0.1:50071")]
        listen: SocketAddr,
        /// Prometheus `/metrics` address, or `off` [default: 127.0.0.1:9463, or a free port
        /// when that one is taken]
        #[arg(long, env = env::WORKER_METRICS_LISTEN)]
        metrics_listen: Option<cluster::OptionalListen>,
        /// Worker name (default: worker-<port>).
        #[arg(long, env = env::WORKER_NAME)]
        name: Option<String>,
        #[command(flatten)]
        worker: WorkerOpts,
        #[command(flatten)]
        etcd: EtcdOpts,
    },
    /// Generate an image through a gateway, with a progress bar.
    Generate(generate::GenerateArgs),
    /// Model files.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Measure decode steps, continuous batching and scheduler decisions on this machine.
    Bench(bench::BenchArgs),
    /// Operator commands on the shared store: API keys and the tier table.
    Admin(admin::AdminArgs),
    /// The cluster view: leader, workers' saturation, queues per tier, shedding.
    Status(status::StatusArgs),
    /// Check an image's C2PA manifest: what it claims and whether it validates (exit 1 if not).
    Verify(verify::VerifyArgs),
    /// Rehearse a launch against a running cluster: a scenario's users and arrivals, open loop.
    Loadtest(loadtest::LoadtestArgs),
    /// Play a scenario in virtual time against N simulated GPUs; --find-workers plans capacity.
    Simulate(simulate::SimulateArgs),
    /// Train the image model on procedural scenes (codebook, transformer; resumable).
    Train(train::TrainArgs),
    /// Score a model's attribute binding on held-out prompts, and time its generation.
    Eval(train::EvalArgs),
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Write a randomly initialised model (config.json + model.safetensors).
    Init {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Preset: `20m` (~20M parameters, the default model) or `tiny` (tests).
        #[arg(long, default_value = "20m", value_parser = ["20m", "tiny"])]
        preset: String,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    // The config file only fills unset variables, so it must be read before clap reads them.
    let early = std::env::args()
        .skip_while(|a| a != "--config")
        .nth(1)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os(env::CONFIG).map(PathBuf::from));
    if let Some(path) = early {
        config::apply_config_file(&path)?;
    }
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The trace exporter runs on the runtime, so it starts inside it and is flushed before it stops.
    let tracing = {
        let _inside = runtime.enter();
        kiln_telemetry::init(&cli.tracing.config(cli.command.service()))
            .context("setting up logging and tracing (--otlp-endpoint, --trace-sample-ratio)")?
    };
    let result = runtime.block_on(run(cli));
    tracing.shutdown();
    result
}

impl Command {
    /// The `service.name` this command's spans carry.
    fn service(&self) -> &'static str {
        match self {
            Command::Up { .. } => "kiln",
            Command::Gateway { .. } => "kiln-gateway",
            Command::Scheduler { .. } => "kiln-scheduler",
            Command::Worker { .. } => "kiln-worker",
            _ => "kiln-cli",
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Up {
            listen,
            metrics_listen,
            http_listen,
            workers,
            worker,
            batching,
            gateway,
            generate,
            output,
            size,
            seed,
        } => {
            worker.validate()?;
            batching.validate()?;
            gateway.validate()?;
            if workers == 0 {
                anyhow::bail!("--workers ({}) must be at least 1", env::UP_WORKERS);
            }
            let keys = match &gateway.keys {
                Some(k) => k.clone(),
                None => cluster::ensure_dev_key(&cli.data_dir, &gateway.pepper)?,
            };
            kiln_scheduler::export_known_series();
            // The one scheduler of `kiln up` leads: there is no election.
            kiln_telemetry::SCHEDULER_LEADER.set(1);
            let (stop, shutdown) = Shutdown::on_signal();
            let metrics =
                cluster::serve_metrics(metrics_listen, cluster::metrics_defaults::UP, &shutdown)
                    .await?;
            let mut addresses = Vec::new();
            for i in 0..workers {
                let engine = cluster::build_worker_engine(&worker, &cli.data_dir)?;
                let listener = cluster::bind("127.0.0.1:0".parse()?, "worker listener").await?;
                addresses.push(format!("http://{}", listener.local_addr()?));
                tokio::spawn(kiln_worker::run(
                    format!("worker-{i}"),
                    engine,
                    listener,
                    shutdown.clone().wait(),
                ));
            }
            let handle = kiln_scheduler::spawn(kiln_scheduler::RuntimeConfig {
                batching: batching.to_config(),
                workers: addresses,
                ..Default::default()
            });
            let gw = cluster::build_gateway(
                &gateway,
                Some(&keys),
                Arc::new(handle.clone()),
                &cli.data_dir,
            )
            .await?;
            let gw = Arc::new(gw);
            let http = cluster::serve_http(
                http_listen,
                Some(cluster::HTTP_DEFAULT),
                gw.clone(),
                &shutdown,
            )
            .await?;
            let listener = cluster::bind(listen, "--listen").await?;
            let addr = listener.local_addr()?;
            let server = tokio::spawn(kiln_gateway::run(gw, listener, shutdown.clone().wait()));
            let model = handle
                .wait_for_model(Duration::from_secs(60))
                .await
                .context("no worker came up within 60 s")?;
            info!(gateway = %addr, workers, model = %model.model, "kiln is up");
            if let Some(prompt) = generate {
                let args = generate::GenerateArgs {
                    seed,
                    ..generate::GenerateArgs::for_local(prompt, output, size, addr)
                };
                let result = generate::run(args, &cli.data_dir).await;
                let _ = stop.send(true);
                let _ = server.await;
                return result;
            }
            let metrics = metrics.map_or("off".to_string(), |m| format!("on http://{m}/metrics"));
            let http = http.map_or("off".to_string(), |h| format!("on http://{h}/v1"));
            eprintln!("kiln is up: gateway on {addr}. OpenAI API {http}. Metrics {metrics}. Try: kiln generate \"a red triangle above a blue star\" -o out.png");
            server.await??;
            Ok(())
        }
        Command::Gateway {
            listen,
            metrics_listen,
            http_listen,
            scheduler,
            gateway,
            etcd,
        } => {
            gateway.validate()?;
            etcd.validate()?;
            let backend = match etcd.config() {
                Some(config) => kiln_gateway::backend::RemoteScheduler::following(
                    kiln_membership::follow_leader(config),
                ),
                None => kiln_gateway::backend::RemoteScheduler::new(&scheduler)
                    .map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?,
            };
            let gw = cluster::build_gateway(
                &gateway,
                gateway.keys.as_deref(),
                Arc::new(backend),
                &cli.data_dir,
            )
            .await?;
            let (_stop, shutdown) = Shutdown::on_signal();
            let metrics = cluster::serve_metrics(
                metrics_listen,
                cluster::metrics_defaults::GATEWAY,
                &shutdown,
            )
            .await?;
            let gw = Arc::new(gw);
            let http = cluster::serve_http(http_listen, None, gw.clone(), &shutdown).await?;
            let listener = cluster::bind(listen, "--listen").await?;
            cluster::announce("gateway", &listener)?;
            cluster::announce_metrics("gateway", metrics)?;
            if let Some(http) = http {
                eprintln!("kiln gateway OpenAI API on http://{http}/v1");
            }
            kiln_gateway::run(gw, listener, shutdown.wait()).await?;
            Ok(())
        }
        Command::Scheduler {
            listen,
            metrics_listen,
            workers,
            call_timeout,
            batching,
            etcd,
        } => {
            batching.validate()?;
            etcd.validate()?;
            if workers.is_empty() && etcd.etcd.is_empty() {
                anyhow::bail!(
                    "give --worker ({}) or --etcd ({}): the scheduler needs workers",
                    env::SCHEDULER_WORKERS,
                    env::ETCD
                );
            }
            let runtime = kiln_scheduler::RuntimeConfig {
                batching: batching.to_config(),
                workers,
                call_timeout: Duration::from_secs(call_timeout.max(1)),
                ..Default::default()
            };
            kiln_scheduler::export_known_series();
            let (_stop, shutdown) = Shutdown::on_signal();
            let metrics = cluster::serve_metrics(
                metrics_listen,
                cluster::metrics_defaults::SCHEDULER,
                &shutdown,
            )
            .await?;
            let listener = cluster::bind(listen, "--listen").await?;
            cluster::announce("scheduler", &listener)?;
            cluster::announce_metrics("scheduler", metrics)?;
            match etcd.config() {
                None => {
                    kiln_telemetry::SCHEDULER_LEADER.set(1);
                    let service = kiln_scheduler::service::SchedulerService::new(
                        kiln_scheduler::spawn(runtime),
                    );
                    kiln_scheduler::service::run(service, listener, shutdown.wait()).await?;
                }
                Some(config) => {
                    let me = etcd.advertised(listener.local_addr()?);
                    cluster::run_elected_scheduler(config, me, runtime, listener, shutdown).await?;
                }
            }
            Ok(())
        }
        Command::Worker {
            listen,
            metrics_listen,
            name,
            worker,
            etcd,
        } => {
            worker.validate()?;
            etcd.validate()?;
            let engine = cluster::build_worker_engine(&worker, &cli.data_dir)?;
            let listener = cluster::bind(listen, "--listen").await?;
            let name = name.unwrap_or_else(|| {
                format!(
                    "worker-{}",
                    listener.local_addr().map(|a| a.port()).unwrap_or(0)
                )
            });
            let (_stop, shutdown) = Shutdown::on_signal();
            let metrics = cluster::serve_metrics(
                metrics_listen,
                cluster::metrics_defaults::WORKER,
                &shutdown,
            )
            .await?;
            cluster::announce("worker", &listener)?;
            cluster::announce_metrics("worker", metrics)?;
            let registration = etcd.config().map(|config| {
                use kiln_model::Engine;
                let info = engine.info();
                let record = kiln_membership::WorkerRecord {
                    name: name.clone(),
                    address: etcd.advertised(listener.local_addr().expect("bound")),
                    model: info.model,
                    device: info.device,
                    kv_blocks: info.kv_blocks_total as u32,
                    block_size: info.block_size as u32,
                    max_batch: info.max_batch as u32,
                };
                tokio::spawn(kiln_membership::register_worker(
                    config,
                    record,
                    shutdown.clone().wait(),
                ))
            });
            kiln_worker::run(name, engine, listener, shutdown.wait()).await?;
            if let Some(registration) = registration {
                // Deregistration is quick; wait for it so the scheduler learns at once.
                let _ = tokio::time::timeout(Duration::from_secs(3), registration).await;
            }
            Ok(())
        }
        Command::Generate(args) => generate::run(args, &cli.data_dir).await,
        Command::Model {
            command: ModelCommand::Init { out, preset, seed },
        } => {
            let cfg = if preset == "tiny" {
                kiln_model::ModelConfig::tiny()
            } else {
                kiln_model::ModelConfig::random_20m()
            };
            kiln_model::Transformer::init_random(&cfg, seed, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} parameters) to {}",
                cfg.name,
                cfg.parameter_count(),
                out.display()
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args, &cli.data_dir).await,
        Command::Admin(args) => admin::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Loadtest(args) => {
            if loadtest::run(args).await? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Simulate(args) => simulate::run(args),
        Command::Train(args) => train::train(args),
        Command::Eval(args) => train::eval(args),
        Command::Verify(args) => {
            if verify::run(args, &cli.data_dir)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}
