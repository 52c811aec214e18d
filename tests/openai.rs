//! The OpenAI-compatible HTTP API, driven by OpenAI's own Python client (`openai` from PyPI, in the
//! venv of `scripts/openai-venv.sh`; `examples/python/openai_example.py`) and by the curl examples of
//! `docs/api.md`: an image from a fresh `kiln up` at the address it prints, signed with C2PA; the
//! client's error classes for a bad key, a bad size, a refused prompt, another model and an
//! exhausted quota (against a real Redis), with the rate-limit headers; `n` images charged `n`, and
//! all of them refunded when one is refused; streamed previews (`partial_images`) over HTTP and gRPC.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{completed, with_key, Cluster, Options};
use kiln_proto::v1::{generate_event, GenerateRequest, GetQuotaRequest, PartialImage};
use kiln_testkit::RedisServer;

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The interpreter with `openai`: `KILN_OPENAI_PYTHON`, else the venv `scripts/openai-venv.sh`
/// makes (run here when missing).
fn openai_python() -> PathBuf {
    if let Some(python) = std::env::var_os("KILN_OPENAI_PYTHON") {
        return python.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/openai-venv.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("running scripts/openai-venv.sh");
    assert!(
        out.status.success(),
        "openai-venv.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// Runs `examples/python/openai_example.py` with `args` against `base_url` with `key`; the model
/// is `kiln-shapes` (what `kiln up` serves) unless `args` name another.
fn example(base_url: &str, key: &str, dir: &Path, args: &[&str]) -> Output {
    example_of("kiln-shapes", base_url, key, dir, args)
}

fn example_of(model: &str, base_url: &str, key: &str, dir: &Path, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/openai_example.py");
    Command::new(openai_python())
        .arg(script)
        .args(args)
        .current_dir(dir)
        .env("KILN_OPENAI_BASE_URL", base_url)
        .env("KILN_API_KEY", key)
        .env("KILN_MODEL", model)
        .output()
        .expect("running the openai example")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Expects the call to fail with `error` and returns what the example printed of it.
fn expect_error(base_url: &str, key: &str, dir: &Path, error: &str, extra: &[&str]) -> String {
    let mut args = vec!["expect", error];
    args.extend(extra);
    let out = example(base_url, key, dir, &args);
    assert!(out.status.success(), "expected {error}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `kiln up` with no HTTP flag and returns it with the announced gRPC and OpenAI addresses.
fn start_up(data: &Path) -> (Up, String, String) {
    let metrics = format!("127.0.0.1:{}", kiln_testkit::free_port());
    let mut child = Command::new(kiln_e2e::kiln_bin())
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics,
        ])
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
            let after = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|rest| rest.split(". ").next())
                    .unwrap_or_else(|| panic!("{marker:?} missing from {line:?}"))
                    .to_string()
            };
            return (up, after("gateway on "), after("OpenAI API on "));
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "kiln up too slow"
        );
    }
    panic!("kiln up ended without announcing itself");
}

