//! Fused training ops with hand-written gradients, for the two places where candle's op-by-op
//! graph spends most of a step on memory rather than arithmetic: causal attention (a `[B, H, T, T]`
//! score tensor, its mask and four softmax intermediates per layer, every one a fresh allocation
//! the kernel must zero) and the cross-entropy over 4,096 codes at every image position. Each op
//! computes the same function as the op-by-op graph it replaced (the tests below check values and
//! gradients against that graph) and recomputes what its backward pass needs instead of storing
//! it.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op} takes f32 tensors")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{op} takes contiguous tensors"),
    }
}

/// `e^x` for `x <= 0` (softmax's shifted scores), within 2 units in the last place of `f32::exp`
/// down to `e^-87`; below that it stays at about `1e-38` instead of reaching zero, which no softmax
/// sum notices. Branch-free, so a loop over it compiles to vector instructions, where libm's
/// `expf` is a call per element (a twentieth of a training step).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let shifted = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // e^r on |r| <= ln2 / 2 by its Taylor series to r^7 (the next term is below 2^-28 of e^r).
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    let power = (shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32 + 127) << 23;
    p * f32::from_bits(power as u32)
}

/// The sum of `e^(x - shift)` over `values`, each at most `shift`, in eight interleaved partial
/// sums (so that the loop keeps one vector register of them).
fn sum_exp(values: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| exp_nonpositive(x - shift))
        .sum();
    for chunk in chunks {
        for l in 0..8 {
            lanes[l] += exp_nonpositive(chunk[l] - shift);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes of partial sums, so the compiler keeps them in one vector register.
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Query rows per block. A block's scores cover the keys up to its last row, so causal attention
/// computes about a fifth more products than the lower triangle, but in matrix products that run
/// several times faster than a dot product per score.
const QUERY_BLOCK: usize = 64;

/// A row-major operand of [`matmul`]: its values, row stride and column stride.
type Operand<'a> = (&'a [f32], usize, usize);

/// `dst[m, n] = scale * lhs[m, k] @ rhs[k, n]`, or `dst += ...` with `accumulate`; `dst` has row
/// stride `dst_rs`. Single-threaded: the callers split work across heads.
#[allow(unsafe_code)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    accumulate: bool,
    scale: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_rs, 1) < dst.len(),
        "product's destination too short"
    );
    assert!(
        last(m, k, lhs.1, lhs.2) < lhs.0.len(),
        "left operand too short"
    );
    assert!(
        last(k, n, rhs.1, rhs.2) < rhs.0.len(),
        "right operand too short"
    );
    // SAFETY: every element the product reads or writes lies within its slice (checked above),
    // and `dst`, a unique borrow, aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The query blocks of a sequence of `t` positions, as row ranges.
fn query_blocks(t: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..t)
        .step_by(QUERY_BLOCK)
        .map(move |r0| r0..(r0 + QUERY_BLOCK).min(t))
}

/// Causal self-attention over `[B, H, T, head_dim]` queries, keys and values, where sequence `b`
/// is left-padded by `pads[b]` positions: a query at or after the padding sees the keys from the
/// padding's end up to itself, a padding query only itself (so that no row is empty).
#[derive(Clone, Debug)]
pub struct CausalAttention {
    pub pads: Vec<usize>,
    pub scale: f32,
}

/// One head of one sequence: `[t, hd]` row-major slices.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    t: usize,
    hd: usize,
    pad: usize,
}

impl<'a> Head<'a> {
    /// The head whose `[t, hd]` rows lie at `range` of the flat queries and keys.
    fn of(q: &'a [f32], k: &'a [f32], range: std::ops::Range<usize>, pad: usize, t: usize) -> Self {
        let hd = range.len() / t;
        Head {
            q: &q[range.clone()],
            k: &k[range],
            t,
            hd,
            pad,
        }
    }
}

impl CausalAttention {
    /// The keys query `i` of a sequence padded by `pad` sees.
    fn keys(pad: usize, i: usize) -> std::ops::RangeInclusive<usize> {
        if i < pad {
            i..=i
        } else {
            pad..=i
        }
    }

