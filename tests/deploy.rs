//! The deployment files are checked with the tools operators use and against the code: the Helm
//! chart lints and renders with every values file under `helm/kiln/ci/` (Helm's own library, through
//! helm-python-sdk), every rendered manifest validates against the Kubernetes schemas
//! (kubernetes-validate --strict), the YAML passes yamllint, and what the chart, the compose file and
//! the Dockerfiles run is the real `kiln` binary with real subcommands, flags, environment variables
//! and files. No cluster and no Docker engine are needed; `scripts/bootstrap.sh --test` installs the
//! tools from PyPI.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The values files the chart is rendered with (`helm/kiln/ci/<name>-values.yaml`).
const VALUES: &[&str] = &["default", "external", "cpu", "no-monitoring"];

/// Kubernetes versions the manifests must validate against: the chart's oldest (Chart.yaml
/// `kubeVersion`; gRPC probes are GA from 1.27) and the newest kubernetes-validate knows.
const KUBE_VERSIONS: &[&str] = &["1.27.0", "1.37.0"];

/// Custom resources of the Prometheus Operator: no Kubernetes schema covers them, so their
/// structure is asserted below instead.
const OPERATOR_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("helm/kiln")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool in the repository root and returns its output, failing with it when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} runs (scripts/bootstrap.sh --test installs it): {e}")
        });
    assert!(out.status.success(), "{program} {args:?}:\n{}", text(&out));
    text(&out)
}

/// The chart's checking adapter, run with Debian's interpreter (where bootstrap installs the tools).
fn check_chart(args: &[&str]) -> String {
    let script = chart().join("ci/check_chart.py");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    run("/usr/bin/python3", &all)
}

