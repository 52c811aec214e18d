//! The image signer: builds each image's manifest and embeds it, signed, in the PNG.

use std::io::Cursor;
use std::sync::Arc;

use c2pa::{Builder, Context, SigningAlg};
use serde_json::json;

use crate::credentials::Credentials;
use crate::verify::{verify_png, Verdict};
use crate::{ProvenanceError, KILN_ASSERTION, TRAINED_ALGORITHMIC_MEDIA};

/// How images are signed.
#[derive(Clone, Debug, Default)]
pub struct SignerOptions {
    /// RFC 3161 time-stamp authority; `None` keeps signing offline (and the manifest small).
    pub tsa_url: Option<String>,
    /// Record the prompt in the Kiln assertion (off by default: prompts may be private).
    pub include_prompt: bool,
}

/// What the manifest says about one image.
#[derive(Clone, Debug)]
pub struct Generation<'a> {
    pub request_id: &'a str,
    /// The model as `name@version`.
    pub model: &'a str,
    pub prompt: &'a str,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
}

/// Signs PNGs with one set of credentials. Cheap to share between requests.
pub struct ImageSigner {
    signer: CompactSigner,
    context: Arc<Context>,
    options: SignerOptions,
}

impl std::fmt::Debug for ImageSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSigner")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Signing context: no thumbnails (the feature is not built), nothing fetched.
fn context() -> Result<Context, ProvenanceError> {
    Context::new()
        .with_settings(json!({
            "builder": { "thumbnail": { "enabled": false } },
            "verify": { "ocsp_fetch": false, "remote_manifest_fetch": false },
        }))
        .map_err(|e| ProvenanceError::Credentials(format!("c2pa settings: {e}")))
}

impl ImageSigner {
    /// A signer over `credentials`, proven at once: it signs a test image and validates the result,
    /// so a key that does not match the certificate, an expired or unsuitable certificate, or an
    /// unreadable PEM is an error here, at start-up, never at the first request.
    pub fn new(
        credentials: &Credentials,
        options: SignerOptions,
    ) -> Result<ImageSigner, ProvenanceError> {
        let inner = c2pa::create_signer::from_keys(
            &credentials.chain_pem,
            &credentials.key_pem,
            SigningAlg::Es256,
            options.tsa_url.clone(),
        )
        .or_else(|_| {
            // Not P-256: try the other algorithms C2PA allows for the key in the chain.
            [
                SigningAlg::Es384,
                SigningAlg::Es512,
                SigningAlg::Ps256,
                SigningAlg::Ed25519,
            ]
            .into_iter()
            .find_map(|alg| {
                c2pa::create_signer::from_keys(
                    &credentials.chain_pem,
                    &credentials.key_pem,
                    alg,
                    options.tsa_url.clone(),
                )
                .ok()
            })
            .ok_or(())
        })
        .map_err(|_| {
            ProvenanceError::Credentials(
                "the certificate chain or private key cannot be read (PEM, signing certificate \
                 first; keys P-256/P-384/P-521, RSA-PSS or Ed25519)"
                    .into(),
            )
        })?;
        let signer = CompactSigner::new(inner, options.tsa_url.is_some())?;
        let image_signer = ImageSigner {
            signer,
            context: context()?.into_shared(),
            options,
        };
        image_signer.self_test()?;
        Ok(image_signer)
    }

    fn self_test(&self) -> Result<(), ProvenanceError> {
        let png = tiny_png();
        let signed = self
            .sign_png(
                &png,
                &Generation {
                    request_id: "kiln-signer-self-test",
                    model: "self-test@0",
                    prompt: "",
                    width: 1,
                    height: 1,
                    seed: 0,
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                },
            )
            .map_err(|e| match e {
                ProvenanceError::Sign(m) => ProvenanceError::Credentials(format!(
                    "the signing certificate was refused ({m}); it must not be expired, must have \
                     the emailProtection or documentSigning extended key usage and an authority \
                     key identifier, and must not be a CA"
                )),
                other => other,
            })?;
        let verification = verify_png(&signed, None)?;
        match verification.verdict {
            Verdict::Valid | Verdict::Trusted => Ok(()),
            _ => Err(ProvenanceError::Credentials(format!(
                "a test image signed with these credentials does not validate ({}); is the private \
                 key the signing certificate's?",
                verification.failures.join("; ")
            ))),
        }
    }

