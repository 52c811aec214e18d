//! `kiln status`: the cluster view from a scheduler's `ClusterStatus`: who leads, each worker's
//! saturation (KV blocks and batch slots used, throughput, last call), each tier's queue, shed
//! counts and the predicted backlog.

use anyhow::{Context, Result};
use clap::Args;
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::ClusterStatusRequest;
use kiln_telemetry::env_names as env;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A scheduler replica (any: a standby names the leader, and the view is asked of it).
    #[arg(long, env = env::STATUS_SCHEDULER, default_value = "http://127.0.0.1:50061")]
    pub scheduler: String,
    /// Print the raw response as JSON-like debug output instead of tables.
    #[arg(long)]
    pub raw: bool,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let mut address = args.scheduler.clone();
    let mut status = ask(&address).await?;
    if !status.is_leader && !status.leader.is_empty() && status.leader != address {
        address = status.leader.clone();
        status = ask(&address).await?;
    }
    if args.raw {
        println!("{status:#?}");
        return Ok(());
    }
    let leader = if status.leader.is_empty() {
        &address
    } else {
        &status.leader
    };
    println!(
        "scheduler {address} ({}); leader {leader}",
        if status.is_leader {
            "leading"
        } else {
            "standby"
        }
    );
    println!(
        "throughput {:.0} image tokens/s; backlog {:.1} s; {} waiting, {} running",
        status.tokens_per_second, status.backlog_seconds, status.waiting, status.running
    );
    println!(
        "\n{:<16} {:<28} {:>12} {:>10} {:>10} {:>12}",
        "worker", "address", "kv used", "slots", "tok/s", "last call"
    );
    for w in &status.workers {
        let used = w.kv_blocks_total - w.kv_blocks_free;
        println!(
            "{:<16} {:<28} {:>5}/{:<6} {:>4}/{:<5} {:>10.0} {:>9.1} ms",
            w.name,
            w.address,
            used,
            w.kv_blocks_total,
            w.running,
            w.max_batch,
            w.tokens_per_second,
            w.last_call_ms
        );
    }
    println!(
        "\n{:<6} {:>8} {:>12} {:>10} {:>10}",
        "tier", "waiting", "oldest (s)", "shed", "deadline"
    );
    for t in &status.tiers {
        println!(
            "{:<6} {:>8} {:>12.1} {:>10} {:>9.0}s",
            t.tier, t.waiting, t.oldest_wait_seconds, t.shed_total, t.deadline_seconds
        );
    }
    Ok(())
}

async fn ask(address: &str) -> Result<kiln_proto::v1::ClusterStatusResponse> {
    let mut client = SchedulerClient::connect(address.to_string())
        .await
        .with_context(|| format!("connecting to the scheduler at {address}"))?;
    Ok(client
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner())
}