    /// Softmax weights of every query over its keys, into `p` (`[t, t]`, row stride `t`): row `i`
    /// holds its block's keys, zero where `i` does not see them; later columns are left as they
    /// were.
    fn probabilities(&self, head: &Head<'_>, p: &mut [f32]) {
        let (t, hd) = (head.t, head.hd);
        for rows in query_blocks(t) {
            let end = rows.end;
            matmul(
                (rows.len(), end, hd),
                &mut p[rows.start * t..],
                t,
                (&head.q[rows.start * hd..], hd, 1),
                (head.k, 1, hd),
                false,
                self.scale,
            );
            for i in rows {
                let row = &mut p[i * t..i * t + end];
                let keys = Self::keys(head.pad, i);
                let (first, last) = (*keys.start(), *keys.end());
                let seen = &mut row[keys];
                let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for w in seen.iter_mut() {
                    *w = exp_nonpositive(*w - max);
                }
                let sum: f32 = seen.iter().sum();
                let inverse = 1.0 / sum;
                for w in seen.iter_mut() {
                    *w *= inverse;
                }
                row[..first].fill(0.0);
                row[last + 1..].fill(0.0);
            }
        }
    }

    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, h, t, hd) = layout.shape().dims4()?;
        if b != self.pads.len() {
            candle_core::bail!(
                "attention over {b} sequences given {} paddings",
                self.pads.len()
            );
        }
        Ok((b, h, t, hd))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "kiln-causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, t, hd) = self.dims(lq)?;
        if lk.shape() != lq.shape() || lv.shape() != lq.shape() {
            candle_core::bail!("attention's queries, keys and values differ in shape");
        }
        let (q, k, v) = (
            f32_slice(sq, lq, self.name())?,
            f32_slice(sk, lk, self.name())?,
            f32_slice(sv, lv, self.name())?,
        );
        let size = t * hd;
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(size).enumerate().for_each_init(
            || vec![0f32; t * t],
            |p, (bh, out)| {
                let range = bh * size..(bh + 1) * size;
                let head = Head::of(q, k, range.clone(), self.pads[bh / h], t);
                self.probabilities(&head, p);
                let v = &v[range];
                for rows in query_blocks(t) {
                    matmul(
                        (rows.len(), hd, rows.end),
                        &mut out[rows.start * hd..],
                        hd,
                        (&p[rows.start * t..], t, 1),
                        (v, hd, 1),
                        false,
                        1.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, h, t, hd) = q.dims4()?;
        let flat = |x: &Tensor| x.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (q, k, v, o, go) = (flat(q)?, flat(k)?, flat(v)?, flat(out)?, flat(grad_out)?);
        let size = t * hd;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; q.len()],
            vec![0f32; q.len()],
        );
        dq.par_chunks_mut(size)
            .zip(dk.par_chunks_mut(size))
            .zip(dv.par_chunks_mut(size))
            .enumerate()
            .for_each_init(
                || (vec![0f32; t * t], vec![0f32; t * t]),
                |(p, ds), (bh, ((dq, dk), dv))| {
                    let range = bh * size..(bh + 1) * size;
                    let head = Head::of(&q, &k, range.clone(), self.pads[bh / h], t);
                    self.probabilities(&head, p);
                    let (v, o, go) = (&v[range.clone()], &o[range.clone()], &go[range]);
                    for rows in query_blocks(t) {
                        let (r0, end, m) = (rows.start, rows.end, rows.len());
                        // dp = go v^T, then d softmax: ds_ij = p_ij (dp_ij - sum_l p_il dp_il),
                        // where sum_l p_il dp_il = go_i . o_i.
                        matmul(
                            (m, end, hd),
                            &mut ds[r0 * t..],
                            t,
                            (&go[r0 * hd..], hd, 1),
                            (v, 1, hd),
                            false,
                            1.0,
                        );
                        for i in rows {
                            let centre = dot(&go[i * hd..(i + 1) * hd], &o[i * hd..(i + 1) * hd]);
                            let (p, ds) = (&p[i * t..i * t + end], &mut ds[i * t..i * t + end]);
                            for (d, &w) in ds.iter_mut().zip(p) {
                                *d = w * (*d - centre) * self.scale;
                            }
                        }
                        let (p, ds) = (&p[r0 * t..], &ds[r0 * t..]);
                        matmul(
                            (m, hd, end),
                            &mut dq[r0 * hd..],
                            hd,
                            (ds, t, 1),
                            (head.k, hd, 1),
                            false,
                            1.0,
                        );
                        matmul(
                            (end, hd, m),
                            dk,
                            hd,
                            (ds, 1, t),
                            (&head.q[r0 * hd..], hd, 1),
                            true,
                            1.0,
                        );
                        matmul(
                            (end, hd, m),
                            dv,
                            hd,
                            (p, 1, t),
                            (&go[r0 * hd..], hd, 1),
                            true,
                            1.0,
                        );
                    }
                },
            );
        let shape = (self.pads.len(), h, t, hd);
        let device = grad_out.device();
        Ok((
            Some(Tensor::from_vec(dq, shape, device)?),
            Some(Tensor::from_vec(dk, shape, device)?),
            Some(Tensor::from_vec(dv, shape, device)?),
        ))
    }
}

