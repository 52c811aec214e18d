//! The transformer of `kiln-model` as a differentiable candle graph over whole sequences: the same
//! weights under the same names and layouts (matrices `[in, out]`), the same pre-norm blocks
//! (RMS norm, causal attention without biases, ReLU MLP) and the same inputs (text positions for the
//! prefix, row and column embeddings for image patches), so what trains here is what a worker serves.
//! Sequences of a batch share one image size; their prefixes are padded on the left, so every image
//! position sits at the same index and the loss reads one slice.
//!
//! Optionally ([`TrainableModel::tie_codes_to_pixels`]) a code's input embedding and output weights
//! are each its own free row plus a learned projection of the code's pixels, so what the model
//! learns of a colour or an edge on some codes carries to every code that shows it (a yellow star's
//! edge shares its colour with yellow squares and its shape with orange stars). The sum is
//! materialised on export: a served model has plain `tok_emb` and `head` tensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use kiln_model::tokenizer::{code_token, prefix_tokens, BOI, BOS};
use kiln_model::ModelConfig;

use crate::{PatchCodebook, TrainError};

/// The projection of a code's pixel features into its input embedding, `[features, d_model]`.
const PIXELS_IN: &str = "code_pixels_in";
/// The projection of a code's pixel features into its output weights, `[d_model, features]`.
const PIXELS_OUT: &str = "code_pixels_out";

/// The model's weights as trainable variables, in `weight_shapes` order, then the pixel projections
/// when codes are tied to their pixels.
pub struct TrainableModel {
    pub cfg: ModelConfig,
    pub vars: Vec<(String, Var)>,
    /// `[codebook, features]`, constant: each code's pixels scaled to -1..1, then their mean square.
    code_pixels: Option<Tensor>,
}

/// The pixel features of every code of `book`: `[codes, patch² * 3 + 1]`.
fn pixel_features(book: &PatchCodebook, device: &Device) -> Result<Tensor, TrainError> {
    let dim = book.patch * book.patch * 3;
    let mut features = Vec::with_capacity(book.len() * (dim + 1));
    for code in book.patches.chunks_exact(dim) {
        let scaled: Vec<f32> = code.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        // A score that is a dot product with the pixels favours bright codes; the mean square lets
        // the model learn the distance's other term.
        let mean_square = scaled.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        features.extend_from_slice(&scaled);
        features.push(mean_square);
    }
    Ok(Tensor::from_vec(features, (book.len(), dim + 1), device)?)
}

/// One training example: a prompt and the codes of its image.
#[derive(Clone, Debug)]
pub struct Example {
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub codes: Vec<u32>,
}

/// A batch laid out for the graph.
pub struct Batch {
    tokens: Tensor,
    pos_a: Tensor,
    pos_b: Tensor,
    /// Left padding of each sequence: attention skips it (a padding position sees only itself).
    pads: Vec<usize>,
    targets: Tensor,
    size: usize,
    prefix: usize,
    image: usize,
}

impl TrainableModel {
    /// Fresh weights, initialised as `Transformer::init_random` does.
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Self, TrainError> {
        cfg.validate()?;
        let vars = kiln_model::transformer::initial_weights(cfg, seed)
            .into_iter()
            .map(|(name, shape, values)| Ok((name, Var::from_vec(values, shape, device)?)))
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(TrainableModel {
            cfg: cfg.clone(),
            vars,
            code_pixels: None,
        })
    }

