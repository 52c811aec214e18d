//! `kiln status`: the cluster view from a scheduler's `ClusterStatus`: who leads, each worker's
//! saturation (KV blocks and batch slots used, throughput, last call), each tier's queue, shed
//! counts and the predicted backlog; `--watch` redraws it live.

use anyhow::{Context, Result};
use clap::Args;
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};
use kiln_telemetry::env_names as env;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A scheduler replica (any: a standby names the leader, and the view is asked of it).
    #[arg(long, env = env::STATUS_SCHEDULER, default_value = "http://127.0.0.1:50061")]
    pub scheduler: String,
    /// Print the raw response as JSON-like debug output instead of tables.
    #[arg(long, conflicts_with = "watch")]
    pub raw: bool,
    /// Redraw the view every SECONDS (default 1) until Ctrl-C: a live terminal view of the cluster.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    pub watch: Option<f64>,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let Some(interval) = args.watch else {
        let (address, status) = leader_view(&args.scheduler).await?;
        if args.raw {
            println!("{status:#?}");
        } else {
            print!("{}", render(&address, &status));
        }
        return Ok(());
    };
    let interval = std::time::Duration::from_secs_f64(interval.max(0.1));
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        // A failed poll is shown and retried: the view outlives a leader change or a restart.
        let frame = match leader_view(&args.scheduler).await {
            Ok((address, status)) => render(&address, &status),
            Err(e) => format!("scheduler {} unreachable: {e:#}\n", args.scheduler),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        // Clear the screen and home the cursor, then draw the frame.
        print!(
            "\x1b[2J\x1b[Hkiln status --watch (every {:.1} s, Ctrl-C to stop; unix time {now})\n\n{frame}",
            interval.as_secs_f64()
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

/// Asks `address`, then the leader it names when it is a standby.
async fn leader_view(address: &str) -> Result<(String, ClusterStatusResponse)> {
    let mut address = address.to_string();
    let mut status = ask(&address).await?;
    if !status.is_leader && !status.leader.is_empty() && status.leader != address {
        address = status.leader.clone();
        status = ask(&address).await?;
    }
    Ok((address, status))
}

/// A bar of `width` cells filled in proportion to `used / total`.
fn bar(used: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((used as f64 / total as f64) * width as f64).round() as usize
    }
    .min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The cluster view as text: leader, throughput, each worker's saturation and each tier's queue.
fn render(address: &str, status: &ClusterStatusResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = if status.leader.is_empty() {
        address
    } else {
        &status.leader
    };
    let role = if status.is_leader {
        "leading"
    } else {
        "standby"
    };
    let _ = writeln!(out, "scheduler {address} ({role}); leader {leader}");
    let _ = writeln!(
        out,
        "throughput {:.0} image tokens/s; backlog {:.1} s; {} waiting, {} running",
        status.tokens_per_second, status.backlog_seconds, status.waiting, status.running
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:<28} {:<27} {:<22} {:>10} {:>9} {:>12}",
        "worker", "address", "kv blocks used", "batch slots", "tok/s", "tok/pass", "last call"
    );
    for w in &status.workers {
        let used = w.kv_blocks_total.saturating_sub(w.kv_blocks_free);
        let _ = writeln!(
            out,
            "{:<16} {:<28} {} {:>5}/{:<6} {} {:>3}/{:<3} {:>10.0} {:>9.2} {:>9.1} ms",
            w.name,
            w.address,
            bar(used, w.kv_blocks_total, 12),
            used,
            w.kv_blocks_total,
            bar(w.running, w.max_batch, 12),
            w.running,
            w.max_batch,
            w.tokens_per_second,
            w.tokens_per_pass.max(1.0),
            w.last_call_ms
        );
    }
    if status.workers.is_empty() {
        let _ = writeln!(out, "(no workers)");
    }
    let _ = writeln!(
        out,
        "\n{:<6} {:>8} {:>12} {:>10} {:>10}",
        "tier", "waiting", "oldest (s)", "shed", "deadline"
    );
    for t in &status.tiers {
        let _ = writeln!(
            out,
            "{:<6} {:>8} {:>12.1} {:>10} {:>9.0}s",
            t.tier, t.waiting, t.oldest_wait_seconds, t.shed_total, t.deadline_seconds
        );
    }
    out
}

async fn ask(address: &str) -> Result<ClusterStatusResponse> {
    let mut client = SchedulerClient::connect(address.to_string())
        .await
        .with_context(|| format!("connecting to the scheduler at {address}"))?;
    Ok(client
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{TierQueue, WorkerStatus};

    #[test]
    fn bars_fill_in_proportion_and_never_overflow() {
        assert_eq!(bar(0, 8, 4), "[....]");
        assert_eq!(bar(4, 8, 4), "[##..]");
        assert_eq!(bar(8, 8, 4), "[####]");
        assert_eq!(bar(9, 8, 4), "[####]");
        assert_eq!(bar(3, 0, 4), "[....]");
    }

    #[test]
    fn the_view_shows_each_worker_and_tier() {
        let status = ClusterStatusResponse {
            is_leader: true,
            waiting: 3,
            running: 2,
            workers: vec![WorkerStatus {
                name: "gpu-7".into(),
                address: "http://10.0.0.7:50071".into(),
                kv_blocks_total: 100,
                kv_blocks_free: 25,
                running: 2,
                max_batch: 4,
                ..Default::default()
            }],
            tiers: vec![TierQueue {
                tier: "free".into(),
                waiting: 3,
                shed_total: 11,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render("http://s:1", &status);
        assert!(text.contains("(leading)"), "{text}");
        let worker = text.lines().find(|l| l.starts_with("gpu-7")).expect(&text);
        assert!(worker.contains("[#########...]    75/100"), "{worker}");
        assert!(worker.contains("[######......]   2/4"), "{worker}");
        let tier = text.lines().find(|l| l.starts_with("free")).expect(&text);
        assert!(tier.contains(" 11 "), "{tier}");
    }
}
