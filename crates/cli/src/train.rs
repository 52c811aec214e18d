//! `kiln train`: learns the patch codebook from procedural scenes, trains the transformer on their
//! captions (resumable from checkpoints), and writes a servable model. `kiln eval`: draws held-out
//! prompts through the serving engine and scores them with the scene checker (attribute binding per
//! number of objects), with generation times alone and in a batch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_model::{
    CandleEngine, Engine, EngineInfo, ModelConfig, NewSequence, SamplingParams, Transformer,
};
use kiln_scenes::{
    held_out_in, held_out_words, CheckResult, ObjectCountMix, Scene, SceneSampler, SceneSet,
    SceneSpec,
};
use kiln_train::{data, PatchCodebook, TrainConfig, Trainer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Where to write the trained model (config.json + model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Checkpoints and the codebook of the run; a run found there is resumed.
    #[arg(long)]
    pub work: PathBuf,
    /// Model name written into its config.
    #[arg(long, default_value = "kiln-shapes")]
    pub name: String,
    /// Model version written into its config (reported as `name@version`).
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub model_version: String,
    /// Optimiser steps in all (a resumed run continues up to this many).
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Stop (checkpoint and export) after this many minutes even if steps remain.
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Stop (checkpoint and export) at this step, with the learning-rate schedule still planned
    /// for `--steps` (a resumed run can go on from there).
    #[arg(long)]
    pub until: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Image side in pixels the model is trained (and served) at.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Pixels per side of one image token (as served).
    #[arg(long, default_value_t = 8)]
    pub patch: usize,
    /// The model draws at `size / draw_scale` pixels: scenes are rendered and tokenized at that
    /// resolution, and the exported codebook's patches are scaled up by it (nearest neighbour). 64
    /// tokens of a 2048-code codebook hold a 32-pixel scene almost exactly, not a 64-pixel one.
    #[arg(long, default_value_t = 2)]
    pub draw_scale: usize,
    /// Codes in the codebook.
    #[arg(long, default_value_t = 2048)]
    pub codebook: usize,
    /// Scenes the codebook is learned from.
    #[arg(long, default_value_t = 3000)]
    pub codebook_images: usize,
    #[arg(long, default_value_t = 128)]
    pub d_model: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 512)]
    pub d_ff: usize,
    /// Read prompts as UTF-8 bytes instead of the captions' words (the first shipped model did).
    #[arg(long)]
    pub byte_prompts: bool,
    /// Learn each code's embedding and output weights freely, not as a free part plus a
    /// projection of the code's pixels (as kiln-shapes 0.2.0 was trained).
    #[arg(long)]
    pub untied_codes: bool,
    /// Scale of every code's free output weights in the exported model (a code's output weights
    /// are a free part plus a projection of its pixels). Below 1 the served model chooses codes
    /// more by what their pixels show, which a code shares with every code of its colour or
    /// edge: the free parts learn to avoid codes never seen as targets, such as a held-out colour
    /// and shape pair's edges. Training is unchanged; a finished run can be re-exported with
    /// another scale.
    #[arg(long, default_value_t = 1.0)]
    pub free_head_scale: f64,
    /// Share of training captions replaced by the empty prompt, so that the model also learns
    /// to draw unconditionally: what classifier-free guidance contrasts the prompt with.
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// Classifier-free guidance scale written into the model's config (1 draws from the prompt
    /// alone; needs a model trained with `--caption-dropout`).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Speculative decoding window written into the model's config: tokens each decode pass
    /// drafts and verifies by default (absent: plain decoding). It changes no weight and no image.
    #[arg(long)]
    pub speculation: Option<usize>,
    /// The scenes to learn: `classic` (1 to 4 objects, what kiln-shapes 0.x learned) or `full`
    /// (1 to 16 objects, more shapes and colours, and words).
    #[arg(long, default_value = "classic", value_parser = parse_scene_set)]
    pub scenes: SceneSet,
    /// Relative weights of training scenes with 1, 2, 3, ... objects (e.g. `3,1,1,1` to draw
    /// single objects half the time; up to the scene set's most objects). Absent: every count
    /// equally often.
    #[arg(long, value_delimiter = ',', value_name = "W1,W2,...")]
    pub object_mix: Vec<u32>,
    /// Relative weight of scenes with a word (the full set only), beside `--object-mix`'s.
    #[arg(long, default_value_t = 0)]
    pub word_weight: u32,
    /// Sampling temperature written into the model's config: what requests that set none get.
    #[arg(long)]
    pub default_temperature: Option<f32>,
    /// Top-k written into the model's config, for requests that set neither it nor temperature.
    #[arg(long)]
    pub default_top_k: Option<u32>,
}

