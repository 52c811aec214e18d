//! The [`Engine`]: what a worker drives. It holds the live sequences of one device (their block
//! tables, tokens and sampling state) and executes batched prefill and multi-step decode, rendering
//! each image the moment its last token is sampled. [`CandleEngine`] runs the real transformer,
//! with classifier-free guidance when the model's config asks for it (a prompt-less twin per image
//! in the same batch, on its own half of the cache).

use std::collections::HashMap;

use crate::kv_cache::{blocks_for, PagedKvCache};
use crate::sampling::{sample, SamplingParams};
use crate::tokenizer::{code_token, prefix_tokens, BOI};
use crate::transformer::{Position, SequenceInput, TokenInput, Transformer};
use crate::{Image, ModelConfig, ModelError};

/// What an engine serves and how much it can hold.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineInfo {
    /// `name@version` of the model.
    pub model: String,
    pub device: String,
    pub kv_blocks_total: usize,
    pub block_size: usize,
    pub max_batch: usize,
    pub sizes: Vec<u32>,
    pub default_size: u32,
    pub patch_size: usize,
    pub max_prompt_bytes: usize,
    /// The model's sampling defaults (`ModelConfig::default_temperature`, `default_top_k`).
    pub default_temperature: Option<f32>,
    pub default_top_k: Option<u32>,
    /// Classifier-free guidance scale the engine draws with (`None`: none).
    pub guidance: Option<f32>,
}

impl EngineInfo {
    /// KV blocks a sequence needs for its whole life: prefix plus every image input.
    pub fn blocks_needed(&self, prompt_bytes: usize, width: u32, height: u32) -> usize {
        blocks_for(
            prompt_tokens(prompt_bytes) + self.image_tokens(width, height),
            self.block_size,
        )
    }

    /// Image tokens of a `width` x `height` image.
    pub fn image_tokens(&self, width: u32, height: u32) -> usize {
        (width as usize / self.patch_size) * (height as usize / self.patch_size)
    }
}

/// Tokens of the text prefix for a prompt of `prompt_bytes` bytes.
pub fn prompt_tokens(prompt_bytes: usize) -> usize {
    prompt_bytes + crate::config::PREFIX_OVERHEAD_TOKENS
}

/// A sequence joining the batch.
#[derive(Clone, Debug)]
pub struct NewSequence {
    pub id: u64,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub sampling: SamplingParams,
    /// Codes generated before (when resuming elsewhere); they are prefilled, not re-sampled.
    pub generated: Vec<u32>,
    /// KV blocks the scheduler reserved; must equal what the engine computes.
    pub kv_blocks: usize,
    /// Previews to render while the image is drawn (see [`preview_due`]).
    pub partial_images: u32,
}

/// New codes of one sequence after a call, its previews that fell due, and its image when it
/// finished.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceOutput {
    pub id: u64,
    pub tokens: Vec<u32>,
    /// Forward passes the sequence took part in during the call: with speculation, fewer than
    /// its new tokens.
    pub passes: u32,
    pub image: Option<Image>,
    pub previews: Vec<Preview>,
}

/// A preview of an image being drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct Preview {
    /// Which preview of the sequence, from 0.
    pub index: u32,
    /// Image tokens drawn in it.
    pub tokens_done: u32,
    pub image: Image,
}

/// The preview that falls due when an image of `total` tokens has `done` of them drawn, if any:
/// `previews` of them evenly spaced, the k-th after (k+1)/(previews+1) of the tokens, never at
/// the first or the last token. Two that would fall on one token are one (the lower index).
pub fn preview_due(total: usize, previews: u32, done: usize) -> Option<u32> {
    if done == 0 || done >= total {
        return None;
    }
    (0..previews).find(|&k| (k as usize + 1) * total / (previews as usize + 1) == done)
}

/// A device that holds sequences and advances them in batches.
pub trait Engine: Send + 'static {
    fn info(&self) -> EngineInfo;
    /// KV blocks not reserved by any sequence.
    fn free_blocks(&self) -> usize;
    /// Sequences held.
    fn sequences(&self) -> usize;
    /// Adds sequences (all or none), runs their prefix and samples each one's next code.
    fn prefill(&mut self, seqs: Vec<NewSequence>) -> Result<Vec<SequenceOutput>, ModelError>;
    /// Runs up to `steps` decode steps over `ids` in one batch; finished sequences leave at once.
    fn decode(&mut self, ids: &[u64], steps: usize) -> Result<Vec<SequenceOutput>, ModelError>;
    /// Drops sequences and frees their blocks; unknown ids are ignored.
    fn release(&mut self, ids: &[u64]);
    /// Ids of every sequence held.
    fn held_ids(&self) -> Vec<u64>;
    /// (used, total) bytes of the accelerator's memory, when the engine runs on one; `None` on the
    /// CPU, where the process's own memory is the figure that matters.
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
}

/// Any engine behind a box is an engine (workers choose theirs at start).
impl<E: Engine + ?Sized> Engine for Box<E> {
    fn info(&self) -> EngineInfo {
        (**self).info()
    }
    fn free_blocks(&self) -> usize {
        (**self).free_blocks()
    }
    fn sequences(&self) -> usize {
        (**self).sequences()
    }
    fn prefill(&mut self, seqs: Vec<NewSequence>) -> Result<Vec<SequenceOutput>, ModelError> {
        (**self).prefill(seqs)
    }
    fn decode(&mut self, ids: &[u64], steps: usize) -> Result<Vec<SequenceOutput>, ModelError> {
        (**self).decode(ids, steps)
    }
    fn release(&mut self, ids: &[u64]) {
        (**self).release(ids)
    }
    fn held_ids(&self) -> Vec<u64> {
        (**self).held_ids()
    }
    fn device_memory(&self) -> Option<(u64, u64)> {
        (**self).device_memory()
    }
}

