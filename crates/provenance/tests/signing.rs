//! Signing and verification on real PNGs: a signed image validates (trusted against the CA that
//! issued the signer), carries the actions and Kiln's assertion, stays small; one flipped pixel or a
//! stripped manifest fails; bad credentials are refused when the signer is built.

use kiln_provenance::{
    dev_credentials, verify_png, Credentials, Generation, ImageSigner, SignerOptions, Verdict,
    TRAINED_ALGORITHMIC_MEDIA,
};

fn image(side: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let pixels: Vec<u8> = (0..side * side * 3).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    out
}

fn generation() -> Generation<'static> {
    Generation {
        request_id: "req-42",
        model: "kiln-random-20m@1",
        prompt: "a secret prompt about a red star",
        width: 64,
        height: 64,
        seed: u64::MAX - 7,
        temperature: 1.0,
        top_k: 40,
        top_p: 0.95,
    }
}

/// PNG chunks as (type, data).
fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 8 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = png[at + 4..at + 8].try_into().unwrap();
        out.push((kind, png[at + 8..at + 8 + len].to_vec()));
        at += 12 + len;
    }
    out
}

fn assemble(chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in chunks {
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(kind);
        png.extend(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        png.extend(crc.finalize().to_be_bytes());
    }
    png
}

/// The same PNG with one pixel's red value changed (pixel data decompressed, edited, recompressed;
/// every other chunk, the manifest included, kept as it was).
fn flip_one_pixel(png: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut parts = chunks(png);
    let idat: Vec<u8> = parts
        .iter()
        .filter(|(k, _)| k == b"IDAT")
        .flat_map(|(_, d)| d.clone())
        .collect();
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    raw[1] ^= 0x01; // first pixel of the first row (byte 0 is the row's filter type)
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).unwrap();
    let recompressed = z.finish().unwrap();
    let first = parts.iter().position(|(k, _)| k == b"IDAT").unwrap();
    parts.retain(|(k, _)| k != b"IDAT");
    parts.insert(first, (*b"IDAT", recompressed));
    let tampered = assemble(&parts);
    // Still a well-formed image, one pixel different.
    let decoded = png::Decoder::new(std::io::Cursor::new(&tampered))
        .read_info()
        .map(|_| ())
        .is_ok();
    assert!(decoded);
    tampered
}

#[test]
fn a_signed_image_is_trusted_against_its_ca_and_says_how_it_was_made() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev_credentials(dir.path()).unwrap();
    assert!(dev.created);
    let signer = ImageSigner::new(&dev.credentials, SignerOptions::default()).unwrap();
    let original = image(64);
    let signed = signer.sign_png(&original, &generation()).unwrap();
    let ca = std::fs::read_to_string(&dev.ca_path).unwrap();

    let trusted = verify_png(&signed, Some(&ca)).unwrap();
    assert_eq!(trusted.verdict, Verdict::Trusted, "{:?}", trusted.failures);
    let untrusted = verify_png(&signed, None).unwrap();
    assert_eq!(
        untrusted.verdict,
        Verdict::Valid,
        "{:?}",
        untrusted.failures
    );

    let manifest = trusted.manifest_json.unwrap();
    assert!(manifest.contains("c2pa.created"), "{manifest}");
    assert!(manifest.contains(TRAINED_ALGORITHMIC_MEDIA), "{manifest}");
    assert!(manifest.contains("kiln-random-20m"), "{manifest}");
    let kiln = trusted.kiln_assertion.expect("Kiln assertion");
    assert_eq!(kiln["request_id"], "req-42");
    assert_eq!(kiln["seed"], (u64::MAX - 7).to_string());
    assert!(
        kiln.get("prompt").is_none(),
        "the prompt is recorded only when configured"
    );
    assert!(!manifest.contains("secret prompt"));

    let added = signed.len() - original.len();
    assert!(added < 4096, "the manifest adds {added} bytes");
}

#[test]
fn the_prompt_is_recorded_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev_credentials(dir.path()).unwrap();
    let options = SignerOptions {
        include_prompt: true,
        ..Default::default()
    };
    let signer = ImageSigner::new(&dev.credentials, options).unwrap();
    let signed = signer.sign_png(&image(16), &generation()).unwrap();
    let kiln = verify_png(&signed, None).unwrap().kiln_assertion.unwrap();
    assert_eq!(kiln["prompt"], "a secret prompt about a red star");
    assert_eq!(kiln["model"], "kiln-random-20m@1");
}

#[test]
fn one_flipped_pixel_or_a_stripped_manifest_fails() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev_credentials(dir.path()).unwrap();
    let signer = ImageSigner::new(&dev.credentials, SignerOptions::default()).unwrap();
    let signed = signer.sign_png(&image(64), &generation()).unwrap();
    let ca = std::fs::read_to_string(&dev.ca_path).unwrap();

    let flipped = verify_png(&flip_one_pixel(&signed), Some(&ca)).unwrap();
    assert_eq!(flipped.verdict, Verdict::Invalid);
    assert!(!flipped.failures.is_empty());

    let mut parts = chunks(&signed);
    let before = parts.len();
    parts.retain(|(k, _)| k != b"caBX");
    assert_eq!(
        parts.len(),
        before - 1,
        "the manifest lives in one caBX chunk"
    );
    let stripped = verify_png(&assemble(&parts), Some(&ca)).unwrap();
    assert_eq!(stripped.verdict, Verdict::Missing);
}

#[test]
fn dev_credentials_are_kept_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let first = dev_credentials(dir.path()).unwrap();
    let second = dev_credentials(dir.path()).unwrap();
    assert!(!second.created);
    assert_eq!(first.credentials.chain_pem, second.credentials.chain_pem);
    assert!(!format!("{:?}", second.credentials).contains("PRIVATE KEY"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(dir.path().join("dev-signer-key.pem")).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
    }
}

#[test]
fn bad_credentials_are_refused_when_the_signer_is_built() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let one = dev_credentials(a.path()).unwrap().credentials;
    let other = dev_credentials(b.path()).unwrap().credentials;

    // The key of another certificate.
    let mismatched = Credentials {
        chain_pem: one.chain_pem.clone(),
        key_pem: other.key_pem.clone(),
    };
    let err = ImageSigner::new(&mismatched, SignerOptions::default()).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");

    // Not PEM at all.
    let garbage = Credentials {
        chain_pem: b"not a certificate".to_vec(),
        key_pem: one.key_pem.clone(),
    };
    assert!(ImageSigner::new(&garbage, SignerOptions::default()).is_err());

    // A missing file names the file.
    let err =
        Credentials::from_files(&a.path().join("nope.pem"), &a.path().join("key.pem")).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let expired = kiln_provenance::testing::expired_credentials();
    let err = ImageSigner::new(&expired, SignerOptions::default()).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn processes_racing_to_create_dev_credentials_agree() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("c2pa");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| dev_credentials(&dir).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.credentials.chain_pem, results[0].credentials.chain_pem);
        assert_eq!(r.credentials.key_pem, results[0].credentials.key_pem);
        ImageSigner::new(&r.credentials, SignerOptions::default()).unwrap();
    }
    assert!(results.iter().filter(|r| r.created).count() <= 1);
}
