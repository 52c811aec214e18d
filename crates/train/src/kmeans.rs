//! The image tokenizer: a codebook of patches learned from the data set by k-means. Patches are
//! deduplicated first (most of a scene is flat background), so Lloyd's iterations run over distinct
//! patches weighted by how often they occur. Each learned centre is then replaced by the real patch
//! nearest to it (a medoid): a mean of differently coloured edges is a muddy colour no scene has,
//! while a real patch keeps the edges hard.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Patches of `patch`² RGB pixels, row-major, one byte per channel.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchCodebook {
    pub patch: usize,
    /// `len * patch² * 3` bytes.
    pub patches: Vec<u8>,
}

/// The `patch`² RGB patches of an image, in raster order.
pub fn patches_of(pixels: &[u8], width: usize, height: usize, patch: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity((width / patch) * (height / patch));
    for py in 0..height / patch {
        for px in 0..width / patch {
            let mut p = Vec::with_capacity(patch * patch * 3);
            for y in 0..patch {
                let row = (py * patch + y) * width + px * patch;
                p.extend_from_slice(&pixels[row * 3..(row + patch) * 3]);
            }
            out.push(p);
        }
    }
    out
}

fn distance(a: &[u8], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f32 - y;
            d * d
        })
        .sum()
}

impl PatchCodebook {
    /// Learns `k` codes from `patches` (each `patch`² * 3 bytes) with `iterations` of Lloyd's
    /// algorithm from a seeded k-means++ start.
    pub fn learn(
        patches: &[Vec<u8>],
        patch: usize,
        k: usize,
        iterations: usize,
        seed: u64,
    ) -> Self {
        assert!(
            k > 0 && !patches.is_empty(),
            "k-means needs codes and patches"
        );
        let mut counts: HashMap<&[u8], f32> = HashMap::new();
        for p in patches {
            *counts.entry(p.as_slice()).or_default() += 1.0;
        }
        let mut distinct: Vec<(&[u8], f32)> = counts.into_iter().collect();
        // HashMap order is random: sort so that one seed gives one codebook.
        distinct.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let dim = patch * patch * 3;
        let k = k.min(distinct.len());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // k-means++: each next centre drawn with probability proportional to weight x distance².
        let mut centres: Vec<Vec<f32>> = Vec::with_capacity(k);
        let first = distinct
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("non-empty");
        centres.push(first.0.iter().map(|&v| v as f32).collect());
        let mut nearest: Vec<f32> = distinct
            .par_iter()
            .map(|(p, _)| distance(p, &centres[0]))
            .collect();
        while centres.len() < k {
            let total: f64 = distinct
                .iter()
                .zip(&nearest)
                .map(|((_, w), d)| (*w * *d) as f64)
                .sum();
            if total <= 0.0 {
                break;
            }
            let mut target = rng.random::<f64>() * total;
            let mut chosen = distinct.len() - 1;
            for (i, ((_, w), d)) in distinct.iter().zip(&nearest).enumerate() {
                target -= (*w * *d) as f64;
                if target <= 0.0 {
                    chosen = i;
                    break;
                }
            }
            let centre: Vec<f32> = distinct[chosen].0.iter().map(|&v| v as f32).collect();
            nearest
                .par_iter_mut()
                .zip(&distinct)
                .for_each(|(n, (p, _))| *n = n.min(distance(p, &centre)));
            centres.push(centre);
        }
        for _ in 0..iterations {
            let assigned: Vec<usize> = distinct
                .par_iter()
                .map(|(p, _)| nearest_centre(p, &centres).0)
                .collect();
            let mut sums = vec![vec![0f64; dim]; centres.len()];
            let mut weights = vec![0f64; centres.len()];
            for ((p, w), &c) in distinct.iter().zip(&assigned) {
                weights[c] += *w as f64;
                for (s, &v) in sums[c].iter_mut().zip(p.iter()) {
                    *s += v as f64 * *w as f64;
                }
            }
            for (c, centre) in centres.iter_mut().enumerate() {
                // An empty cluster keeps its centre; k-means++ rarely leaves one.
                if weights[c] > 0.0 {
                    for (x, s) in centre.iter_mut().zip(&sums[c]) {
                        *x = (*s / weights[c]) as f32;
                    }
                }
            }
        }
        // Medoids: the member of each cluster nearest its centre.
        let assigned: Vec<(usize, f32)> = distinct
            .par_iter()
            .map(|(p, _)| nearest_centre(p, &centres))
            .collect();
        let mut best: Vec<(f32, usize)> = vec![(f32::INFINITY, usize::MAX); centres.len()];
        for (i, &(c, d)) in assigned.iter().enumerate() {
            if d < best[c].0 {
                best[c] = (d, i);
            }
        }
        best.retain(|&(_, i)| i != usize::MAX);
        let mut chosen: Vec<usize> = best.into_iter().map(|(_, i)| i).collect();
        chosen.sort_unstable();
        chosen.dedup();
        let mut bytes = Vec::with_capacity(chosen.len() * dim);
        for i in chosen {
            bytes.extend_from_slice(distinct[i].0);
        }
        PatchCodebook {
            patch,
            patches: bytes,
        }
    }