struct Sequence {
    width: u32,
    height: u32,
    sampling: SamplingParams,
    blocks: Vec<u32>,
    /// Positions in the KV cache.
    cached: usize,
    generated: Vec<u32>,
    total: usize,
    /// Previews asked for (see [`preview_due`]).
    partial_images: u32,
    /// With guidance: the same image drawn without its prompt (its own blocks and positions).
    unconditional: Option<Unconditional>,
    /// Codes drafted for the positions after `generated`, verified by the next pass (Jacobi
    /// decoding; see [`CandleEngine::set_speculation`]).
    draft: Vec<u32>,
}

impl Sequence {
    /// The code at image position `index`: drawn, else drafted.
    fn code_at(&self, index: usize) -> Option<u32> {
        match index.checked_sub(self.generated.len()) {
            None => Some(self.generated[index]),
            Some(ahead) => self.draft.get(ahead).copied(),
        }
    }
}

/// The prompt-less twin of a guided sequence: it reads the codes the guided one samples.
struct Unconditional {
    blocks: Vec<u32>,
    cached: usize,
}

/// The transformer on a candle device with its paged KV cache.
pub struct CandleEngine {
    model: Transformer,
    cache: PagedKvCache,
    max_batch: usize,
    sequences: HashMap<u64, Sequence>,
    /// Blocks the scheduler may reserve: all of the cache, or half of it under guidance, whose
    /// unconditional twins take the other half (a twin never needs more than its sequence).
    kv_blocks: usize,
    /// Blocks reserved by the sequences held (their own, not their twins').
    reserved: usize,
    /// Tokens each decode pass drafts and verifies per sequence (1: plain decoding).
    window: usize,
    /// Rows a decode pass may compute before windows narrow (see
    /// [`CandleEngine::set_speculation_rows`]); `None`: no limit.
    speculation_rows: Option<usize>,
    /// Forward passes summed over the sequences in them, prefill included.
    sequence_passes: u64,
}

impl CandleEngine {
    /// An engine holding `kv_blocks` blocks of KV cache (twice that under guidance: the scheduler
    /// reserves blocks per image, and a guided image holds two sequences).
    pub fn new(model: Transformer, kv_blocks: usize, block_size: usize, max_batch: usize) -> Self {
        let cfg = model.config();
        let physical = if cfg.guidance_scale().is_some() {
            2 * kv_blocks
        } else {
            kv_blocks
        };
        let cache = PagedKvCache::new(cfg.n_layers, physical, block_size, cfg.d_model);
        let window = cfg.speculation.unwrap_or(1);
        CandleEngine {
            model,
            cache,
            max_batch,
            sequences: HashMap::new(),
            kv_blocks,
            reserved: 0,
            window,
            speculation_rows: Some(DEFAULT_SPECULATION_ROWS),
            sequence_passes: 0,
        }
    }

    /// Speculative Jacobi decoding with `window` tokens per decode pass (`None` or 1: plain
    /// decoding). Each pass feeds a sequence its next input and the codes drafted for the
    /// `window - 1` positions after it, samples every position of the window with that position's
    /// own draw (the counter-based stream keyed by seed and position), and keeps the longest run
    /// whose inputs were right: a draft is accepted exactly when it is the code the model samples
    /// there. The image is therefore the one plain decoding draws, bit for bit, in fewer passes
    /// whenever drafts come true; the rejected drafts' keys and values are overwritten later, and
    /// the codes sampled past the accepted run are the next pass's drafts.
    pub fn set_speculation(&mut self, window: Option<usize>) {
        self.window = window.unwrap_or(1).max(1);
    }

    /// The tokens per decode pass [`CandleEngine::set_speculation`] chose.
    pub fn speculation(&self) -> usize {
        self.window
    }

    /// Narrows the windows of a crowded pass so that it computes at most `rows` rows (one per
    /// sequence at least; `None`: always the full window). A pass over few sequences costs little
    /// more per row added, so speculating pays; a full batch is bound by its arithmetic, where
    /// every drafted row costs as much as an accepted one and speculating is slower.
    pub fn set_speculation_rows(&mut self, rows: Option<usize>) {
        self.speculation_rows = rows;
    }

    /// The window each of `batch` sequences gets in one decode pass, before its own limit.
    pub fn pass_window(&self, batch: usize) -> usize {
        match self.speculation_rows {
            Some(rows) => (rows / batch.max(1)).clamp(1, self.window),
            None => self.window,
        }
    }

    /// Forward passes so far, each counted once per sequence in it (prefill included): divided
    /// by the images drawn, the passes per image.
    pub fn sequence_passes(&self) -> u64 {
        self.sequence_passes
    }

    /// Runs each sequence of `ids` with its new `tokens` through the model, and under guidance
    /// each one's twin beside it in the same batch; returns one row of logits per sequence,
    /// guided, and advances every sequence's (and twin's) position.
    fn forward_guided(
        &mut self,
        ids: &[u64],
        tokens: Vec<Vec<TokenInput>>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let tails = vec![1; ids.len()];
        let rows = self.forward_guided_tails(ids, tokens, &tails)?;
        Ok(rows.into_iter().map(|mut r| r.remove(0)).collect())
    }

