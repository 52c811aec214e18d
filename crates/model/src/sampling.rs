//! Seeded sampling of the next image code from logits: temperature, top-k and top-p. The random draw
//! for image position `i` comes from a counter-based stream keyed by (seed, i), so a token does not
//! depend on what else ran in the batch nor on which worker drew it, resumes included.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Validated sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// In (0, 1]; 1 disables top-p.
    pub top_p: f32,
    pub seed: u64,
    /// The most tokens a decode pass may draft and verify for this sequence (speculative Jacobi
    /// decoding; 1 turns it off, `None` leaves it to the engine). It never changes the codes drawn.
    pub speculation: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            speculation: None,
        }
    }
}

/// The uniform draw in [0, 1) for image position `index` of a sequence seeded with `seed`.
pub fn uniform(seed: u64, index: usize) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng.random::<f64>()
}

/// Picks a code from `logits` for image position `index`.
pub fn sample(logits: &[f32], params: &SamplingParams, index: usize) -> u32 {
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    // Candidates by descending logit, ties by lower code: a total order, so the result is stable.
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let keep = if params.top_k > 0 {
        params.top_k.min(order.len())
    } else {
        order.len()
    };
    if keep < order.len() {
        order.select_nth_unstable_by(keep - 1, by_logit);
        order.truncate(keep);
    }
    order.sort_unstable_by(by_logit);

    let inv_t = 1.0 / params.temperature as f64;
    let max = logits[order[0] as usize] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&c| ((logits[c as usize] as f64 - max) * inv_t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);

    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative >= params.top_p as f64 {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        let kept: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= kept);
    }

    let u = uniform(params.seed, index);
    let mut cumulative = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cumulative += p;
        if u < cumulative {
            return order[i];
        }
    }
    order[probs.len() - 1]
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            speculation: None,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(
            sample(&[0.1, 3.0, 3.0, -1.0], &params(0.0, 0, 1.0, 7), 0),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_tiny_top_p_too() {
        let logits = [0.5, 0.2, 2.0, 1.9];
        for i in 0..50 {
            assert_eq!(sample(&logits, &params(1.5, 1, 1.0, 3), i), 2);
            assert_eq!(sample(&logits, &params(1.5, 0, 0.01, 3), i), 2);
        }
    }

    #[test]
    fn draws_depend_on_seed_and_position_only() {
        let logits: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = params(1.0, 0, 1.0, 42);
        let a: Vec<u32> = (0..100).map(|i| sample(&logits, &p, i)).collect();
        let b: Vec<u32> = (0..100)
            .rev()
            .map(|i| sample(&logits, &p, i))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert_eq!(a, b);
        let other: Vec<u32> = (0..100)
            .map(|i| sample(&logits, &params(1.0, 0, 1.0, 43), i))
            .collect();
        assert_ne!(a, other);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000)
            .filter(|&i| sample(&logits, &params(1.0, 0, 1.0, 9), i) == 1)
            .count();
        // Expected 3000 of 4000; five standard deviations is about 137.
        assert!((2860..3140).contains(&ones), "{ones}");
    }

    proptest! {
        #[test]
        fn samples_stay_inside_top_k(seed in any::<u64>(), k in 1usize..8, logits in proptest::collection::vec(-5.0f32..5.0, 8..32)) {
            let code = sample(&logits, &params(1.0, k, 1.0, seed), 3) as usize;
            let better = logits.iter().enumerate().filter(|(i, &l)| l > logits[code] || (l == logits[code] && *i < code)).count();
            prop_assert!(better < k);
        }
    }
}