const CODEBOOK_FILE: &str = "codebook.bin";

fn parse_scene_set(name: &str) -> Result<SceneSet, String> {
    SceneSet::from_name(name).ok_or_else(|| {
        let names: Vec<_> = SceneSet::ALL.iter().map(|s| s.name()).collect();
        format!("unknown scene set {name:?}; one of {}", names.join(", "))
    })
}

/// The longest prompt a model of `set` reads, in bytes. A full 4 x 4 grid's caption is about
/// 290 bytes; 128 is what kiln-shapes 0.x was trained with.
fn max_prompt_bytes(set: SceneSet) -> usize {
    match set {
        SceneSet::Classic => 128,
        SceneSet::Full => 320,
    }
}

impl TrainArgs {
    /// Side of the scenes as drawn, and of their patches.
    fn drawn(&self) -> (u32, usize) {
        (
            self.size / self.draw_scale as u32,
            self.patch / self.draw_scale,
        )
    }

    fn model_config(&self, codes: usize) -> ModelConfig {
        ModelConfig {
            name: self.name.clone(),
            version: self.model_version.clone(),
            d_model: self.d_model,
            n_layers: self.layers,
            n_heads: self.heads,
            d_ff: self.d_ff,
            codebook_size: codes,
            patch_size: self.patch,
            sizes: vec![self.size],
            default_size: self.size,
            max_prompt_bytes: max_prompt_bytes(self.scenes),
            norm_eps: 1e-5,
            words: if self.byte_prompts {
                Vec::new()
            } else {
                kiln_scenes::caption_words_in(self.scenes)
                    .into_iter()
                    .map(String::from)
                    .collect()
            },
            default_temperature: self.default_temperature,
            default_top_k: self.default_top_k,
            guidance: self.guidance,
            speculation: self.speculation,
        }
    }
}

/// The codebook of the run in `work`, learned (and saved) on first use.
fn codebook(args: &TrainArgs) -> Result<PatchCodebook> {
    let path = args.work.join(CODEBOOK_FILE);
    let (size, patch) = args.drawn();
    if let Ok(bytes) = std::fs::read(&path) {
        let book = PatchCodebook {
            patch,
            patches: bytes,
        };
        if book.len() * patch * patch * 3 == book.patches.len() {
            return Ok(book);
        }
        bail!("{} does not hold {patch}px patches", path.display());
    }
    let started = Instant::now();
    eprintln!(
        "learning a {}-code codebook of {patch}px patches from {} scenes of {size}px...",
        args.codebook, args.codebook_images
    );
    let book = data::learn_codebook(
        sampler(args, args.seed)?.take(args.codebook_images),
        size,
        patch,
        args.codebook,
        12,
        args.seed,
    );
    eprintln!(
        "codebook: {} codes in {:.1} s",
        book.len(),
        started.elapsed().as_secs_f64()
    );
    // Per group and in all: the classic figure is over 100 scenes of each of 1 to 4 objects.
    let mut all = Vec::new();
    for (label, scenes) in held_out_groups(args.scenes, args.seed, 100)? {
        let (rmse, ceiling) = data::reconstruction(&book, &scenes, size, args.scenes);
        if args.scenes == SceneSet::Full {
            eprintln!(
                "  {label}: held-out reconstruction RMSE {rmse:.2}, checker right on {:.1} %",
                ceiling * 100.0
            );
        }
        all.extend(scenes);
    }
    let (rmse, ceiling) = data::reconstruction(&book, &all, size, args.scenes);
    eprintln!(
        "held-out reconstruction RMSE {rmse:.2} (of 255), checker still correct on {:.1} % of \
         {} reconstructions",
        ceiling * 100.0,
        all.len()
    );
    std::fs::create_dir_all(&args.work)?;
    std::fs::write(&path, &book.patches).with_context(|| format!("writing {}", path.display()))?;
    Ok(book)
}

/// The examples of step `step`: a sampler seeded by the run and the step, so a resumed run sees
/// the data it would have seen; `--caption-dropout` of them (drawn from the same seed) have the
/// empty prompt.
fn batch_for(args: &TrainArgs, book: &PatchCodebook, step: usize) -> Vec<kiln_train::Example> {
    let seed = args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step as u64;
    let mut dropout = ChaCha8Rng::seed_from_u64(seed ^ 0xd1b5_4a32_d192_ed03);
    sampler(args, seed)
        .expect("checked when the run starts")
        .take(args.batch)
        .map(|scene| {
            let mut example = data::example(&scene, book, args.drawn().0, args.size);
            if dropout.random_bool(args.caption_dropout) {
                example.prompt.clear();
            }
            example
        })
        .collect()
}