/// Attention of `q`, `k`, `v` (`[B, H, T, head_dim]`, made contiguous here) with left paddings
/// `pads` and score scale `scale`: `[B, H, T, head_dim]`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pads: &[usize],
    scale: f64,
) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        CausalAttention {
            pads: pads.to_vec(),
            scale: scale as f32,
        },
    )
}

/// Mean negative log-likelihood of u32 `targets` `[N]` under `logits` `[N, classes]`, a scalar.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy;

/// Per row of `logits`, the log of the sum of exponentials and the row's maximum.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = sum_exp(row, max);
    (sum.ln(), max)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        sl: &CpuStorage,
        ll: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, classes) = ll.shape().dims2()?;
        let logits = f32_slice(sl, ll, self.name())?;
        let CpuStorage::U32(targets) = st else {
            candle_core::bail!("cross-entropy takes u32 targets")
        };
        let Some((start, end)) = lt.contiguous_offsets() else {
            candle_core::bail!("cross-entropy takes contiguous targets")
        };
        let targets = &targets[start..end];
        if targets.len() != n || targets.iter().any(|&c| c as usize >= classes) {
            candle_core::bail!("cross-entropy needs one target below {classes} per row");
        }
        let total: f64 = logits
            .par_chunks(classes)
            .zip(targets.par_iter())
            .map(|(row, &target)| {
                let (log_z, max) = log_sum_exp(row);
                (log_z - (row[target as usize] - max)) as f64
            })
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, classes) = logits.dims2()?;
        let scale = grad_loss.to_scalar::<f32>()? / n as f32;
        let values = logits.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let targets = targets.to_vec1::<u32>()?;
        let mut grad = vec![0f32; values.len()];
        grad.par_chunks_mut(classes)
            .zip(values.par_chunks(classes))
            .zip(targets.par_iter())
            .for_each(|((g, row), &target)| {
                let (log_z, max) = log_sum_exp(row);
                for (g, &x) in g.iter_mut().zip(row) {
                    *g = exp_nonpositive(x - max - log_z) * scale;
                }
                g[target as usize] -= scale;
            });
        Ok((
            Some(Tensor::from_vec(grad, (n, classes), logits.device())?),
            None,
        ))
    }
}

