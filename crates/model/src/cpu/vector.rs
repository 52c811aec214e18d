//! The vector primitives of attention, a dot product and `y += a * x`, for AVX-512 with a portable
//! twin of the same arithmetic: sixteen lanes of fused multiply-adds in a fixed order, the tail
//! added in sequence and the lanes summed by a fixed tree, so the result has the same bits on every
//! CPU and whatever else runs beside it.

const LANES: usize = 16;

/// `a · b` (equal lengths).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the lengths are equal.
        return unsafe { avx512::dot(a, b) };
    }
    portable_dot(a, b)
}

/// `y[i] += a * x[i]` in one rounding (equal lengths).
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the lengths are equal.
        unsafe { avx512::axpy(a, x, y) };
        return;
    }
    portable_axpy(a, x, y);
}

pub(crate) fn portable_axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut()
        .zip(x)
        .for_each(|(y, x)| *y = a.mul_add(*x, *y));
}

pub(crate) fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(0f32, |t, (x, y)| x.mul_add(*y, t));
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            lanes[i] = x[i].mul_add(y[i], lanes[i]);
        }
    }
    sum_lanes(lanes) + tail
}

/// Lane `i` with lane `i + 8`, then `i + 4`, `i + 2`, `i + 1`.
fn sum_lanes(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F; `a` and `b` have the same length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let whole = a.len() / LANES * LANES;
        // SAFETY: every load reads 16 floats below `whole`, within both slices.
        let sum = unsafe {
            let mut acc = _mm512_setzero_ps();
            for at in (0..whole).step_by(LANES) {
                let x = _mm512_loadu_ps(a.as_ptr().add(at));
                let y = _mm512_loadu_ps(b.as_ptr().add(at));
                acc = _mm512_fmadd_ps(x, y, acc);
            }
            sum_lanes_in_register(acc)
        };
        let tail = a[whole..]
            .iter()
            .zip(&b[whole..])
            .fold(0f32, |t, (x, y)| x.mul_add(*y, t));
        sum + tail
    }

    /// The tree of `sum_lanes`, by shuffles: lane `i` with `i + 8`, then `i + 4`, `i + 2`, `i + 1`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sum_lanes_in_register(v: __m512) -> f32 {
        let high8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let s8 = _mm256_add_ps(_mm512_castps512_ps256(v), high8);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// # Safety
    /// The CPU must support AVX-512F; `x` and `y` have the same length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let whole = x.len() / LANES * LANES;
        // SAFETY: every load and store touches 16 floats below `whole`, within both slices.
        unsafe {
            let av = _mm512_set1_ps(a);
            for at in (0..whole).step_by(LANES) {
                let xv = _mm512_loadu_ps(x.as_ptr().add(at));
                let yp = y.as_mut_ptr().add(at);
                _mm512_storeu_ps(yp, _mm512_fmadd_ps(av, xv, _mm512_loadu_ps(yp)));
            }
        }
        for (y, x) in y[whole..].iter_mut().zip(&x[whole..]) {
            *y = a.mul_add(*x, *y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ salt) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn dispatched_and_portable_give_the_same_bits() {
        for n in [1, 15, 16, 64, 77, 128] {
            let (a, b) = (values(n, 1), values(n, 2));
            assert_eq!(
                dot(&a, &b).to_bits(),
                portable_dot(&a, &b).to_bits(),
                "dot of {n}"
            );
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "dot of {n}");
            let (mut fast, mut portable) = (b.clone(), b.clone());
            axpy(0.37, &a, &mut fast);
            portable_axpy(0.37, &a, &mut portable);
            assert_eq!(fast, portable, "axpy of {n}");
        }
    }
}