    /// [`CandleEngine::forward_guided`] returning, per sequence, the guided logits of its last
    /// `tails[i]` inputs (its twin reads the same drafted codes after its own unread ones).
    fn forward_guided_tails(
        &mut self,
        ids: &[u64],
        tokens: Vec<Vec<TokenInput>>,
        tails: &[usize],
    ) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
        let cfg = self.model.config();
        let guidance = cfg.guidance_scale();
        let mut inputs: Vec<SequenceInput> = ids
            .iter()
            .zip(tokens)
            .map(|(id, tokens)| {
                let seq = &self.sequences[id];
                SequenceInput {
                    tokens,
                    cached: seq.cached,
                    block_table: &seq.blocks,
                }
            })
            .collect();
        if guidance.is_some() {
            for id in ids {
                let seq = &self.sequences[id];
                let twin = seq
                    .unconditional
                    .as_ref()
                    .expect("guided sequences have twins");
                inputs.push(SequenceInput {
                    tokens: twin_inputs(cfg, seq, twin),
                    cached: twin.cached,
                    block_table: &twin.blocks,
                });
            }
        }
        let added: Vec<usize> = inputs.iter().map(|input| input.tokens.len()).collect();
        let all_tails: Vec<usize> = if guidance.is_some() {
            tails.iter().chain(tails).copied().collect()
        } else {
            tails.to_vec()
        };
        let flat = self
            .model
            .forward_tails(&inputs, &mut self.cache, &all_tails)?;
        let mut flat = flat.into_iter();
        let mut logits: Vec<Vec<Vec<f32>>> = all_tails
            .iter()
            .map(|&tail| flat.by_ref().take(tail).collect())
            .collect();
        drop(inputs);
        for (i, id) in ids.iter().enumerate() {
            let seq = self.sequences.get_mut(id).expect("held");
            seq.cached += added[i];
            if let Some(twin) = seq.unconditional.as_mut() {
                twin.cached += added[ids.len() + i];
            }
        }
        let Some(scale) = guidance else {
            return Ok(logits);
        };
        let unconditional = logits.split_off(ids.len());
        for (cond, uncond) in logits.iter_mut().zip(&unconditional) {
            for (cond, uncond) in cond.iter_mut().zip(uncond) {
                guide(cond, uncond, scale);
            }
        }
        Ok(logits)
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }
}

/// Rows per decode pass past which windows narrow, measured on a 2-core CPU with the shipped model
/// (docs/speculative-decoding.md): there, speculation is about 2x faster at a batch of 1 and slower
/// at 16. A GPU's pass stays memory-bound for many more rows (set it per worker).
pub const DEFAULT_SPECULATION_ROWS: usize = 16;

/// Under guidance, codes the prompted model finds this much less likely than its favourite are
/// ruled out: pushing away from the prompt-less model lifts codes both find unlikely (stray
/// specks), and only the prompted model's plausible codes are worth re-ranking.
const GUIDANCE_PLAUSIBILITY: f32 = 0.1;

/// Turns `cond` into the guided logits `uncond + scale * (cond - uncond)` over the codes within
/// [`GUIDANCE_PLAUSIBILITY`] of `cond`'s most likely one, and rules the others out.
fn guide(cond: &mut [f32], uncond: &[f32], scale: f32) {
    let best = cond.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = best + GUIDANCE_PLAUSIBILITY.ln();
    for (c, u) in cond.iter_mut().zip(uncond) {
        *c = if *c >= floor {
            u + scale * (*c - u)
        } else {
            f32::NEG_INFINITY
        };
    }
}

/// The text prefix of `prompt` for a `width` x `height` image, at its text positions.
fn text_inputs(cfg: &ModelConfig, prompt: &str, width: u32, height: u32) -> Vec<TokenInput> {
    prefix_tokens(cfg, prompt, width, height)
        .into_iter()
        .enumerate()
        .map(|(i, token)| TokenInput {
            token,
            position: Position::Text(i),
        })
        .collect()
}

/// The new inputs of `seq`'s prompt-less twin: the empty prompt's prefix on its first call, then
/// the image inputs it has not read, up to the last one its sequence reads next (its drafts'
/// included).
fn twin_inputs(cfg: &ModelConfig, seq: &Sequence, twin: &Unconditional) -> Vec<TokenInput> {
    let (mut tokens, read) = if twin.cached == 0 {
        (text_inputs(cfg, "", seq.width, seq.height), 0)
    } else {
        (Vec::new(), twin.cached - prompt_tokens(0))
    };
    let last = seq.generated.len() + seq.draft.len();
    tokens.extend((read..=last).map(|i| image_input(cfg, seq, i)));
    tokens
}

/// The image input at position `index`: BOI or the previous code (drawn or drafted), at the
/// patch it predicts.
fn image_input(cfg: &ModelConfig, seq: &Sequence, index: usize) -> TokenInput {
    let cols = seq.width as usize / cfg.patch_size;
    let token = if index == 0 {
        BOI
    } else {
        let code = seq
            .code_at(index - 1)
            .expect("inputs read codes drawn or drafted");
        code_token(cfg, code)
    };
    TokenInput {
        token,
        position: Position::Image {
            row: index / cols,
            col: index % cols,
        },
    }
}

impl CandleEngine {
    /// Gives a sequence's blocks (and its twin's) back.
    fn free(&mut self, seq: Sequence) {
        self.reserved -= seq.blocks.len();
        self.cache.allocator.release(seq.blocks);
        if let Some(twin) = seq.unconditional {
            self.cache.allocator.release(twin.blocks);
        }
    }

    /// Samples each sequence's next code from its logits; finishes the sequences that are complete.
    fn advance(
        &mut self,
        ids: &[u64],
        logits: Vec<Vec<f32>>,
        outputs: &mut HashMap<u64, SequenceOutput>,
    ) -> Result<(), ModelError> {
        for (id, logits) in ids.iter().zip(logits) {
            let seq = &self.sequences[id];
            let code = sample(&logits, &seq.sampling, seq.generated.len());
            self.accept(*id, &[code], outputs)?;
        }
        Ok(())
    }