/// One YAML file as JSON.
fn yaml(path: &Path) -> Value {
    let out = check_chart(&["yaml2json", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn values_file(name: &str) -> String {
    chart()
        .join(format!("ci/{name}-values.yaml"))
        .to_string_lossy()
        .into_owned()
}

/// The chart rendered with every values file: (directory of `<name>-values.yaml` streams, manifests).
fn render() -> (tempfile::TempDir, BTreeMap<&'static str, Vec<Value>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "render".to_owned(),
        chart().to_string_lossy().into_owned(),
        dir.path().to_string_lossy().into_owned(),
    ];
    args.extend(VALUES.iter().map(|v| values_file(v)));
    check_chart(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut out = BTreeMap::new();
    for name in VALUES {
        let json = read(&dir.path().join(format!("{name}-values.json")));
        let docs: Vec<Value> = serde_json::from_str(&json).unwrap();
        assert!(!docs.is_empty(), "{name}: nothing rendered");
        out.insert(*name, docs);
    }
    (dir, out)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn kinds(docs: &[Value], kind: &str) -> Vec<String> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The value of `--flag=value` in a container's arguments.
fn flag(c: &Value, name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    strings(&c["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

/// Whether `selector` (matchLabels-style map) selects an object with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet"];

fn workloads(docs: &[Value]) -> impl Iterator<Item = &Value> {
    docs.iter()
        .filter(|d| WORKLOADS.contains(&d["kind"].as_str().unwrap_or_default()))
}

/// Kiln's own containers (image `kiln:*`) of every workload and Job.
fn kiln_containers(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| {
            WORKLOADS.contains(&d["kind"].as_str().unwrap_or_default()) || d["kind"] == "Job"
        })
        .flat_map(|d| {
            let name = d["metadata"]["name"].as_str().unwrap().to_owned();
            d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["image"].as_str().unwrap_or_default().starts_with("kiln:"))
                .map(move |c| (name.clone(), c))
        })
        .collect()
}

#[test]
fn chart_lints_with_every_values_file() {
    let files: Vec<String> = VALUES.iter().map(|v| values_file(v)).collect();
    let mut args = vec!["lint", "helm/kiln"];
    args.extend(files.iter().map(String::as_str));
    let out = check_chart(&args);
    let ok = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(ok, VALUES.len(), "{out}");
}

#[test]
fn every_rendered_manifest_validates_against_the_kubernetes_schemas() {
    let (dir, rendered) = render();
    for (name, docs) in &rendered {
        let file = dir.path().join(format!("{name}-values.yaml"));
        // As a module of Debian's interpreter: a `pip --user` install puts no script on PATH.
        let mut args = vec!["-m", "kubernetes_validate", "--strict", "--no-warn"];
        for v in KUBE_VERSIONS {
            args.extend(["-k", v]);
        }
        args.push(file.to_str().unwrap());
        let out = run("/usr/bin/python3", &args);
        assert!(!out.contains("ERROR"), "{name}:\n{out}");
        // Every manifest was validated (a kind without a schema would only warn), against each version.
        let operator = docs
            .iter()
            .filter(|d| OPERATOR_KINDS.contains(&d["kind"].as_str().unwrap()))
            .count();
        let passed = out
            .lines()
            .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
            .count();
        assert_eq!(
            passed,
            (docs.len() - operator) * KUBE_VERSIONS.len(),
            "{name}: not every manifest was validated:\n{out}"
        );
    }
}

#[test]
fn default_chart_runs_the_cluster_of_the_issue() {
    let (_dir, rendered) = render();
    let docs = &rendered["default"];

    // Gateways: a Deployment behind a Service, scaled by an HPA, with the pepper from a Secret.
    let gateway = find(docs, "Deployment", "kiln-gateway");
    let hpa = find(docs, "HorizontalPodAutoscaler", "kiln-gateway");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "kiln-gateway");
    assert!(
        gateway["spec"].get("replicas").is_none(),
        "the HPA owns the replica count"
    );
    let gw = container(gateway, "gateway");
    let pepper = &env(gw, "KILN_API_KEY_PEPPER").expect("pepper env")["valueFrom"]["secretKeyRef"];
    let secret = find(docs, "Secret", pepper["name"].as_str().unwrap());
    assert!(secret["data"][pepper["key"].as_str().unwrap()].is_string());
    assert_eq!(
        secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the pepper outlives the release: every key digest depends on it"
    );
    assert_eq!(
        env(gw, "KILN_GATEWAY_REDIS").unwrap()["value"],
        "redis://kiln-redis:6379/"
    );
    find(docs, "StatefulSet", "kiln-redis");
    find(docs, "Service", "kiln-redis");
    find(docs, "StatefulSet", "kiln-etcd");
    find(docs, "Service", "kiln-etcd");

    // Two scheduler replicas electing a leader in etcd; gateways and workers use the same etcd.
    let scheduler = find(docs, "Deployment", "kiln-scheduler");
    assert_eq!(scheduler["spec"]["replicas"], 2);
    let worker = find(docs, "StatefulSet", "kiln-worker");
    let w = container(worker, "worker");
    let s = container(scheduler, "scheduler");
    for c in [gw, s, w] {
        assert_eq!(flag(c, "--etcd").as_deref(), Some("http://kiln-etcd:2379"));
    }
    assert!(flag(s, "--advertise").unwrap().contains("$(POD_IP)"));
    assert!(env(s, "POD_IP").is_some(), "--advertise expands $(POD_IP)");

    // GPU workers: the CUDA image, cuda:0 and one nvidia.com/gpu.
    assert!(w["image"].as_str().unwrap().ends_with("-cuda"));
    assert_eq!(flag(w, "--device").as_deref(), Some("cuda:0"));
    assert_eq!(w["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert!(worker["spec"]["template"]["spec"]["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "nvidia.com/gpu"));

    // Tiers and policy: ConfigMaps with the shipped files, mounted where the flags point.
    for (cm, key, original, flag_name) in [
        (
            "kiln-tiers",
            "tiers.toml",
            "crates/quota/tiers.toml",
            "--tiers",
        ),
        (
            "kiln-policy",
            "artists.toml",
            "crates/policy/data/artists.toml",
            "--policy",
        ),
    ] {
        let data = find(docs, "ConfigMap", cm)["data"][key]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(data, read(&root().join(original)).trim_end(), "{cm}");
        let path = flag(gw, flag_name).unwrap();
        assert_mounted(gateway, gw, &path, "configMap", "name", cm, key);
    }

    // Every Kiln container: gRPC health probes on its gRPC port, resource requests, non-root.
    for (workload, c) in kiln_containers(docs) {
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{workload}: cpu request"
        );
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{workload}: memory request"
        );
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        if workload.ends_with("store-tiers") {
            continue;
        }
        let grpc = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "grpc")
            .unwrap_or_else(|| panic!("{workload}: grpc port"))["containerPort"]
            .clone();
        let listen = flag(c, "--listen").unwrap();
        assert!(
            listen.ends_with(&format!(":{grpc}")),
            "{workload}: listens on {listen}, port {grpc}"
        );
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"], grpc,
                "{workload}: {probe} on grpc.health.v1"
            );
        }
    }
    for w in workloads(docs) {
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{}",
            w["metadata"]["name"]
        );
    }

    assert_selectors_and_references(docs, &[]);
    assert_monitoring(docs);

    // Disruption budgets cover gateways, schedulers and workers.
    let pdbs: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "PodDisruptionBudget")
        .collect();
    for p in [gateway, scheduler, worker] {
        let labels = &p["spec"]["template"]["metadata"]["labels"];
        assert!(
            pdbs.iter()
                .any(|b| selects(&b["spec"]["selector"]["matchLabels"], labels)),
            "no PodDisruptionBudget for {}",
            p["metadata"]["name"]
        );
    }

    // The tier table is stored in Redis after install and upgrade.
    let job = find(docs, "Job", "kiln-store-tiers");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"],
        "post-install,post-upgrade"
    );
}