    /// Variables from stored tensors (a checkpoint), checked against the configuration's shapes.
    /// Pixel projections among them are kept for [`TrainableModel::tie_codes_to_pixels`].
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut vars = Vec::new();
        for (name, shape) in kiln_model::transformer::weight_shapes(cfg) {
            let t = tensors
                .get(&name)
                .ok_or_else(|| TrainError::Checkpoint(format!("missing tensor {name}")))?;
            if t.dims() != shape.as_slice() {
                return Err(TrainError::Checkpoint(format!(
                    "{name} has shape {:?}, the configuration implies {shape:?}",
                    t.dims()
                )));
            }
            vars.push((
                name,
                Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?,
            ));
        }
        for name in [PIXELS_IN, PIXELS_OUT] {
            if let Some(t) = tensors.get(name) {
                vars.push((name.to_string(), Var::from_tensor(&t.to_device(device)?)?));
            }
        }
        Ok(TrainableModel {
            cfg: cfg.clone(),
            vars,
            code_pixels: None,
        })
    }

    /// Ties every code's embedding and output weights to its pixels in `book` (the codebook the
    /// examples are encoded with). New projections start at zero, so the model computes what it
    /// did before; projections loaded from a checkpoint are kept.
    pub fn tie_codes_to_pixels(
        &mut self,
        book: &PatchCodebook,
        device: &Device,
    ) -> Result<(), TrainError> {
        if book.len() != self.cfg.codebook_size {
            return Err(TrainError::Data(format!(
                "the codebook has {} codes, the model {}",
                book.len(),
                self.cfg.codebook_size
            )));
        }
        let features = pixel_features(book, device)?;
        let (n, d) = (features.dim(1)?, self.cfg.d_model);
        let shapes = [(PIXELS_IN, (n, d)), (PIXELS_OUT, (d, n))];
        for (name, shape) in shapes {
            match self.vars.iter().find(|(v, _)| v == name) {
                Some((_, var)) if var.as_tensor().dims() != [shape.0, shape.1].as_slice() => {
                    return Err(TrainError::Checkpoint(format!(
                        "{name} has shape {:?}, the codebook implies {shape:?}",
                        var.as_tensor().dims()
                    )))
                }
                Some(_) => {}
                None => self
                    .vars
                    .push((name.to_string(), Var::zeros(shape, DType::F32, device)?)),
            }
        }
        self.code_pixels = Some(features);
        Ok(())
    }

    /// Whether codes are tied to their pixels.
    pub fn ties_codes_to_pixels(&self) -> bool {
        self.code_pixels.is_some()
    }

    /// The token embeddings and output weights the model computes with: the variables themselves,
    /// or with each code's pixel projection added.
    fn embeddings_and_head(&self) -> Result<(Tensor, Tensor), TrainError> {
        self.embeddings_and_head_with(1.0)
    }

    /// [`Self::embeddings_and_head`] with each code's free output weights scaled by `head_scale`
    /// (1 for the model as trained).
    fn embeddings_and_head_with(&self, head_scale: f64) -> Result<(Tensor, Tensor), TrainError> {
        let (tok_emb, head) = (self.var("tok_emb"), self.var("head"));
        let Some(pixels) = &self.code_pixels else {
            return Ok((tok_emb.clone(), head.clone()));
        };
        let first = self.cfg.first_code_token();
        let codes = (tok_emb.narrow(0, first, self.cfg.codebook_size)?
            + pixels.matmul(self.var(PIXELS_IN))?)?;
        let tok_emb = Tensor::cat(&[tok_emb.narrow(0, 0, first)?, codes], 0)?;
        // Scaled only when asked: training runs this every step.
        let free = if head_scale == 1.0 {
            head.clone()
        } else {
            (head * head_scale)?
        };
        let head = (free + self.var(PIXELS_OUT).matmul(&pixels.t()?)?)?;
        Ok((tok_emb, head))
    }

    /// The weights a worker serves, by name: pixel projections are folded into `tok_emb` and
    /// `head`.
    pub fn served_weights(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        self.served_weights_with(1.0)
    }

    /// [`Self::served_weights`] with every code's free output weights scaled by `head_scale`:
    /// below 1 the served model chooses codes more by what their pixels show. The free parts are
    /// where training learns which codes it never saw as targets (a held-out colour and shape
    /// pair's edges) and learns to avoid them; the pixel projection is shared by every code of a
    /// colour or an edge, so shrinking the free parts lets it speak for those codes. An error for
    /// a model whose codes are not tied to their pixels.
    pub fn served_weights_with(
        &self,
        head_scale: f64,
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        if head_scale != 1.0 && self.code_pixels.is_none() {
            return Err(TrainError::Data(
                "only a model whose codes are tied to their pixels has free parts to scale".into(),
            ));
        }
        let (tok_emb, head) = self.embeddings_and_head_with(head_scale)?;
        self.vars
            .iter()
            .filter(|(name, _)| name != PIXELS_IN && name != PIXELS_OUT)
            .map(|(name, var)| {
                let tensor = match name.as_str() {
                    "tok_emb" => &tok_emb,
                    "head" => &head,
                    _ => var.as_tensor(),
                };
                Ok((name.clone(), tensor.to_device(&Device::Cpu)?))
            })
            .collect()
    }

    fn var(&self, name: &str) -> &Tensor {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .expect("every weight has a variable")
    }

    /// Lays `examples` (one image size) out as a batch.
    pub fn batch(&self, examples: &[Example], device: &Device) -> Result<Batch, TrainError> {
        let cfg = &self.cfg;
        let first = examples
            .first()
            .ok_or_else(|| TrainError::Data("an empty batch".into()))?;
        let (w, h) = (first.width, first.height);
        let grid_w = w as usize / cfg.patch_size;
        let image = cfg.image_tokens(w, h);
        let prefixes: Vec<Vec<u32>> = examples
            .iter()
            .map(|e| {
                if (e.width, e.height) != (w, h) || e.codes.len() != image {
                    return Err(TrainError::Data(
                        "every example of a batch has the same image size".into(),
                    ));
                }
                if e.prompt.len() > cfg.max_prompt_bytes {
                    return Err(TrainError::Data(format!(
                        "prompt of {} bytes over the model's {}",
                        e.prompt.len(),
                        cfg.max_prompt_bytes
                    )));
                }
                Ok(prefix_tokens(cfg, &e.prompt, w, h))
            })
            .collect::<Result<_, _>>()?;
        let prefix = prefixes.iter().map(Vec::len).max().unwrap_or(0);
        let t = prefix + image;
        let b = examples.len();
        // Rows of the extended position table: text positions, rows, columns, then one zero row.
        let text_rows = cfg.max_prefix_tokens();
        let grid = cfg.max_grid();
        let zero = (text_rows + 2 * grid) as u32;
        let (mut tokens, mut pos_a, mut pos_b) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
        );
        let mut pads = Vec::with_capacity(b);
        let mut targets = Vec::with_capacity(b * image);
        for (e, p) in examples.iter().zip(&prefixes) {
            let pad = prefix - p.len();
            for _ in 0..pad {
                tokens.push(BOS);
                pos_a.push(zero);
                pos_b.push(zero);
            }
            for (i, &tok) in p.iter().enumerate() {
                tokens.push(tok);
                pos_a.push(i as u32);
                pos_b.push(zero);
            }
            for i in 0..image {
                tokens.push(if i == 0 {
                    BOI
                } else {
                    code_token(cfg, e.codes[i - 1])
                });
                pos_a.push((text_rows + i / grid_w) as u32);
                pos_b.push((text_rows + grid + i % grid_w) as u32);
            }
            targets.extend_from_slice(&e.codes);
            pads.push(pad);
        }
        Ok(Batch {
            tokens: Tensor::from_vec(tokens, b * t, device)?,
            pos_a: Tensor::from_vec(pos_a, b * t, device)?,
            pos_b: Tensor::from_vec(pos_b, b * t, device)?,
            pads,
            targets: Tensor::from_vec(targets, b * image, device)?,
            size: b,
            prefix,
            image,
        })
    }

    /// Mean cross-entropy (nats per image token) of the batch's codes.
    pub fn loss(&self, batch: &Batch) -> Result<Tensor, TrainError> {
        let logits = self.logits(batch)?;
        Ok(crate::ops::cross_entropy(&logits, &batch.targets)?)
    }

    /// Logits over codes at every image position: `[B * image, codebook]`.
    pub fn logits(&self, batch: &Batch) -> Result<Tensor, TrainError> {
        let cfg = &self.cfg;
        let (b, t, d) = (batch.size, batch.prefix + batch.image, cfg.d_model);
        let (heads, hd) = (cfg.n_heads, cfg.head_dim());
        let device = self.var("tok_emb").device();
        let (tok_emb, head) = self.embeddings_and_head()?;
        let positions = Tensor::cat(
            &[
                self.var("text_pos").clone(),
                self.var("row_emb").clone(),
                self.var("col_emb").clone(),
                Tensor::zeros((1, d), DType::F32, device)?,
            ],
            0,
        )?;
        let mut x = (tok_emb.index_select(&batch.tokens, 0)?
            + positions.index_select(&batch.pos_a, 0)?)?
        .add(&positions.index_select(&batch.pos_b, 0)?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in 0..cfg.n_layers {
            let w = |n: &str| self.var(&format!("layers.{l}.{n}"));
            let h = rms_norm(&x, w("attn_norm"), cfg.norm_eps)?;
            let qkv = h
                .matmul(w("wqkv"))?
                .reshape((b, t, 3, heads, hd))?
                .permute((2, 0, 3, 1, 4))?;
            let q = qkv.get(0)?.contiguous()?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let att = crate::ops::causal_attention(&q, &k, &v, &batch.pads, scale)?
                .transpose(1, 2)?
                .reshape((b * t, d))?;
            x = (x + att.matmul(w("wo"))?)?;
            let h = rms_norm(&x, w("mlp_norm"), cfg.norm_eps)?;
            x = (x + h.matmul(w("w_up"))?.relu()?.matmul(w("w_down"))?)?;
        }
        let image = x
            .reshape((b, t, d))?
            .narrow(1, batch.prefix, batch.image)?
            .reshape((b * batch.image, d))?;
        let image = rms_norm(&image, self.var("final_norm"), cfg.norm_eps)?;
        Ok(image.matmul(&head)?)
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}
