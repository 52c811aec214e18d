//! The signing stage: every finished PNG passes through a [`Signer`] before it is returned.
//! [`C2paSigner`] embeds a signed C2PA manifest (see `kiln-provenance`); [`Unsigned`] exists for
//! benchmarks that measure the gateway without it.

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

/// Signs every image with a C2PA manifest.
pub struct C2paSigner(pub kiln_provenance::ImageSigner);

impl Signer for C2paSigner {
    fn sign(&self, png: Vec<u8>, provenance: &Provenance<'_>) -> Result<Vec<u8>, GatewayError> {
        let request = provenance.request;
        let start = std::time::Instant::now();
        let signed = self
            .0
            .sign_png(
                &png,
                &kiln_provenance::Generation {
                    request_id: &request.request_id,
                    model: provenance.model,
                    prompt: &request.prompt,
                    width: request.width,
                    height: request.height,
                    seed: request.sampling.seed,
                    temperature: request.sampling.temperature,
                    top_k: request.sampling.top_k,
                    top_p: request.sampling.top_p,
                },
            )
            .map_err(|e| {
                tracing::error!(request_id = %request.request_id, error = %e, "signing the image failed");
                GatewayError::Internal(format!("signing the image failed: {e}"))
            })?;
        kiln_telemetry::GATEWAY_SIGNING_DURATION.observe(start.elapsed().as_secs_f64());
        kiln_telemetry::GATEWAY_MANIFEST_BYTES
            .observe(signed.len().saturating_sub(png.len()) as f64);
        Ok(signed)
    }
}
