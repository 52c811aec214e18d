//! Validation at the edge: a `GenerateRequest` becomes a [`ValidRequest`] or an `INVALID_ARGUMENT`
//! that names the field. Everything downstream takes the typed value and never re-checks it.

use kiln_proto::v1::{GenerateRequest, Sampling};
use kiln_scheduler::ModelDescription;

use crate::GatewayError;

/// Largest accepted `top_k`.
pub const MAX_TOP_K: u32 = 4096;
/// Longest caller-chosen request id.
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// A request every field of which has been checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub sampling: Sampling,
    pub image_tokens: u32,
    pub idempotency_key: Option<String>,
    /// Previews to stream while the image is drawn.
    pub partial_images: u32,
}

/// Checks every field of `request` against the served `model`.
pub fn validate(
    request: GenerateRequest,
    model: &ModelDescription,
) -> Result<ValidRequest, GatewayError> {
    let request_id = if request.request_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else if request.request_id.len() > MAX_REQUEST_ID_LEN
        || !request
            .request_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(GatewayError::invalid(
            "request_id",
            format!("must be 1 to {MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9_.-]"),
        ));
    } else {
        request.request_id
    };

    let idempotency_key = match request.idempotency_key.as_str() {
        "" => None,
        k if k.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')) =>
        {
            Some(k.to_string())
        }
        _ => {
            return Err(GatewayError::invalid(
                "idempotency_key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters of [A-Za-z0-9_.:-]"),
            ))
        }
    };

    let prompt = request.prompt.trim().to_string();
    if prompt.is_empty() {
        return Err(GatewayError::invalid("prompt", "must not be empty"));
    }
    if prompt.len() > model.max_prompt_bytes as usize {
        return Err(GatewayError::invalid(
            "prompt",
            format!(
                "is {} bytes; the model accepts at most {}",
                prompt.len(),
                model.max_prompt_bytes
            ),
        ));
    }
    if prompt
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(GatewayError::invalid(
            "prompt",
            "must not contain control characters",
        ));
    }

    let side = |field: &'static str, value: u32| -> Result<u32, GatewayError> {
        match value {
            0 => Ok(model.default_size),
            v if model.sizes.contains(&v) => Ok(v),
            v => Err(GatewayError::invalid(
                field,
                format!(
                    "{v} is not a supported size; use one of {:?} (or 0 for {})",
                    model.sizes, model.default_size
                ),
            )),
        }
    };
    let width = side("width", request.width)?;
    let height = side("height", request.height)?;

    let given = request.sampling.unwrap_or_default();
    // A request that sets no temperature samples as the model samples best.
    let (temperature, top_k) = if given.has_temperature {
        (given.temperature, given.top_k)
    } else {
        let top_k = match given.top_k {
            0 => model.default_top_k.unwrap_or(0),
            k => k,
        };
        (model.default_temperature.unwrap_or(1.0), top_k)
    };
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(GatewayError::invalid(
            "sampling.temperature",
            format!("must be in [0, 2], got {temperature}"),
        ));
    }
    if top_k > MAX_TOP_K {
        return Err(GatewayError::invalid(
            "sampling.top_k",
            format!("must be at most {MAX_TOP_K} (0 disables it), got {top_k}"),
        ));
    }
    let top_p = if given.top_p == 0.0 { 1.0 } else { given.top_p };
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(GatewayError::invalid(
            "sampling.top_p",
            format!("must be in (0, 1] (0 means 1), got {}", given.top_p),
        ));
    }
    let seed = if given.seed == 0 {
        rand_seed()
    } else {
        given.seed
    };

    if let Some(window) = given.speculation {
        if !(1..=kiln_proto::MAX_SPECULATION).contains(&window) {
            return Err(GatewayError::invalid(
                "sampling.speculation",
                format!(
                    "must be 1 (off) to {} tokens per pass, or absent to let the server choose, got {window}",
                    kiln_proto::MAX_SPECULATION
                ),
            ));
        }
    }

    if request.partial_images > kiln_proto::MAX_PARTIAL_IMAGES {
        return Err(GatewayError::invalid(
            "partial_images",
            format!(
                "must be 0 to {}, got {}",
                kiln_proto::MAX_PARTIAL_IMAGES,
                request.partial_images
            ),
        ));
    }

    let patch = model.patch_size.max(1);
    Ok(ValidRequest {
        request_id,
        prompt,
        width,
        height,
        sampling: Sampling {
            temperature,
            top_k,
            top_p,
            seed,
            speculation: given.speculation,
        },
        image_tokens: (width / patch) * (height / patch),
        idempotency_key,
        partial_images: request.partial_images,
    })
}

