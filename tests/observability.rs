//! The dashboards and alerts in `deploy/` are checked against the code: the alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), and every Kiln metric the
//! dashboard or the rules query is one the components export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// `kiln_*` metric names in a text, without histogram series suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("kiln_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
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
