//! `x[rows, k] @ W[k, n]` over a weight matrix packed once at load into panels of [`PANEL`] columns,
//! each panel `k` rows of [`PANEL`] contiguous floats, so the kernel streams it front to back.
//!
//! Every output element is one fused multiply-add chain over `k` in increasing order, started from
//! zero, whatever the number of rows, the tile a row falls in or the thread that computes it: a row
//! gets the same bits alone or in any batch (the engine's "same seed, same image" rests on it). The
//! AVX-512 kernel and the portable one run the same chain, so they agree bit for bit too.

use rayon::prelude::*;

/// Columns per panel: four 16-float AVX-512 registers.
pub const PANEL: usize = 64;
/// Rows per tile: 6 rows x 4 registers = 24 accumulators, leaving room for the panel's 4.
const TILE_ROWS: usize = 6;
/// Panel rows per pass: 128 x 64 floats = 32 KiB, which stays in L1 while all row tiles use it.
const K_BLOCK: usize = 128;

/// A `[k, n]` weight matrix in panel order, zero-padded to whole panels.
#[derive(Clone)]
pub struct PackedMatrix {
    k: usize,
    n: usize,
    panels: Vec<f32>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix({}x{})", self.k, self.n)
    }
}

impl PackedMatrix {
    /// Packs a row-major `[k, n]` matrix.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "a {k}x{n} matrix has {} floats", k * n);
        let n_panels = n.div_ceil(PANEL);
        let mut panels = vec![0f32; n_panels * k * PANEL];
        for (p, panel) in panels.chunks_mut(k * PANEL).enumerate() {
            let (start, width) = (p * PANEL, PANEL.min(n - p * PANEL));
            for (row, dst) in panel.chunks_mut(PANEL).enumerate() {
                dst[..width].copy_from_slice(&w[row * n + start..row * n + start + width]);
            }
        }
        PackedMatrix { k, n, panels }
    }

    /// Inner dimension (rows of the weight matrix).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `out[rows, n] = x[rows, k] @ W`, panels split across the rayon pool in contiguous runs.
    ///
    /// Each panel is taken [`K_BLOCK`] rows of `k` at a time, so the block stays in L1 while every
    /// row tile passes over it; a tile's accumulators are parked between blocks and the chain goes
    /// on from them, which leaves the order of the additions (and the bits) unchanged.
    pub fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), rows * k, "{rows} rows of {k}");
        assert_eq!(out.len(), rows * n, "{rows} rows of {n}");
        if rows == 0 {
            return;
        }
        let n_panels = n.div_ceil(PANEL);
        let threads = rayon::current_num_threads().clamp(1, n_panels);
        let per_thread = n_panels.div_ceil(threads);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let run = |first: usize| {
            let out_ptr = &out_ptr;
            let mut acc = vec![0f32; rows * PANEL];
            for p in first..(first + per_thread).min(n_panels) {
                let panel = &self.panels[p * k * PANEL..(p + 1) * k * PANEL];
                for k0 in (0..k).step_by(K_BLOCK) {
                    let kc = K_BLOCK.min(k - k0);
                    for r0 in (0..rows).step_by(TILE_ROWS) {
                        let tile_rows = TILE_ROWS.min(rows - r0);
                        tile_product(
                            &x[r0 * k..(r0 + tile_rows) * k],
                            k,
                            k0..k0 + kc,
                            &panel[k0 * PANEL..(k0 + kc) * PANEL],
                            &mut acc[r0 * PANEL..(r0 + tile_rows) * PANEL],
                        );
                    }
                }
                let (col, width) = (p * PANEL, PANEL.min(n - p * PANEL));
                for (r, values) in acc.chunks_exact(PANEL).enumerate() {
                    // SAFETY: `r * n + col .. + width` lies inside `out` (r < rows, col + width <=
                    // n), and every (row, panel) is written by exactly one thread: threads own
                    // disjoint panel runs, so these ranges never overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            values.as_ptr(),
                            out_ptr.0.add(r * n + col),
                            width,
                        );
                    }
                }
            }
        };
        if threads == 1 {
            run(0);
        } else {
            (0..threads)
                .into_par_iter()
                .for_each(|t| run(t * per_thread));
        }
    }
}

/// The output's base pointer, shared by the threads that write its disjoint column ranges.
struct SharedOut(*mut f32);
// SAFETY: the threads write disjoint ranges (see `matmul`), and the borrow of `out` outlives them.
unsafe impl Sync for SharedOut {}