    /// Verifies each sequence's window from its rows of logits (one per input, the first after
    /// its last accepted code): accepts the sampled codes as far as the drafts fed in were right,
    /// discards the rest of the window's keys and values, and keeps the codes sampled past the
    /// accepted run as the next drafts.
    fn advance_windows(
        &mut self,
        ids: &[u64],
        rows: Vec<Vec<Vec<f32>>>,
        outputs: &mut HashMap<u64, SequenceOutput>,
    ) -> Result<(), ModelError> {
        for (id, rows) in ids.iter().zip(rows) {
            let seq = self.sequences.get_mut(id).expect("held");
            let next = seq.generated.len();
            let sampled: Vec<u32> = rows
                .iter()
                .enumerate()
                .map(|(j, logits)| sample(logits, &seq.sampling, next + j))
                .collect();
            let mut accepted = 1;
            while accepted < sampled.len() && seq.draft[accepted - 1] == sampled[accepted - 1] {
                accepted += 1;
            }
            let rejected = sampled.len() - accepted;
            seq.cached -= rejected;
            if let Some(twin) = seq.unconditional.as_mut() {
                twin.cached -= rejected;
            }
            seq.draft = sampled[accepted..].to_vec();
            self.accept(*id, &sampled[..accepted], outputs)?;
        }
        Ok(())
    }

    /// Appends accepted `codes` to sequence `id` and its output, rendering the previews that fall
    /// due; finishes the sequence when it is complete.
    fn accept(
        &mut self,
        id: u64,
        codes: &[u32],
        outputs: &mut HashMap<u64, SequenceOutput>,
    ) -> Result<(), ModelError> {
        for &code in codes {
            let seq = self
                .sequences
                .get_mut(&id)
                .expect("ids come from the held sequences");
            seq.generated.push(code);
            let out = output_of(outputs, id);
            out.tokens.push(code);
            if let Some(index) = preview_due(seq.total, seq.partial_images, seq.generated.len()) {
                out.previews.push(Preview {
                    index,
                    tokens_done: seq.generated.len() as u32,
                    image: self.model.codebook().render_partial_png(
                        &seq.generated,
                        seq.width,
                        seq.height,
                    )?,
                });
            }
            if seq.generated.len() == seq.total {
                let seq = self.sequences.remove(&id).expect("present above");
                out.image = Some(self.model.codebook().render_png(
                    &seq.generated,
                    seq.width,
                    seq.height,
                )?);
                self.free(seq);
            }
        }
        Ok(())
    }
}

/// The output of sequence `id` in a call's `outputs`, empty until it gets something.
pub(crate) fn output_of(
    outputs: &mut HashMap<u64, SequenceOutput>,
    id: u64,
) -> &mut SequenceOutput {
    outputs.entry(id).or_insert_with(|| SequenceOutput {
        id,
        tokens: Vec::new(),
        passes: 0,
        image: None,
        previews: Vec::new(),
    })
}

/// The inputs of `seq`'s next decode pass: its next input, then its drafted codes for the
/// positions after it (topped up from [`draft_code`]), `window` in all or what is left.
fn window_inputs(cfg: &ModelConfig, window: usize, seq: &mut Sequence) -> Vec<TokenInput> {
    let next = seq.generated.len();
    let window = window.min(seq.total - next);
    seq.draft.truncate(window - 1);
    while seq.draft.len() < window - 1 {
        let code = draft_code(cfg, seq, next + seq.draft.len());
        seq.draft.push(code);
    }
    (next..next + window)
        .map(|i| image_input(cfg, seq, i))
        .collect()
}

/// A first guess for the code at image position `index` of `seq` (past its drafts): the code
/// above it, where the row above is drawn or drafted (shapes and backgrounds run down the
/// image), else the last code known, else code 0.
fn draft_code(cfg: &ModelConfig, seq: &Sequence, index: usize) -> u32 {
    let cols = seq.width as usize / cfg.patch_size;
    let known = |i: usize| seq.code_at(i);
    index
        .checked_sub(cols)
        .and_then(known)
        .or_else(|| index.checked_sub(1).and_then(known))
        .unwrap_or(0)
}

/// Checks a sequence joining an engine that serves `cfg` (`held`: its id is already in use).
pub(crate) fn check_new_sequence(
    cfg: &ModelConfig,
    info: &EngineInfo,
    held: bool,
    seq: &NewSequence,
) -> Result<(), ModelError> {
    let bad = |m: String| {
        Err(ModelError::InvalidSequence(format!(
            "sequence {}: {m}",
            seq.id
        )))
    };
    if held {
        return bad("id already held".into());
    }
    if seq.prompt.len() > cfg.max_prompt_bytes {
        return bad(format!(
            "prompt of {} bytes exceeds {}",
            seq.prompt.len(),
            cfg.max_prompt_bytes
        ));
    }
    if !cfg.sizes.contains(&seq.width) || !cfg.sizes.contains(&seq.height) {
        return bad(format!(
            "size {}x{} not among {:?}",
            seq.width, seq.height, cfg.sizes
        ));
    }
    let total = cfg.image_tokens(seq.width, seq.height);
    if seq.generated.len() >= total {
        return bad(format!(
            "{} codes already generated of {total}",
            seq.generated.len()
        ));
    }
    if seq
        .generated
        .iter()
        .any(|&c| c as usize >= cfg.codebook_size)
    {
        return bad("generated code outside the codebook".into());
    }
    let needed = info.blocks_needed(seq.prompt.len(), seq.width, seq.height);
    if seq.kv_blocks != needed {
        return bad(format!(
            "reserved {} KV blocks, needs {needed}",
            seq.kv_blocks
        ));
    }
    Ok(())
}

