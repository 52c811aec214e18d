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
    generate_event, ClusterStatusRequest, GenerateEvent, GenerateRequest, GetModelInfoRequest,
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

/// A running cluster of separate processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub gateway: String,
    pub scheduler: String,
    pub workers: Vec<String>,
    children: Vec<(String, Child)>,
}

impl Cluster {
    /// Starts `workers` workers, a scheduler and a gateway, and waits until the gateway serves.
    pub async fn start(workers: usize, preset: Preset) -> Cluster {
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

        let mut cluster = Cluster {
            dir,
            gateway: String::new(),
            scheduler: String::new(),
            workers: Vec::new(),
            children: Vec::new(),
        };
        let any_port = "127.0.0.1:0";
        let model = model.to_str().expect("utf-8 path");
        for i in 0..workers {
            let name = format!("worker-{i}");
            let args = [
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
            let addr = cluster.spawn(&name, &args);
            cluster.workers.push(addr);
        }
        let worker_list = cluster.workers.join(",");
        cluster.scheduler = cluster.spawn(
            "scheduler",
            &["scheduler", "--listen", any_port, "--worker", &worker_list],
        );
        let scheduler = cluster.scheduler.clone();
        let keys = keys.to_str().expect("utf-8 path");
        let args = [
            "gateway",
            "--listen",
            any_port,
            "--scheduler",
            &scheduler,
            "--keys",
            keys,
        ];
        cluster.gateway = cluster.spawn("gateway", &args);
        cluster.wait_ready().await;
        cluster
    }

    /// Starts a server process on port 0 and returns the `http://` address it announced.
    fn spawn(&mut self, name: &str, args: &[&str]) -> String {
        let log =
            std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log file");
        let mut child = Command::new(kiln_bin())
            .args(args)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
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
        format!("http://{addr}")
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
            if let (Ok(mut gateway), Ok(mut scheduler)) = (
                ImageServiceClient::connect(self.gateway.clone()).await,
                SchedulerClient::connect(self.scheduler.clone()).await,
            ) {
                let workers = scheduler
                    .cluster_status(ClusterStatusRequest {})
                    .await
                    .map(|s| s.into_inner().workers.len());
                if workers.is_ok_and(|n| n == self.workers.len())
                    && gateway
                        .get_model_info(authed(GetModelInfoRequest {}))
                        .await
                        .is_ok()
                {
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

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::connect(self.gateway.clone())
            .await
            .expect("gateway reachable")
            .max_decoding_message_size(64 << 20)
    }

    /// Runs one Generate to its end: every event, or the status that ended it.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<Vec<GenerateEvent>, tonic::Status> {
        let mut stream = self
            .client()
            .await
            .generate(authed(request))
            .await?
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.next().await {
            events.push(event?);
        }
        Ok(events)
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
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().expect("ascii"),
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

/// Width and height from a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let w = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
    let h = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
    (w, h)
}
