//! The dashboards and alerts in `deploy/` are checked against the code: the alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), and every Kiln metric the
//! dashboard or the rules query is one the components export. And a live cluster's `/metrics` pages
//! pass `promtool check metrics` and follow the load: KV blocks rise while images are drawn and go
//! back to zero, and every shed request is counted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::{metric_names, promtool_check_metrics, Cluster, Options};
use kiln_proto::v1::GenerateRequest;
use tonic::Code;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool runs (scripts/bootstrap.sh --test installs Debian's prometheus)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid_and_fire_as_their_tests_expect() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
}

#[test]
fn dashboard_and_alerts_query_only_exported_metrics() {
    let dashboard = std::fs::read_to_string(deploy().join("grafana/kiln-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let used: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&alerts))
        .collect();
    let exported: BTreeSet<String> = kiln_telemetry::names::ALL
        .iter()
        .map(|n| n.to_string())
        .collect();
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queried but never exported: {unknown:?}"
    );
    // The dashboard covers what operators watch on launch day.
    for needed in [
        "kiln_worker_kv_blocks_used",
        "kiln_scheduler_queue_depth",
        "kiln_scheduler_shed_total",
        "kiln_gateway_quota_refusals_total",
        "kiln_gateway_request_duration_seconds",
    ] {
        assert!(
            metric_names(&dashboard).contains(needed),
            "dashboard lacks {needed}"
        );
    }
}

/// Sum of a metric's samples whose label sets contain every `label="value"` in `labels`.
fn sample_sum(page: &str, metric: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            (name == metric && labels.iter().all(|want| series.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_parse_and_follow_the_load() {
    // One worker with one batch slot and a scheduler that lets one job wait: a burst must shed.
    let cluster = Cluster::start_with(Options {
        metrics: true,
        worker_args: vec!["--max-batch".into(), "1".into()],
        scheduler_args: vec!["--max-waiting".into(), "1".into()],
        ..Default::default()
    })
    .await;
    for process in ["gateway", "scheduler", "worker-0"] {
        promtool_check_metrics(process, &cluster.scrape(process));
    }
    let used = |page: &str| sample_sum(page, "kiln_worker_kv_blocks_used", &[]);
    assert_eq!(used(&cluster.scrape("worker-0")), 0.0);

    let cluster = std::sync::Arc::new(cluster);
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                cluster
                    .generate(GenerateRequest {
                        prompt: format!("a red star number {i}"),
                        width: 64,
                        height: 64,
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    // Watch the worker while the burst runs.
    let mut peak = 0.0f64;
    let watch_until = Instant::now() + Duration::from_secs(30);
    while !burst.iter().all(|t| t.is_finished()) && Instant::now() < watch_until {
        peak = peak.max(used(&cluster.scrape("worker-0")));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut done, mut shed) = (0, 0);
    for task in burst {
        match task.await.unwrap() {
            Ok(_) => done += 1,
            Err(status) if status.code() == Code::ResourceExhausted => shed += 1,
            Err(status) => panic!("unexpected answer: {status:?}"),
        }
    }
    assert!(peak > 0.0, "KV blocks never rose during the burst");
    assert!(
        shed > 0,
        "a burst of 12 on one slot and one queue place shed nothing"
    );
    assert!(done > 0, "everything was shed");

    let worker = cluster.scrape("worker-0");
    let scheduler = cluster.scrape("scheduler");
    let gateway = cluster.scrape("gateway");
    assert_eq!(used(&worker), 0.0, "KV blocks still held after the burst");
    assert_eq!(
        sample_sum(
            &scheduler,
            "kiln_scheduler_shed_total",
            &["reason=\"queue_full\""]
        ),
        shed as f64
    );
    assert_eq!(
        sample_sum(&gateway, "kiln_gateway_requests_total", &["code=\"Ok\""]),
        done as f64
    );
    assert!(sample_sum(&worker, "kiln_worker_generated_tokens_total", &[]) > 0.0);
    for (process, page) in [
        ("gateway", &gateway),
        ("scheduler", &scheduler),
        ("worker-0", &worker),
    ] {
        promtool_check_metrics(process, page);
    }
}