/// Checks a whole prefill before anything is allocated: room in the batch, each sequence valid and
/// listed once (`held` tells which ids the engine already holds), and enough free KV blocks.
pub(crate) fn check_prefill(
    cfg: &ModelConfig,
    info: &EngineInfo,
    held: impl Fn(u64) -> bool,
    sequences_held: usize,
    free_blocks: usize,
    seqs: &[NewSequence],
) -> Result<(), ModelError> {
    if sequences_held + seqs.len() > info.max_batch {
        return Err(ModelError::BatchFull {
            max_batch: info.max_batch,
        });
    }
    let mut seen = std::collections::HashSet::new();
    for seq in seqs {
        check_new_sequence(cfg, info, held(seq.id), seq)?;
        if !seen.insert(seq.id) {
            return Err(ModelError::InvalidSequence(format!(
                "sequence {} listed twice",
                seq.id
            )));
        }
    }
    let needed: usize = seqs.iter().map(|s| s.kv_blocks).sum();
    if needed > free_blocks {
        return Err(ModelError::OutOfBlocks {
            needed,
            free: free_blocks,
        });
    }
    Ok(())
}

impl Engine for CandleEngine {
    fn info(&self) -> EngineInfo {
        let cfg = self.model.config();
        EngineInfo {
            model: format!("{}@{}", cfg.name, cfg.version),
            device: self.model.device_name(),
            kv_blocks_total: self.kv_blocks,
            block_size: self.cache.block_size(),
            max_batch: self.max_batch,
            sizes: cfg.sizes.clone(),
            default_size: cfg.default_size,
            patch_size: cfg.patch_size,
            max_prompt_bytes: cfg.max_prompt_bytes,
            default_temperature: cfg.default_temperature,
            default_top_k: cfg.default_top_k,
            guidance: cfg.guidance_scale(),
        }
    }

    fn free_blocks(&self) -> usize {
        self.kv_blocks - self.reserved
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        self.model.device_memory()
    }

    fn sequences(&self) -> usize {
        self.sequences.len()
    }

    fn prefill(&mut self, seqs: Vec<NewSequence>) -> Result<Vec<SequenceOutput>, ModelError> {
        check_prefill(
            self.model.config(),
            &self.info(),
            |id| self.sequences.contains_key(&id),
            self.sequences.len(),
            self.free_blocks(),
            &seqs,
        )?;
        let cfg = self.model.config().clone();
        let mut inputs = Vec::with_capacity(seqs.len());
        for new in seqs {
            let blocks = self.cache.allocator.allocate(new.kv_blocks)?;
            self.reserved += blocks.len();
            // The empty prompt is the shortest: the twin fits in what its sequence reserved.
            let unconditional = if cfg.guidance_scale().is_some() {
                let tokens = prompt_tokens(0) + cfg.image_tokens(new.width, new.height);
                let blocks = blocks_for(tokens, self.cache.block_size());
                Some(Unconditional {
                    blocks: self.cache.allocator.allocate(blocks)?,
                    cached: 0,
                })
            } else {
                None
            };
            let mut tokens = text_inputs(&cfg, &new.prompt, new.width, new.height);
            let seq = Sequence {
                width: new.width,
                height: new.height,
                sampling: new.sampling,
                blocks,
                cached: 0,
                total: cfg.image_tokens(new.width, new.height),
                partial_images: new.partial_images,
                generated: new.generated,
                unconditional,
                draft: Vec::new(),
            };
            tokens.extend((0..=seq.generated.len()).map(|i| image_input(&cfg, &seq, i)));
            inputs.push((new.id, tokens));
            self.sequences.insert(new.id, seq);
        }
        let (ids, tokens): (Vec<u64>, Vec<_>) = inputs.into_iter().unzip();
        let logits = self.forward_guided(&ids, tokens)?;
        self.sequence_passes += ids.len() as u64;
        let mut outputs = HashMap::new();
        for &id in &ids {
            output_of(&mut outputs, id).passes += 1;
        }
        self.advance(&ids, logits, &mut outputs)?;
        Ok(ids.iter().filter_map(|id| outputs.remove(id)).collect())
    }

