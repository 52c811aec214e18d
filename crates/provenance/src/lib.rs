//! Provenance of Kiln's images: every PNG the gateway returns carries a signed C2PA manifest saying
//! an AI model created it (`c2pa.created`, digital source type `trainedAlgorithmicMedia`, the model
//! as software agent) plus a Kiln assertion with the request id and generation parameters. This
//! crate owns the signing credentials (loaded from PEM files, or a development CA it creates), the
//! signer (checked at start-up by signing and validating a test image, so a bad key or certificate
//! stops the process before any request), and verification against trust anchors. Signing never
//! reaches the network: no time-stamp authority is used unless one is configured.

#![forbid(unsafe_code)]

mod credentials;
mod signer;
mod verify;

pub use credentials::{dev_credentials, Credentials, DevCredentials};
pub use signer::{Generation, ImageSigner, SignerOptions};
pub use verify::{verify_png, Verdict, Verification};

/// Credentials for tests of callers (and this crate's): an expired signing certificate.
#[doc(hidden)]
pub mod testing {
    /// A CA-issued signing certificate that expired on 2020-01-01.
    pub fn expired_credentials() -> crate::Credentials {
        crate::credentials::generate_dev_chain(
            rcgen::date_time_ymd(2030, 1, 1),
            rcgen::date_time_ymd(2020, 1, 1),
        )
        .expect("generating certificates")
        .1
    }
}

/// The IPTC digital source type of images made by a trained model.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// Label of Kiln's own assertion (request id and generation parameters).
pub const KILN_ASSERTION: &str = "org.kiln.generation";

/// What can go wrong with credentials, signing or verification.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("signing credentials: {0}")]
    Credentials(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("reading the manifest: {0}")]
    Read(String),
}