/// Training scenes of `--scenes` in the proportions of `--object-mix` and `--word-weight`.
fn sampler(args: &TrainArgs, seed: u64) -> Result<SceneSampler> {
    let mix = if args.object_mix.is_empty() {
        ObjectCountMix::uniform(args.scenes)
    } else {
        ObjectCountMix::new(&args.object_mix).context("--object-mix")?
    };
    SceneSampler::for_set(args.scenes, seed, mix.with_words(args.word_weight))
        .context("--object-mix or --word-weight for --scenes")
}

/// Held-out scenes by group, `count` each: per object count (1 to 4 for the classic set; 1, 2,
/// 4, 8, 12 and 16 for the full one), then per word length 1 to 8 for the full set.
fn held_out_groups(set: SceneSet, seed: u64, count: usize) -> Result<Vec<(String, Vec<Scene>)>> {
    let counts: &[usize] = match set {
        SceneSet::Classic => &[1, 2, 3, 4],
        SceneSet::Full => &[1, 2, 4, 8, 12, 16],
    };
    let mut groups = Vec::new();
    for &n in counts {
        groups.push((format!("{n} objects"), held_out_in(set, seed, n, count)?));
    }
    if set.has_words() {
        for length in 1..=kiln_scenes::MAX_WORD_LEN {
            groups.push((
                format!("words of {length}"),
                held_out_words(seed, length, count)?,
            ));
        }
    }
    Ok(groups)
}

/// A line above the progress bar, or on stderr when there is no terminal to draw the bar on (a
/// hidden bar prints nothing).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// `mi_option_purge_delay` in mimalloc's option enum (v2 and v3 alike; the Rust bindings name
/// no constant for it).
const MIMALLOC_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// A training step allocates and frees tensors of tens of megabytes; mimalloc hands freed memory
/// back to the kernel after 10 ms, and the kernel zeroes it again on the next touch: a third of a
/// step's time was spent zeroing pages (measured with perf). A training run keeps what it freed.
fn keep_freed_memory() {
    // SAFETY: setting an option is allowed at any time and only changes when memory is purged.
    unsafe { libmimalloc_sys::mi_option_set(MIMALLOC_PURGE_DELAY, -1) }
}