#[test]
fn the_openai_client_draws_on_a_fresh_kiln_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_up, _grpc, base_url) = start_up(&data);
    assert!(
        base_url.starts_with("http://127.0.0.1:") && base_url.ends_with("/v1"),
        "{base_url}"
    );
    let key = std::fs::read_to_string(data.join("dev-api-key")).unwrap();
    let key = key.trim();

    let out = example(
        &base_url,
        key,
        dir.path(),
        &["generate", "a red triangle above a blue star", "star.png"],
    );
    assert!(out.status.success(), "generate: {}", text(&out));
    assert!(text(&out).contains("images: 1"), "{}", text(&out));
    let png = dir.path().join("star.png");
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    // The image carries a C2PA manifest that validates against the development CA of `kiln up`.
    let verified = Command::new(kiln_e2e::kiln_bin())
        .arg("verify")
        .arg(&png)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "kiln verify: {}",
        text(&verified)
    );

    let out = example(
        &base_url,
        key,
        dir.path(),
        &["generate", "a blue star", "two.png", "--n", "2"],
    );
    assert!(out.status.success(), "n=2: {}", text(&out));
    assert!(text(&out).contains("images: 2"), "{}", text(&out));
    let (a, b) = (
        std::fs::read(dir.path().join("two-0.png")).unwrap(),
        std::fs::read(dir.path().join("two-1.png")).unwrap(),
    );
    assert_ne!(a, b, "two images of one request differ");

    // Streamed, with previews: two partial images, then the image.
    let out = example(
        &base_url,
        key,
        dir.path(),
        &["stream", "a red star", "live.png", "--partial-images", "2"],
    );
    assert!(out.status.success(), "stream: {}", text(&out));
    let events: Vec<&str> = std::str::from_utf8(&out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[0].starts_with("partial 0") && events[1].starts_with("partial 1"));
    assert!(events[2].starts_with("completed"), "{events:?}");
    let (early, late, full) = (
        std::fs::read(dir.path().join("live.partial-0.png")).unwrap(),
        std::fs::read(dir.path().join("live.partial-1.png")).unwrap(),
        std::fs::read(dir.path().join("live.png")).unwrap(),
    );
    assert_eq!(&early[..8], b"\x89PNG\r\n\x1a\n");
    assert!(early != late && late != full, "each preview shows more");

    let printed = expect_error(
        &base_url,
        "not-a-key",
        dir.path(),
        "AuthenticationError",
        &["a red star"],
    );
    assert!(printed.contains("status: 401"), "{printed}");
    assert!(printed.contains("header x-request-id:"), "{printed}");
    let printed = expect_error(
        &base_url,
        key,
        dir.path(),
        "BadRequestError",
        &["a red star", "--size", "65x65"],
    );
    assert!(printed.contains("param: size"), "{printed}");
    let printed = expect_error(
        &base_url,
        key,
        dir.path(),
        "PermissionDeniedError",
        &["a portrait in the style of Greg Rutkowski"],
    );
    assert!(
        printed.contains("code: content_policy_violation"),
        "{printed}"
    );
    let printed = expect_error(
        &base_url,
        key,
        dir.path(),
        "NotFoundError",
        &["a red star", "--model", "dall-e-3"],
    );
    assert!(printed.contains("code: model_not_found"), "{printed}");
}