fn rand_seed() -> u64 {
    // A v4 UUID carries 122 random bits; 64 of them make a seed without another dependency.
    let bits = uuid::Uuid::new_v4().as_u128();
    (bits as u64).max(1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_proto::v1::SamplingParams;

    /// A valid request for tests of later stages.
    pub(crate) fn valid_request() -> ValidRequest {
        validate(request("a red star"), &model()).expect("valid")
    }

    fn model() -> ModelDescription {
        ModelDescription {
            model: "m@1".into(),
            sizes: vec![32, 64],
            default_size: 32,
            patch_size: 8,
            max_prompt_bytes: 20,
            prefix_overhead_tokens: 3,
            default_temperature: None,
            default_top_k: None,
        }
    }

    fn request(prompt: &str) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    fn field_of(r: GenerateRequest) -> &'static str {
        match validate(r, &model()) {
            Err(GatewayError::InvalidField { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_what_the_caller_left_out() {
        let v = validate(request("  a red star "), &model()).unwrap();
        assert_eq!(
            (v.prompt.as_str(), v.width, v.height, v.image_tokens),
            ("a red star", 32, 32, 16)
        );
        assert_eq!(
            (v.sampling.temperature, v.sampling.top_p, v.sampling.top_k),
            (1.0, 1.0, 0)
        );
        assert_ne!(v.sampling.seed, 0);
        assert!(!v.request_id.is_empty());
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(field_of(request("   ")), "prompt");
        assert_eq!(field_of(request(&"x".repeat(21))), "prompt");
        assert_eq!(field_of(request("a\u{7}b")), "prompt");
        assert_eq!(
            field_of(GenerateRequest {
                partial_images: 4,
                ..request("a red star")
            }),
            "partial_images"
        );
        assert_eq!(
            field_of(GenerateRequest {
                width: 33,
                ..request("a")
            }),
            "width"
        );
        assert_eq!(
            field_of(GenerateRequest {
                height: 128,
                ..request("a")
            }),
            "height"
        );
        let sampling = |s: SamplingParams| GenerateRequest {
            sampling: Some(s),
            ..request("a")
        };
        assert_eq!(
            field_of(sampling(SamplingParams {
                temperature: 2.5,
                has_temperature: true,
                ..Default::default()
            })),
            "sampling.temperature"
        );
        assert_eq!(
            field_of(sampling(SamplingParams {
                temperature: f32::NAN,
                has_temperature: true,
                ..Default::default()
            })),
            "sampling.temperature"
        );
        assert_eq!(
            field_of(sampling(SamplingParams {
                top_k: 5000,
                ..Default::default()
            })),
            "sampling.top_k"
        );
        assert_eq!(
            field_of(sampling(SamplingParams {
                top_p: 1.5,
                ..Default::default()
            })),
            "sampling.top_p"
        );
        assert_eq!(
            field_of(sampling(SamplingParams {
                top_p: -0.1,
                ..Default::default()
            })),
            "sampling.top_p"
        );
        for window in [0, kiln_proto::MAX_SPECULATION + 1] {
            assert_eq!(
                field_of(sampling(SamplingParams {
                    speculation: Some(window),
                    ..Default::default()
                })),
                "sampling.speculation"
            );
        }
        assert_eq!(
            field_of(GenerateRequest {
                request_id: "has space".into(),
                ..request("a")
            }),
            "request_id"
        );
        assert_eq!(
            field_of(GenerateRequest {
                request_id: "x".repeat(65),
                ..request("a")
            }),
            "request_id"
        );
        for bad in ["with space", "ü", &"k".repeat(129)] {
            assert_eq!(
                field_of(GenerateRequest {
                    idempotency_key: bad.to_string(),
                    ..request("a")
                }),
                "idempotency_key"
            );
        }
        let kept = validate(
            GenerateRequest {
                idempotency_key: "order-17:retry.ok_1".into(),
                ..request("a")
            },
            &model(),
        )
        .unwrap();
        assert_eq!(kept.idempotency_key.as_deref(), Some("order-17:retry.ok_1"));
    }

    #[test]
    fn explicit_greedy_and_seed_are_kept() {
        let s = SamplingParams {
            temperature: 0.0,
            has_temperature: true,
            top_k: 7,
            top_p: 0.9,
            seed: 42,
            speculation: Some(1),
        };
        let v = validate(
            GenerateRequest {
                sampling: Some(s),
                width: 64,
                ..request("a")
            },
            &model(),
        )
        .unwrap();
        assert_eq!(
            v.sampling,
            Sampling {
                temperature: 0.0,
                top_k: 7,
                top_p: 0.9,
                seed: 42,
                speculation: Some(1),
            }
        );
        assert_eq!(v.image_tokens, 8 * 4);
    }

    #[test]
    fn a_request_without_temperature_samples_as_the_model_prefers() {
        let tuned = ModelDescription {
            default_temperature: Some(0.8),
            default_top_k: Some(8),
            ..model()
        };
        let sampled = |s: SamplingParams| {
            let v = validate(
                GenerateRequest {
                    sampling: Some(s),
                    ..request("a")
                },
                &tuned,
            )
            .unwrap();
            (v.sampling.temperature, v.sampling.top_k)
        };
        assert_eq!(sampled(SamplingParams::default()), (0.8, 8));
        let own_top_k = SamplingParams {
            top_k: 3,
            ..Default::default()
        };
        assert_eq!(sampled(own_top_k), (0.8, 3));
        let own_temperature = SamplingParams {
            temperature: 1.0,
            has_temperature: true,
            ..Default::default()
        };
        assert_eq!(
            sampled(own_temperature),
            (1.0, 0),
            "the caller's choice stands"
        );
        let plain = validate(request("a"), &model()).unwrap();
        assert_eq!((plain.sampling.temperature, plain.sampling.top_k), (1.0, 0));
    }
}
