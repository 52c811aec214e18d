//! What the training tests share.

use kiln_model::ModelConfig;
use kiln_train::PatchCodebook;

/// A codebook of `cfg`'s size with distinct patches, so a projection of their pixels tells codes
/// apart.
pub fn distinct_codebook(cfg: &ModelConfig) -> PatchCodebook {
    let dim = cfg.patch_size * cfg.patch_size * 3;
    PatchCodebook {
        patch: cfg.patch_size,
        patches: (0..cfg.codebook_size * dim)
            .map(|i| ((i * 37 + i / dim * 11) % 256) as u8)
            .collect(),
    }
}
