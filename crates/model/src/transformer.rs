//! The decoder-only transformer. A sequence is the prompt prefix (BOS, bytes, width and height tokens,
//! with learned text positions) followed by image inputs: input `i` is BOI for `i = 0`, else code
//! `i - 1`, plus the row and column embeddings of the patch it predicts, so one model draws every
//! image size. On the CPU, matrix products run the crate's own kernel over weights packed once at
//! load ([`crate::cpu::gemm`]); on CUDA they go through candle. Attention is hand-written over the
//! paged KV cache, one (row, head) at a time, which makes every row's result independent of the
//! batch it runs in.

use std::collections::HashMap;
use std::path::Path;

pub use candle_core::Device;
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::cpu::attention::{attend_heads, Spans};
use crate::cpu::gemm::PackedMatrix;
use crate::kv_cache::PagedKvCache;
use crate::{Codebook, ModelConfig, ModelError};

/// Where an input token sits: in the text prefix, or at an image patch it predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Text(usize),
    Image { row: usize, col: usize },
}

/// One input token.
#[derive(Clone, Copy, Debug)]
pub struct TokenInput {
    pub token: u32,
    pub position: Position,
}

/// New tokens of one sequence for a forward pass.
#[derive(Debug)]
pub struct SequenceInput<'a> {
    pub tokens: Vec<TokenInput>,
    /// Positions already in the KV cache; the new tokens take the next ones.
    pub cached: usize,
    pub block_table: &'a [u32],
}

struct Layer {
    attn_norm: Vec<f32>,
    wqkv: Linear,
    wo: Linear,
    mlp_norm: Vec<f32>,
    w_up: Linear,
    w_down: Linear,
}

/// A weight matrix where its products run: packed for the CPU kernel, or a tensor on a candle
/// device (CUDA).
enum Linear {
    Packed(PackedMatrix),
    Device(Tensor),
}

impl Linear {
    /// Places a `[k, n]` matrix for products on `device`.
    fn new(w: Tensor, device: &Device) -> Result<Self, ModelError> {
        let w = w.to_dtype(DType::F32)?;
        if device.is_cpu() {
            let (k, n) = w.dims2()?;
            let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
            return Ok(Linear::Packed(PackedMatrix::pack(&values, k, n)));
        }
        Ok(Linear::Device(w.to_device(device)?.contiguous()?))
    }
}

/// Weights and configuration of a loaded model.
pub struct Transformer {
    cfg: ModelConfig,
    device: Device,
    tok_emb: Vec<f32>,
    text_pos: Vec<f32>,
    row_emb: Vec<f32>,
    col_emb: Vec<f32>,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    head: Linear,
    codebook: Codebook,
    /// Activation buffers of a forward pass, reused by the next one (see [`Transformer::forward`]).
    scratch: std::sync::Mutex<Scratch>,
}

/// Activations of one forward pass: normed input, Q|K|V, attention output, MLP hidden, projection.
#[derive(Default)]
struct Scratch {
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    up: Vec<f32>,
    proj: Vec<f32>,
}

/// Weight names and shapes, as stored in `model.safetensors` (matrices `[in, out]`).
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.d_model;
    let mut shapes = vec![
        ("tok_emb".to_string(), vec![cfg.vocab_size(), d]),
        ("text_pos".to_string(), vec![cfg.max_prefix_tokens(), d]),
        ("row_emb".to_string(), vec![cfg.max_grid(), d]),
        ("col_emb".to_string(), vec![cfg.max_grid(), d]),
        ("final_norm".to_string(), vec![d]),
        ("head".to_string(), vec![d, cfg.codebook_size]),
    ];
    for l in 0..cfg.n_layers {
        let p = |n: &str| format!("layers.{l}.{n}");
        shapes.push((p("attn_norm"), vec![d]));
        shapes.push((p("wqkv"), vec![d, 3 * d]));
        shapes.push((p("wo"), vec![d, d]));
        shapes.push((p("mlp_norm"), vec![d]));
        shapes.push((p("w_up"), vec![d, cfg.d_ff]));
        shapes.push((p("w_down"), vec![cfg.d_ff, d]));
    }
    shapes
}

/// Seeded initial values of every weight, in [`weight_shapes`] order: norms at 1, matrices uniform
/// with the deviation of a scaled normal (1/sqrt(fan_in), about 0.02 for embeddings), and the
/// matrices that write into the residual stream smaller still, so each block starts near the
/// identity. `init_random` and training both start here.
pub fn initial_weights(cfg: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm") {
                vec![1.0; n]
            } else {
                let fan_in = if shape.len() == 2 && !name.contains("emb") && name != "text_pos" {
                    shape[0]
                } else {
                    2500
                };
                let damp = if name.ends_with("wo") || name.ends_with("w_down") {
                    1.0 / (2.0 * cfg.n_layers as f32).sqrt()
                } else {
                    1.0
                };
                let a = damp * (3.0f32 / fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            (name, shape, values)
        })
        .collect()
}