pub fn train(args: TrainArgs) -> Result<()> {
    keep_freed_memory();
    if args.batch == 0 || args.steps == 0 {
        bail!("--batch and --steps must be positive");
    }
    if !(0.0..1.0).contains(&args.caption_dropout) {
        bail!("--caption-dropout must be in [0, 1)");
    }
    if !(0.0..=1.0).contains(&args.free_head_scale) {
        bail!("--free-head-scale must be in [0, 1]");
    }
    if args.free_head_scale != 1.0 && args.untied_codes {
        bail!("--free-head-scale needs codes tied to their pixels (drop --untied-codes)");
    }
    sampler(&args, args.seed)?;
    if args.draw_scale == 0
        || !args.patch.is_multiple_of(args.draw_scale)
        || !(args.size as usize).is_multiple_of(args.patch)
    {
        bail!("--draw-scale must divide --patch, and --patch must divide --size");
    }
    let book = codebook(&args)?;
    let cfg = args.model_config(book.len());
    cfg.validate().context("model shape flags")?;
    eprintln!(
        "model {}: {:.2} M parameters, {} image tokens per {}px image",
        cfg.name,
        cfg.parameter_count() as f64 / 1e6,
        cfg.image_tokens(args.size, args.size),
        args.size
    );
    let device = candle_core::Device::Cpu;
    let config = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        learning_rate: args.learning_rate,
        warmup: args.warmup,
        seed: args.seed,
        pixel_codes: !args.untied_codes,
        ..Default::default()
    };
    let mut trainer = Trainer::resume_or_new(&args.work, &cfg, config, &book, &device)?;
    if trainer.step_count() > 0 {
        eprintln!("resuming at step {}", trainer.step_count());
    }
    let validation: Vec<_> = held_out_groups(args.scenes, args.seed + 1, 8)?
        .into_iter()
        .flat_map(|(_, scenes)| scenes)
        .map(|scene| data::example(&scene, &book, args.drawn().0, args.size))
        .collect();
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} (eta {eta}) {msg}")
            .expect("template"),
    );
    bar.set_position(trainer.step_count() as u64);
    let started = Instant::now();
    let first_step = trainer.step_count();
    let mut recent = Vec::new();
    let (mut since_report, mut steps_since_report) = (Instant::now(), 0usize);
    let last_step = args.until.map_or(args.steps, |until| until.min(args.steps));
    while trainer.step_count() < last_step {
        if args
            .minutes
            .is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0)
        {
            say(
                &bar,
                "time budget spent: checkpointing and exporting".into(),
            );
            break;
        }
        let step = trainer.step_count();
        let loss = trainer.train_step(&batch_for(&args, &book, step))?;
        steps_since_report += 1;
        recent.push(loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        let mean = recent.iter().sum::<f32>() / recent.len() as f32;
        bar.set_message(format!("loss {mean:.3}"));
        bar.inc(1);
        if trainer.step_count() % args.checkpoint_every == 0 {
            // Seconds a step since the last report, the checkpoint and held-out loss excluded.
            let per_step = since_report.elapsed().as_secs_f64() / steps_since_report as f64;
            trainer.checkpoint(&args.work)?;
            let held = trainer.evaluate(&validation)?;
            say(
                &bar,
                format!(
                    "step {}: train loss {mean:.3}, held-out loss {held:.3}, lr {:.2e}, {per_step:.2} s/step, {:.1} min",
                    trainer.step_count(),
                    trainer.config().learning_rate_at(trainer.step_count()),
                    started.elapsed().as_secs_f64() / 60.0
                ),
            );
            (since_report, steps_since_report) = (Instant::now(), 0);
        }
    }
    bar.finish();
    trainer.checkpoint(&args.work)?;
    trainer.export_with(
        &book.scaled(args.draw_scale),
        args.free_head_scale,
        &args.out,
    )?;
    eprintln!(
        "trained {} steps ({} this run, {:.1} min); model written to {}",
        trainer.step_count(),
        trainer.step_count() - first_step,
        started.elapsed().as_secs_f64() / 60.0,
        args.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory (as `kiln train --out` writes it).
    #[arg(long)]
    pub model: PathBuf,
    /// Held-out prompts per object count (and per word length, for a model of the full set).
    #[arg(long, default_value_t = 50)]
    pub per_count: usize,
    /// Seeds of the held-out prompts (and of sampling), comma-separated: each seed draws its own
    /// `--per-count` prompts per group, and a row reports them together and seed by seed.
    #[arg(long, value_delimiter = ',', default_value = "7")]
    pub seed: Vec<u64>,
    /// Sampling temperature (0 is greedy). Absent: the model's default, as the gateway applies it.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among this many most likely codes (0: all). Absent: as the gateway chooses for a
    /// request that sets neither.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Classifier-free guidance scale (1: none). Absent: the model's own.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Images generated together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Speculative Jacobi decoding: tokens per decode pass, one or several to compare side by
    /// side on the same prompts and seeds (1: plain decoding), e.g. `1,8`. Absent: the model's own.
    #[arg(long, value_delimiter = ',')]
    pub speculation: Vec<usize>,
    /// Rows a decode pass may compute before windows narrow, in the timed batch (as `kiln worker
    /// --speculation-rows`; 0: no limit). Scoring always runs the full window, so that passes per
    /// image are the window's own.
    #[arg(long, default_value_t = kiln_model::engine::DEFAULT_SPECULATION_ROWS)]
    pub speculation_rows: usize,
    /// Timed rounds (one image alone and one batch per window each, the windows in turn);
    /// medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Draw this caption `--per-count` times (one seed each) instead of the held-out prompts, and
    /// report how often it is drawn exactly.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Write every generated image (PNG, named by outcome and prompt) here.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Generates `prompts` together and returns their PNGs.
fn generate(
    engine: &mut CandleEngine,
    info: &EngineInfo,
    prompts: &[String],
    sampling: SamplingParams,
    first_id: u64,
) -> Result<Vec<Vec<u8>>> {
    let size = info.default_size;
    let seqs: Vec<NewSequence> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| NewSequence {
            id: first_id + i as u64,
            prompt: p.clone(),
            width: size,
            height: size,
            sampling: SamplingParams {
                seed: sampling.seed + first_id + i as u64,
                ..sampling
            },
            generated: Vec::new(),
            kv_blocks: info.blocks_needed(p.len(), size, size),
            partial_images: 0,
        })
        .collect();
    let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
    let mut images: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let collect = |images: &mut std::collections::HashMap<u64, Vec<u8>>,
                   outputs: Vec<kiln_model::SequenceOutput>| {
        for o in outputs {
            if let Some(image) = o.image {
                images.insert(o.id, image.png);
            }
        }
    };
    collect(&mut images, engine.prefill(seqs)?);
    while images.len() < ids.len() {
        let live: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !images.contains_key(id))
            .collect();
        collect(&mut images, engine.decode(&live, 16)?);
    }
    Ok(ids
        .iter()
        .map(|id| images.remove(id).expect("finished"))
        .collect())
}

