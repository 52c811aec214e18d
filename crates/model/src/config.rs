//! The model's configuration (`config.json` beside the weights) and the vocabulary layout it implies.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Shape and image geometry of a model. Stored as `config.json` next to `model.safetensors`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model name, e.g. `kiln-random-20m`.
    pub name: String,
    /// Model version, reported with the name.
    pub version: String,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Attention heads; `d_model` must be a multiple.
    pub n_heads: usize,
    /// Hidden width of the MLP (ReLU: cheap, vectorises, deterministic).
    pub d_ff: usize,
    /// Image tokens in the codebook.
    pub codebook_size: usize,
    /// Pixels per side of one image token's square patch.
    pub patch_size: usize,
    /// Allowed image sides in pixels (width and height are each one of these).
    pub sizes: Vec<u32>,
    /// Side used when a request does not choose one.
    pub default_size: u32,
    /// Longest prompt in UTF-8 bytes.
    pub max_prompt_bytes: usize,
    /// Epsilon of the RMS norms.
    #[serde(default = "default_eps")]
    pub norm_eps: f32,
    /// The prompt words a model reads, when it reads words rather than bytes: word `i` is token
    /// `i`, and any other word or sign is token `words.len()` (unknown). Empty: the prompt's UTF-8
    /// bytes are its tokens. See [`crate::tokenizer`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub words: Vec<String>,
    /// Temperature a request gets when it sets none (1 when absent): what this model samples best at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_temperature: Option<f32>,
    /// Top-k a request gets when it sets neither temperature nor top-k (0, all codes, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_top_k: Option<u32>,
    /// Classifier-free guidance scale (absent or 1: none). Each image is also drawn without its
    /// prompt, in the same batch, and its logits are pushed away from that unconditional draw:
    /// `uncond + guidance * (cond - uncond)`. Only a model trained with some empty captions
    /// knows how to draw unconditionally. It doubles the work and the KV cache of every image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    /// Speculative Jacobi decoding: tokens each decode pass drafts and verifies per image (absent
    /// or 1: one token per pass). The image is the same either way; only the passes differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculation: Option<usize>,
}

/// The widest speculation window a config may name: a pass's cost grows with its window, and
/// drafts far ahead of the accepted run are rarely right.
pub const MAX_SPECULATION: usize = 64;

fn default_eps() -> f32 {
    1e-5
}

/// Tokens before the image besides the prompt bytes: BOS, the width token and the height token.
pub const PREFIX_OVERHEAD_TOKENS: usize = 3;

impl ModelConfig {
    /// About 20M parameters: the size the foundation benchmarks use.
    pub fn random_20m() -> Self {
        ModelConfig {
            name: "kiln-random-20m".into(),
            version: "0.1.0".into(),
            d_model: 512,
            n_layers: 6,
            n_heads: 8,
            d_ff: 2048,
            codebook_size: 512,
            patch_size: 8,
            sizes: vec![64, 128, 256],
            default_size: 128,
            max_prompt_bytes: 256,
            norm_eps: 1e-5,
            words: Vec::new(),
            default_temperature: None,
            default_top_k: None,
            guidance: None,
            speculation: None,
        }
    }

    /// A very small model for tests: fast on one core, same code paths.
    pub fn tiny() -> Self {
        ModelConfig {
            name: "kiln-tiny".into(),
            version: "0.1.0".into(),
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            d_ff: 128,
            codebook_size: 64,
            patch_size: 8,
            sizes: vec![16, 32, 64],
            default_size: 32,
            max_prompt_bytes: 256,
            norm_eps: 1e-5,
            words: Vec::new(),
            default_temperature: None,
            default_top_k: None,
            guidance: None,
            speculation: None,
        }
    }

