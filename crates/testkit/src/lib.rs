//! Test support shared by the crates' integration tests, the end-to-end suite and `kiln bench`:
//! starts a real `redis-server` or `etcd` on free loopback ports in a temporary directory, waits
//! until it answers, and kills it when dropped; receives OTLP traces ([`OtlpReceiver`]); and slows a
//! loopback connection down on demand ([`SlowProxy`]). It owns
//! no Kiln logic; `scripts/bootstrap.sh --test` installs the servers it needs.

#![forbid(unsafe_code)]

pub mod otlp;
pub mod proxy;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use proxy::SlowProxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago (the OS picks it; a race with another process is retried by
/// the callers that start servers).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// A `redis-server` process on loopback.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Keep data across a kill and restart (append-only file, fsync on every write).
    persistent: bool,
}

impl RedisServer {
    /// Starts a server without persistence on a free port; panics with the server's output when
    /// it cannot.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Starts a server whose data survives [`RedisServer::kill`] and [`RedisServer::restart`], as a
    /// production Redis with an append-only file would.
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir: tempfile::tempdir().expect("temp dir"),
            persistent,
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    server.kill();
                    last = e;
                }
            }
        }
        panic!("could not start redis-server: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--protected-mode", "yes"])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("redis-server not runnable ({e}); run scripts/bootstrap.sh --test")
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("exited with {status}: {}", read(&log)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("did not answer within 10 s: {}", read(&log)))
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once, as a crash would; its data is lost unless it is persistent.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same port after [`RedisServer::kill`].
    pub fn restart(&mut self) {
        self.kill();
        retry_until_started("redis-server", || self.spawn());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster on loopback: `primaries` nodes sharing the 16384 slots, each with `replicas`
/// replicas, made with `redis-cli --cluster create`, no persistence. Killed when dropped.
pub struct RedisCluster {
    nodes: Vec<(Child, u16)>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every slot is served; panics with
    /// the nodes' logs when it cannot.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for i in 0..primaries * (1 + replicas) {
            let (port, bus) = (free_port(), free_port());
            let node_dir = cluster.dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--cluster-node-timeout", "2000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server not runnable; run scripts/bootstrap.sh --test");
            cluster.nodes.push((child, port));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster.nodes.iter().all(|(_, p)| ping(*p)) {
            assert!(
                Instant::now() < deadline,
                "cluster nodes did not start: {}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli not runnable (Debian package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_ok();
        cluster
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every node reports the cluster healthy with every slot served.
    fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|(_, p)| {
                let info = self.cli(*p, &["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy in 30 s: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://127.0.0.1:<port>,...`: every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Ports of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| self.cli(*p, &["role"]).starts_with("master"))
            .collect()
    }

    /// A manual failover (`CLUSTER FAILOVER` on a replica, which waits until it has caught up, so
    /// nothing acknowledged is lost): the replica becomes the primary of its slots. Returns the
    /// port of the former primary. Needs a cluster started with replicas.
    pub fn fail_over(&self) -> u16 {
        let (replica, primary) = self
            .nodes
            .iter()
            .find_map(|(_, p)| {
                let role = self.cli(*p, &["role"]);
                let mut lines = role.lines();
                (lines.next() == Some("slave")).then(|| {
                    let _host = lines.next();
                    (*p, lines.next().and_then(|l| l.parse().ok()).unwrap_or(0))
                })
            })
            .expect("a replica to promote");
        // A replica still in its first sync cannot take over: wait for its link, then ask (again
        // if a request times out).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .cli(replica, &["info", "replication"])
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "the replica never synced");
            std::thread::sleep(Duration::from_millis(50));
        }
        'promote: loop {
            let answer = self.cli(replica, &["cluster", "failover"]);
            assert!(answer.starts_with("OK"), "CLUSTER FAILOVER: {answer}");
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(5) {
                if self.cli(replica, &["role"]).starts_with("master") {
                    break 'promote;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < deadline,
                "the replica was not promoted: {}",
                self.logs()
            );
        }
        self.wait_until_ok();
        primary
    }

    fn logs(&self) -> String {
        (0..self.nodes.len())
            .map(|i| read(&self.dir.path().join(format!("node-{i}/redis.log"))))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A single-member `etcd` on loopback (client and peer ports free), data in a temporary directory.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd; panics with its log when it cannot.
    pub fn start() -> EtcdServer {
        let mut server = EtcdServer {
            child: None,
            client_port: 0,
            peer_port: 0,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.client_port = free_port();
            server.peer_port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    server.kill();
                    last = e;
                }
            }
        }
        panic!("could not start etcd: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("etcd.log");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", "kiln-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("kiln-test={peer}")])
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("etcd not runnable ({e}); run scripts/bootstrap.sh --test"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_ok(self.client_port, "/health", "true") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("exited with {status}: {}", read(&log)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "did not become healthy within 20 s: {}",
            read(&log)
        ))
    }

    /// `http://127.0.0.1:<client port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd at once (its data stays on disk for a restart).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.kill();
        retry_until_started("etcd", || self.spawn());
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Retries `spawn` for up to 20 s: a killed server's port may linger briefly.
fn retry_until_started(what: &str, mut spawn: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match spawn() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("restarting {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(150)),
        }
    }
}

/// Whether `GET path` on loopback answers 200 with a body containing `needle`.
fn http_ok(port: u16, path: &str, needle: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.starts_with("HTTP/1.") && body.contains(" 200 ") && body.contains(needle)
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_starts_healthy_and_restarts_with_its_data() {
        let mut etcd = EtcdServer::start();
        assert!(http_ok(etcd.client_port, "/health", "true"));
        etcd.kill();
        assert!(!http_ok(etcd.client_port, "/health", "true"));
        etcd.restart();
        assert!(http_ok(etcd.client_port, "/health", "true"));
    }

    #[test]
    fn redis_starts_answers_and_restarts_on_the_same_port() {
        let mut redis = RedisServer::start();
        assert!(ping(redis.port()));
        redis.kill();
        assert!(!ping(redis.port()));
        redis.restart();
        assert!(ping(redis.port()));
    }
}
