//! Provenance end to end: an image from a running cluster carries a C2PA manifest that `kiln verify`
//! trusts against the gateway's CA and that an independent verifier (c2pa-python, from PyPI) reads
//! with the same claims; a gateway with broken signing credentials refuses to start, saying why.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_e2e::{completed, kiln_bin, Cluster, Options};
use kiln_proto::v1::GenerateRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_is_signed_and_verifies_with_two_independent_readers() {
    let cluster = Cluster::start_with(Options::default()).await;
    let events = cluster
        .generate(GenerateRequest {
            prompt: "a blue circle".into(),
            width: 32,
            height: 32,
            request_id: "signed-1".into(),
            ..Default::default()
        })
        .await
        .expect("generate");
    let png = &completed(&events).expect("an image").png;
    let image = cluster.dir.path().join("signed.png");
    std::fs::write(&image, png).unwrap();
    let data_dir = cluster.dir.path().join("data");
    let ca = data_dir.join("c2pa").join("dev-ca.pem");
    assert!(ca.exists(), "the gateway created its development CA");

    // Kiln's own verifier, against the gateway's CA.
    let out = Command::new(kiln_bin())
        .args(["verify", "--trust-anchors"])
        .arg(&ca)
        .arg(&image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("TRUSTED") && text.contains("signed-1"),
        "{text}"
    );

    // Against another CA, the same image is not trusted.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = kiln_provenance::dev_credentials(elsewhere.path()).unwrap();
    let out = Command::new(kiln_bin())
        .args(["verify", "--trust-anchors"])
        .arg(&other.ca_path)
        .arg(&image)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("UNTRUSTED"));

    // c2pa-python reads the same claims.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/verify_c2pa.py");
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&image)
        .arg(&ca)
        .output()
        .expect("python3 (scripts/bootstrap.sh --test installs c2pa-python)");
    assert!(
        out.status.success(),
        "c2pa-python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "Trusted");
    assert_eq!(report["first_action"]["action"], "c2pa.created");
    assert_eq!(
        report["first_action"]["digitalSourceType"],
        "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
    );
    assert_eq!(report["first_action"]["softwareAgent"]["name"], "kiln-tiny");
    assert_eq!(report["kiln"]["request_id"], "signed-1");
    assert!(report["kiln"].get("prompt").is_none());
}

/// Runs `kiln gateway` with `args` and returns its exit status and stderr; it must stop by itself.
fn gateway_refuses(args: &[&str]) -> String {
    let mut child = Command::new(kiln_bin())
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--scheduler",
            "http://127.0.0.1:1",
        ])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            assert!(!status.success(), "gateway started with {args:?}");
            return stderr;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("gateway with {args:?} did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_misconfigured_signer_stops_the_gateway_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let refused_with = |chain: &str, key: &str| {
        gateway_refuses(&[
            "--data-dir",
            data,
            "--c2pa-cert-chain",
            chain,
            "--c2pa-private-key",
            key,
        ])
    };
    let missing = dir.path().join("missing-chain.pem");
    let missing = missing.to_str().unwrap();
    let stderr = refused_with(missing, missing);
    assert!(stderr.contains("missing-chain.pem"), "{stderr}");

    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let expired = kiln_provenance::testing::expired_credentials();
    let (chain, key) = (
        write("old.pem", &expired.chain_pem),
        write("old.key", &expired.key_pem),
    );
    let stderr = refused_with(&chain, &key);
    assert!(stderr.contains("expired"), "{stderr}");

    let a = kiln_provenance::dev_credentials(&dir.path().join("a"))
        .unwrap()
        .credentials;
    let b = kiln_provenance::dev_credentials(&dir.path().join("b"))
        .unwrap()
        .credentials;
    let (chain, key) = (write("a.pem", &a.chain_pem), write("b.key", &b.key_pem));
    let stderr = refused_with(&chain, &key);
    assert!(stderr.contains("private key"), "{stderr}");
}
