//! Test harness for end-to-end tests: builds the `kiln` binary, starts its processes (workers, a
//! scheduler, a gateway) on free loopback ports with a temporary model and keys file, and kills them
//! when the cluster value is dropped. Every test talks to the cluster over real gRPC, as a service would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_proto::v1::image_service_client::ImageServiceClient;
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{
    generate_event, ClusterStatusRequest, ClusterStatusResponse, GenerateEvent, GenerateRequest,
    GetModelInfoRequest,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// The API key every test cluster accepts (tier pro, user "tester").
pub const API_KEY: &str = "test-key-for-e2e";

/// Path of the `kiln` binary, built once per test process (cargo serialises concurrent builds).
pub fn kiln_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--quiet", "-p", "kiln"])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p kiln failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("kiln")
    })
}

/// Model presets of `kiln model init`.
#[derive(Clone, Copy, Debug)]
pub enum Preset {
    Tiny,
    TwentyM,
}

/// A tier table that never gets in the way of tests about something else.
pub const GENEROUS_TIERS: &str = r#"
[tiers.free]
windows = [{ seconds = 86400, images = 100000 }]
[tiers.plus]
windows = [{ seconds = 86400, images = 100000 }]
[tiers.pro]
windows = [{ seconds = 86400, images = 100000 }]
[tiers.team]
windows = [{ seconds = 86400, images = 100000 }]
org_pool = true
"#;

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    pub workers: usize,
    pub preset: Preset,
    /// Gateway processes (all on the same scheduler and store).
    pub gateways: usize,
    /// Redis URL for keys and quotas; without it each gateway keeps them in memory.
    pub redis: Option<String>,
    /// The gateways' initial tier table (TOML).
    pub tiers: String,
    /// More gateway flags.
    pub gateway_args: Vec<String>,
    /// etcd endpoint: workers register there, schedulers elect a leader, gateways follow it.
    pub etcd: Option<String>,
    /// Scheduler replicas (more than one needs etcd).
    pub schedulers: usize,
    /// Environment variables of every process (e.g. tracing and log format).
    pub env: Vec<(String, String)>,
    /// More flags for every scheduler and every worker.
    pub scheduler_args: Vec<String>,
    pub worker_args: Vec<String>,
    /// Give every process a `/metrics` port (see [`Cluster::metrics`]).
    pub metrics: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: 1,
            preset: Preset::Tiny,
            gateways: 1,
            redis: None,
            tiers: GENEROUS_TIERS.into(),
            gateway_args: Vec::new(),
            etcd: None,
            schedulers: 1,
            env: Vec::new(),
            scheduler_args: Vec::new(),
            worker_args: Vec::new(),
            metrics: false,
        }
    }
}

/// A running cluster of separate processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// The first gateway.
    pub gateway: String,
    /// Every gateway.
    pub gateways: Vec<String>,
    pub redis: Option<String>,
    /// The first scheduler.
    pub scheduler: String,
    /// Every scheduler replica, named `scheduler`, `scheduler-1`, ...
    pub schedulers: Vec<String>,
    pub workers: Vec<String>,
    children: Vec<(String, Child)>,
    /// Each process's arguments and announced address, to start it again.
    started: std::collections::HashMap<String, (Vec<String>, String)>,
    env: Vec<(String, String)>,
    /// `host:port` of each process's `/metrics`, by process name (with `Options::metrics`).
    pub metrics: std::collections::HashMap<String, String>,
    with_metrics: bool,
}

impl Cluster {
    /// Starts `workers` workers, a scheduler and a gateway, and waits until the gateway serves.
    pub async fn start(workers: usize, preset: Preset) -> Cluster {
        Cluster::start_with(Options {
            workers,
            preset,
            ..Default::default()
        })
        .await
    }