/// How `kiln eval` draws: sampling, batch size, the next sequence id (each image's seed follows
/// it), and where to save images, named `{label}-{number}-{verdict}-{prompt}`.
struct Drawing {
    sampling: SamplingParams,
    batch: usize,
    next_id: u64,
    save: Option<PathBuf>,
    label: String,
    /// The scene set the model was trained on, which the checker scores by.
    set: SceneSet,
}

/// The scene set a model was trained on, told by its vocabulary: a model that spells quoted words
/// learned the full set.
fn scene_set_of(cfg: &ModelConfig) -> SceneSet {
    if cfg.words.iter().any(|w| w == kiln_model::tokenizer::QUOTE) {
        SceneSet::Full
    } else {
        SceneSet::Classic
    }
}

/// Draws each caption in batches, checks each image against its spec and returns the verdicts in
/// order; with `save`, writes every image and the checker's verdict beside each wrong one.
fn draw_and_check(
    engine: &mut CandleEngine,
    info: &EngineInfo,
    items: &[(String, SceneSpec)],
    drawing: &mut Drawing,
) -> Result<Vec<CheckResult>> {
    let mut results = Vec::with_capacity(items.len());
    for chunk in items.chunks(drawing.batch) {
        let prompts: Vec<String> = chunk.iter().map(|(prompt, _)| prompt.clone()).collect();
        let pngs = generate(engine, info, &prompts, drawing.sampling, drawing.next_id)?;
        for ((prompt, spec), png) in chunk.iter().zip(&pngs) {
            drawing.next_id += 1;
            let image = kiln_scenes::from_png(png)?;
            let result = kiln_scenes::check(&image, spec, drawing.set);
            if let Some(dir) = &drawing.save {
                // Numbered, as prompts repeat (a single object has few held-out captions).
                let verdict = if result.correct { "ok" } else { "wrong" };
                let name = format!(
                    "{}-{:03}-{verdict}-{}",
                    drawing.label,
                    drawing.next_id % 1000,
                    slug(prompt)
                );
                std::fs::write(dir.join(format!("{name}.png")), png)?;
                if !result.correct {
                    std::fs::write(
                        dir.join(format!("{name}.json")),
                        serde_json::to_vec_pretty(&result)?,
                    )?;
                }
            }
            results.push(result);
        }
    }
    Ok(results)
}