/// `path` is a file of a volume of `kind` (configMap/secret) named `name` mounted in container `c`.
fn assert_mounted(
    workload: &Value,
    c: &Value,
    path: &str,
    kind: &str,
    name_key: &str,
    name: &str,
    key: &str,
) {
    let volumes = workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let mounted = c["volumeMounts"].as_array().unwrap().iter().any(|m| {
        let dir = m["mountPath"].as_str().unwrap();
        path.strip_prefix(dir).and_then(|f| f.strip_prefix('/')) == Some(key)
            && volumes
                .iter()
                .any(|v| v["name"] == m["name"] && v[kind][name_key] == name)
    });
    assert!(mounted, "{path} is not {key} of {kind} {name}");
}

/// Every Service, PDB and StatefulSet selects pods that exist; every ConfigMap, Secret and claim a
/// pod or Service refers to is rendered (or is one the values name as existing).
fn assert_selectors_and_references(docs: &[Value], existing: &[&str]) {
    let pod_labels: Vec<&Value> = workloads(docs)
        .map(|w| &w["spec"]["template"]["metadata"]["labels"])
        .collect();
    for d in docs {
        let selector = match d["kind"].as_str().unwrap() {
            "Service" => &d["spec"]["selector"],
            "PodDisruptionBudget" | "Deployment" | "StatefulSet" => {
                &d["spec"]["selector"]["matchLabels"]
            }
            _ => continue,
        };
        assert!(
            pod_labels.iter().any(|l| selects(selector, l)),
            "{} {} selects no pods",
            d["kind"],
            d["metadata"]["name"]
        );
    }
    let names = |kind: &str| kinds(docs, kind);
    let (configmaps, secrets) = (names("ConfigMap"), names("Secret"));
    let known = |list: &[String], n: &str| list.iter().any(|x| x == n) || existing.contains(&n);
    for d in docs
        .iter()
        .filter(|d| WORKLOADS.contains(&d["kind"].as_str().unwrap()) || d["kind"] == "Job")
    {
        let pod = &d["spec"]["template"]["spec"];
        for v in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(n) = v["configMap"]["name"].as_str() {
                assert!(known(&configmaps, n), "ConfigMap {n} not rendered");
            }
            if let Some(n) = v["secret"]["secretName"].as_str() {
                assert!(known(&secrets, n), "Secret {n} not rendered");
            }
            if let Some(n) = v["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(existing.contains(&n), "claim {n} not named in the values");
            }
        }
        for c in pod["containers"].as_array().unwrap() {
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(n) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    assert!(known(&secrets, n), "Secret {n} not rendered");
                }
            }
            let mounts: Vec<&str> = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m["name"].as_str().unwrap())
                .collect();
            let declared: Vec<&str> = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v["name"].as_str().unwrap())
                .chain(
                    d["spec"]["volumeClaimTemplates"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| t["metadata"]["name"].as_str().unwrap()),
                )
                .collect();
            for m in mounts {
                assert!(
                    declared.contains(&m),
                    "{}: volume {m} not declared",
                    d["metadata"]["name"]
                );
            }
        }
    }
}