/// `docs/api.md`'s shell examples of the HTTP API.
fn curl_examples() -> Vec<String> {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md"))
            .unwrap();
    let section = guide
        .split("## The OpenAI-compatible HTTP API")
        .nth(1)
        .expect("the guide's HTTP section");
    section
        .split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("\n```").next())
        .filter(|block| block.contains("curl"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refusals_and_the_guide_over_http_against_redis() {
    let redis = RedisServer::start();
    let http = format!("127.0.0.1:{}", kiln_testkit::free_port());
    let cluster = Cluster::start_with(Options {
        redis: Some(redis.url()),
        tiers: r#"
[tiers.free]
windows = [{ seconds = 86400, images = 3 }]
[tiers.plus]
windows = [{ seconds = 86400, images = 1000 }]
[tiers.pro]
windows = [{ seconds = 86400, images = 1000 }]
[tiers.team]
windows = [{ seconds = 86400, images = 1000 }]
org_pool = true
"#
        .into(),
        gateway_args: vec!["--http-listen".into(), http.clone()],
        metrics: true,
        ..Default::default()
    })
    .await;
    let base_url = format!("http://{http}/v1");
    let dir = tempfile::tempdir().unwrap();
    // The harness's clusters serve the tiny test model.
    let tiny = |base_url: &str, key: &str, dir: &Path, args: &[&str]| {
        example_of("kiln-tiny", base_url, key, dir, args)
    };
    let (_, key) = cluster.create_key("ana", "free", None);
    let used = || async {
        let mut client = cluster.client().await;
        let quota = client
            .get_quota(with_key(&key, GetQuotaRequest {}))
            .await
            .unwrap()
            .into_inner();
        quota.windows[0].used
    };

    // Two images are two charges.
    let out = tiny(
        &base_url,
        &key,
        dir.path(),
        &["generate", "a red star", "a.png", "--n", "2"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(used().await, 2);
    // Two more do not fit the window of three: the request is refused whole, and the one image
    // that was admitted is refunded.
    let out = tiny(
        &base_url,
        &key,
        dir.path(),
        &["generate", "a red star", "b.png", "--n", "2"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("RateLimitError"), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    while used().await != 2 {
        assert!(
            Instant::now() < deadline,
            "the admitted image was not refunded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last image of the window, then a refusal with OpenAI's rate-limit headers.
    let out = tiny(
        &base_url,
        &key,
        dir.path(),
        &["generate", "a red star", "c.png"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let printed = expect_error(
        &base_url,
        &key,
        dir.path(),
        "RateLimitError",
        &["a red star", "--model", "kiln-tiny"],
    );
    assert!(printed.contains("status: 429"), "{printed}");
    assert!(printed.contains("code: insufficient_quota"), "{printed}");
    assert!(
        printed.contains("header x-ratelimit-limit-requests: 3"),
        "{printed}"
    );
    assert!(
        printed.contains("header x-ratelimit-remaining-requests: 0"),
        "{printed}"
    );
    assert!(
        printed.contains("header x-ratelimit-reset-requests: "),
        "{printed}"
    );
    assert!(printed.contains("header retry-after: "), "{printed}");
    assert_eq!(used().await, 3);

    // The guide's curl examples, as written, with a key that has room.
    let (_, roomy) = cluster.create_key("bo", "pro", None);
    for block in curl_examples() {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &block])
            .current_dir(dir.path())
            .env("KILN_HTTP", format!("http://{http}"))
            .env("KILN_API_KEY", &roomy)
            .output()
            .unwrap();
        assert!(out.status.success(), "{block}\n{}", text(&out));
    }
    let star = std::fs::read(dir.path().join("star.png")).expect("the curl example wrote star.png");
    assert_eq!(&star[..8], b"\x89PNG\r\n\x1a\n");

    // gRPC's previews, through a scheduler and a worker in other processes: evenly spaced, in
    // order, each a signed PNG of the image so far, before the image.
    let events = cluster
        .generate_as(
            0,
            &roomy,
            GenerateRequest {
                prompt: "a red star".into(),
                width: 64,
                height: 64,
                partial_images: 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let previews: Vec<&PartialImage> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(generate_event::Event::PartialImage(p)) => Some(p),
            _ => None,
        })
        .collect();
    let total = completed(&events).unwrap().usage.unwrap().image_tokens;
    assert_eq!(
        previews
            .iter()
            .map(|p| (p.index, p.tokens_done))
            .collect::<Vec<_>>(),
        [(0, total / 4), (1, total / 2), (2, 3 * total / 4)]
    );
    assert!(previews
        .iter()
        .all(|p| p.png.starts_with(b"\x89PNG") && p.width == 64));
    assert!(matches!(
        events.last().and_then(|e| e.event.as_ref()),
        Some(generate_event::Event::Completed(_))
    ));
    let refused = cluster
        .generate_as(
            0,
            &roomy,
            GenerateRequest {
                prompt: "a red star".into(),
                partial_images: 4,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("partial_images"),
        "{}",
        refused.message()
    );

    // The HTTP front door's requests are counted as such.
    let page = cluster.scrape("gateway");
    let ok_over_http = page
        .lines()
        .filter(|l| {
            l.starts_with("kiln_gateway_requests_total{")
                && l.contains("code=\"Ok\"")
                && l.contains("protocol=\"http\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(ok_over_http >= 4.0, "{ok_over_http} OK over HTTP:\n{page}");
}