/// A file name's worth of the prompt: a 16-object caption is longer than a name may be.
fn slug(prompt: &str) -> String {
    prompt
        .chars()
        .take(120)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

pub fn eval(args: EvalArgs) -> Result<()> {
    if args.batch == 0 || args.per_count == 0 {
        bail!("--batch and --per-count must be positive");
    }
    let first_seed = *args.seed.first().context("--seed names no seed")?;
    if args
        .seed
        .iter()
        .enumerate()
        .any(|(i, s)| args.seed[..i].contains(s))
    {
        bail!("--seed {:?} names a seed twice", args.seed);
    }
    let mut model = Transformer::load(&args.model, &candle_core::Device::Cpu)
        .with_context(|| format!("loading --model {}", args.model.display()))?;
    if let Some(guidance) = args.guidance {
        model.set_guidance(guidance).context("--guidance")?;
    }
    let cfg = model.config().clone();
    // The model's own codebook, to tell what its tokenizer allows from what the model learned.
    let book = PatchCodebook {
        patch: cfg.patch_size,
        patches: model.codebook().as_bytes().to_vec(),
    };
    let mut engine = CandleEngine::new(model, 4096, 16, args.batch.max(16));
    let info = engine.info();
    // The gateway's rule: a request without a temperature samples with the model's defaults.
    let temperature = args
        .temperature
        .unwrap_or(cfg.default_temperature.unwrap_or(1.0));
    let top_k = args.top_k.unwrap_or(match args.temperature {
        None => cfg.default_top_k.unwrap_or(0) as usize,
        Some(_) => 0,
    });
    let sampling = SamplingParams {
        temperature,
        top_k,
        seed: first_seed,
        ..Default::default()
    };
    if let Some(dir) = &args.save {
        std::fs::create_dir_all(dir)?;
    }
    let mut figures = serde_json::Map::new();
    let mut drawing = Drawing {
        sampling,
        batch: args.batch,
        next_id: 1,
        save: args.save.clone(),
        label: "prompt".into(),
        set: scene_set_of(&cfg),
    };
    println!(
        "{} ({:.2} M parameters), {}px, temperature {}, top-k {}, guidance {}",
        cfg.name,
        cfg.parameter_count() as f64 / 1e6,
        info.default_size,
        temperature,
        top_k,
        cfg.guidance.unwrap_or(1.0)
    );
    let windows = if args.speculation.is_empty() {
        vec![engine.speculation()]
    } else {
        args.speculation.clone()
    };
    if let Some(w) = windows
        .iter()
        .find(|w| !(1..=kiln_model::MAX_SPECULATION).contains(*w))
    {
        bail!(
            "--speculation {w}: tokens per pass must be 1 to {}",
            kiln_model::MAX_SPECULATION
        );
    }
    if let Some(prompt) = &args.prompt {
        engine.set_speculation(Some(windows[0]));
        let spec = kiln_scenes::parse_caption(prompt)
            .with_context(|| format!("--prompt {prompt:?} is not a caption the checker reads"))?;
        let results = draw_and_check(
            &mut engine,
            &info,
            &vec![(prompt.clone(), spec); args.per_count],
            &mut drawing,
        )?;
        let correct = results.iter().filter(|r| r.correct).count();
        let accuracy = correct as f64 / args.per_count as f64;
        println!(
            "{prompt:?}: drawn exactly {correct} of {} times ({:.1} %)",
            args.per_count,
            accuracy * 100.0
        );
        figures.insert("prompt_accuracy".into(), accuracy.into());
        if let Some(path) = &args.report {
            write_report(path, &figures)?;
        }
        return Ok(());
    }
    let mut per_window = Vec::new();
    engine.set_speculation_rows(None);
    for &window in &windows {
        engine.set_speculation(Some(window));
        // Every window draws the same prompts with the same seeds.
        drawing.next_id = 1;
        per_window.push(evaluate_window(
            &args,
            &mut engine,
            &info,
            &book,
            &mut drawing,
        )?);
    }
    // Generation time: one image alone, and a batch, the windows in turn round by round (the
    // machine's speed drifts), medians of `--rounds`.
    let prompt = held_out_in(drawing.set, first_seed + 1, 2, 1)?[0].caption();
    engine.set_speculation_rows((args.speculation_rows > 0).then_some(args.speculation_rows));
    let mut times = vec![(Vec::new(), Vec::new()); windows.len()];
    for _ in 0..args.rounds.max(1) {
        for (w, &window) in windows.iter().enumerate() {
            engine.set_speculation(Some(window));
            let (alone, batch) = &mut times[w];
            for (count, runs) in [(1, alone), (args.batch, batch)] {
                let prompts = vec![prompt.clone(); count];
                let started = Instant::now();
                generate(&mut engine, &info, &prompts, sampling, drawing.next_id)?;
                drawing.next_id += count as u64;
                runs.push(started.elapsed().as_secs_f64());
            }
        }
    }
    let median = |mut runs: Vec<f64>| {
        runs.sort_by(f64::total_cmp);
        runs[runs.len() / 2]
    };
    let threads = candle_core::utils::get_num_threads();
    let plain_alone = median(times[0].0.clone());
    let plain_batch = median(times[0].1.clone());
    for ((window, mut window_figures), (alone, batch)) in windows.iter().zip(per_window).zip(times)
    {
        let (alone, batch) = (median(alone), median(batch));
        engine.set_speculation(Some(*window));
        let batch_window = engine.pass_window(args.batch);
        println!(
            "speculation {window}: generation on {threads} thread(s): one image {:.0} ms, {:.1} images/s ({:.2}x the first window's); a batch of {} (window {batch_window}) {:.0} ms, {:.1} images/s ({:.2}x)",
            alone * 1e3,
            1.0 / alone,
            plain_alone / alone,
            args.batch,
            batch * 1e3,
            args.batch as f64 / batch,
            plain_batch / batch
        );
        window_figures.insert("batch_window".into(), batch_window.into());
        window_figures.insert("threads".into(), threads.into());
        window_figures.insert("one_image_seconds".into(), alone.into());
        window_figures.insert("batch".into(), args.batch.into());
        window_figures.insert("batch_seconds".into(), batch.into());
        if windows.len() == 1 {
            figures.extend(window_figures);
        } else {
            figures.insert(format!("speculation_{window}"), window_figures.into());
        }
    }
    figures.insert("guidance".into(), cfg.guidance.unwrap_or(1.0).into());
    if let Some(path) = &args.report {
        write_report(path, &figures)?;
    }
    Ok(())
}

/// Scores one speculation window: binding per object count, with the forward passes per image.
fn evaluate_window(
    args: &EvalArgs,
    engine: &mut CandleEngine,
    info: &EngineInfo,
    book: &PatchCodebook,
    drawing: &mut Drawing,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut figures = serde_json::Map::new();
    println!("speculation: {} token(s) per pass", engine.speculation());
    println!(
        "scenes          prompts  correct  accuracy  objects right  tokenizer ceiling  passes/image  ms/image"
    );
    let per_seed = args
        .seed
        .iter()
        .map(|&seed| held_out_groups(drawing.set, seed, args.per_count))
        .collect::<Result<Vec<_>>>()?;
    let first_seed = drawing.sampling.seed;
    for (group, (label, first_scenes)) in per_seed[0].iter().enumerate() {
        // Figures are keyed by object count (`accuracy_4`) or word length (`accuracy_word_4`).
        let key = match first_scenes[0].spec().word() {
            Some(word) => format!("word_{}", word.text.len()),
            None => first_scenes[0].spec().objects().len().to_string(),
        };
        drawing.label = key.clone();
        let passes_before = engine.sequence_passes();
        let started = Instant::now();
        let (mut results, mut scenes, mut seed_accuracy) = (Vec::new(), Vec::new(), Vec::new());
        for (&seed, groups) in args.seed.iter().zip(&per_seed) {
            let seed_scenes = &groups[group].1;
            let items: Vec<(String, SceneSpec)> = seed_scenes
                .iter()
                .map(|s| (s.caption(), s.spec()))
                .collect();
            drawing.sampling.seed = seed;
            let seed_results = draw_and_check(engine, info, &items, drawing)?;
            let correct = seed_results.iter().filter(|r| r.correct).count();
            seed_accuracy.push(correct as f64 / seed_scenes.len() as f64);
            results.extend(seed_results);
            scenes.extend(seed_scenes.iter().cloned());
        }
        drawing.sampling.seed = first_seed;
        let per_image = started.elapsed().as_secs_f64() / scenes.len() as f64;
        let passes = (engine.sequence_passes() - passes_before) as f64 / scenes.len() as f64;
        let correct = results.iter().filter(|r| r.correct).count();
        // Only prompts with objects count: a sign alone has no object score.
        let object_scores: Vec<f64> = results
            .iter()
            .filter_map(|r| r.score().map(f64::from))
            .collect();
        let objects_right = (!object_scores.is_empty())
            .then(|| object_scores.iter().sum::<f64>() / object_scores.len() as f64);
        let accuracy = correct as f64 / scenes.len() as f64;
        // The same scenes drawn at the model's own resolution, encoded and decoded by its codebook:
        // the best any model can do.
        let scale = book.pixel_scale();
        let (_, ceiling) = data::reconstruction(
            &book.unscaled(scale),
            &scenes,
            info.default_size / scale as u32,
            drawing.set,
        );
        let by_seed = if args.seed.len() > 1 {
            let each: Vec<String> = seed_accuracy
                .iter()
                .map(|a| format!("{:.1}", a * 100.0))
                .collect();
            format!("  by seed {} %", each.join(" / "))
        } else {
            String::new()
        };
        let objects_column = match objects_right {
            Some(right) => format!("{:.1}%", right * 100.0),
            None => "-".to_string(),
        };
        println!(
            "{label:<14}  {:>7}  {correct:>7}  {:>7.1}%  {objects_column:>13}  {:>16.1}%  {passes:>12.1}  {:>8.1}{by_seed}",
            scenes.len(),
            accuracy * 100.0,
            ceiling * 100.0,
            per_image * 1e3
        );
        figures.insert(format!("passes_per_image_{key}"), passes.into());
        figures.insert(format!("accuracy_by_seed_{key}"), seed_accuracy.into());
        figures.insert(format!("tokenizer_ceiling_{key}"), ceiling.into());
        figures.insert(format!("accuracy_{key}"), accuracy.into());
        figures.insert(format!("seconds_per_image_{key}"), per_image.into());
        if let Some(right) = objects_right {
            figures.insert(format!("objects_right_{key}"), right.into());
        }
    }
    Ok(figures)
}

fn write_report(path: &Path, figures: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(figures)?)
        .with_context(|| format!("writing --report {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn args(extra: &[&str]) -> TrainArgs {
        let base = ["kiln", "--out", "/nonexistent", "--work", "/nonexistent"];
        Cli::parse_from(base.iter().chain(extra)).train
    }

    #[test]
    fn caption_dropout_empties_that_share_of_prompts_the_same_way_every_time() {
        let book = data::learn_codebook(SceneSampler::new(1).take(4), 32, 4, 16, 2, 1);
        let prompts = |a: &TrainArgs, step| -> Vec<String> {
            batch_for(a, &book, step)
                .into_iter()
                .map(|example| example.prompt)
                .collect()
        };
        let kept = args(&["--batch", "64", "--caption-dropout", "0"]);
        assert!(prompts(&kept, 3).iter().all(|p| !p.is_empty()));
        let dropped = args(&["--batch", "64", "--caption-dropout", "0.5"]);
        let batch = prompts(&dropped, 3);
        let empty = batch.iter().filter(|p| p.is_empty()).count();
        assert!((16..=48).contains(&empty), "{empty} of 64 dropped");
        assert_eq!(
            batch,
            prompts(&dropped, 3),
            "a resumed run sees the same batch"
        );
        // The scenes are those of the run without dropout: only captions are emptied.
        for (with, without) in batch.iter().zip(prompts(&kept, 3)) {
            assert!(with.is_empty() || *with == without);
        }
    }

    #[test]
    fn the_object_mix_sets_how_many_objects_training_scenes_have() {
        let book = data::learn_codebook(SceneSampler::new(1).take(4), 32, 4, 16, 2, 1);
        let objects = |a: &TrainArgs| -> Vec<usize> {
            batch_for(a, &book, 5)
                .into_iter()
                .map(|example| {
                    kiln_scenes::parse_caption(&example.prompt)
                        .unwrap()
                        .objects()
                        .len()
                })
                .collect()
        };
        let even = objects(&args(&["--batch", "64", "--caption-dropout", "0"]));
        assert!((1..=4).all(|n| even.contains(&n)), "{even:?}");
        let singles = args(&[
            "--batch",
            "64",
            "--caption-dropout",
            "0",
            "--object-mix",
            "1,0,0,0",
        ]);
        assert!(objects(&singles).iter().all(|&n| n == 1));
        let pairs = args(&[
            "--batch",
            "64",
            "--caption-dropout",
            "0",
            "--object-mix",
            "0,1,0,0",
        ]);
        assert!(objects(&pairs).iter().all(|&n| n == 2));
        // The default is the even mix the shipped models were trained on.
        assert_eq!(
            even,
            objects(&args(&[
                "--batch",
                "64",
                "--caption-dropout",
                "0",
                "--object-mix",
                "1,1,1,1"
            ]))
        );
    }

    #[test]
    fn a_full_run_reads_every_caption_word_by_word_and_draws_grids_and_words() {
        let full = args(&[
            "--scenes",
            "full",
            "--word-weight",
            "4",
            "--batch",
            "200",
            "--caption-dropout",
            "0",
        ]);
        let cfg = full.model_config(16);
        cfg.validate().unwrap();
        let book = data::learn_codebook(SceneSampler::new(1).take(4), 32, 4, 16, 2, 1);
        let unknown = cfg.words.len() as u32;
        let (mut words, mut most) = (0, 0);
        for example in batch_for(&full, &book, 2) {
            let tokens = kiln_model::tokenizer::prefix_tokens(&cfg, &example.prompt, 64, 64);
            assert!(!tokens.contains(&unknown), "{}", example.prompt);
            let spec = kiln_scenes::parse_caption(&example.prompt).unwrap();
            words += usize::from(spec.word().is_some());
            most = most.max(spec.objects().len());
        }
        assert!(
            words >= 10 && most >= 12,
            "{words} words, {most} objects at most"
        );
        // The longest captions, 16 objects, fit the model's prompt.
        let sixteen =
            SceneSampler::for_set(SceneSet::Full, 3, ObjectCountMix::only(16).unwrap()).unwrap();
        let longest = sixteen.take(500).map(|s| s.caption().len()).max().unwrap();
        assert!(
            longest > 250 && longest <= cfg.max_prompt_bytes,
            "{longest}"
        );
    }

    #[test]
    fn eval_refuses_a_seed_named_twice_before_loading_the_model() {
        #[derive(Parser)]
        struct EvalCli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        let parsed = |seeds: &str| {
            EvalCli::parse_from(["kiln", "--model", "/nonexistent", "--seed", seeds]).eval
        };
        assert_eq!(parsed("7,11").seed, [7, 11]);
        let error = eval(parsed("7,11,7")).unwrap_err().to_string();
        assert!(
            error.contains("--seed") && error.contains("twice"),
            "{error}"
        );
        // Distinct seeds get as far as the model.
        let error = format!("{:#}", eval(parsed("7,11")).unwrap_err());
        assert!(error.contains("--model"), "{error}");
    }

    #[test]
    fn flags_out_of_range_are_refused_before_training() {
        for flags in [
            &["--object-mix", "0,0,0,0"][..],
            &["--object-mix", "1,1,1,1,1"],
            &["--word-weight", "1"],
            &["--free-head-scale", "1.5"],
            &["--free-head-scale", "0.5", "--untied-codes"],
        ] {
            let error = train(args(flags)).unwrap_err().to_string();
            assert!(error.contains(flags[0]), "{flags:?}: {error}");
        }
    }
}