    /// Starts the cluster `options` describe and waits until every gateway serves.
    pub async fn start_with(options: Options) -> Cluster {
        let Options {
            workers, preset, ..
        } = options;
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("model");
        let preset_name = match preset {
            Preset::Tiny => "tiny",
            Preset::TwentyM => "20m",
        };
        run_ok(
            Command::new(kiln_bin())
                .args(["model", "init", "--preset", preset_name, "--out"])
                .arg(&model),
        );
        let keys = dir.path().join("keys.toml");
        let digest = hex::encode(Sha256::digest(API_KEY.as_bytes()));
        std::fs::write(&keys, format!("[[keys]]\nid = \"e2e\"\nsha256 = \"{digest}\"\nuser = \"tester\"\ntier = \"pro\"\n")).expect("keys file");

        let tiers = dir.path().join("tiers.toml");
        std::fs::write(&tiers, &options.tiers).expect("tiers file");
        let mut cluster = Cluster {
            dir,
            gateway: String::new(),
            gateways: Vec::new(),
            schedulers: Vec::new(),
            redis: options.redis.clone(),
            scheduler: String::new(),
            workers: Vec::new(),
            children: Vec::new(),
            started: Default::default(),
            env: options.env.clone(),
            metrics: Default::default(),
            with_metrics: options.metrics,
        };
        let any_port = "127.0.0.1:0";
        let model = model.to_str().expect("utf-8 path");
        let etcd_args: Vec<String> = options
            .etcd
            .iter()
            .flat_map(|e| {
                [
                    "--etcd".to_string(),
                    e.clone(),
                    "--lease-ttl".into(),
                    "2".into(),
                ]
            })
            .collect();
        let etcd_args: Vec<&str> = etcd_args.iter().map(String::as_str).collect();
        for i in 0..workers {
            let name = format!("worker-{i}");
            let mut args = vec![
                "worker",
                "--listen",
                any_port,
                "--name",
                &name,
                "--kv-blocks",
                "512",
                "--model",
                model,
            ];
            args.extend(&etcd_args);
            args.extend(options.worker_args.iter().map(String::as_str));
            let addr = cluster.spawn(&name, &args);
            cluster.workers.push(addr);
        }
        let worker_list = cluster.workers.join(",");
        for i in 0..options.schedulers.max(1) {
            let mut args = vec!["scheduler", "--listen", any_port];
            if options.etcd.is_some() {
                args.extend(&etcd_args);
            } else {
                args.extend(["--worker", &worker_list]);
            }
            args.extend(options.scheduler_args.iter().map(String::as_str));
            let addr = cluster.spawn(&replica_name("scheduler", i), &args);
            cluster.schedulers.push(addr);
        }
        cluster.scheduler = cluster.schedulers[0].clone();
        let scheduler = cluster.scheduler.clone();
        let keys = keys.to_str().expect("utf-8 path");
        let tiers = tiers.to_str().expect("utf-8 path");
        for i in 0..options.gateways {
            let mut args = vec![
                "gateway",
                "--listen",
                any_port,
                "--scheduler",
                &scheduler,
                "--keys",
                keys,
                "--tiers",
                tiers,
                "--refresh-ms",
                "200",
            ];
            if let Some(url) = &options.redis {
                args.extend(["--redis", url.as_str()]);
            }
            args.extend(&etcd_args);
            args.extend(options.gateway_args.iter().map(String::as_str));
            let addr = cluster.spawn(&replica_name("gateway", i), &args);
            cluster.gateways.push(addr);
        }
        cluster.gateway = cluster.gateways[0].clone();
        cluster.wait_ready().await;
        cluster
    }

    /// Starts one more worker with `extra` flags, registered in etcd at `etcd` (a worker joining
    /// mid-run); returns its name and the address it listens on.
    pub fn add_worker(&mut self, etcd: &str, extra: &[&str]) -> (String, String) {
        let name = format!("worker-{}", self.workers.len());
        let model = self.dir.path().join("model");
        let model = model.to_str().expect("utf-8 path").to_string();
        let mut args = vec![
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--name",
            &name,
            "--kv-blocks",
            "512",
            "--model",
            &model,
            "--etcd",
            etcd,
            "--lease-ttl",
            "2",
        ];
        args.extend(extra);
        let addr = self.spawn(&name, &args);
        self.workers.push(addr.clone());
        (name, addr)
    }

