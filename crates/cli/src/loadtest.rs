//! `kiln loadtest --scenario FILE`: rehearses a launch against a running cluster. It provisions an
//! API key per user of the scenario's population in the cluster's Redis, sends the arrivals open
//! loop to the gateway with a live progress line, and prints (and writes as JSON) the report, which
//! accounts for every request sent.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kiln_loadtest::{default_deadlines, driver, FaultWindow, Report, Scenario};
use kiln_quota::{RedisConfig, RedisStore};
use kiln_telemetry::env_names as env;

#[derive(Args, Debug)]
pub struct LoadtestArgs {
    /// Scenario file (TOML); `deploy/loadtest/launch-day.toml` is the shipped example.
    #[arg(long)]
    pub scenario: PathBuf,
    /// Gateway to load.
    #[arg(long, env = env::GATEWAY, default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// The cluster's Redis, where the users' API keys are created.
    #[arg(long, env = env::ADMIN_REDIS)]
    pub redis: String,
    /// Prefix of the cluster's Redis keys.
    #[arg(long, env = env::ADMIN_REDIS_PREFIX, default_value = "kiln:")]
    pub redis_prefix: String,
    /// The gateways' API-key pepper (a secret; never logged).
    #[arg(long, env = env::API_KEY_PEPPER, default_value = "", hide_env_values = true)]
    pub pepper: String,
    /// Prompt corpus, one per line (default: the shipped corpus).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "loadtest-report.json")]
    pub report: PathBuf,
    /// Seconds a request may take before it counts as an error.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// The scheduler's metrics address (`host:port` of its `--metrics-listen`): saturation and
    /// queue depth are read every second and charted beside the load.
    #[arg(long)]
    pub scheduler_metrics: Option<String>,
    /// A fault injected while the run goes, to draw over the report's charts: `NAME@FROM` (an
    /// instant, such as a kill) or `NAME@FROM-TO`, seconds from the run's start; repeatable.
    #[arg(long = "fault", value_name = "NAME@FROM[-TO]", value_parser = FaultWindow::parse)]
    pub faults: Vec<FaultWindow>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs the rehearsal; `Ok(false)` when some request is not accounted for.
pub async fn run(args: LoadtestArgs) -> Result<bool> {
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading --scenario {}", args.scenario.display()))?;
    let scenario = Scenario::from_toml(&text)
        .with_context(|| format!("--scenario {}", args.scenario.display()))?;
    let prompts = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompts {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => kiln_loadtest::shipped_prompts(),
    };
    anyhow::ensure!(!prompts.is_empty(), "--prompts: the corpus is empty");
    let mut config = RedisConfig::new(args.redis.clone());
    config.prefix = args.redis_prefix.clone();
    let store = RedisStore::new(config).map_err(|e| anyhow::anyhow!("--redis: {e}"))?;
    let users = scenario.users();
    eprintln!(
        "{}: {} users, {:.0} s, about {:.0} requests; provisioning keys",
        scenario.name,
        users.len(),
        scenario.duration(),
        scenario.expected_requests()
    );
    let keys = driver::provision_keys(&store, &args.pepper, &scenario, &users).await?;
    let arrivals = scenario.arrivals(prompts.len());
    let run = driver::run(
        &args.gateway,
        &users,
        &keys,
        &prompts,
        arrivals,
        &driver::RunOptions {
            request_timeout: Duration::from_secs_f64(args.request_timeout),
            progress: !args.quiet,
            scheduler_metrics: args.scheduler_metrics.clone(),
        },
    )
    .await?;
    let mut report = Report::build(&scenario, run.sent, &run.outcomes, &default_deadlines());
    report.add_saturation(&run.saturation);
    report.add_faults(args.faults.iter().cloned());
    print!("{}", report.summary());
    let (p50, p99, max) = run.send_lag;
    println!(
        "offered {:.0} requests/s over {:.1} s (the scenario asks {:.0}/s on average); send lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        run.sent as f64 / run.sending_seconds.max(1e-9),
        run.sending_seconds,
        scenario.expected_requests() / scenario.duration(),
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    let html = args.report.with_extension("html");
    std::fs::write(&html, kiln_loadtest::html::render(&report))
        .with_context(|| format!("writing {}", html.display()))?;
    eprintln!("charts written to {}", html.display());
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing --report {}", args.report.display()))?;
    eprintln!("report written to {}", args.report.display());
    Ok(report.accounted)
}
