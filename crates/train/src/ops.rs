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

fn add_scaled(into: &mut [f32], scale: f32, from: &[f32]) {
    for (i, f) in into.iter_mut().zip(from) {
        *i += scale * f;
    }
}

/// Causal self-attention over `[B, H, T, head_dim]` queries, keys and values, where sequence `b`
/// is left-padded by `pads[b]` positions: a query at or after the padding sees the keys from the
/// padding's end up to itself, a padding query only itself (so that no row is empty).
#[derive(Clone, Debug)]
pub struct CausalAttention {
    pub pads: Vec<usize>,
    pub scale: f32,
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

    /// Softmax weights of query `qi` (position `i`) over its keys, into `p[..len]`.
    fn weights(
        &self,
        qi: &[f32],
        k: &[f32],
        hd: usize,
        keys: &std::ops::RangeInclusive<usize>,
        p: &mut [f32],
    ) {
        let mut max = f32::NEG_INFINITY;
        for (slot, j) in keys.clone().enumerate() {
            let s = dot(qi, &k[j * hd..(j + 1) * hd]) * self.scale;
            p[slot] = s;
            max = max.max(s);
        }
        let len = keys.clone().count();
        let mut sum = 0.0;
        for w in &mut p[..len] {
            *w = (*w - max).exp();
            sum += *w;
        }
        for w in &mut p[..len] {
            *w /= sum;
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
        let head = t * hd;
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(head).enumerate().for_each(|(bh, out)| {
            let pad = self.pads[bh / h];
            let base = bh * head;
            let (q, k, v) = (
                &q[base..base + head],
                &k[base..base + head],
                &v[base..base + head],
            );
            let mut p = vec![0f32; t];
            for i in 0..t {
                let keys = Self::keys(pad, i);
                self.weights(&q[i * hd..(i + 1) * hd], k, hd, &keys, &mut p);
                let oi = &mut out[i * hd..(i + 1) * hd];
                for (slot, j) in keys.enumerate() {
                    add_scaled(oi, p[slot], &v[j * hd..(j + 1) * hd]);
                }
            }
        });
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
        let head = t * hd;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; q.len()],
            vec![0f32; q.len()],
        );
        dq.par_chunks_mut(head)
            .zip(dk.par_chunks_mut(head))
            .zip(dv.par_chunks_mut(head))
            .enumerate()
            .for_each(|(bh, ((dq, dk), dv))| {
                let pad = self.pads[bh / h];
                let range = bh * head..(bh + 1) * head;
                let (q, k, v) = (&q[range.clone()], &k[range.clone()], &v[range.clone()]);
                let (o, go) = (&o[range.clone()], &go[range]);
                let mut p = vec![0f32; t];
                for i in 0..t {
                    let keys = Self::keys(pad, i);
                    let row = i * hd..(i + 1) * hd;
                    let qi = &q[row.clone()];
                    self.weights(qi, k, hd, &keys, &mut p);
                    let goi = &go[row.clone()];
                    // d softmax: ds_j = p_j (dp_j - sum_l p_l dp_l), and sum_l p_l dp_l = go_i . o_i.
                    let centre = dot(goi, &o[row.clone()]);
                    for (slot, j) in keys.enumerate() {
                        let key = j * hd..(j + 1) * hd;
                        let ds = p[slot] * (dot(goi, &v[key.clone()]) - centre) * self.scale;
                        add_scaled(&mut dq[row.clone()], ds, &k[key.clone()]);
                        add_scaled(&mut dk[key.clone()], ds, qi);
                        add_scaled(&mut dv[key], p[slot], goi);
                    }
                }
            });
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
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
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
                    *g = (x - max - log_z).exp() * scale;
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
        let shape = (3, 2, 7, 12);
        let pads = [0, 3, 6];
        let (q, k, v) = (random(shape, 1), random(shape, 2), random(shape, 3));
        let weights = random(shape, 4).as_tensor().clone();
        let scale = 1.0 / 12f64.sqrt();
        let fused = causal_attention(&q, &k, &v, &pads, scale).unwrap();
        let reference = attention_by_ops(&q, &k, &v, &pads, scale);
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