    /// The same codes drawn `factor` times larger (each pixel a `factor`² block).
    pub fn scaled(&self, factor: usize) -> PatchCodebook {
        let (p, q) = (self.patch, self.patch * factor);
        let mut patches = Vec::with_capacity(self.patches.len() * factor * factor);
        for code in self.patches.chunks(p * p * 3) {
            for y in 0..q {
                for x in 0..q {
                    let at = ((y / factor) * p + x / factor) * 3;
                    patches.extend_from_slice(&code[at..at + 3]);
                }
            }
        }
        PatchCodebook { patch: q, patches }
    }

    /// The largest factor this codebook was [`Self::scaled`] by: every code is made of blocks of
    /// that many pixels a side (1 for a codebook drawn at its own resolution).
    pub fn pixel_scale(&self) -> usize {
        let p = self.patch;
        let uniform_blocks = |f: usize| {
            self.patches.chunks(p * p * 3).all(|code| {
                (0..p * p).all(|i| {
                    let (y, x) = (i / p, i % p);
                    let at = ((y / f * f) * p + x / f * f) * 3;
                    code[i * 3..i * 3 + 3] == code[at..at + 3]
                })
            })
        };
        (1..=p)
            .rev()
            .find(|&f| p.is_multiple_of(f) && uniform_blocks(f))
            .unwrap_or(1)
    }

    /// The codebook before [`Self::scaled`] by `factor`: one pixel of each block.
    pub fn unscaled(&self, factor: usize) -> PatchCodebook {
        let (q, p) = (self.patch, self.patch / factor);
        let mut patches = Vec::with_capacity(self.patches.len() / (factor * factor));
        for code in self.patches.chunks(q * q * 3) {
            for y in 0..p {
                for x in 0..p {
                    let at = (y * factor * q + x * factor) * 3;
                    patches.extend_from_slice(&code[at..at + 3]);
                }
            }
        }
        PatchCodebook { patch: p, patches }
    }