/// The ServiceMonitor scrapes a `metrics` port of gateway, scheduler and worker Services, and the
/// PrometheusRule holds exactly the rules of deploy/prometheus/alerts.yml.
fn assert_monitoring(docs: &[Value]) {
    let monitor = find(docs, "ServiceMonitor", "kiln");
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    let mut components = Vec::new();
    for svc in docs.iter().filter(|d| d["kind"] == "Service") {
        if !selects(selector, &svc["metadata"]["labels"]) {
            continue;
        }
        let port = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "metrics")
            .unwrap_or_else(|| panic!("{}: no metrics port", svc["metadata"]["name"]));
        // The target port is a container port named so in the selected pods, and the process
        // serves /metrics on it.
        for w in workloads(docs) {
            if !selects(
                &svc["spec"]["selector"],
                &w["spec"]["template"]["metadata"]["labels"],
            ) {
                continue;
            }
            let c = &w["spec"]["template"]["spec"]["containers"][0];
            let p = c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == port["targetPort"])
                .expect("named target port");
            let listen = flag(c, "--metrics-listen").expect("--metrics-listen");
            assert!(listen.ends_with(&format!(":{}", p["containerPort"])));
        }
        components.push(svc["metadata"]["labels"]["app.kubernetes.io/component"].clone());
    }
    for c in ["gateway", "scheduler", "worker"] {
        assert!(components.contains(&Value::from(c)), "{c} is not scraped");
    }
    let rule = find(docs, "PrometheusRule", "kiln");
    assert_eq!(
        rule["spec"],
        yaml(&root().join("deploy/prometheus/alerts.yml"))
    );
}

#[test]
fn values_choose_gpu_stores_and_monitoring() {
    let (_dir, rendered) = render();

    // External Redis and etcd: none bundled, the URL from the named Secret, the endpoints given.
    let docs = &rendered["external"];
    assert!(
        kinds(docs, "StatefulSet") == ["kiln-worker"],
        "{:?}",
        kinds(docs, "StatefulSet")
    );
    let gateway = find(docs, "Deployment", "kiln-gateway");
    let gw = container(gateway, "gateway");
    let redis = &env(gw, "KILN_GATEWAY_REDIS").unwrap()["valueFrom"]["secretKeyRef"];
    assert_eq!(redis["name"], "kiln-redis");
    assert_eq!(
        flag(gw, "--etcd").unwrap(),
        "http://etcd-0.etcd:2379,http://etcd-1.etcd:2379,http://etcd-2.etcd:2379"
    );
    assert_eq!(
        env(gw, "KILN_API_KEY_PEPPER").unwrap()["valueFrom"]["secretKeyRef"]["name"],
        "kiln-pepper"
    );
    assert!(
        kinds(docs, "Secret").is_empty(),
        "existing Secrets are not rendered"
    );
    assert_mounted(
        gateway,
        gw,
        &flag(gw, "--c2pa-cert-chain").unwrap(),
        "secret",
        "secretName",
        "kiln-c2pa",
        "chain.pem",
    );
    let worker = find(docs, "StatefulSet", "kiln-worker");
    assert_eq!(worker["spec"]["replicas"], 8);
    let w = container(worker, "worker");
    assert_eq!(flag(w, "--model").as_deref(), Some("/models/kiln-20m"));
    assert_selectors_and_references(
        docs,
        &["kiln-redis", "kiln-pepper", "kiln-c2pa", "kiln-models"],
    );
    assert_monitoring(docs);

    // CPU only: no GPU anywhere, the CPU image, a fixed gateway count, inline C2PA credentials.
    let docs = &rendered["cpu"];
    let all = serde_json::to_string(docs).unwrap();
    assert!(!all.contains("nvidia.com/gpu"));
    let w = container(find(docs, "StatefulSet", "kiln-worker"), "worker");
    assert_eq!(flag(w, "--device").as_deref(), Some("cpu"));
    assert!(!w["image"].as_str().unwrap().contains("cuda"));
    assert!(kinds(docs, "HorizontalPodAutoscaler").is_empty());
    let gateway = find(docs, "Deployment", "kiln-gateway");
    assert_eq!(gateway["spec"]["replicas"], 1);
    let gw = container(gateway, "gateway");
    assert_mounted(
        gateway,
        gw,
        &flag(gw, "--c2pa-private-key").unwrap(),
        "secret",
        "secretName",
        "kiln-c2pa",
        "key.pem",
    );
    assert!(find(docs, "Secret", "kiln-c2pa")["data"]["key.pem"].is_string());
    assert_selectors_and_references(docs, &[]);

    // No monitoring, budgets or hook; three schedulers; tiers and policy from the values.
    let docs = &rendered["no-monitoring"];
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
        "Job",
    ] {
        assert!(kinds(docs, kind).is_empty(), "{kind} rendered");
    }
    assert!(!kinds(docs, "ConfigMap").contains(&"kiln-dashboard".to_owned()));
    assert_eq!(
        find(docs, "Deployment", "kiln-scheduler")["spec"]["replicas"],
        3
    );
    let tiers = find(docs, "ConfigMap", "kiln-tiers")["data"]["tiers.toml"]
        .as_str()
        .unwrap();
    assert!(tiers.contains("images = 10") && !tiers.contains("[tiers.pro]"));
    assert!(
        find(docs, "ConfigMap", "kiln-policy")["data"]["artists.toml"]
            .as_str()
            .unwrap()
            .contains("Example Living Artist")
    );
    assert_selectors_and_references(docs, &[]);
}

