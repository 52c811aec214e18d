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
    let mut child = Command::new(kiln_e2e::kiln_bin())
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
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
}