    pub fn len(&self) -> usize {
        self.patches.len() / (self.patch * self.patch * 3)
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// The code of every patch of an image (nearest patch by squared RGB distance, the first code
    /// of the nearest on a tie). Most patches of a scene are codes exactly: those are looked up,
    /// and only the rest are compared with every code.
    pub fn encode(&self, pixels: &[u8], width: usize, height: usize) -> Vec<u32> {
        let dim = self.patch * self.patch * 3;
        let mut exact: HashMap<&[u8], u32> = HashMap::with_capacity(self.len());
        for (c, code) in self.patches.chunks(dim).enumerate() {
            exact.entry(code).or_insert(c as u32);
        }
        patches_of(pixels, width, height, self.patch)
            .iter()
            .map(|p| match exact.get(p.as_slice()) {
                Some(&code) => code,
                None => self.nearest(p),
            })
            .collect()
    }

    fn nearest(&self, p: &[u8]) -> u32 {
        let dim = self.patch * self.patch * 3;
        let mut best = (u32::MAX, 0u32);
        for (c, code) in self.patches.chunks(dim).enumerate() {
            let d: u32 = p
                .iter()
                .zip(code)
                .map(|(&a, &b)| {
                    let d = a as i32 - b as i32;
                    (d * d) as u32
                })
                .sum();
            if d < best.0 {
                best = (d, c as u32);
            }
        }
        best.1
    }

    /// The image the codes stand for (RGB bytes, `width` x `height`).
    pub fn decode(&self, codes: &[u32], width: usize, height: usize) -> Vec<u8> {
        let p = self.patch;
        let dim = p * p * 3;
        let mut pixels = vec![0u8; width * height * 3];
        let per_row = width / p;
        for (i, &code) in codes.iter().enumerate() {
            let (py, px) = (i / per_row, i % per_row);
            let src = &self.patches[code as usize * dim..(code as usize + 1) * dim];
            for y in 0..p {
                let row = (py * p + y) * width + px * p;
                pixels[row * 3..(row + p) * 3].copy_from_slice(&src[y * p * 3..(y + 1) * p * 3]);
            }
        }
        pixels
    }
}

fn nearest_centre(p: &[u8], centres: &[Vec<f32>]) -> (usize, f32) {
    let mut best = (0, f32::INFINITY);
    for (c, centre) in centres.iter().enumerate() {
        let d = distance(p, centre);
        if d < best.1 {
            best = (c, d);
        }
    }
    best
}

/// Root-mean-square error per channel value (0-255) between two images of the same size.
pub fn rmse(a: &[u8], b: &[u8]) -> f64 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum();
    (sum / a.len().max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two-colour 4x4 test images: left half red, right half one of two greys.
    fn image(grey: u8) -> Vec<u8> {
        let mut px = Vec::new();
        for _y in 0..4 {
            for x in 0..4 {
                let rgb = if x < 2 {
                    [255, 0, 0]
                } else {
                    [grey, grey, grey]
                };
                px.extend_from_slice(&rgb);
            }
        }
        px
    }

    #[test]
    fn codes_round_trip_patches_the_codebook_holds() {
        let mut patches = Vec::new();
        for grey in [10, 240] {
            patches.extend(patches_of(&image(grey), 4, 4, 2));
        }
        let book = PatchCodebook::learn(&patches, 2, 3, 5, 1);
        assert_eq!(book.len(), 3);
        for grey in [10, 240] {
            let img = image(grey);
            let codes = book.encode(&img, 4, 4);
            assert_eq!(codes.len(), 4);
            assert_eq!(book.decode(&codes, 4, 4), img, "grey {grey}");
        }
        assert_eq!(
            book,
            PatchCodebook::learn(&patches, 2, 3, 5, 1),
            "one seed, one codebook"
        );
    }

    #[test]
    fn looking_up_exact_patches_encodes_as_comparing_with_every_code() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // Four grey levels make exact matches and near misses; a duplicated code keeps the first.
        let mut patches: Vec<u8> = (0..40 * 12)
            .map(|_| [0, 80, 160, 255][rng.random_range(0..4)])
            .collect();
        patches.extend_from_within(12..24);
        let book = PatchCodebook { patch: 2, patches };
        let pixels: Vec<u8> = (0..8 * 8 * 3)
            .map(|_| [0, 80, 160, 255, 90][rng.random_range(0..5)])
            .collect();
        let mut image = pixels.clone();
        image[..6].copy_from_slice(&book.patches[12..18]);
        image[8 * 3..8 * 3 + 6].copy_from_slice(&book.patches[18..24]);
        let codes = book.encode(&image, 8, 8);
        let compared: Vec<u32> = patches_of(&image, 8, 8, 2)
            .iter()
            .map(|p| book.nearest(p))
            .collect();
        assert_eq!(codes, compared);
        assert_eq!(codes[0], 1, "the first of two equal codes");
    }

    #[test]
    fn a_scaled_codebook_knows_its_scale_and_unscales_to_the_original() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let book = PatchCodebook {
            patch: 4,
            patches: (0..10 * 48).map(|_| rng.random::<u8>()).collect(),
        };
        assert_eq!(book.pixel_scale(), 1);
        for factor in [2, 3] {
            let scaled = book.scaled(factor);
            assert_eq!(scaled.pixel_scale(), factor);
            assert_eq!(scaled.unscaled(factor), book);
        }
    }

    #[test]
    fn codes_are_real_patches() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let patches: Vec<Vec<u8>> = (0..500)
            .map(|_| (0..12).map(|_| rng.random_range(0..2u8) * 255).collect())
            .collect();
        let book = PatchCodebook::learn(&patches, 2, 8, 4, 3);
        for code in book.patches.chunks(12) {
            assert!(
                patches.iter().any(|p| p == code),
                "a medoid is a data patch"
            );
        }
        assert!(rmse(&patches[0], &patches[0]) == 0.0);
    }
}