#[test]
fn chart_copies_equal_their_sources() {
    for (copy, original) in [
        ("helm/kiln/files/tiers.toml", "crates/quota/tiers.toml"),
        (
            "helm/kiln/files/artists.toml",
            "crates/policy/data/artists.toml",
        ),
        ("helm/kiln/files/alerts.yml", "deploy/prometheus/alerts.yml"),
        (
            "helm/kiln/files/kiln-dashboard.json",
            "deploy/grafana/kiln-dashboard.json",
        ),
    ] {
        assert!(
            read(&root().join(copy)) == read(&root().join(original)),
            "{copy} differs from {original}: copy it again (`cp {original} {copy}`)"
        );
    }
}

#[test]
fn yaml_passes_yamllint() {
    // The repository's .yamllint; templates are skipped (not YAML before rendering).
    run(
        "/usr/bin/python3",
        &[
            "-m",
            "yamllint",
            "--strict",
            "deploy/compose.yaml",
            "deploy/compose",
            "deploy/prometheus",
            "helm/kiln",
        ],
    );
}

/// `kiln <path> --help`, cached.
struct Help(HashMap<Vec<String>, Option<String>>);

impl Help {
    fn get(&mut self, path: &[String]) -> Option<&str> {
        self.0
            .entry(path.to_vec())
            .or_insert_with(|| {
                let out = Command::new(kiln_e2e::kiln_bin())
                    .args(path)
                    .arg("--help")
                    .output()
                    .expect("kiln runs");
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .as_deref()
    }

    /// Subcommands listed under "Commands:" in a help text.
    fn lists_command(help: &str, word: &str) -> bool {
        help.split("Commands:")
            .nth(1)
            .and_then(|rest| rest.split("\n\n").next())
            .is_some_and(|list| {
                list.lines()
                    .any(|l| l.split_whitespace().next() == Some(word))
            })
    }

    fn has_flag(help: &str, flag: &str) -> bool {
        help.lines().any(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .filter(|r| r.chars().nth(1) == Some(','))
                .map(|r| r[2..].trim_start())
                .unwrap_or(l);
            l.strip_prefix(flag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })
    }

    /// Asserts that `argv` (after `kiln`) names real subcommands and flags, and `env` real
    /// variables of those commands.
    fn check(&mut self, place: &str, argv: &[String], env: &[String]) {
        let mut path = vec![argv[0].clone()];
        let mut texts = vec![self
            .get(&path)
            .unwrap_or_else(|| panic!("{place}: `kiln {}` is not a command", argv[0]))
            .to_owned()];
        for arg in &argv[1..] {
            if let Some(f) = arg.strip_prefix("--") {
                let name = format!("--{}", f.split('=').next().unwrap());
                assert!(
                    texts.iter().any(|h| Self::has_flag(h, &name)),
                    "{place}: `kiln {}` has no {name}",
                    path.join(" ")
                );
            } else if Self::lists_command(texts.last().unwrap(), arg) {
                path.push(arg.clone());
                texts.push(self.get(&path).expect("listed subcommand").to_owned());
            }
        }
        for name in env.iter().filter(|n| n.starts_with("KILN_")) {
            let known = texts.iter().any(|h| {
                h.contains(&format!("[env: {name}=")) || h.contains(&format!("[env: {name}]"))
            }) || [
                kiln_telemetry::env_names::LOG,
                kiln_telemetry::env_names::LOG_FORMAT,
                kiln_telemetry::env_names::DATA_DIR,
            ]
            .contains(&name.as_str());
            assert!(known, "{place}: `kiln {}` reads no {name}", path.join(" "));
        }
    }
}

#[test]
fn chart_compose_and_images_run_only_real_commands_flags_and_variables() {
    let mut help = Help(HashMap::new());
    // The checker itself rejects what is not there.
    let bogus = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Help(HashMap::new()).check(
            "self-test",
            &["worker".into(), "--no-such-flag=1".into()],
            &[],
        )
    }));
    assert!(bogus.is_err(), "an unknown flag must fail the check");

    let (_dir, rendered) = render();
    let mut checked = 0;
    for (values, docs) in &rendered {
        for (workload, c) in kiln_containers(docs) {
            let env: Vec<String> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["name"].as_str().unwrap().to_owned())
                .collect();
            help.check(
                &format!("chart ({values}) {workload}"),
                &strings(&c["args"]),
                &env,
            );
            checked += 1;
        }
    }
    assert!(checked >= 4 * 3, "only {checked} Kiln containers rendered");

    let compose = yaml(&root().join("deploy/compose.yaml"));
    let mut services = 0;
    for (name, svc) in compose["services"].as_object().unwrap() {
        if svc["image"] != "kiln:dev" {
            continue;
        }
        let env: Vec<String> = svc["environment"]
            .as_object()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default();
        help.check(&format!("compose {name}"), &strings(&svc["command"]), &env);
        services += 1;
    }
    assert_eq!(
        services, 5,
        "compose runs 2 workers, 2 schedulers and a gateway"
    );

    for dockerfile in ["deploy/Dockerfile", "deploy/Dockerfile.cuda"] {
        let (_, cmd, env) = final_stage(dockerfile);
        help.check(dockerfile, &cmd, &env);
    }
}

