//! `kiln verify IMAGE.png`: reads the image's C2PA manifest, says what it claims (who made it, with
//! which model and parameters) and whether it validates, and against which trust anchors. The exit
//! code is non-zero when it does not validate, or when trust anchors were given and the signer does
//! not chain to one of them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use kiln_provenance::{verify_png, Verdict};
use kiln_telemetry::env_names as env;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The PNG to check.
    pub image: PathBuf,
    /// Trust anchors (PEM certificates). Default: the development CA of the data directory, when
    /// there is one.
    #[arg(long, env = env::VERIFY_TRUST_ANCHORS)]
    pub trust_anchors: Option<PathBuf>,
    /// Print the whole manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Verifies and prints; `Ok(false)` when the image does not pass.
pub fn run(args: VerifyArgs, data_dir: &Path) -> Result<bool> {
    let png =
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let dev_ca = crate::cluster::dev_signing_dir(data_dir).join("dev-ca.pem");
    let (anchors_path, anchors_label) = match &args.trust_anchors {
        Some(path) => (Some(path.clone()), format!("{}", path.display())),
        None if dev_ca.exists() => (
            Some(dev_ca.clone()),
            format!(
                "the development CA {} (not for production)",
                dev_ca.display()
            ),
        ),
        None => (None, "none given".to_string()),
    };
    let anchors = anchors_path
        .as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let verification = verify_png(&png, anchors.as_deref())?;
    println!("image: {}", args.image.display());
    if let Some(issuer) = &verification.issuer {
        println!("signed by: {issuer}");
    }
    if let Some(kiln) = &verification.kiln_assertion {
        println!("kiln: {kiln}");
    }
    if args.json {
        if let Some(json) = &verification.manifest_json {
            println!("{json}");
        }
    } else if let Some(json) = &verification.manifest_json {
        summarise(json);
    }
    println!("trust anchors: {anchors_label}");
    let passed = match verification.verdict {
        Verdict::Trusted => {
            println!("result: TRUSTED (valid, and the signer chains to the trust anchors)");
            true
        }
        Verdict::Valid if anchors.is_none() => {
            println!("result: VALID (signature and content check out; no trust anchors to check the signer against)");
            true
        }
        Verdict::Valid => {
            println!(
                "result: UNTRUSTED (valid, but the signer does not chain to the trust anchors)"
            );
            false
        }
        Verdict::Invalid => {
            println!("result: INVALID");
            false
        }
        Verdict::Missing => {
            println!("result: NO MANIFEST");
            false
        }
    };
    for failure in &verification.failures {
        println!("  {failure}");
    }
    Ok(passed)
}

/// Prints the claim generator and the actions of a manifest.
fn summarise(manifest_json: &str) {
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(manifest_json) else {
        return;
    };
    if let Some(generators) = manifest["claim_generator_info"].as_array() {
        for g in generators {
            println!(
                "claim generator: {} {}",
                g["name"].as_str().unwrap_or("?"),
                g["version"].as_str().unwrap_or("")
            );
        }
    }
    for assertion in manifest["assertions"].as_array().into_iter().flatten() {
        let label = assertion["label"].as_str().unwrap_or_default();
        if !label.starts_with("c2pa.actions") {
            continue;
        }
        for action in assertion["data"]["actions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!(
                "action: {} (source type {}, software agent {})",
                action["action"].as_str().unwrap_or("?"),
                action["digitalSourceType"].as_str().unwrap_or("-"),
                action["softwareAgent"]
            );
        }
    }
}