impl Transformer {
    /// Writes a randomly initialised model (`config.json` + `model.safetensors`) into `dir`.
    pub fn init_random(cfg: &ModelConfig, seed: u64, dir: &Path) -> Result<(), ModelError> {
        cfg.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape, values) in initial_weights(cfg, seed) {
            tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        let codebook = Codebook::procedural(cfg.codebook_size, cfg.patch_size);
        Self::save(cfg, tensors, &codebook, dir)
    }

    /// Writes a model (`config.json` + `model.safetensors` with the weights of [`weight_shapes`] and
    /// the codebook) into `dir`: what `load` reads. Training writes its models through this too.
    pub fn save(
        cfg: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        codebook: &Codebook,
        dir: &Path,
    ) -> Result<(), ModelError> {
        cfg.validate()?;
        std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
        if codebook.len() != cfg.codebook_size || codebook.patch_size() != cfg.patch_size {
            return Err(ModelError::Weights(format!(
                "a codebook of {} {}px patches for a model of {} {}px codes",
                codebook.len(),
                codebook.patch_size(),
                cfg.codebook_size,
                cfg.patch_size
            )));
        }
        let per = cfg.patch_size * cfg.patch_size * 3;
        tensors.insert(
            "codebook".to_string(),
            Tensor::from_vec(
                codebook.as_bytes().to_vec(),
                (cfg.codebook_size, per),
                &Device::Cpu,
            )?,
        );
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        let json =
            serde_json::to_string_pretty(cfg).map_err(|e| ModelError::Config(e.to_string()))?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, json).map_err(ModelError::io(&config_path))?;
        Ok(())
    }

    /// Loads `config.json` and `model.safetensors` from `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(ModelError::io(&config_path))?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", config_path.display())))?;
        cfg.validate()?;
        let weights_path = dir.join("model.safetensors");
        if !weights_path.exists() {
            return Err(ModelError::Io {
                path: weights_path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let mut tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor, ModelError> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| ModelError::Weights(format!("missing tensor {name}")))?;
            if t.dims() != shape {
                return Err(ModelError::Weights(format!(
                    "{name} has shape {:?}, config implies {shape:?}",
                    t.dims()
                )));
            }
            Ok(t)
        };
        let host = |t: Tensor| -> Result<Vec<f32>, ModelError> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let dev = |t: Tensor| Linear::new(t, device);
        let shapes: HashMap<String, Vec<usize>> = weight_shapes(&cfg).into_iter().collect();
        let mut get = |name: &str| take(name, &shapes[name]);
        let tok_emb = host(get("tok_emb")?)?;
        let text_pos = host(get("text_pos")?)?;
        let row_emb = host(get("row_emb")?)?;
        let col_emb = host(get("col_emb")?)?;
        let final_norm = host(get("final_norm")?)?;
        let head = dev(get("head")?)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = |n: &str| format!("layers.{l}.{n}");
            layers.push(Layer {
                attn_norm: host(get(&p("attn_norm"))?)?,
                wqkv: dev(get(&p("wqkv"))?)?,
                wo: dev(get(&p("wo"))?)?,
                mlp_norm: host(get(&p("mlp_norm"))?)?,
                w_up: dev(get(&p("w_up"))?)?,
                w_down: dev(get(&p("w_down"))?)?,
            });
        }
        let per = cfg.patch_size * cfg.patch_size * 3;
        let codebook_tensor = take("codebook", &[cfg.codebook_size, per])?;
        let codebook = Codebook::new(
            cfg.patch_size,
            codebook_tensor.flatten_all()?.to_vec1::<u8>()?,
        )?;
        Ok(Transformer {
            cfg,
            device: device.clone(),
            tok_emb,
            text_pos,
            row_emb,
            col_emb,
            layers,
            final_norm,
            head,
            codebook,
            scratch: Default::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Serves with another classifier-free guidance scale than the model's config names.
    pub fn set_guidance(&mut self, guidance: f32) -> Result<(), ModelError> {
        let cfg = ModelConfig {
            guidance: Some(guidance),
            ..self.cfg.clone()
        };
        cfg.validate()?;
        self.cfg = cfg;
        Ok(())
    }

    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// A short name of the device, e.g. `cpu` or `cuda:0`.
    pub fn device_name(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    /// (used, total) bytes of the GPU's memory as the CUDA driver reports it (all processes on the
    /// device, so it is the saturation figure an operator needs); `None` on the CPU.
    pub fn device_memory(&self) -> Option<(u64, u64)> {
        #[cfg(feature = "cuda")]
        if let Ok(cuda) = self.device.as_cuda_device() {
            let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            return Some(((total - free) as u64, total as u64));
        }
        None
    }

    fn embed(&self, input: &TokenInput, out: &mut [f32]) {
        let d = self.cfg.d_model;
        let t = input.token as usize;
        out.copy_from_slice(&self.tok_emb[t * d..(t + 1) * d]);
        let mut add = |table: &[f32], i: usize| {
            for (o, v) in out.iter_mut().zip(&table[i * d..(i + 1) * d]) {
                *o += v;
            }
        };
        match input.position {
            Position::Text(i) => add(&self.text_pos, i),
            Position::Image { row, col } => {
                add(&self.row_emb, row);
                add(&self.col_emb, col);
            }
        }
    }

    /// The kept buffers (a pass that panicked left nothing in them that matters).
    fn scratch_slot(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs the new tokens of every sequence through the model, appending their keys and values to
    /// the cache, and returns the logits over image codes of each sequence's last new token.
    pub fn forward(
        &self,
        seqs: &[SequenceInput<'_>],
        cache: &mut PagedKvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_tails(seqs, cache, &vec![1; seqs.len()])
    }

    /// [`Transformer::forward`], returning the logits of the last `tails[s]` new tokens of each
    /// sequence `s` (at least one, at most its new tokens), sequence after sequence and in order:
    /// a window of drafted tokens is verified with one row of logits per draft.
    pub fn forward_tails(
        &self,
        seqs: &[SequenceInput<'_>],
        cache: &mut PagedKvCache,
        tails: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        assert_eq!(seqs.len(), tails.len(), "a tail per sequence");
        assert!(
            seqs.iter()
                .zip(tails)
                .all(|(seq, &tail)| (1..=seq.tokens.len()).contains(&tail)),
            "each tail within its sequence's new tokens"
        );
        let d = self.cfg.d_model;
        let hd = self.cfg.head_dim();
        // (sequence, absolute position) of every row.
        let rows: Vec<(usize, usize)> = seqs
            .iter()
            .enumerate()
            .flat_map(|(s, seq)| (0..seq.tokens.len()).map(move |i| (s, seq.cached + i)))
            .collect();
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut x = vec![0f32; n * d];
        for (row, input) in x.chunks_mut(d).zip(seqs.iter().flat_map(|s| &s.tokens)) {
            self.embed(input, row);
        }
        let scale = 1.0 / (hd as f32).sqrt();
        // Buffers of the pass, kept between passes: products of a large batch would otherwise
        // map, zero and unmap fresh pages every time.
        let mut scratch = std::mem::take(&mut *self.scratch_slot());
        let Scratch {
            h,
            qkv,
            att,
            up,
            proj,
        } = &mut scratch;
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, self.cfg.norm_eps, h);
            matmul(h, n, &layer.wqkv, qkv)?;
            for (r, &(s, pos)) in rows.iter().enumerate() {
                let row = &qkv[r * 3 * d..(r + 1) * 3 * d];
                cache.write(l, seqs[s].block_table, pos, &row[d..2 * d], &row[2 * d..]);
            }
            att.resize(n * d, 0.0);
            let (keys, values) = cache.layer(l);
            let cache_ref = &*cache;
            let qkv_ref = &*qkv;
            let group = heads_per_task(n, self.cfg.n_heads);
            let groups_per_row = self.cfg.n_heads / group;
            att.par_chunks_mut(group * hd)
                .enumerate()
                .for_each(|(i, out)| {
                    let (r, first) = (i / groups_per_row, i % groups_per_row * group);
                    let (s, pos) = rows[r];
                    let q = &qkv_ref[r * 3 * d + first * hd..r * 3 * d + (first + group) * hd];
                    attend(
                        q,
                        keys,
                        values,
                        cache_ref,
                        seqs[s].block_table,
                        pos,
                        first..first + group,
                        hd,
                        scale,
                        out,
                    );
                });
            matmul(att, n, &layer.wo, proj)?;
            add_in_place(&mut x, proj);
            rms_norm(&x, &layer.mlp_norm, self.cfg.norm_eps, h);
            matmul(h, n, &layer.w_up, up)?;
            up.iter_mut().for_each(|v| *v = v.max(0.0));
            matmul(up, n, &layer.w_down, proj)?;
            add_in_place(&mut x, proj);
        }
        // Only each sequence's tail rows predict tokens.
        let predicting: usize = tails.iter().sum();
        let mut last = Vec::with_capacity(predicting * d);
        let mut end = 0;
        for (seq, &tail) in seqs.iter().zip(tails) {
            end += seq.tokens.len();
            last.extend_from_slice(&x[(end - tail) * d..end * d]);
        }
        rms_norm(&last, &self.final_norm, self.cfg.norm_eps, h);
        let mut logits = Vec::new();
        matmul(h, predicting, &self.head, &mut logits)?;
        *self.scratch_slot() = scratch;
        Ok(logits
            .chunks(self.cfg.codebook_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Rows per matrix product on CUDA: every product has exactly this many rows (see [`matmul`]).
const CUDA_MATMUL_ROWS: usize = 64;

/// `x[rows, k] @ w[k, n]`, with every row's result independent of the other rows, because a
/// sequence must get the same bits whether it runs alone or in a batch (see the test below):
/// - on CPU the packed kernel runs one fixed chain per output element (see [`crate::cpu::gemm`]);
/// - on CUDA, cuBLAS picks its kernel (and so its summation order) by shape, so rows go in chunks of
///   exactly [`CUDA_MATMUL_ROWS`], the last one padded.
fn matmul(x: &[f32], rows: usize, w: &Linear, out: &mut Vec<f32>) -> Result<(), ModelError> {
    let w = match w {
        Linear::Packed(packed) => {
            out.resize(rows * packed.n(), 0.0);
            packed.matmul(x, rows, out);
            return Ok(());
        }
        Linear::Device(w) => w,
    };
    let (k, n) = w.dims2()?;
    out.clear();
    for chunk in x.chunks(CUDA_MATMUL_ROWS * k) {
        let mut padded = chunk.to_vec();
        padded.resize(CUDA_MATMUL_ROWS * k, 0.0);
        let t = Tensor::from_vec(padded, (CUDA_MATMUL_ROWS, k), w.device())?;
        let product: Vec<f32> = t.matmul(w)?.flatten_all()?.to_vec1()?;
        out.extend_from_slice(&product[..chunk.len() / k * n]);
    }
    Ok(())
}

/// Causal attention of one query row's heads `heads` over positions `0..=pos` of a sequence,
/// block by block of the block table (see [`crate::cpu::attention`]).
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    cache: &PagedKvCache,
    table: &[u32],
    pos: usize,
    heads: std::ops::Range<usize>,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (bs, d) = (cache.block_size(), cache.d_model());
    let spans: Vec<(usize, usize)> = (0..=pos)
        .step_by(bs)
        .zip(table)
        .map(|(start, &block)| (block as usize * bs * d, (pos + 1 - start).min(bs)))
        .collect();
    let at = Spans {
        spans: &spans,
        stride: d,
        head_dim,
    };
    let mut scores = Vec::with_capacity((pos + 1) * heads.len());
    attend_heads(q, keys, values, &at, heads, scale, &mut scores, out);
}

/// Heads per attention task for `rows` rows: all of them (one pass over each position's memory)
/// unless that leaves threads idle, then the largest divisor of `n_heads` that gives every thread
/// a few tasks. Only the speed depends on it: a head's result is the same in any group.
fn heads_per_task(rows: usize, n_heads: usize) -> usize {
    let wanted_tasks = 4 * rayon::current_num_threads();
    let groups_per_row = wanted_tasks.div_ceil(rows).clamp(1, n_heads);
    (1..=n_heads)
        .rev()
        .find(|g| n_heads.is_multiple_of(*g) && n_heads / g >= groups_per_row)
        .unwrap_or(1)
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let d = weight.len();
    out.resize(x.len(), 0.0);
    for (o, row) in out.chunks_mut(d).zip(x.chunks(d)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;

    // The property the determinism guarantee rests on: a row's product does not depend on how many
    // other rows share the matrix multiplication.
    device_test!(
        matmul_rows_are_batch_invariant,
        matmul_rows_are_batch_invariant_on
    );

    fn matmul_rows_are_batch_invariant_on(device: &Device) {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (k, n) in [(64, 128), (512, 1536), (2048, 512)] {
            let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-0.1..0.1)).collect();
            let w =
                Linear::new(Tensor::from_vec(w, (k, n), &Device::Cpu).unwrap(), device).unwrap();
            let x: Vec<f32> = (0..1100 * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut alone = Vec::new();
            matmul(&x[..k], 1, &w, &mut alone).unwrap();
            for rows in [2, 3, 7, 16, 33, 64, 80, 300, 1100] {
                let mut batch = Vec::new();
                matmul(&x[..rows * k], rows, &w, &mut batch).unwrap();
                assert_eq!(
                    &batch[..n],
                    &alone[..],
                    "row 0 of {k}x{n} differs in a batch of {rows}"
                );
            }
        }
    }
}
