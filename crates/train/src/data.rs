//! Training data from `kiln-scenes`: a scene's caption is the prompt, its rendering encoded by the
//! patch codebook is the target; and the codebook itself is learned from rendered scenes.

use kiln_scenes::{render, Scene, SceneSet};

use crate::{Example, PatchCodebook};

/// Learns a `k`-code codebook of `patch`-pixel patches from `scenes` drawn at `size` pixels
/// (k-means seeded by `seed`).
pub fn learn_codebook(
    scenes: impl IntoIterator<Item = Scene>,
    size: u32,
    patch: usize,
    k: usize,
    iterations: usize,
    seed: u64,
) -> PatchCodebook {
    let patches: Vec<Vec<u8>> = scenes
        .into_iter()
        .flat_map(|scene| {
            let image = render(&scene, size);
            crate::kmeans::patches_of(image.pixels(), size as usize, size as usize, patch)
        })
        .collect();
    PatchCodebook::learn(&patches, patch, k, iterations, seed)
}

/// The example of one scene drawn at `drawn` pixels and served at `served` (the codebook's patches
/// are shown `served / drawn` times larger): the codes of the drawing, laid out as the served
/// image's tokens.
pub fn example(scene: &Scene, codebook: &PatchCodebook, drawn: u32, served: u32) -> Example {
    let image = render(scene, drawn);
    Example {
        prompt: scene.caption(),
        width: served,
        height: served,
        codes: codebook.encode(image.pixels(), drawn as usize, drawn as usize),
    }
}

/// Reconstruction of held-out scenes through the codebook: RMSE per channel value, and the share
/// the checker (scoring by `set`) still judges correct: the ceiling of any model drawing with
/// these codes.
pub fn reconstruction(
    codebook: &PatchCodebook,
    scenes: &[Scene],
    size: u32,
    set: SceneSet,
) -> (f64, f64) {
    let mut error = 0.0;
    let mut correct = 0usize;
    for scene in scenes {
        let image = render(scene, size);
        let s = size as usize;
        let codes = codebook.encode(image.pixels(), s, s);
        let decoded = codebook.decode(&codes, s, s);
        error += crate::kmeans::rmse(image.pixels(), &decoded);
        let decoded = kiln_scenes::RgbImage::new(size, size, decoded).expect("decoded size");
        if kiln_scenes::check(&decoded, &scene.spec(), set).correct {
            correct += 1;
        }
    }
    let n = scenes.len().max(1) as f64;
    (error / n, correct as f64 / n)
}
