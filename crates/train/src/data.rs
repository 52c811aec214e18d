//! Training data from `kiln-scenes`: a scene's caption is the prompt, its rendering encoded by the
//! patch codebook is the target; and the codebook itself is learned from rendered scenes.

use kiln_scenes::{render, Scene, SceneSampler};

use crate::{Example, PatchCodebook};

/// Learns a `k`-code codebook of `patch`-pixel patches from `images` scenes of `size` pixels.
pub fn learn_codebook(
    seed: u64,
    images: usize,
    size: u32,
    patch: usize,
    k: usize,
    iterations: usize,
) -> PatchCodebook {
    let patches: Vec<Vec<u8>> = SceneSampler::new(seed)
        .take(images)
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
/// the checker still judges correct (the ceiling of any model drawing with these codes).
pub fn reconstruction(codebook: &PatchCodebook, scenes: &[Scene], size: u32) -> (f64, f64) {
    let mut error = 0.0;
    let mut correct = 0usize;
    for scene in scenes {
        let image = render(scene, size);
        let s = size as usize;
        let codes = codebook.encode(image.pixels(), s, s);
        let decoded = codebook.decode(&codes, s, s);
        error += crate::kmeans::rmse(image.pixels(), &decoded);
        let decoded = kiln_scenes::RgbImage::new(size, size, decoded).expect("decoded size");
        let set = kiln_scenes::SceneSet::Classic;
        if kiln_scenes::check(&decoded, &scene.spec(), set).correct {
            correct += 1;
        }
    }
    let n = scenes.len().max(1) as f64;
    (error / n, correct as f64 / n)
}