/// [`CrossEntropy`] of `logits` and `targets`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The op-by-op graph the fused ops replaced: an explicit mask and softmax.
    fn attention_by_ops(q: &Tensor, k: &Tensor, v: &Tensor, pads: &[usize], scale: f64) -> Tensor {
        let (b, _, t, _) = q.dims4().unwrap();
        let mut mask = vec![0f32; b * t * t];
        for (s, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    let visible = j == i || (j < i && j >= pad);
                    mask[s * t * t + i * t + j] = if visible { 0.0 } else { -1e9 };
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), q.device()).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(v).unwrap()
    }

    fn cross_entropy_by_ops(logits: &Tensor, targets: &Tensor) -> Tensor {
        let max = logits.max_keepdim(D::Minus1).unwrap().detach();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let log_z = shifted
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let log_p = shifted.broadcast_sub(&log_z).unwrap();
        let picked = log_p.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
        picked.mean_all().unwrap().neg().unwrap()
    }

    /// The largest absolute value of `t`.
    fn largest(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        largest(&(a - b).unwrap())
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
        Var::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_attention_matches_the_masked_softmax_in_values_and_gradients() {
        // Head size 12 exercises the dot product's tail; pads of 0, 3 and all but one position.
        matches_the_masked_softmax((3, 2, 7, 12), &[0, 3, 6]);
    }

    #[test]
    fn fused_attention_over_several_query_blocks_matches_the_masked_softmax() {
        // 150 positions span three query blocks; one padding ends inside the second.
        const { assert!(150 > 2 * QUERY_BLOCK) };
        matches_the_masked_softmax((2, 2, 150, 8), &[0, 70]);
    }

    fn matches_the_masked_softmax(shape: (usize, usize, usize, usize), pads: &[usize]) {
        let (q, k, v) = (random(shape, 1), random(shape, 2), random(shape, 3));
        let weights = random(shape, 4).as_tensor().clone();
        let scale = 1.0 / (shape.3 as f64).sqrt();
        let fused = causal_attention(&q, &k, &v, pads, scale).unwrap();
        let reference = attention_by_ops(&q, &k, &v, pads, scale);
        assert!(largest_difference(&fused, &reference) < 1e-5);
        let grads = |out: &Tensor| {
            (out * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (fused_grads, reference_grads) = (grads(&fused), grads(&reference));
        for var in [&q, &k, &v] {
            let (a, b) = (
                fused_grads.get(var).unwrap(),
                reference_grads.get(var).unwrap(),
            );
            let size = largest(b);
            assert!(size > 0.1, "the reference gradient is not trivial");
            assert!(
                largest_difference(a, b) < 1e-4,
                "{}",
                largest_difference(a, b)
            );
        }
    }

    #[test]
    fn the_vector_exponential_is_within_two_ulps_of_libm() {
        let mut worst = 0u32;
        for i in 0..=2_000_000 {
            let x = -87.0 * i as f32 / 2_000_000.0;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            worst = worst.max(fast.to_bits().abs_diff(exact.to_bits()));
        }
        assert!(worst <= 2, "{worst} ulps");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
        let values = [
            -3.0f32, -0.5, 0.0, -10.0, -1.0, -2.0, -4.0, -0.25, -7.0, -1.5, -0.1,
        ];
        let exact: f32 = values.iter().map(|&x| (x - 0.5).exp()).sum();
        assert!((sum_exp(&values, 0.5) - exact).abs() < 1e-6 * exact);
    }

    #[test]
    fn a_padding_query_sees_only_itself() {
        let shape = (1, 1, 4, 8);
        let (q, k, v) = (random(shape, 5), random(shape, 6), random(shape, 7));
        let out = causal_attention(&q, &k, &v, &[2], 0.5).unwrap();
        // Padding rows 0 and 1 copy their own values; row 2 is the first to see only itself.
        for row in 0..3 {
            let (a, b) = (out.narrow(2, row, 1).unwrap(), v.narrow(2, row, 1).unwrap());
            assert!(largest_difference(&a, &b) < 1e-6, "row {row}");
        }
        let (a, b) = (out.narrow(2, 3, 1).unwrap(), v.narrow(2, 3, 1).unwrap());
        assert!(largest_difference(&a, &b) > 1e-3, "row 3 mixes two values");
    }

    #[test]
    fn fused_cross_entropy_matches_log_softmax_in_value_and_gradient() {
        let logits = random((1, 1, 6, 37), 8);
        let logits2 = logits.as_tensor().reshape((6, 37)).unwrap();
        let targets = Tensor::new(&[0u32, 36, 5, 5, 17, 2], &Device::Cpu).unwrap();
        let fused = cross_entropy(&logits2, &targets).unwrap();
        let reference = cross_entropy_by_ops(&logits2, &targets);
        assert!(largest_difference(&fused, &reference) < 1e-5);
        let (a, b) = (fused.backward().unwrap(), reference.backward().unwrap());
        let (a, b) = (a.get(&logits).unwrap(), b.get(&logits).unwrap());
        assert!(largest_difference(a, b) < 1e-6);
        assert!(cross_entropy(
            &logits2,
            &Tensor::new(&[0u32, 0, 0, 0, 0, 37], &Device::Cpu).unwrap()
        )
        .is_err());
    }
}
