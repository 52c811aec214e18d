//! The signing stage: every finished PNG passes through a [`Signer`] before it is returned. The C2PA
//! signer plugs in here; the embedded default returns the image unchanged.

use crate::validation::ValidRequest;
use crate::GatewayError;

/// What a signer may record about the image.
#[derive(Clone, Debug)]
pub struct Provenance<'a> {
    pub request: &'a ValidRequest,
    pub model: &'a str,
}

pub trait Signer: Send + Sync + 'static {
    fn sign(&self, png: Vec<u8>, provenance: &Provenance<'_>) -> Result<Vec<u8>, GatewayError>;
}

/// Returns images unsigned.
pub struct Unsigned;

impl Signer for Unsigned {
    fn sign(&self, png: Vec<u8>, _: &Provenance<'_>) -> Result<Vec<u8>, GatewayError> {
        Ok(png)
    }
}
