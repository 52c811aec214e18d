//! Decode attention of one query row over its cached keys and values, for a group of heads at
//! once: scores, softmax and the weighted sum of values, each head in logical position order. The
//! heads of a position lie side by side in the cache, so walking positions with all heads reads
//! memory front to back (one head alone would read 256 bytes out of every 2 KiB). One body,
//! expanded for AVX-512 (so its dot products and sums inline into one loop) and for any CPU, over
//! the primitives of [`super::vector`], which give the same bits on both; a head's result does not
//! depend on the group it is computed in.

use std::ops::Range;

/// Where a sequence's cached positions lie: spans of `(offset of the first position, positions in
/// the span)`, consecutive positions `stride` floats apart, head `h` at `h * head_dim` in each.
pub struct Spans<'a> {
    pub spans: &'a [(usize, usize)],
    pub stride: usize,
    pub head_dim: usize,
}

/// `out[h] = softmax(q[h] · K[h] * scale) · V[h]` for the heads `heads` over the positions `at`
/// names; `q` and `out` hold those heads side by side; `scores` is scratch space.
#[allow(clippy::too_many_arguments)]
pub fn attend_heads(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    at: &Spans<'_>,
    heads: Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let width = heads.len() * at.head_dim;
    assert!(
        q.len() == width && out.len() == width,
        "q and out hold the heads' slices"
    );
    for &(base, used) in at.spans {
        let last = base + used.saturating_sub(1) * at.stride + heads.end * at.head_dim;
        assert!(
            last <= keys.len() && last <= values.len(),
            "a span runs past the cache"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); spans were checked against the cache.
        unsafe { avx512_attend_heads(q, keys, values, at, heads, scale, scores, out) };
        return;
    }
    portable_attend_heads(q, keys, values, at, heads, scale, scores, out);
}

/// The algorithm, with `$dot` and `$axpy` as the primitives (each called inside `unsafe`).
macro_rules! attend_body {
    ($dot:path, $axpy:path, $q:ident, $keys:ident, $values:ident, $at:ident, $heads:ident,
     $scale:ident, $scores:ident, $out:ident) => {{
        let (hd, n_heads) = ($at.head_dim, $heads.len());
        let first = $heads.start * hd;
        // Scores position by position, the group's heads side by side.
        $scores.clear();
        let mut max = vec![f32::NEG_INFINITY; n_heads];
        for &(base, used) in $at.spans {
            for slot in 0..used {
                let at = base + slot * $at.stride + first;
                for (h, max) in max.iter_mut().enumerate() {
                    let (q, k) = (
                        &$q[h * hd..(h + 1) * hd],
                        &$keys[at + h * hd..at + (h + 1) * hd],
                    );
                    #[allow(unused_unsafe)]
                    let s = unsafe { $dot(q, k) } * $scale;
                    *max = max.max(s);
                    $scores.push(s);
                }
            }
        }
        let mut total = vec![0f32; n_heads];
        for row in $scores.chunks_exact_mut(n_heads) {
            for ((s, max), total) in row.iter_mut().zip(&max).zip(total.iter_mut()) {
                *s = (*s - max).exp();
                *total += *s;
            }
        }
        let inv_total: Vec<f32> = total.iter().map(|t| 1.0 / t).collect();
        $out.fill(0.0);
        let mut weights = $scores.chunks_exact(n_heads);
        for &(base, used) in $at.spans {
            for slot in 0..used {
                let at = base + slot * $at.stride + first;
                let row = weights.next().expect("a score per position");
                for (h, (w, inv)) in row.iter().zip(&inv_total).enumerate() {
                    let (v, o) = (
                        &$values[at + h * hd..at + (h + 1) * hd],
                        &mut $out[h * hd..(h + 1) * hd],
                    );
                    #[allow(unused_unsafe)]
                    unsafe {
                        $axpy(w * inv, v, o)
                    };
                }
            }
        }
    }};
}

#[allow(clippy::too_many_arguments)]
fn portable_attend_heads(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    at: &Spans<'_>,
    heads: Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    use super::vector::{portable_axpy, portable_dot};
    attend_body!(
        portable_dot,
        portable_axpy,
        q,
        keys,
        values,
        at,
        heads,
        scale,
        scores,
        out
    )
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx512_attend_heads(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    at: &Spans<'_>,
    heads: Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    // SAFETY (the primitives): the CPU has AVX-512F, and slices of equal length are passed.
    use super::vector::avx512::{axpy, dot};
    attend_body!(dot, axpy, q, keys, values, at, heads, scale, scores, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_get_the_same_bits_on_both_instruction_sets_and_in_any_group() {
        let (hd, n_heads) = (64, 4);
        let stride = n_heads * hd;
        let n = 40 * stride;
        let keys: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let q: Vec<f32> = (0..stride)
            .map(|i| ((i * 29 % 61) as f32 - 30.0) / 30.0)
            .collect();
        let spans = [(0, 16), (20 * stride, 7)];
        let at = Spans {
            spans: &spans,
            stride,
            head_dim: hd,
        };
        let (mut fast, mut portable) = (vec![0f32; stride], vec![0f32; stride]);
        attend_heads(
            &q,
            &keys,
            &values,
            &at,
            0..n_heads,
            0.125,
            &mut Vec::new(),
            &mut fast,
        );
        portable_attend_heads(
            &q,
            &keys,
            &values,
            &at,
            0..n_heads,
            0.125,
            &mut Vec::new(),
            &mut portable,
        );
        assert_eq!(fast, portable);
        for h in 0..n_heads {
            let mut alone = vec![0f32; hd];
            let q_h = &q[h * hd..(h + 1) * hd];
            attend_heads(
                q_h,
                &keys,
                &values,
                &at,
                h..h + 1,
                0.125,
                &mut Vec::new(),
                &mut alone,
            );
            assert_eq!(alone, fast[h * hd..(h + 1) * hd], "head {h} alone");
        }
        // Each output is a convex mix of the values: within their range in every component.
        let values = &values;
        for (i, o) in fast.iter().enumerate() {
            let component = spans
                .iter()
                .flat_map(|&(base, used)| (0..used).map(move |s| values[base + s * stride + i]));
            let (lo, hi) = component.fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(v), h.max(v)));
            assert!(
                *o >= lo - 1e-6 && *o <= hi + 1e-6,
                "component {i}: {o} outside {lo}..{hi}"
            );
        }
    }
}
