//! Verification: reads a PNG's manifest and says whether it validates, and against which trust
//! anchors.

use std::io::Cursor;

use c2pa::{Context, Reader, ValidationState};
use serde_json::json;

use crate::{ProvenanceError, KILN_ASSERTION};

/// The outcome, from worst to best.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The image carries no manifest.
    Missing,
    /// A manifest is there but fails validation (tampered image, bad signature, refused certificate).
    Invalid,
    /// Signature and hashes check out, but the signer does not chain to a given trust anchor.
    Valid,
    /// Valid, and the signer chains to one of the given trust anchors.
    Trusted,
}

/// What a verification found.
#[derive(Clone, Debug)]
pub struct Verification {
    pub verdict: Verdict,
    /// Validation failure codes and explanations (empty when valid).
    pub failures: Vec<String>,
    /// The active manifest as JSON (`None` when missing).
    pub manifest_json: Option<String>,
    /// The signing certificate's issuer, as the manifest reports it.
    pub issuer: Option<String>,
    /// Kiln's assertion (request id, model, parameters) when present.
    pub kiln_assertion: Option<serde_json::Value>,
}

/// Reads and validates `png`'s manifest. With `trust_anchors_pem` (PEM certificates), a signer that
/// chains to one of them is [`Verdict::Trusted`]; without, the best is [`Verdict::Valid`].
pub fn verify_png(
    png: &[u8],
    trust_anchors_pem: Option<&str>,
) -> Result<Verification, ProvenanceError> {
    let mut settings = json!({
        "verify": {
            "verify_after_reading": true,
            "ocsp_fetch": false,
            "remote_manifest_fetch": false,
        },
    });
    if let Some(anchors) = trust_anchors_pem {
        settings["trust"] = json!({ "user_anchors": anchors });
    }
    let context = Context::new()
        .with_settings(settings)
        .map_err(|e| ProvenanceError::Read(format!("c2pa settings: {e}")))?;
    let reader = match Reader::from_context(context).with_stream("image/png", Cursor::new(png)) {
        Ok(reader) => reader,
        Err(c2pa::Error::JumbfNotFound) => {
            return Ok(Verification {
                verdict: Verdict::Missing,
                failures: vec!["the image carries no C2PA manifest".into()],
                manifest_json: None,
                issuer: None,
                kiln_assertion: None,
            })
        }
        Err(e) => {
            return Ok(Verification {
                verdict: Verdict::Invalid,
                failures: vec![e.to_string()],
                manifest_json: None,
                issuer: None,
                kiln_assertion: None,
            })
        }
    };
    let verdict = match reader.validation_state() {
        ValidationState::Trusted => Verdict::Trusted,
        ValidationState::Valid => Verdict::Valid,
        _ => Verdict::Invalid,
    };
    let failures = reader
        .validation_results()
        .and_then(|r| r.active_manifest())
        .map(|m| {
            m.failure()
                .iter()
                .map(|s| format!("{}: {}", s.code(), s.explanation().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let manifest = reader.active_manifest();
    let kiln_assertion = manifest.and_then(|m| {
        m.assertions()
            .iter()
            .find(|a| a.label() == KILN_ASSERTION)
            .and_then(|a| a.value().ok().cloned())
    });
    Ok(Verification {
        verdict,
        failures,
        manifest_json: manifest.and_then(|m| serde_json::to_string_pretty(m).ok()),
        issuer: manifest.and_then(|m| m.issuer()),
        kiln_assertion,
    })
}