    /// Runs `kiln admin` against the cluster's Redis and returns its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let redis = self.redis.as_deref().expect("a cluster with Redis");
        let out = Command::new(kiln_bin())
            .args(["admin", "--redis", redis])
            .args(args)
            .output()
            .expect("running kiln admin");
        assert!(
            out.status.success(),
            "kiln admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Creates a key with `kiln admin keys create`; returns (id, key).
    pub fn create_key(&self, user: &str, tier: &str, org: Option<&str>) -> (String, String) {
        let mut args = vec!["keys", "create", "--user", user, "--tier", tier];
        if let Some(org) = org {
            args.extend(["--org", org]);
        }
        let out = self.admin(&args);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} not printed: {out}"))
                .to_string()
        };
        (field("id: "), field("key: "))
    }

    /// Starts a server process on port 0 and returns the `http://` address it announced.
    fn spawn(&mut self, name: &str, args: &[&str]) -> String {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file");
        let mut command = Command::new(kiln_bin());
        command.args(args);
        if self.with_metrics {
            let metrics = format!("127.0.0.1:{}", kiln_testkit::free_port());
            command.args(["--metrics-listen", &metrics]);
            self.metrics.insert(name.to_string(), metrics);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        self.children.push((name.to_string(), child));
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the announcement");
        let addr = line
            .trim()
            .rsplit_once("listening on ")
            .map(|(_, a)| a.to_string())
            .unwrap_or_else(|| {
                panic!(
                    "{name} did not announce its address; log:\n{}",
                    self.log(name)
                )
            });
        let address = format!("http://{addr}");
        self.started.insert(
            name.to_string(),
            (
                args.iter().map(|a| a.to_string()).collect(),
                address.clone(),
            ),
        );
        address
    }

    /// Starts again, with the same arguments, each of `names` that has exited (a supervisor's
    /// job: a leader that lost its lease exits by design); returns those restarted. Their new
    /// addresses replace the old ones.
    pub fn restart_exited(&mut self, names: &[&str]) -> Vec<String> {
        let mut restarted = Vec::new();
        for &name in names {
            let Some(i) = self.children.iter().position(|(n, _)| n == name) else {
                continue;
            };
            if !matches!(self.children[i].1.try_wait(), Ok(Some(_))) {
                continue;
            }
            self.children.remove(i);
            let (args, old) = self.started[name].clone();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let new = self.spawn(name, &args);
            for list in [&mut self.schedulers, &mut self.workers, &mut self.gateways] {
                for address in list.iter_mut().filter(|a| **a == old) {
                    *address = new.clone();
                }
            }
            if self.scheduler == old {
                self.scheduler = new.clone();
            }
            restarted.push(name.to_string());
        }
        restarted
    }

    /// The `/metrics` page of process `name` (started with `Options::metrics`).
    pub fn scrape(&self, name: &str) -> String {
        use std::io::{Read, Write};
        let address = &self.metrics[name];
        let mut stream = std::net::TcpStream::connect(address).expect("metrics port");
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        page.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or(page)
    }

    /// Kills one process (e.g. a worker) at once, as a crash would.
    pub fn kill(&mut self, name: &str) {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log a process wrote so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until the scheduler sees every worker and the gateway answers.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(workers) = self.leader_status().await.map(|s| s.workers.len()) {
                let workers: Result<usize, ()> = Ok(workers);
                let mut gateways_ready = true;
                for address in &self.gateways {
                    gateways_ready &= match ImageServiceClient::connect(address.clone()).await {
                        Ok(mut g) => g
                            .get_model_info(authed(GetModelInfoRequest {}))
                            .await
                            .is_ok(),
                        Err(_) => false,
                    };
                }
                if workers.is_ok_and(|n| n == self.workers.len()) && gateways_ready {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready in 60 s; gateway log:\n{}\nscheduler log:\n{}",
                self.log("gateway"),
                self.log("scheduler")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster view of the leading scheduler (the only one without etcd). A replica that does
    /// not answer within 2 s (a paused process) is passed over.
    pub async fn leader_status(&self) -> Option<ClusterStatusResponse> {
        for address in &self.schedulers {
            let ask = async {
                let mut client = SchedulerClient::connect(address.clone()).await.ok()?;
                let status = client
                    .cluster_status(ClusterStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                status.is_leader.then_some(status)
            };
            if let Ok(Some(status)) = tokio::time::timeout(Duration::from_secs(2), ask).await {
                return Some(status);
            }
        }
        None
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to process `name`: SIGSTOP pauses it with its leases
    /// and connections open, as a long GC pause or a partition would.
    pub fn signal(&self, name: &str, signal: &str) {
        let (_, child) = self
            .children
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let status = Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -s {signal} {name}");
    }

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        self.client_at(0).await
    }

    /// A client of the `i`-th gateway.
    pub async fn client_at(&self, i: usize) -> ImageServiceClient<Channel> {
        ImageServiceClient::connect(self.gateways[i].clone())
            .await
            .expect("gateway reachable")
            .max_decoding_message_size(64 << 20)
    }

    /// Runs one Generate to its end on gateway `i` with `key`.
    pub async fn generate_as(
        &self,
        i: usize,
        key: &str,
        request: GenerateRequest,
    ) -> Result<Vec<GenerateEvent>, tonic::Status> {
        let mut stream = self
            .client_at(i)
            .await
            .generate(with_key(key, request))
            .await?
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.next().await {
            events.push(event?);
        }
        Ok(events)
    }

    /// Runs one Generate to its end with the test key: every event, or the status that ended it.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<Vec<GenerateEvent>, tonic::Status> {
        self.generate_as(0, API_KEY, request).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `role` for the first replica, `role-i` for the others.
fn replica_name(role: &str, i: usize) -> String {
    if i == 0 {
        role.to_string()
    } else {
        format!("{role}-{i}")
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("running kiln");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wraps a message with the test API key.
pub fn authed<T>(message: T) -> tonic::Request<T> {
    with_key(API_KEY, message)
}

/// Wraps a message with `key`.
pub fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii"),
    );
    request
}

/// The finished image of a stream, if it has one.
pub fn completed(events: &[GenerateEvent]) -> Option<&kiln_proto::v1::Completed> {
    events.iter().find_map(|e| match &e.event {
        Some(generate_event::Event::Completed(c)) => Some(c),
        _ => None,
    })
}

/// The decoded pixels of a PNG. Every image carries its own signed manifest (request id, instance
/// id), so equal images are equal in pixels, not in bytes.
pub fn pixels(png: &[u8]) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().expect("a decodable PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("one frame");
    buf.truncate(info.buffer_size());
    buf
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let w = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
    let h = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
    (w, h)
}

/// `kiln_*` metric names in a text, without histogram series suffixes.
pub fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
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

/// The `kiln_*` metrics the Grafana dashboard and the Prometheus alert rules query.
pub fn dashboard_and_alert_metrics() -> std::collections::BTreeSet<String> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |p: &str| std::fs::read_to_string(deploy.join(p)).expect("deploy file");
    metric_names(&read("grafana/kiln-dashboard.json"))
        .into_iter()
        .chain(metric_names(&read("prometheus/alerts.yml")))
        .collect()
}

/// `promtool check metrics` on one exposition (it also lints names, units and suffixes).
pub fn promtool_check_metrics(process: &str, page: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/bootstrap.sh --test installs Debian's prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics, {process}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
