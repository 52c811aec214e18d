//! A simulated accelerator for load tests: [`SimulatedEngine`] does no math. Each call takes as long
//! as a calibrated [`StepCost`] predicts for its batch and context, while the KV blocks, batch slots,
//! validation and token counts behave exactly as on the real engine, so the gateway, scheduler,
//! Redis and etcd see a fleet of GPUs that one machine can host. Its codes are a deterministic
//! function of seed and position, and its images are flat colour PNGs marked as simulated.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::{
    check_prefill, preview_due, Engine, EngineInfo, NewSequence, Preview, SequenceOutput,
};
use crate::kv_cache::BlockAllocator;
use crate::{Image, ModelConfig, ModelError};

/// Predicted step times of one accelerator and model, in seconds.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepCost {
    /// Short name, e.g. `h100-20m`; the worker reports its device as `simulated:<name>`.
    pub name: String,
    pub decode_fixed_seconds: f64,
    pub decode_per_sequence_seconds: f64,
    pub decode_per_context_token_seconds: f64,
    pub prefill_fixed_seconds: f64,
    pub prefill_per_token_seconds: f64,
    /// Image tokens a sequence advances per decode pass on average: 1 for plain decoding, more
    /// with speculative decoding (`kiln eval --speculation` measures it as tokens over passes).
    /// The decode coefficients are then those measured with the same speculation.
    #[serde(default = "one_token_per_pass")]
    pub tokens_per_pass: f64,
}

fn one_token_per_pass() -> f64 {
    1.0
}

/// The calibrations shipped with Kiln, by name.
pub const SHIPPED_COSTS: &[(&str, &str)] = &[
    ("cpu-20m", include_str!("../calibration/cpu-20m.toml")),
    ("h100-20m", include_str!("../calibration/h100-20m.toml")),
];

