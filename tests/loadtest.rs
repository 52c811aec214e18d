//! A short launch-day spike against a real cluster (gateway, scheduler, simulated-GPU workers
//! registered in etcd, Redis):
//! `kiln loadtest` accounts for every request, no user gets more images than its quota, and the
//! spike sheds free requests while pro requests are never shed.

use std::process::Command;

use kiln_e2e::{kiln_bin, Cluster, Options};
use kiln_testkit::{EtcdServer, RedisServer};

/// Free users get 2 images a day; pro users are not limited here.
const TIERS: &str = r#"
[tiers.free]
windows = [{ seconds = 86400, images = 2 }]
[tiers.plus]
windows = [{ seconds = 86400, images = 100000 }]
[tiers.pro]
windows = [{ seconds = 86400, images = 100000 }]
[tiers.team]
windows = [{ seconds = 86400, images = 100000 }]
org_pool = true
"#;

const SCENARIO: &str = r#"
name = "spike-e2e"
seed = 11
[population]
users = 60
tiers = { free = 0.8, pro = 0.2 }
[requests]
sizes = [64]
[[phases]]
name = "baseline"
seconds = 2
rate = 4
[[phases]]
name = "spike"
seconds = 4
rate = 60
[[phases]]
name = "decay"
seconds = 2
rate = 4
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_is_accounted_for_quotas_hold_and_only_free_is_shed() {
    let redis = RedisServer::start();
    let etcd = EtcdServer::start();
    let cluster = Cluster::start_with(Options {
        etcd: Some(etcd.endpoint()),
        workers: 2,
        redis: Some(redis.url()),
        tiers: TIERS.into(),
        // Two simulated GPUs of 4 slots each (about 25 images/s), a short queue: the spike's free
        // requests (about 48/s) must be shed, its pro requests (about 12/s) never.
        worker_args: [
            "--backend",
            "simulated",
            "--step-cost",
            "h100-20m",
            "--max-batch",
            "4",
        ]
        .map(String::from)
        .to_vec(),
        // Decode calls of up to 16 steps: a quarter of the calls, so the time each spends outside
        // the GPU (round trips, the scheduler's turn on 2 busy cores) moves capacity a quarter as much.
        scheduler_args: ["--max-waiting", "12", "--max-steps-per-call", "16"]
            .map(String::from)
            .to_vec(),
        metrics: true,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("spike.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let report_path = dir.path().join("report.json");
    let out = Command::new(kiln_bin())
        .args([
            "loadtest",
            "--quiet",
            "--gateway",
            &cluster.gateway,
            "--redis",
            &redis.url(),
            "--scheduler-metrics",
            &cluster.metrics["scheduler"],
            "--fault",
            "an operator's drill@2-4",
        ])
        .arg("--scenario")
        .arg(&scenario)
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln loadtest: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["accounted"], true, "{stdout}");
    let outcomes = &report["totals"]["outcomes"];
    let count = |k: &str| outcomes[k].as_u64().unwrap_or(0);
    let sum = count("completed")
        + count("shed")
        + count("quota_refused")
        + count("policy_refused")
        + count("error");
    assert_eq!(sum, report["sent"].as_u64().unwrap(), "{stdout}");
    assert_eq!(count("error"), 0, "{stdout}");
    assert!(
        count("quota_refused") > 0,
        "free users ran out of images: {stdout}"
    );
    assert!(
        report["most_images_per_user"]["free"].as_u64().unwrap_or(0) <= 2,
        "a free user got more than its 2 images: {stdout}"
    );
    let shed_of = |tier: &str| -> u64 {
        report["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|phase| phase[1][tier]["outcomes"]["shed"].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(
        shed_of("free") > 0,
        "the spike shed no free request: {stdout}"
    );
    assert_eq!(shed_of("pro"), 0, "pro requests were shed: {stdout}");
    // The scheduler's saturation was read during the run, and the spike filled the GPUs.
    let peak = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["saturation"].as_f64())
        .fold(0.0f64, f64::max);
    assert!(peak > 0.5, "saturation never rose above {peak}: {stdout}");
    let html = std::fs::read_to_string(report_path.with_extension("html")).unwrap();
    assert!(
        html.contains("batch slots in use"),
        "the HTML report charts saturation"
    );
    assert!(
        html.contains("<title>an operator's drill</title>")
            && html.contains("<td>F1</td><td>2.0</td><td>4.0</td>"),
        "the HTML report marks the --fault window"
    );
    assert_eq!(report["faults"][0]["from"], 2.0);

    // What each worker call cost beyond the engine's time on this machine (the gRPC round trip and
    // the processes' turns on 2 shared cores): the simulator is told, as it is told the step costs.
    let calls = histogram(
        &cluster.scrape("scheduler"),
        "kiln_scheduler_worker_call_duration_seconds",
    );
    let engine: f64 = ["worker-0", "worker-1"]
        .iter()
        .map(|w| histogram(&cluster.scrape(w), "kiln_worker_step_duration_seconds").0)
        .sum();
    assert!(calls.1 > 0.0, "the scheduler made no worker call");
    let overhead_ms = ((calls.0 - engine) / calls.1 * 1000.0).max(0.0);
    eprintln!(
        "worker calls: {} taking {:.2} s, engine {engine:.2} s: {overhead_ms:.2} ms overhead per call",
        calls.1, calls.0
    );

    // The simulator, given the same scenario, tiers, fleet, scheduler settings and call overhead,
    // predicts the same outcome counts within the stated tolerance: max(8 requests, 25 %) per outcome.
    let tiers = dir.path().join("tiers.toml");
    std::fs::write(&tiers, TIERS).unwrap();
    let simulated_path = dir.path().join("simulated.json");
    let out = Command::new(kiln_bin())
        .args([
            "simulate",
            "--workers",
            "2",
            "--step-cost",
            "h100-20m",
            "--max-batch",
            "4",
            "--kv-blocks",
            "512",
            "--max-waiting",
            "12",
            "--max-steps-per-call",
            "16",
            "--call-overhead-ms",
            &format!("{overhead_ms:.3}"),
        ])
        .arg("--scenario")
        .arg(&scenario)
        .arg("--tiers")
        .arg(&tiers)
        .arg("--report")
        .arg(&simulated_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let simulated: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&simulated_path).unwrap()).unwrap();
    assert_eq!(simulated["sent"], report["sent"], "the same schedule");
    for kind in ["completed", "shed", "quota_refused"] {
        let real = count(kind) as f64;
        let predicted = simulated["totals"]["outcomes"][kind].as_u64().unwrap_or(0) as f64;
        eprintln!("agreement {kind}: real {real}, simulated {predicted}");
        assert!(
            (real - predicted).abs() <= (0.25 * real).max(8.0),
            "{kind}: real {real}, simulated {predicted}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Sum and count of a histogram over all its label sets, from a `/metrics` page.
fn histogram(page: &str, name: &str) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        let series = format!("{name}{suffix}");
        page.lines()
            .filter(|l| {
                l.strip_prefix(&series)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    (total("_sum"), total("_count"))
}