/// Goes on with the chains of up to [`TILE_ROWS`] rows over the panel rows `ks` (`block` holds
/// them): `acc[r]` (64 floats per row) starts from zero when `ks` starts at 0, else from what the
/// previous block left there.
fn tile_product(x: &[f32], k: usize, ks: std::ops::Range<usize>, block: &[f32], acc: &mut [f32]) {
    let rows = acc.len() / PANEL;
    assert!(
        rows <= TILE_ROWS
            && x.len() >= rows * k
            && ks.end <= k
            && block.len() == ks.len() * PANEL
            && acc.len() == rows * PANEL
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let (xp, bp, ap) = (x[ks.start..].as_ptr(), block.as_ptr(), acc.as_mut_ptr());
        let (kc, resume) = (ks.len(), ks.start > 0);
        // SAFETY: the CPU has AVX-512F (checked just above), and the assert above bounds every
        // access: rows r < R of x from ks.start to ks.end, kc panel rows, R x 64 accumulators.
        unsafe {
            match rows {
                1 => avx512::tile::<1>(xp, k, bp, kc, ap, resume),
                2 => avx512::tile::<2>(xp, k, bp, kc, ap, resume),
                3 => avx512::tile::<3>(xp, k, bp, kc, ap, resume),
                4 => avx512::tile::<4>(xp, k, bp, kc, ap, resume),
                5 => avx512::tile::<5>(xp, k, bp, kc, ap, resume),
                _ => avx512::tile::<6>(xp, k, bp, kc, ap, resume),
            }
        }
        return;
    }
    portable_tile(x, k, ks, block, acc);
}

/// The same chains in plain Rust: `mul_add` is one rounding, like the FMA instruction.
fn portable_tile(x: &[f32], k: usize, ks: std::ops::Range<usize>, block: &[f32], acc: &mut [f32]) {
    let resume = ks.start > 0;
    for (r, acc) in acc.chunks_exact_mut(PANEL).enumerate() {
        if !resume {
            acc.fill(0.0);
        }
        let row = &x[r * k + ks.start..r * k + ks.end];
        for (xv, w) in row.iter().zip(block.chunks_exact(PANEL)) {
            for (a, wv) in acc.iter_mut().zip(w) {
                *a = xv.mul_add(*wv, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// `R` rows against `kc` rows of one panel, the 4 x `R` accumulators held in registers.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `x` points at `R` rows `x_stride` apart, each with `kc`
    /// readable floats; `block` at `kc * PANEL` floats; `acc` at `R * PANEL` writable floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(
        x: *const f32,
        x_stride: usize,
        block: *const f32,
        kc: usize,
        acc: *mut f32,
        resume: bool,
    ) {
        // SAFETY (the whole body): every pointer stays within the ranges the caller vouches for.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 4]; R];
            if resume {
                for (r, row) in a.iter_mut().enumerate() {
                    for (i, v) in row.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(acc.add(r * PANEL + 16 * i));
                    }
                }
            }
            let mut w = block;
            for kk in 0..kc {
                let w0 = _mm512_loadu_ps(w);
                let w1 = _mm512_loadu_ps(w.add(16));
                let w2 = _mm512_loadu_ps(w.add(32));
                let w3 = _mm512_loadu_ps(w.add(48));
                for (r, row) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(r * x_stride + kk));
                    row[0] = _mm512_fmadd_ps(xv, w0, row[0]);
                    row[1] = _mm512_fmadd_ps(xv, w1, row[1]);
                    row[2] = _mm512_fmadd_ps(xv, w2, row[2]);
                    row[3] = _mm512_fmadd_ps(xv, w3, row[3]);
                }
                w = w.add(PANEL);
            }
            for (r, row) in a.iter().enumerate() {
                for (i, v) in row.iter().enumerate() {
                    _mm512_storeu_ps(acc.add(r * PANEL + 16 * i), *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The naive product, in f64.
    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[i * n + j] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn products_match_the_naive_sum_for_ragged_shapes() {
        for (rows, k, n) in [(1, 3, 5), (7, 64, 64), (13, 33, 130), (6, 512, 200)] {
            let (x, w) = (random(rows * k, 1), random(k * n, 2));
            let mut out = vec![f32::NAN; rows * n];
            PackedMatrix::pack(&w, k, n).matmul(&x, rows, &mut out);
            for (got, want) in out.iter().zip(reference(&x, &w, rows, k, n)) {
                assert!(
                    (*got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + want.abs()),
                    "{rows}x{k}x{n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_portable_kernel_gives_the_same_bits() {
        let (k, rows) = (300, 6);
        let (x, w) = (random(rows * k, 3), random(k * PANEL, 4));
        let packed = PackedMatrix::pack(&w, k, PANEL);
        let mut fast = vec![0f32; rows * PANEL];
        let mut portable = vec![1f32; rows * PANEL];
        // Two blocks, the second resuming the first's chains, as `matmul` runs them.
        for ks in [0..K_BLOCK, K_BLOCK..k] {
            let block = &packed.panels[ks.start * PANEL..ks.end * PANEL];
            tile_product(&x, k, ks.clone(), block, &mut fast);
            portable_tile(&x, k, ks, block, &mut portable);
        }
        assert_eq!(fast, portable);
        let mut whole = vec![0f32; rows * PANEL];
        portable_tile(&x, k, 0..k, &packed.panels, &mut whole);
        assert_eq!(
            whole, portable,
            "a chain split across blocks gives the bits of one pass"
        );
    }
}