#[test]
fn compose_runs_the_whole_stack_from_real_files() {
    let deploy = root().join("deploy");
    let compose = yaml(&deploy.join("compose.yaml"));
    let services = compose["services"].as_object().unwrap();
    for needed in [
        "redis",
        "etcd",
        "scheduler-0",
        "scheduler-1",
        "gateway",
        "worker-0",
        "worker-1",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(needed), "compose lacks {needed}");
    }
    let command = |name: &str| strings(&services[name]["command"]);
    let arg = |name: &str, f: &str| {
        let prefix = format!("{f}=");
        command(name)
            .into_iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
    };

    // Every bind mount and build path exists (relative to deploy/, where compose.yaml is).
    let mut mounts: HashMap<String, Vec<(PathBuf, String)>> = HashMap::new();
    for (name, svc) in services {
        for v in strings(&svc["volumes"]) {
            let mut parts = v.split(':');
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
            if src.starts_with('.') || src.starts_with('/') {
                let path = deploy.join(src);
                assert!(path.exists(), "{name}: {src} does not exist");
                mounts
                    .entry(name.clone())
                    .or_default()
                    .push((path.canonicalize().unwrap(), dst.to_owned()));
            } else {
                assert!(
                    compose["volumes"].get(src).is_some(),
                    "{name}: volume {src} not declared"
                );
            }
        }
        if let Some(build) = svc.get("build") {
            let context = deploy.join(build["context"].as_str().unwrap());
            assert_eq!(
                context.canonicalize().unwrap(),
                root().canonicalize().unwrap()
            );
            assert!(context
                .join(build["dockerfile"].as_str().unwrap())
                .is_file());
        }
    }
    let mounted_at = |svc: &str, file: &str| -> String {
        let want = root().join(file).canonicalize().unwrap();
        mounts[svc]
            .iter()
            .find_map(|(src, dst)| {
                if *src == want {
                    Some(dst.clone())
                } else {
                    want.strip_prefix(src)
                        .ok()
                        .map(|rest| format!("{dst}/{}", rest.display()))
                }
            })
            .unwrap_or_else(|| panic!("{svc} does not mount {file}"))
    };

    // The cluster: everyone on the compose etcd, the gateway on the compose Redis, the shipped
    // tiers and policy.
    for name in [
        "scheduler-0",
        "scheduler-1",
        "gateway",
        "worker-0",
        "worker-1",
    ] {
        assert_eq!(
            arg(name, "--etcd").as_deref(),
            Some("http://etcd:2379"),
            "{name}"
        );
    }
    for name in ["scheduler-0", "scheduler-1", "worker-0", "worker-1"] {
        let advertise = arg(name, "--advertise").unwrap();
        let port = arg(name, "--listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(advertise, format!("http://{name}:{port}"));
    }
    assert_eq!(
        arg("gateway", "--redis").as_deref(),
        Some("redis://redis:6379/")
    );
    assert_eq!(
        arg("gateway", "--tiers").unwrap(),
        mounted_at("gateway", "crates/quota/tiers.toml")
    );
    assert_eq!(
        arg("gateway", "--policy").unwrap(),
        mounted_at("gateway", "crates/policy/data/artists.toml")
    );

    // Prometheus: the repository's config and rules, and a target for every component's metrics.
    let config_path = mounted_at("prometheus", "deploy/prometheus/prometheus.yml");
    assert!(strings(&services["prometheus"]["command"])
        .contains(&format!("--config.file={config_path}")));
    let config = yaml(&deploy.join("prometheus/prometheus.yml"));
    let config_dir = Path::new(&config_path).parent().unwrap();
    for rules in strings(&config["rule_files"]) {
        assert_eq!(
            mounted_at("prometheus", &format!("deploy/prometheus/{rules}")),
            config_dir.join(&rules).to_string_lossy(),
            "rule file {rules} is not beside the config"
        );
    }
    let mut targets = Vec::new();
    for job in config["scrape_configs"].as_array().unwrap() {
        for sc in job["static_configs"].as_array().unwrap() {
            targets.extend(strings(&sc["targets"]));
        }
    }
    for name in [
        "scheduler-0",
        "scheduler-1",
        "gateway",
        "worker-0",
        "worker-1",
    ] {
        let port = arg(name, "--metrics-listen")
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        assert!(
            targets.contains(&format!("{name}:{port}")),
            "prometheus.yml does not scrape {name}:{port} ({targets:?})"
        );
    }
    for t in &targets {
        assert!(
            services.contains_key(t.split(':').next().unwrap()),
            "target {t} is no service"
        );
    }

    // Grafana: Prometheus as the datasource, the dashboard in the provider's folder.
    let provisioning = deploy.join("compose/grafana/provisioning");
    assert_eq!(
        mounted_at("grafana", "deploy/compose/grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let datasources = yaml(&provisioning.join("datasources/prometheus.yml"));
    assert_eq!(datasources["datasources"][0]["type"], "prometheus");
    assert_eq!(
        datasources["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    let providers = yaml(&provisioning.join("dashboards/kiln.yml"));
    let folder = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let dashboard = mounted_at("grafana", "deploy/grafana/kiln-dashboard.json");
    assert_eq!(Path::new(&dashboard).parent().unwrap(), Path::new(folder));
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let text = read(&root().join(dockerfile)).replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// The final stage's user, `ENTRYPOINT` + `CMD` (without the leading `kiln`) and `ENV` names.
fn final_stage(dockerfile: &str) -> (String, Vec<String>, Vec<String>) {
    let all = instructions(dockerfile);
    let last_from = all.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let stage = &all[last_from..];
    let get = |op: &str| {
        stage
            .iter()
            .rev()
            .find(|(o, _)| o == op)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{dockerfile}: no {op} in the final stage"))
    };
    let json = |s: String| -> Vec<String> {
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{dockerfile}: exec form expected: {e}"))
    };
    let entrypoint = json(get("ENTRYPOINT"));
    assert_eq!(
        entrypoint,
        ["kiln"],
        "{dockerfile}: the one binary is the entry point"
    );
    let env = stage
        .iter()
        .filter(|(o, _)| o == "ENV")
        .flat_map(|(_, r)| {
            r.split_whitespace()
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    (get("USER"), json(get("CMD")), env)
}

#[test]
fn dockerfiles_build_the_real_binary_from_real_paths_as_non_root() {
    let cli = read(&root().join("crates/cli/Cargo.toml"));
    assert!(
        cli.contains("[[bin]]\nname = \"kiln\""),
        "crates/cli builds no `kiln` binary"
    );
    assert!(
        cli.contains("name = \"kiln\"\n"),
        "the cli package is not `kiln`"
    );
    let features = cli.split("[features]").nth(1).expect("[features]");
    let toolchain = read(&root().join("rust-toolchain.toml"));
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let members = workspace_members();
    let chart_uid = yaml(&chart().join("values.yaml"))["podSecurityContext"]["runAsUser"].clone();

    for (dockerfile, feature) in [
        ("deploy/Dockerfile", None),
        ("deploy/Dockerfile.cuda", Some("cuda")),
    ] {
        let all = instructions(dockerfile);
        // Sources copied from the build context (the repository root) exist.
        let mut copied = Vec::new();
        for (_, rest) in all.iter().filter(|(op, _)| op == "COPY") {
            if rest.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(
                    root().join(src).exists(),
                    "{dockerfile}: COPY {src}: no such path"
                );
                copied.push(src.trim_end_matches('/').to_owned());
            }
        }
        let is_copied = |p: &str| {
            copied
                .iter()
                .any(|c| p == c || p.starts_with(&format!("{c}/")))
        };
        for m in &members {
            assert!(
                is_copied(m),
                "{dockerfile}: workspace member {m} is not copied"
            );
        }
        for f in ["Cargo.toml", "Cargo.lock", "proto"] {
            assert!(is_copied(f), "{dockerfile}: {f} is not copied");
        }
        for included in files_included_from_outside_their_crate() {
            assert!(
                is_copied(&included),
                "{dockerfile}: the build reads {included}, not copied"
            );
        }

        // The build: the real package and binary, with the real feature.
        let build = all
            .iter()
            .find(|(op, r)| op == "RUN" && r.contains("cargo build"))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{dockerfile}: no cargo build"));
        assert!(
            build.contains("--release") && build.contains("-p kiln "),
            "{dockerfile}: {build}"
        );
        assert!(
            build.contains("target/release/kiln"),
            "{dockerfile}: {build}"
        );
        let named: Vec<&str> = build
            .split("--features ")
            .skip(1)
            .map(|r| r.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(
            named,
            feature.into_iter().collect::<Vec<_>>(),
            "{dockerfile}"
        );
        for f in named {
            assert!(
                features.lines().any(|l| l.starts_with(&format!("{f} = "))),
                "{dockerfile}: crates/cli has no feature {f}"
            );
        }
        // The toolchain of rust-toolchain.toml.
        let text = read(&root().join(dockerfile));
        assert!(
            text.contains(&format!("rust:{channel}-"))
                || text.contains(&format!("RUST_VERSION={channel}")),
            "{dockerfile}: not built with Rust {channel} (rust-toolchain.toml)"
        );
        // The final stage runs as the non-root uid the chart expects.
        let (user, _, _) = final_stage(dockerfile);
        let uid = user.split(':').next().unwrap();
        assert!(uid != "root" && uid != "0", "{dockerfile}: runs as root");
        assert_eq!(
            uid,
            chart_uid.to_string(),
            "{dockerfile}: the chart's runAsUser differs"
        );
    }
}

fn workspace_members() -> Vec<String> {
    let manifest = read(&root().join("Cargo.toml"));
    let list = manifest
        .split("members = [")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("workspace members");
    let members: Vec<String> = list
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    assert!(members.len() > 5, "{members:?}");
    members
}

/// Files that `include_str!`/`include_bytes!` in crates/ read from outside their crate, relative to
/// the repository root.
fn files_included_from_outside_their_crate() -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root().join("crates")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let source = read(&path);
            for piece in source.split("include_").skip(1) {
                let Some(arg) = piece
                    .strip_prefix("str!(\"")
                    .or_else(|| piece.strip_prefix("bytes!(\""))
                else {
                    continue;
                };
                let rel = arg.split('"').next().unwrap();
                let Ok(file) = path.parent().unwrap().join(rel).canonicalize() else {
                    continue;
                };
                let from_root = file.strip_prefix(root().canonicalize().unwrap()).unwrap();
                if !from_root.starts_with("crates") {
                    found.push(from_root.to_string_lossy().into_owned());
                }
            }
        }
    }
    assert!(
        found.iter().any(|f| f == "docs/api.md"),
        "the scan misses crates/client's docs/api.md: {found:?}"
    );
    found
}