    /// Checks the configuration, naming the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.d_model == 0 || self.n_layers == 0 || self.d_ff == 0 || self.codebook_size == 0 {
            return bad("d_model, n_layers, d_ff and codebook_size must be positive".into());
        }
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "n_heads ({}) must divide d_model ({})",
                self.n_heads, self.d_model
            ));
        }
        if self.patch_size == 0 {
            return bad("patch_size must be positive".into());
        }
        if self.sizes.is_empty() {
            return bad("sizes must list at least one image side".into());
        }
        for &s in &self.sizes {
            if s == 0 || !(s as usize).is_multiple_of(self.patch_size) {
                return bad(format!(
                    "size {s} is not a positive multiple of patch_size {}",
                    self.patch_size
                ));
            }
        }
        if !self.sizes.contains(&self.default_size) {
            return bad(format!(
                "default_size {} is not in sizes",
                self.default_size
            ));
        }
        if self.max_prompt_bytes == 0 {
            return bad("max_prompt_bytes must be positive".into());
        }
        if let Some(t) = self.default_temperature {
            if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
                return bad(format!("default_temperature must be in [0, 2], got {t}"));
            }
        }
        if let Some(g) = self.guidance {
            if !(g.is_finite() && (1.0..=20.0).contains(&g)) {
                return bad(format!("guidance must be in [1, 20], got {g}"));
            }
        }
        if let Some(w) = self.speculation {
            if !(1..=MAX_SPECULATION).contains(&w) {
                return bad(format!(
                    "speculation must be 1 to {MAX_SPECULATION} tokens per pass, got {w}"
                ));
            }
        }
        // Words share the byte tokens' ids, and one id is kept for unknown words.
        if self.words.len() >= crate::tokenizer::BOS as usize {
            return bad(format!(
                "words lists {} entries; at most {} fit",
                self.words.len(),
                crate::tokenizer::BOS - 1
            ));
        }
        for (i, word) in self.words.iter().enumerate() {
            if !crate::tokenizer::is_listable_word(word) {
                return bad(format!(
                    "words[{i}] ({word:?}) is not one lowercase word or sign, or one capital"
                ));
            }
            if self.words[..i].contains(word) {
                return bad(format!("words[{i}] ({word:?}) is listed twice"));
            }
        }
        Ok(())
    }

    /// Patches per side of the largest image.
    pub fn max_grid(&self) -> usize {
        self.sizes.iter().copied().max().unwrap_or(0) as usize / self.patch_size
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Positions of the text prefix: BOS, prompt bytes, width and height tokens.
    pub fn max_prefix_tokens(&self) -> usize {
        self.max_prompt_bytes + PREFIX_OVERHEAD_TOKENS
    }

    /// Size of the input vocabulary: 256 bytes, BOS, BOI, width and height tokens, then the codes.
    pub fn vocab_size(&self) -> usize {
        self.first_code_token() + self.codebook_size
    }

    /// Token id of the first image code.
    pub fn first_code_token(&self) -> usize {
        258 + 2 * self.max_grid()
    }

    /// Image tokens of a `width` x `height` image.
    pub fn image_tokens(&self, width: u32, height: u32) -> usize {
        (width as usize / self.patch_size) * (height as usize / self.patch_size)
    }

    /// The guidance scale when each image is drawn twice, with and without its prompt (a scale
    /// above 1); `None` when the prompt alone draws it.
    pub fn guidance_scale(&self) -> Option<f32> {
        self.guidance.filter(|&g| g > 1.0)
    }

    /// Parameters of the model, for reports.
    pub fn parameter_count(&self) -> usize {
        let d = self.d_model;
        let per_layer = 2 * d + d * 3 * d + d * d + d * self.d_ff + self.d_ff * d;
        self.vocab_size() * d
            + self.max_prefix_tokens() * d
            + 2 * self.max_grid() * d
            + self.n_layers * per_layer
            + d
            + d * self.codebook_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_are_valid() {
        ModelConfig::random_20m().validate().unwrap();
        ModelConfig::tiny().validate().unwrap();
        let n = ModelConfig::random_20m().parameter_count();
        assert!((18_000_000..24_000_000).contains(&n), "{n}");
    }

    #[test]
    fn rejects_heads_that_do_not_divide() {
        let mut c = ModelConfig::tiny();
        c.n_heads = 5;
        assert!(c.validate().unwrap_err().to_string().contains("n_heads"));
        let mut c = ModelConfig::tiny();
        c.default_size = 48;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default_size"));
    }
}
