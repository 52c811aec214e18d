//! The API guide's Python example (`examples/python/kiln_example.py`, stock grpcio) runs against a
//! live `kiln up`: it draws an image, and it recognises a bad key as UNAUTHENTICATED.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_python_example_runs_against_kiln_up() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", kiln_testkit::free_port());
    let mut child = Command::new(kiln_e2e::kiln_bin())
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics,
            "--data-dir",
        ])
        .arg(dir.path())
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln up");
    let stderr = child.stderr.take().unwrap();
    let _up = Up(child);
    let started = Instant::now();
    let mut address = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("reading kiln up's output");
        if let Some(rest) = line.split("kiln is up: gateway on ").nth(1) {
            // "127.0.0.1:PORT. Try: ..." -> up to the full stop after the port.
            address = rest.split(". ").next().map(str::to_string);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "kiln up too slow"
        );
    }
    let address = address.expect("kiln up announced its gateway");
    let key = std::fs::read_to_string(dir.path().join("dev-api-key")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/kiln_example.py");
    let out_png = dir.path().join("star.png");
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new("/usr/bin/python3")
            .arg(&script)
            .args(args)
            .env("KILN_GATEWAY", &address)
            .env("KILN_API_KEY", key.trim())
            .output()
            .expect("running /usr/bin/python3 (scripts/bootstrap.sh --test installs it)")
    };
    let out = run(&["a red star".as_ref(), out_png.as_os_str()]);
    assert!(
        out.status.success(),
        "example failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&out_png).expect("the example wrote the image");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("completed:"), "{stdout}");
    let bad = run(&["--bad-key".as_ref()]);
    assert!(
        bad.status.success(),
        "--bad-key: {}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // Every component's metrics are on the metrics port, named as the dashboard expects.
    let page = http_get(&metrics, "/metrics");
    for name in [
        "kiln_build_info",
        "kiln_gateway_requests_total",
        "kiln_gateway_time_to_first_progress_seconds_bucket",
        "kiln_gateway_admission_duration_seconds_bucket",
        "kiln_scheduler_queue_depth",
        "kiln_scheduler_queue_wait_seconds_bucket",
        "kiln_scheduler_saturation_ratio",
        "kiln_worker_kv_blocks_used",
        "kiln_worker_batch_slots_capacity",
        "kiln_worker_step_duration_seconds_bucket",
        "kiln_worker_device_memory_used_bytes",
    ] {
        assert!(page.contains(name), "{name} missing from /metrics");
    }
}

fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("metrics port");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    page
}