    fn decode(&mut self, ids: &[u64], steps: usize) -> Result<Vec<SequenceOutput>, ModelError> {
        if let Some(id) = ids.iter().find(|id| !self.sequences.contains_key(id)) {
            return Err(ModelError::InvalidSequence(format!(
                "sequence {id} is not held"
            )));
        }
        let mut outputs = HashMap::new();
        for _ in 0..steps.max(1) {
            let active: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| self.sequences.contains_key(id))
                .collect();
            if active.is_empty() {
                break;
            }
            let pass_window = self.pass_window(active.len());
            let cfg = self.model.config();
            let tokens: Vec<Vec<TokenInput>> = active
                .iter()
                .map(|id| {
                    let seq = self.sequences.get_mut(id).expect("active");
                    let window = seq
                        .sampling
                        .speculation
                        .map_or(pass_window, |own| own.clamp(1, pass_window));
                    window_inputs(cfg, window, seq)
                })
                .collect();
            self.sequence_passes += active.len() as u64;
            for &id in &active {
                output_of(&mut outputs, id).passes += 1;
            }
            let tails: Vec<usize> = tokens.iter().map(Vec::len).collect();
            let rows = self.forward_guided_tails(&active, tokens, &tails)?;
            self.advance_windows(&active, rows, &mut outputs)?;
        }
        Ok(ids.iter().filter_map(|id| outputs.remove(id)).collect())
    }

    fn held_ids(&self) -> Vec<u64> {
        self.sequences.keys().copied().collect()
    }

    fn release(&mut self, ids: &[u64]) {
        for id in ids {
            if let Some(seq) = self.sequences.remove(id) {
                self.free(seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    device_test!(
        same_seed_same_image_whatever_the_batch,
        same_seed_same_image_whatever_the_batch_on
    );
    device_test!(
        resuming_from_generated_codes_gives_the_same_image,
        resuming_gives_the_same_image_on
    );
    device_test!(
        refuses_wrong_reservations_and_full_pools_without_leaking,
        refuses_without_leaking_on
    );
    device_test!(
        guidance_pushes_the_prompt_away_from_the_empty_one,
        guidance_pushes_away_from_the_empty_prompt_on
    );
    device_test!(
        guided_images_keep_their_seed_batch_and_resume_invariance,
        guided_invariance_on
    );
    device_test!(
        speculation_draws_the_plain_image_alone_in_a_crowd_and_resumed,
        speculation_draws_the_plain_image_on
    );

    fn engine(blocks: usize, device: &Device) -> (tempfile::TempDir, CandleEngine) {
        guided_engine(blocks, None, device)
    }

    fn guided_engine(
        blocks: usize,
        guidance: Option<f32>,
        device: &Device,
    ) -> (tempfile::TempDir, CandleEngine) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig {
            guidance,
            ..ModelConfig::tiny()
        };
        Transformer::init_random(&cfg, 11, dir.path()).unwrap();
        let model = Transformer::load(dir.path(), device).unwrap();
        (dir, CandleEngine::new(model, blocks, 4, 8))
    }

    /// Logits of the last of `images` image inputs after `prompt`'s prefix, from the bare model.
    fn last_logits(e: &CandleEngine, prompt: &str, codes: &[u32]) -> Vec<f32> {
        let cfg = e.config();
        let mut cache = PagedKvCache::new(cfg.n_layers, 16, 4, cfg.d_model);
        let table = cache.allocator.allocate(16).unwrap();
        let seq = Sequence {
            width: 32,
            height: 16,
            sampling: SamplingParams::default(),
            blocks: Vec::new(),
            cached: 0,
            generated: codes.to_vec(),
            total: cfg.image_tokens(32, 16),
            partial_images: 0,
            unconditional: None,
            draft: Vec::new(),
        };
        let mut tokens = text_inputs(cfg, prompt, 32, 16);
        tokens.extend((0..=codes.len()).map(|i| image_input(cfg, &seq, i)));
        let input = SequenceInput {
            tokens,
            cached: 0,
            block_table: &table,
        };
        e.model.forward(&[input], &mut cache).unwrap().remove(0)
    }

    fn guidance_pushes_away_from_the_empty_prompt_on(device: &Device) {
        let (_d, mut guided) = guided_engine(32, Some(3.0), device);
        assert_eq!(guided.info().kv_blocks_total, 32);
        assert_eq!(guided.info().guidance, Some(3.0));
        assert_eq!(guided_engine(32, Some(1.0), device).1.info().guidance, None);
        let codes = vec![5, 9, 1];
        let mut seq = new_seq(&guided, 1, "a red star", 1, codes.clone());
        seq.sampling.temperature = 0.0;
        let reserved = seq.kv_blocks;
        let out = guided.prefill(vec![seq]).unwrap();
        // The twin's blocks come from the other half: the scheduler sees its own reservation.
        assert_eq!(guided.free_blocks(), 32 - reserved);
        let cond = last_logits(&guided, "a red star", &codes);
        let uncond = last_logits(&guided, "", &codes);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut mixed = cond.clone();
        guide(&mut mixed, &uncond, 3.0);
        assert_eq!(
            out[0].tokens,
            vec![crate::sampling::sample(&mixed, &greedy, codes.len())]
        );
        guided.release(&[1]);
        assert_eq!(guided.free_blocks(), 32);
        assert_eq!(
            guided.cache.allocator.free(),
            64,
            "twins give their blocks back"
        );
    }

    #[test]
    fn guidance_reranks_the_prompted_models_plausible_codes_only() {
        // Code 2 is likeliest with the prompt; code 1 within a tenth of it; code 0 far below.
        let mut cond = vec![-5.0, 0.0, 1.0];
        let uncond = [-9.0, -1.0, 1.0];
        guide(&mut cond, &uncond, 2.0);
        assert_eq!(cond[0], f32::NEG_INFINITY, "the unlikely code is ruled out");
        assert_eq!(cond[1..], [1.0, 1.0]);
    }

    fn guided_invariance_on(device: &Device) {
        let (_d, mut e) = guided_engine(64, Some(2.0), device);
        let first = new_seq(&e, 1, "a red star", 7, vec![]);
        let alone = run_to_end(&mut e, vec![first], 1);
        assert_eq!(e.free_blocks(), 64);
        assert_eq!(e.cache.allocator.free(), 128);
        let mut batch: Vec<NewSequence> = (2..6)
            .map(|i| new_seq(&e, i, &"x".repeat(i as usize * 3), i, vec![]))
            .collect();
        batch.insert(2, new_seq(&e, 100, "a red star", 7, vec![]));
        let together = run_to_end(&mut e, batch, 3);
        assert_eq!(together[&100], alone[&1]);
        let (codes, image) = &alone[&1];
        let again = new_seq(&e, 7, "a red star", 7, codes[..5].to_vec());
        let resumed = run_to_end(&mut e, vec![again], 2);
        let mut joined = codes[..5].to_vec();
        joined.extend(&resumed[&7].0);
        assert_eq!(&joined, codes);
        assert_eq!(&resumed[&7].1, image);
        let (_d, mut unguided) = engine(64, device);
        let first = new_seq(&unguided, 1, "a red star", 7, vec![]);
        let plain = run_to_end(&mut unguided, vec![first], 1);
        assert_ne!(plain[&1].0, alone[&1].0, "guidance changes what is drawn");
    }

    fn new_seq(
        e: &CandleEngine,
        id: u64,
        prompt: &str,
        seed: u64,
        generated: Vec<u32>,
    ) -> NewSequence {
        NewSequence {
            id,
            prompt: prompt.into(),
            width: 32,
            height: 16,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 20,
                top_p: 0.95,
                seed,
                speculation: None,
            },
            generated,
            kv_blocks: e.info().blocks_needed(prompt.len(), 32, 16),
            partial_images: 0,
        }
    }

    #[test]
    fn previews_fall_evenly_and_never_at_the_ends() {
        // 8 tokens, 3 previews: after 2, 4 and 6 tokens.
        let due: Vec<_> = (0..=8).map(|done| preview_due(8, 3, done)).collect();
        assert_eq!(
            due,
            [
                None,
                None,
                Some(0),
                None,
                Some(1),
                None,
                Some(2),
                None,
                None
            ]
        );
        assert!((0..=8).all(|done| preview_due(8, 0, done).is_none()));
        // Two previews that would share a token are one.
        let tiny: Vec<_> = (0..=2).filter_map(|done| preview_due(2, 3, done)).collect();
        assert_eq!(tiny, [1]);
    }

    #[test]
    fn previews_show_the_image_so_far_and_change_nothing_else() {
        let (_d, mut e) = engine(64, &Device::Cpu);
        let first = new_seq(&e, 1, "a red star", 7, vec![]);
        let plain = run_to_end(&mut e, vec![first], 1);
        let mut asked = new_seq(&e, 2, "a red star", 7, vec![]);
        asked.partial_images = 1;
        let mut previews = Vec::new();
        let mut outs = e.prefill(vec![asked]).unwrap();
        while outs.iter().all(|o| o.image.is_none()) {
            previews.extend(outs.into_iter().flat_map(|o| o.previews));
            outs = e.decode(&[2], 1).unwrap();
        }
        assert_eq!(
            outs[0].image.as_ref(),
            Some(&plain[&1].1),
            "same image with previews"
        );
        assert_eq!(previews.len(), 1);
        let preview = &previews[0];
        let total = plain[&1].0.len();
        assert_eq!(
            (preview.index, preview.tokens_done as usize),
            (0, total / 2)
        );
        let codebook = e.model.codebook();
        let expected = codebook
            .render_partial_png(&plain[&1].0[..total / 2], 32, 16)
            .unwrap();
        assert_eq!(preview.image, expected);
        assert_ne!(preview.image, plain[&1].1);
    }

    fn run_to_end(
        e: &mut CandleEngine,
        seqs: Vec<NewSequence>,
        steps: usize,
    ) -> HashMap<u64, (Vec<u32>, Image)> {
        run_counting_calls(e, seqs, steps).0
    }

    /// [`run_to_end`], and the decode calls it took.
    fn run_counting_calls(
        e: &mut CandleEngine,
        seqs: Vec<NewSequence>,
        steps: usize,
    ) -> (HashMap<u64, (Vec<u32>, Image)>, usize) {
        let mut calls = 0;
        let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
        let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut images = HashMap::new();
        let mut outs = e.prefill(seqs).unwrap();
        loop {
            for o in outs {
                tokens.entry(o.id).or_default().extend(o.tokens);
                if let Some(img) = o.image {
                    images.insert(o.id, img);
                }
            }
            if images.len() == ids.len() {
                break;
            }
            let live: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| !images.contains_key(id))
                .collect();
            outs = e.decode(&live, steps).unwrap();
            calls += 1;
        }
        let images = ids
            .iter()
            .map(|id| (*id, (tokens[id].clone(), images[id].clone())))
            .collect();
        (images, calls)
    }

    /// 64x64 images (64 codes) at temperature `temperature`, seed `seed`.
    fn wide_seq(
        e: &CandleEngine,
        id: u64,
        prompt: &str,
        seed: u64,
        temperature: f32,
    ) -> NewSequence {
        NewSequence {
            width: 64,
            height: 64,
            sampling: SamplingParams {
                temperature,
                ..new_seq(e, id, prompt, seed, vec![]).sampling
            },
            kv_blocks: e.info().blocks_needed(prompt.len(), 64, 64),
            ..new_seq(e, id, prompt, seed, vec![])
        }
    }

    fn speculation_draws_the_plain_image_on(device: &Device) {
        for guidance in [None, Some(2.0)] {
            for temperature in [0.0, 1.0] {
                let (_d, mut plain) = guided_engine(256, guidance, device);
                let first = wide_seq(&plain, 1, "a red star", 7, temperature);
                let (reference, plain_calls) = run_counting_calls(&mut plain, vec![first], 1);
                for window in [2, 5, 16] {
                    let (_d, mut e) = guided_engine(256, guidance, device);
                    e.set_speculation(Some(window));
                    // The full window in the crowd too (the row limit is tested on its own).
                    e.set_speculation_rows(None);
                    let first = wide_seq(&e, 1, "a red star", 7, temperature);
                    let (alone, calls) = run_counting_calls(&mut e, vec![first], 1);
                    let what = format!(
                        "guidance {guidance:?}, temperature {temperature}, window {window}"
                    );
                    assert_eq!(alone[&1], reference[&1], "alone: {what}");
                    assert!(calls <= plain_calls, "{what}: {calls} passes");
                    // In a crowd of other prompts, seeds and windows' worth of progress.
                    let mut crowd: Vec<NewSequence> = (2..6)
                        .map(|i| wide_seq(&e, i, &"y".repeat(i as usize * 2), i, 1.0))
                        .collect();
                    crowd.insert(1, wide_seq(&e, 100, "a red star", 7, temperature));
                    let together = run_to_end(&mut e, crowd, 2);
                    assert_eq!(together[&100], reference[&1], "in a crowd: {what}");
                    assert_eq!(e.free_blocks(), 256, "{what}: every block back");
                    // Resumed elsewhere from half its codes.
                    let codes = &reference[&1].0;
                    let mut again = wide_seq(&e, 7, "a red star", 7, temperature);
                    again.generated = codes[..30].to_vec();
                    let resumed = run_to_end(&mut e, vec![again], 1);
                    assert_eq!(resumed[&7].0[..], codes[30..], "resumed: {what}");
                }
            }
        }
    }

    #[test]
    fn drafts_that_come_true_save_passes() {
        // A greedy draw of a random model settles on a few codes: drafts from the row above and
        // from the last code come true, and whole runs are accepted in one pass.
        let (_d, mut plain) = engine(256, &Device::Cpu);
        let first = wide_seq(&plain, 1, "a red star", 7, 0.0);
        let (reference, plain_calls) = run_counting_calls(&mut plain, vec![first], 1);
        let (_d, mut e) = engine(256, &Device::Cpu);
        e.set_speculation(Some(8));
        let first = wide_seq(&e, 1, "a red star", 7, 0.0);
        let (fast, calls) = run_counting_calls(&mut e, vec![first], 1);
        assert_eq!(fast, reference);
        assert_eq!(plain_calls, 63, "one pass per code after prefill's");
        assert_eq!(plain.sequence_passes(), 64);
        assert_eq!(e.sequence_passes(), calls as u64 + 1);
        assert!(
            calls < plain_calls / 2,
            "{calls} passes against {plain_calls}"
        );
    }

    #[test]
    fn crowded_passes_narrow_their_windows_and_a_request_can_turn_speculation_off() {
        let (_d, mut e) = engine(256, &Device::Cpu);
        e.set_speculation(Some(8));
        let windows: Vec<usize> = [1, 2, 3, 4, 8, 16, 64].map(|b| e.pass_window(b)).into();
        assert_eq!(windows, [8, 8, 5, 4, 2, 1, 1], "16 rows a pass by default");
        e.set_speculation_rows(None);
        assert_eq!(e.pass_window(64), 8);
        e.set_speculation_rows(Some(DEFAULT_SPECULATION_ROWS));
        // A greedy draw (whose drafts come true) asking for plain decoding gets one code a pass;
        // beside it, the same prompt and seed speculate; both draw the same codes.
        let mut off = wide_seq(&e, 1, "a red star", 7, 0.0);
        off.sampling.speculation = Some(1);
        let on = wide_seq(&e, 2, "a red star", 7, 0.0);
        let mut outputs: HashMap<u64, (Vec<u32>, u32)> = HashMap::new();
        let mut ids = vec![1, 2];
        for out in e.prefill(vec![off, on]).unwrap() {
            assert_eq!(out.passes, 1);
            outputs.insert(out.id, (out.tokens, 1));
        }
        while !ids.is_empty() {
            for out in e.decode(&ids, 4).unwrap() {
                let entry = outputs.get_mut(&out.id).unwrap();
                entry.0.extend(&out.tokens);
                entry.1 += out.passes;
                assert!(out.passes <= 4);
                if out.image.is_some() {
                    ids.retain(|&id| id != out.id);
                }
            }
        }
        assert_eq!(outputs[&1].0, outputs[&2].0, "the same image");
        assert_eq!(outputs[&1].1, 64, "one code a pass when turned off");
        assert!(outputs[&2].1 < 32, "{} passes speculating", outputs[&2].1);
        assert_eq!(e.sequence_passes(), (outputs[&1].1 + outputs[&2].1) as u64);
    }

    fn same_seed_same_image_whatever_the_batch_on(device: &Device) {
        let (_d, mut e) = engine(64, device);
        let first = new_seq(&e, 1, "a red star", 7, vec![]);
        let alone = run_to_end(&mut e, vec![first], 1);
        assert_eq!(
            e.free_blocks(),
            64,
            "finished sequences give their blocks back"
        );
        let crowd: Vec<NewSequence> = (2..8)
            .map(|i| new_seq(&e, i, &"x".repeat(i as usize * 3), i, vec![]))
            .collect();
        let mut batch = crowd.clone();
        batch.insert(3, new_seq(&e, 100, "a red star", 7, vec![]));
        let together = run_to_end(&mut e, batch, 3);
        assert_eq!(together[&100], alone[&1]);
        assert_eq!(alone[&1].0.len(), 8);
        let other = new_seq(&e, 9, "a red star", 8, vec![]);
        let other_seed = run_to_end(&mut e, vec![other], 2);
        assert_ne!(other_seed[&9].0, alone[&1].0);
    }

    fn resuming_gives_the_same_image_on(device: &Device) {
        let (_d, mut e) = engine(64, device);
        let first = new_seq(&e, 1, "two blue circles", 3, vec![]);
        let full = run_to_end(&mut e, vec![first], 2);
        let (codes, image) = &full[&1];
        let again = new_seq(&e, 2, "two blue circles", 3, codes[..5].to_vec());
        let resumed = run_to_end(&mut e, vec![again], 1);
        let mut joined = codes[..5].to_vec();
        joined.extend(&resumed[&2].0);
        assert_eq!(&joined, codes);
        assert_eq!(&resumed[&2].1, image);
    }

    fn refuses_without_leaking_on(device: &Device) {
        let (_d, mut e) = engine(10, device);
        let mut s = new_seq(&e, 1, "abc", 1, vec![]);
        s.kv_blocks += 1;
        assert_eq!(
            e.prefill(vec![s]).unwrap_err().error_type(),
            "invalid_sequence"
        );
        // Each needs ceil((3 + 3 + 8) / 4) = 4 blocks: three do not fit in ten.
        let three: Vec<_> = (1..4).map(|i| new_seq(&e, i, "abc", 1, vec![])).collect();
        assert_eq!(e.prefill(three).unwrap_err().error_type(), "out_of_blocks");
        assert_eq!((e.free_blocks(), e.sequences()), (10, 0));
        e.prefill(vec![new_seq(&e, 1, "abc", 1, vec![])]).unwrap();
        assert_eq!(e.free_blocks(), 6);
        assert!(e.decode(&[1, 99], 1).is_err());
        e.release(&[1, 99]);
        assert_eq!((e.free_blocks(), e.sequences()), (10, 0));
    }
}
