//! What a new user's stock tools find on a fresh `kiln up`, with no flags beyond a port and a data
//! directory: `/metrics` served by default at the address it prints, with every series the dashboard
//! and the alert rules query present before any request (and `promtool check metrics` clean); and
//! server reflection over both `grpc.reflection.v1` and `v1alpha`, through tonic's generated clients
//! and through grpcio's own reflection client (`examples/python/discover.py`), which then calls
//! `Generate` from the discovered descriptors alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use tonic::transport::Channel;

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kiln up` with `extra` flags and returns it with its announcement line.
fn start_up(data: &Path, extra: &[&str]) -> (Up, String) {
    let mut child = Command::new(kiln_e2e::kiln_bin())
        .args(["up", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln up");
    let stderr = child.stderr.take().unwrap();
    let up = Up(child);
    let started = Instant::now();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("reading kiln up's output");
        if line.starts_with("kiln is up: ") {
            return (up, line);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "kiln up too slow"
        );
    }
    panic!("kiln up ended without announcing itself");
}

/// "kiln is up: gateway on ADDR. Metrics on http://M/metrics. Try: ..." -> (ADDR, M).
fn addresses(line: &str) -> (String, Option<String>) {
    let gateway = line
        .split("gateway on ")
        .nth(1)
        .and_then(|rest| rest.split(". ").next())
        .expect("the gateway's address")
        .to_string();
    let metrics = line
        .split("Metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .map(str::to_string);
    (gateway, metrics)
}

fn scrape(address: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).expect("the printed metrics address");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    let (head, body) = page.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// Whether `page` has a sample (not only a `# HELP`) of `metric`.
fn has_series(page: &str, metric: &str) -> bool {
    page.lines().filter(|l| !l.starts_with('#')).any(|l| {
        let name = l.split(['{', ' ']).next().unwrap_or("");
        name == metric
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{metric}{s}"))
    })
}

async fn reflected_services(channel: &Channel, v1alpha: bool) -> (Vec<String>, Vec<u8>) {
    use tonic_reflection::pb::{v1, v1alpha as alpha};
    // The two protocols have the same messages under two packages.
    if v1alpha {
        let mut client =
            alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let requests = [
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "kiln.v1.ImageService".into(),
            ),
        ]
        .map(|m| alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        });
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("v1alpha reflection answers")
            .into_inner();
        let (mut names, mut file) = (Vec::new(), Vec::new());
        while let Some(answer) = answers.next().await {
            match answer.expect("a reflection answer").message_response {
                Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(
                    l,
                )) => {
                    names = l.service.into_iter().map(|s| s.name).collect();
                }
                Some(
                    alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(f),
                ) => {
                    file = f.file_descriptor_proto.concat();
                }
                other => panic!("unexpected v1alpha answer {other:?}"),
            }
        }
        return (names, file);
    }
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let requests = [
        v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "kiln.v1.ImageService".into(),
        ),
    ]
    .map(|m| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("v1 reflection answers")
        .into_inner();
    let (mut names, mut file) = (Vec::new(), Vec::new());
    while let Some(answer) = answers.next().await {
        match answer.expect("a reflection answer").message_response {
            Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
                names = l.service.into_iter().map(|s| s.name).collect();
            }
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f)) => {
                file = f.file_descriptor_proto.concat();
            }
            other => panic!("unexpected v1 answer {other:?}"),
        }
    }
    (names, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_tools_find_metrics_and_reflection_on_a_fresh_kiln_up() {
    let dir = tempfile::tempdir().unwrap();
    let (up, line) = start_up(dir.path(), &[]);
    let (gateway, metrics) = addresses(&line);
    let metrics = metrics.unwrap_or_else(|| panic!("no metrics address in {line:?}"));

    // Before any request: every series the dashboard and the alert rules query.
    let page = scrape(&metrics);
    let missing: Vec<String> = kiln_e2e::dashboard_and_alert_metrics()
        .into_iter()
        .filter(|m| !has_series(&page, m))
        .collect();
    assert!(
        missing.is_empty(),
        "no series yet for {missing:?} on a fresh kiln up:\n{page}"
    );
    kiln_e2e::promtool_check_metrics("kiln up", &page);

    // Reflection, both protocols.
    let channel = Channel::from_shared(format!("http://{gateway}"))
        .unwrap()
        .connect()
        .await
        .expect("the gateway");
    for v1alpha in [false, true] {
        let (names, file) = reflected_services(&channel, v1alpha).await;
        assert!(
            names.iter().any(|n| n == "kiln.v1.ImageService"),
            "v1alpha={v1alpha}: {names:?}"
        );
        let descriptor = prost_types::FileDescriptorProto::decode(&file[..])
            .unwrap_or_else(|e| panic!("v1alpha={v1alpha}: a file descriptor ({e})"));
        let service = descriptor
            .service
            .iter()
            .find(|s| s.name() == "ImageService")
            .expect("the file declares ImageService");
        assert!(service.method.iter().any(|m| m.name() == "Generate"));
    }

    // grpcio's own reflection client (v1alpha) discovers the API and draws an image with it.
    let key = std::fs::read_to_string(dir.path().join("dev-api-key")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/discover.py");
    let png = dir.path().join("discovered.png");
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg("a red star")
        .arg(&png)
        .env("KILN_GATEWAY", &gateway)
        .env("KILN_API_KEY", key.trim())
        .output()
        .expect(
            "running /usr/bin/python3 (scripts/bootstrap.sh --test installs grpcio-reflection)",
        );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "discover.py: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("service: kiln.v1.ImageService"), "{stdout}");
    assert!(stdout.contains("completed: "), "{stdout}");
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    // The image counts on the page the dashboard reads.
    let after = scrape(&metrics);
    assert!(
        after.lines().any(|l| l.starts_with("kiln_gateway_requests_total{code=\"Ok\"") && !l.ends_with(" 0")),
        "the request is not counted:\n{after}"
    );
    drop(up);
}

#[test]
fn metrics_can_be_turned_off_and_a_taken_default_port_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_off, line) = start_up(dir.path(), &["--metrics-listen", "off"]);
    assert!(line.contains("Metrics off."), "{line}");
    // Hold the default port, as a second kiln up on the host would: the next one serves elsewhere.
    let holder = std::net::TcpListener::bind("127.0.0.1:9464");
    let (_second, line) = start_up(dir.path(), &[]);
    let (_, metrics) = addresses(&line);
    let metrics = metrics.unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    if holder.is_ok() {
        assert_ne!(metrics, "127.0.0.1:9464", "the held port was not skipped");
    }
    assert!(has_series(&scrape(&metrics), "kiln_scheduler_queue_depth"));
    let bad = Command::new(kiln_e2e::kiln_bin())
        .args(["up", "--metrics-listen", "everywhere"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("neither `off` nor an address"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