    /// Embeds a signed manifest describing `generation` in `png`.
    pub fn sign_png(
        &self,
        png: &[u8],
        generation: &Generation<'_>,
    ) -> Result<Vec<u8>, ProvenanceError> {
        let (model_name, model_version) = generation
            .model
            .split_once('@')
            .unwrap_or((generation.model, ""));
        let mut parameters = json!({
            "request_id": generation.request_id,
            "model": generation.model,
            "width": generation.width,
            "height": generation.height,
            // CBOR integers in c2pa are i64: a u64 seed goes as its decimal string.
            "seed": generation.seed.to_string(),
            "temperature": generation.temperature,
            "top_k": generation.top_k,
            "top_p": generation.top_p,
        });
        if self.options.include_prompt {
            parameters["prompt"] = json!(generation.prompt);
        }
        let definition = json!({
            "claim_generator_info": [{ "name": "Kiln", "version": env!("CARGO_PKG_VERSION") }],
            "title": format!("kiln-{}.png", generation.request_id),
            "format": "image/png",
        });
        let fail = |e: c2pa::Error| ProvenanceError::Sign(e.to_string());
        let mut builder = Builder::from_shared_context(&self.context)
            .with_definition(definition.to_string())
            .map_err(fail)?;
        builder
            .add_action(json!({
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": { "name": model_name, "version": model_version },
            }))
            .map_err(fail)?;
        builder
            .add_assertion(KILN_ASSERTION, &parameters)
            .map_err(fail)?;
        let mut source = Cursor::new(png);
        let mut dest = Cursor::new(Vec::with_capacity(png.len() + 4096));
        builder
            .sign(&self.signer, "image/png", &mut source, &mut dest)
            .map_err(fail)?;
        Ok(dest.into_inner())
    }
}

/// Wraps c2pa's signer to reserve only the space the signature needs. c2pa reserves room for a
/// time-stamp token (about 10 KB) in every manifest; without a time-stamp authority that space is
/// padding, so the reservation is cut to the certificates, the signature and a margin.
struct CompactSigner {
    inner: Box<dyn c2pa::Signer + Send + Sync>,
    reserve: usize,
}

impl CompactSigner {
    fn new(
        inner: Box<dyn c2pa::Signer + Send + Sync>,
        time_stamped: bool,
    ) -> Result<CompactSigner, ProvenanceError> {
        let certificates: usize = inner
            .certs()
            .map_err(|e| ProvenanceError::Credentials(format!("certificate chain: {e}")))?
            .iter()
            .map(Vec::len)
            .sum();
        let reserve = if time_stamped {
            inner.reserve_size()
        } else {
            // The signature (RSA-PSS: up to a 4096-bit key) plus COSE headers and CBOR framing;
            // too little would fail the start-up self test, never a request.
            let signature = match inner.alg() {
                SigningAlg::Es256 | SigningAlg::Ed25519 => 64,
                SigningAlg::Es384 => 96,
                SigningAlg::Es512 => 132,
                _ => 512,
            };
            certificates + signature + 512
        };
        Ok(CompactSigner { inner, reserve })
    }
}

impl c2pa::Signer for CompactSigner {
    fn sign(&self, data: &[u8]) -> c2pa::Result<Vec<u8>> {
        self.inner.sign(data)
    }

    fn alg(&self) -> SigningAlg {
        self.inner.alg()
    }

    fn certs(&self) -> c2pa::Result<Vec<Vec<u8>>> {
        self.inner.certs()
    }

    fn reserve_size(&self) -> usize {
        self.reserve
    }

    fn time_authority_url(&self) -> Option<String> {
        self.inner.time_authority_url()
    }

    fn ocsp_val(&self) -> Option<Vec<u8>> {
        self.inner.ocsp_val()
    }
}

/// A valid 1x1 grey PNG, for the start-up self test.
fn tiny_png() -> Vec<u8> {
    // Built by hand: signature, IHDR, one IDAT (zlib of filter byte 0 + one grey pixel), IEND.
    const PNG: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x3a,
        0x7e, 0x9b, 0x55, 0x00, 0x00, 0x00, 0x0a, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x68,
        0x00, 0x00, 0x00, 0x82, 0x00, 0x81, 0x77, 0xcd, 0x72, 0xb6, 0x00, 0x00, 0x00, 0x00, 0x49,
        0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    PNG.to_vec()
}