impl StepCost {
    /// A shipped calibration (`cpu-20m`, `h100-20m`) or a TOML file of the same fields.
    pub fn load(name_or_path: &str) -> Result<StepCost, ModelError> {
        let text = match SHIPPED_COSTS.iter().find(|(name, _)| *name == name_or_path) {
            Some((_, text)) => text.to_string(),
            None => std::fs::read_to_string(Path::new(name_or_path)).map_err(|e| {
                ModelError::Weights(format!(
                    "step-cost {name_or_path}: not a shipped calibration ({}) and not readable: {e}",
                    SHIPPED_COSTS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
        };
        let cost: StepCost = toml::from_str(&text)
            .map_err(|e| ModelError::Weights(format!("step-cost {name_or_path}: {e}")))?;
        let all = [
            cost.decode_fixed_seconds,
            cost.decode_per_sequence_seconds,
            cost.decode_per_context_token_seconds,
            cost.prefill_fixed_seconds,
            cost.prefill_per_token_seconds,
        ];
        if all.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(ModelError::Weights(format!(
                "step-cost {name_or_path}: every coefficient must be a finite number of seconds >= 0"
            )));
        }
        cost.check_tokens_per_pass()
            .map_err(|e| ModelError::Weights(format!("step-cost {name_or_path}: {e}")))?;
        Ok(cost)
    }

    /// The same costs with `tokens_per_pass` image tokens per decode pass (checked as in a file).
    pub fn with_tokens_per_pass(mut self, tokens_per_pass: f64) -> Result<StepCost, ModelError> {
        self.tokens_per_pass = tokens_per_pass;
        self.check_tokens_per_pass().map_err(ModelError::Weights)?;
        Ok(self)
    }

    fn check_tokens_per_pass(&self) -> Result<(), String> {
        let tpp = self.tokens_per_pass;
        if !(tpp.is_finite() && (1.0..=crate::MAX_SPECULATION as f64).contains(&tpp)) {
            return Err(format!(
                "tokens_per_pass must be 1 to {} (a pass accepts at least one token and at most its window), got {tpp}",
                crate::MAX_SPECULATION
            ));
        }
        Ok(())
    }

    /// Image tokens a sequence with `credit` carried over takes in one decode pass, at most
    /// `remaining`, and the credit it carries to the next: `tokens_per_pass` on average (at most
    /// the sequence's own `limit`), whole tokens each pass, the same for the same history.
    pub fn pass_tokens(&self, limit: Option<usize>, credit: f64, remaining: usize) -> (usize, f64) {
        let rate = limit.map_or(self.tokens_per_pass, |l| {
            self.tokens_per_pass.min(l.max(1) as f64)
        });
        let due = credit + rate;
        let whole = (due.floor() as usize).max(1);
        if whole >= remaining {
            (remaining, 0.0)
        } else {
            (whole, due - whole as f64)
        }
    }

    /// One decode step over `batch` sequences holding `context_tokens` positions in all.
    pub fn decode_seconds(&self, batch: usize, context_tokens: usize) -> f64 {
        self.decode_fixed_seconds
            + self.decode_per_sequence_seconds * batch as f64
            + self.decode_per_context_token_seconds * context_tokens as f64
    }

    /// One prefill pass over `tokens` prompt (and resumed) tokens.
    pub fn prefill_seconds(&self, tokens: usize) -> f64 {
        self.prefill_fixed_seconds + self.prefill_per_token_seconds * tokens as f64
    }
}

struct SimulatedSequence {
    seed: u64,
    width: u32,
    height: u32,
    blocks: Vec<u32>,
    /// Positions held: prefix, then one per image input.
    context: usize,
    generated: Vec<u32>,
    total: usize,
    /// Previews asked for (the simulated engine's previews are its final image's stand-in).
    partial_images: u32,
    /// The request's own limit on tokens per pass (1: no speculation).
    speculation: Option<usize>,
    /// Fractional tokens carried between passes (see [`StepCost::pass_tokens`]).
    credit: f64,
}

/// How the engine spends a predicted step time; tests record instead of sleeping.
pub type Pause = Box<dyn Fn(Duration) + Send>;

/// The simulated accelerator.
pub struct SimulatedEngine {
    config: ModelConfig,
    cost: StepCost,
    allocator: BlockAllocator,
    block_size: usize,
    max_batch: usize,
    sequences: HashMap<u64, SimulatedSequence>,
    pause: Pause,
}

impl SimulatedEngine {
    /// An engine that looks like `config` (sizes, codebook, prompt limit) and takes `cost`'s time.
    pub fn new(
        config: ModelConfig,
        cost: StepCost,
        kv_blocks: usize,
        block_size: usize,
        max_batch: usize,
    ) -> Self {
        SimulatedEngine {
            config,
            cost,
            allocator: BlockAllocator::new(kv_blocks),
            block_size,
            max_batch,
            sequences: HashMap::new(),
            pause: Box::new(std::thread::sleep),
        }
    }

    /// Replaces sleeping (tests observe the predicted times instead).
    pub fn with_pause(mut self, pause: Pause) -> Self {
        self.pause = pause;
        self
    }

    fn pause_for(&self, seconds: f64) {
        if seconds > 0.0 {
            (self.pause)(Duration::from_secs_f64(seconds));
        }
    }

    /// The code at `index` of a sequence seeded `seed`: any fixed function works, as long as a
    /// resumed sequence continues where it left off.
    fn code(&self, seed: u64, index: usize) -> u32 {
        let mut x = seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        (x % self.config.codebook_size as u64) as u32
    }

    /// Appends the next code; returns the image when the sequence is complete (and drops it).
    fn advance(&mut self, id: u64, out: &mut SequenceOutput) -> Result<(), ModelError> {
        let seq = self.sequences.get(&id).expect("held");
        let code = self.code(seq.seed, seq.generated.len());
        let seq = self.sequences.get_mut(&id).expect("held");
        seq.generated.push(code);
        seq.context += 1;
        out.tokens.push(code);
        if let Some(index) = preview_due(seq.total, seq.partial_images, seq.generated.len()) {
            out.previews.push(Preview {
                index,
                tokens_done: seq.generated.len() as u32,
                image: simulated_png(seq.seed, seq.width, seq.height)?,
            });
        }
        if seq.generated.len() == seq.total {
            let seq = self.sequences.remove(&id).expect("held");
            out.image = Some(simulated_png(seq.seed, seq.width, seq.height)?);
            self.allocator.release(seq.blocks);
        }
        Ok(())
    }
}

/// A flat colour image (from the seed) whose PNG text says it was simulated.
fn simulated_png(seed: u64, width: u32, height: u32) -> Result<Image, ModelError> {
    let colour = [(seed >> 16) as u8, (seed >> 8) as u8, seed as u8];
    let rgb: Vec<u8> = colour
        .iter()
        .copied()
        .cycle()
        .take((width * height * 3) as usize)
        .collect();
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| ModelError::Encode(e.to_string());
        encoder
            .add_text_chunk("Software".into(), "Kiln simulated GPU backend".into())
            .map_err(err)?;
        encoder
            .add_text_chunk("kiln:simulated".into(), "true".into())
            .map_err(err)?;
        let mut writer = encoder.write_header().map_err(err)?;
        writer.write_image_data(&rgb).map_err(err)?;
    }
    Ok(Image { png, width, height })
}

impl Engine for SimulatedEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model: format!("{}-simulated@{}", self.config.name, self.config.version),
            device: format!("simulated:{}", self.cost.name),
            kv_blocks_total: self.allocator.total(),
            block_size: self.block_size,
            max_batch: self.max_batch,
            sizes: self.config.sizes.clone(),
            default_size: self.config.default_size,
            patch_size: self.config.patch_size,
            max_prompt_bytes: self.config.max_prompt_bytes,
            default_temperature: self.config.default_temperature,
            default_top_k: self.config.default_top_k,
            // Step times are calibrated per call, not per row: the simulated GPU draws unguided.
            guidance: None,
        }
    }

    fn free_blocks(&self) -> usize {
        self.allocator.free()
    }

    fn sequences(&self) -> usize {
        self.sequences.len()
    }

    fn prefill(&mut self, seqs: Vec<NewSequence>) -> Result<Vec<SequenceOutput>, ModelError> {
        check_prefill(
            &self.config,
            &self.info(),
            |id| self.sequences.contains_key(&id),
            self.sequences.len(),
            self.allocator.free(),
            &seqs,
        )?;
        let mut tokens = 0;
        let mut ids = Vec::with_capacity(seqs.len());
        for new in seqs {
            let blocks = self.allocator.allocate(new.kv_blocks)?;
            let prefix = crate::engine::prompt_tokens(new.prompt.len()) + new.generated.len();
            tokens += prefix;
            ids.push(new.id);
            self.sequences.insert(
                new.id,
                SimulatedSequence {
                    seed: new.sampling.seed,
                    width: new.width,
                    height: new.height,
                    blocks,
                    context: prefix,
                    total: self.config.image_tokens(new.width, new.height),
                    partial_images: new.partial_images,
                    generated: new.generated,
                    speculation: new.sampling.speculation,
                    credit: 0.0,
                },
            );
        }
        self.pause_for(self.cost.prefill_seconds(tokens));
        let mut outputs = Vec::with_capacity(ids.len());
        for id in ids {
            let mut out = SequenceOutput {
                id,
                tokens: Vec::new(),
                passes: 1,
                image: None,
                previews: Vec::new(),
            };
            self.advance(id, &mut out)?;
            outputs.push(out);
        }
        Ok(outputs)
    }

    fn decode(&mut self, ids: &[u64], steps: usize) -> Result<Vec<SequenceOutput>, ModelError> {
        if let Some(id) = ids.iter().find(|id| !self.sequences.contains_key(id)) {
            return Err(ModelError::InvalidSequence(format!(
                "sequence {id} is not held"
            )));
        }
        let mut outputs: HashMap<u64, SequenceOutput> = HashMap::new();
        let mut seconds = 0.0;
        for _ in 0..steps.max(1) {
            let active: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| self.sequences.contains_key(id))
                .collect();
            if active.is_empty() {
                break;
            }
            let context: usize = active.iter().map(|id| self.sequences[id].context).sum();
            seconds += self.cost.decode_seconds(active.len(), context);
            for id in active {
                let out = crate::engine::output_of(&mut outputs, id);
                out.passes += 1;
                let seq = &self.sequences[&id];
                let (tokens, credit) = self.cost.pass_tokens(
                    seq.speculation,
                    seq.credit,
                    seq.total - seq.generated.len(),
                );
                self.sequences.get_mut(&id).expect("active").credit = credit;
                for _ in 0..tokens {
                    self.advance(id, out)?;
                }
            }
        }
        self.pause_for(seconds);
        Ok(ids.iter().filter_map(|id| outputs.remove(id)).collect())
    }

    fn release(&mut self, ids: &[u64]) {
        for id in ids {
            if let Some(seq) = self.sequences.remove(id) {
                self.allocator.release(seq.blocks);
            }
        }
    }

    fn held_ids(&self) -> Vec<u64> {
        self.sequences.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;
    use std::sync::{Arc, Mutex};

    fn engine(kv_blocks: usize) -> (SimulatedEngine, Arc<Mutex<Vec<Duration>>>) {
        let paused = Arc::new(Mutex::new(Vec::new()));
        let record = paused.clone();
        let cost = StepCost::load("h100-20m").unwrap();
        let engine = SimulatedEngine::new(ModelConfig::tiny(), cost, kv_blocks, 4, 8)
            .with_pause(Box::new(move |d| record.lock().unwrap().push(d)));
        (engine, paused)
    }

    fn new_seq(engine: &SimulatedEngine, id: u64, seed: u64, generated: Vec<u32>) -> NewSequence {
        let prompt = "a red star".to_string();
        NewSequence {
            id,
            kv_blocks: engine.info().blocks_needed(prompt.len(), 32, 32),
            prompt,
            width: 32,
            height: 32,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed,
                speculation: None,
            },
            generated,
            partial_images: 0,
        }
    }

    fn run_to_end(engine: &mut SimulatedEngine, id: u64) -> (Vec<u32>, Image) {
        let mut codes = Vec::new();
        loop {
            let out = engine.decode(&[id], 64).unwrap().remove(0);
            codes.extend(out.tokens);
            if let Some(image) = out.image {
                return (codes, image);
            }
        }
    }

    #[test]
    fn steps_take_the_calibrated_time_and_blocks_are_accounted() {
        let (mut engine, paused) = engine(64);
        let cost = StepCost::load("h100-20m").unwrap();
        let first = new_seq(&engine, 1, 5, vec![]);
        let second = new_seq(&engine, 2, 6, vec![]);
        let blocks = first.kv_blocks + second.kv_blocks;
        let out = engine.prefill(vec![first, second]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(engine.free_blocks(), 64 - blocks);
        let prefix = crate::engine::prompt_tokens("a red star".len());
        let expected = cost.prefill_seconds(2 * prefix);
        assert!((paused.lock().unwrap()[0].as_secs_f64() - expected).abs() < 1e-9);

        engine.decode(&[1, 2], 3).unwrap();
        let expected = 3.0 * cost.decode_seconds(2, 0);
        assert!((paused.lock().unwrap()[1].as_secs_f64() - expected).abs() < 1e-9);

        engine.release(&[1]);
        let (codes, image) = run_to_end(&mut engine, 2);
        assert!(!codes.is_empty());
        assert_eq!((image.width, image.height), (32, 32));
        assert!(image.png.windows(14).any(|w| w == b"kiln:simulated"));
        assert_eq!(
            engine.free_blocks(),
            64,
            "every block back after finish and release"
        );
        assert_eq!(engine.sequences(), 0);
    }

    #[test]
    fn speculation_advances_tokens_per_pass_on_average_and_a_request_can_turn_it_off() {
        let paused = Arc::new(Mutex::new(Vec::new()));
        let record = paused.clone();
        let cost = StepCost::load("h100-20m")
            .unwrap()
            .with_tokens_per_pass(2.5)
            .unwrap();
        let mut e = SimulatedEngine::new(ModelConfig::tiny(), cost.clone(), 64, 4, 8)
            .with_pause(Box::new(move |d| record.lock().unwrap().push(d)));
        let mut plain = new_seq(&e, 2, 6, vec![]);
        plain.sampling.speculation = Some(1);
        e.prefill(vec![new_seq(&e, 1, 5, vec![]), plain]).unwrap();
        let out = e.decode(&[1, 2], 4).unwrap();
        // 2.5 a pass in whole tokens: 2, 3, 2, 3; the request that turned it off takes one a pass.
        assert_eq!((out[0].tokens.len(), out[0].passes), (10, 4));
        assert_eq!((out[1].tokens.len(), out[1].passes), (4, 4));
        // The time is that of four passes over two sequences, whatever they accepted.
        let took = paused.lock().unwrap()[1].as_secs_f64();
        assert!((took - 4.0 * cost.decode_seconds(2, 0)).abs() < 1e-9);
        // The codes are those of plain decoding, and the last pass stops at the image's end.
        let (mut reference, _) = engine(64);
        reference
            .prefill(vec![new_seq(&reference, 1, 5, vec![])])
            .unwrap();
        let (plain_codes, _) = run_to_end(&mut reference, 1);
        let (rest, _) = run_to_end(&mut e, 1);
        assert_eq!([&out[0].tokens[..], &rest[..]].concat(), plain_codes);
        assert!(StepCost::load("h100-20m")
            .unwrap()
            .with_tokens_per_pass(0.5)
            .is_err());
    }

    #[test]
    fn resumed_sequences_continue_with_the_same_codes() {
        let (mut engine, _) = engine(64);
        let mut full = engine
            .prefill(vec![new_seq(&engine, 1, 9, vec![])])
            .unwrap()
            .remove(0)
            .tokens;
        let (rest, _) = run_to_end(&mut engine, 1);
        full.extend(rest);
        assert_eq!(full.len(), ModelConfig::tiny().image_tokens(32, 32));
        // Elsewhere, resumed after two codes: the third is the same.
        let (mut other, _) = super::tests::engine(64);
        let resumed = new_seq(&other, 7, 9, full[..2].to_vec());
        let out = other.prefill(vec![resumed]).unwrap().remove(0);
        assert_eq!(out.tokens, vec![full[2]]);
    }

    #[test]
    fn refusals_match_the_real_engine() {
        let (mut engine, _) = engine(2);
        let mut bad = new_seq(&engine, 1, 1, vec![]);
        bad.kv_blocks += 1;
        assert!(matches!(
            engine.prefill(vec![bad]),
            Err(ModelError::InvalidSequence(_))
        ));
        let big = new_seq(&engine, 2, 1, vec![]);
        assert!(matches!(
            engine.prefill(vec![big]),
            Err(ModelError::OutOfBlocks { .. })
        ));
        assert_eq!(engine.free_blocks(), 2, "nothing leaked by refusals");
        assert!(StepCost::load("no-such-calibration").is_err());
    }
}
