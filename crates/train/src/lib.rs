//! Training Kiln's image model on the CPU: the k-means patch tokenizer ([`kmeans`]), the
//! transformer as a differentiable graph with the weights a worker serves ([`graph`]) and its fused
//! attention and cross-entropy with hand-written gradients ([`ops`]), and the
//! [`Trainer`]: AdamW with warm-up and cosine decay, gradient clipping, resumable checkpoints, and
//! the export of a servable model directory. The data comes from `kiln-scenes` ([`data`]).

// Unsafe code only where the fused ops call the `gemm` crate on checked slices (`ops::matmul`).
#![deny(unsafe_code)]

pub mod data;
pub mod graph;
pub mod kmeans;
pub mod ops;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, Device, Tensor};
use kiln_model::{Codebook, ModelConfig, Transformer};
use serde::{Deserialize, Serialize};

pub use graph::{Example, TrainableModel};
pub use kmeans::PatchCodebook;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("data: {0}")]
    Data(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The knobs of one training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimiser steps in all.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warm-up before the cosine decay (to a tenth of the peak).
    pub warmup: usize,
    pub weight_decay: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it.
    pub clip: f64,
    pub seed: u64,
    /// Whether codes' embeddings and output weights are tied to their pixels
    /// ([`TrainableModel::tie_codes_to_pixels`]). Checkpoints from before the option are untied.
    #[serde(default)]
    pub pixel_codes: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 3000,
            batch: 32,
            learning_rate: 2e-3,
            warmup: 100,
            weight_decay: 0.01,
            clip: 1.0,
            seed: 1,
            pixel_codes: true,
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step` (0-based).
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.learning_rate * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps.saturating_sub(self.warmup)).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = 0.1 * self.learning_rate;
        floor + (self.learning_rate - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What a checkpoint records beside the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    config: TrainConfig,
    model: ModelConfig,
    /// Mean loss of each finished step, for the record.
    losses: Vec<f32>,
}

/// AdamW with its moments kept as tensors, so a checkpoint can store and restore them.
struct AdamW {
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    /// Updates made, for the bias corrections.
    updates: i32,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

/// The model, its optimiser and where the run is.
pub struct Trainer {
    pub model: TrainableModel,
    config: TrainConfig,
    adam: AdamW,
    step: usize,
    losses: Vec<f32>,
    device: Device,
}

const CHECKPOINT: &str = "checkpoint.safetensors";
const STATE: &str = "train-state.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.display().to_string();
    move |source| TrainError::Io { path, source }
}

impl Trainer {
    /// A fresh run on examples encoded with `codebook`.
    pub fn new(
        cfg: &ModelConfig,
        config: TrainConfig,
        codebook: &PatchCodebook,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut model = TrainableModel::init(cfg, config.seed, device)?;
        if config.pixel_codes {
            model.tie_codes_to_pixels(codebook, device)?;
        }
        let adam = AdamW::new(&model)?;
        Ok(Trainer {
            model,
            config,
            adam,
            step: 0,
            losses: Vec::new(),
            device: device.clone(),
        })
    }

    /// Continues the run checkpointed in `dir`, or starts a fresh one when there is none.
    pub fn resume_or_new(
        dir: &Path,
        cfg: &ModelConfig,
        config: TrainConfig,
        codebook: &PatchCodebook,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let state_path = dir.join(STATE);
        if !state_path.exists() {
            return Self::new(cfg, config, codebook, device);
        }
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", state_path.display())))?;
        // Neither the version nor the sampling defaults are the architecture: a run may be
        // exported with new ones.
        let architecture = |c: &ModelConfig| ModelConfig {
            version: String::new(),
            default_temperature: None,
            default_top_k: None,
            guidance: None,
            speculation: None,
            ..c.clone()
        };
        if architecture(&state.model) != architecture(cfg) {
            return Err(TrainError::Checkpoint(format!(
                "{} holds a run of another model configuration; use another directory",
                dir.display()
            )));
        }
        let tensors = candle_core::safetensors::load(dir.join(CHECKPOINT), device)?;
        let mut model = TrainableModel::from_tensors(cfg, &tensors, device)?;
        if state.config.pixel_codes {
            model.tie_codes_to_pixels(codebook, device)?;
        }
        let moments = |prefix: &str| -> Result<Vec<Tensor>, TrainError> {
            model
                .vars
                .iter()
                .map(|(name, _)| {
                    tensors
                        .get(&format!("{prefix}.{name}"))
                        .cloned()
                        .ok_or_else(|| {
                            TrainError::Checkpoint(format!(
                                "missing optimiser state {prefix}.{name}"
                            ))
                        })
                })
                .collect()
        };
        let adam = AdamW {
            first: moments("adam.m")?,
            second: moments("adam.v")?,
            updates: state.step as i32,
            ..AdamW::new(&model)?
        };
        // The step count and the schedule carry on; a longer `steps` extends the run.
        Ok(Trainer {
            model,
            config: TrainConfig {
                steps: config.steps,
                ..state.config
            },
            adam,
            step: state.step,
            losses: state.losses,
            device: device.clone(),
        })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// One optimiser step on `examples`; returns the batch's mean loss before the update.
    pub fn train_step(&mut self, examples: &[Example]) -> Result<f32, TrainError> {
        let batch = self.model.batch(examples, &self.device)?;
        let loss = self.model.loss(&batch)?;
        let grads = loss.backward()?;
        let lr = self.config.learning_rate_at(self.step);
        self.adam.update(&self.model, &grads, lr, &self.config)?;
        let value = loss.to_scalar::<f32>()?;
        self.step += 1;
        self.losses.push(value);
        Ok(value)
    }

    /// Mean loss on `examples` without training.
    pub fn evaluate(&self, examples: &[Example]) -> Result<f32, TrainError> {
        let batch = self.model.batch(examples, &self.device)?;
        Ok(self.model.loss(&batch)?.to_scalar::<f32>()?)
    }

    /// Writes weights, optimiser moments and the step into `dir` (atomically: a crash mid-write
    /// leaves the previous checkpoint).
    pub fn checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, var)) in self.model.vars.iter().enumerate() {
            tensors.insert(name.clone(), var.as_tensor().clone());
            tensors.insert(format!("adam.m.{name}"), self.adam.first[i].clone());
            tensors.insert(format!("adam.v.{name}"), self.adam.second[i].clone());
        }
        let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, dir.join(CHECKPOINT)).map_err(io(dir))?;
        let state = TrainState {
            step: self.step,
            config: self.config.clone(),
            model: self.model.cfg.clone(),
            losses: self.losses.clone(),
        };
        let tmp = dir.join(format!("{STATE}.tmp"));
        let json =
            serde_json::to_string(&state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(io(&tmp))?;
        std::fs::rename(&tmp, dir.join(STATE)).map_err(io(dir))?;
        Ok(())
    }

    /// Writes a servable model (what `kiln worker --model` loads) into `dir`.
    pub fn export(&self, codebook: &PatchCodebook, dir: &Path) -> Result<(), TrainError> {
        self.export_with(codebook, 1.0, dir)
    }

    /// [`Self::export`] with the codes' free output weights scaled by `head_scale`
    /// ([`TrainableModel::served_weights_with`]).
    pub fn export_with(
        &self,
        codebook: &PatchCodebook,
        head_scale: f64,
        dir: &Path,
    ) -> Result<(), TrainError> {
        let tensors = self.model.served_weights_with(head_scale)?;
        let book = Codebook::new(codebook.patch, codebook.patches.clone())?;
        Transformer::save(&self.model.cfg, tensors, &book, dir)?;
        Ok(())
    }
}

impl AdamW {
    fn new(model: &TrainableModel) -> Result<Self, TrainError> {
        let zeros = || -> Result<Vec<Tensor>, TrainError> {
            model
                .vars
                .iter()
                .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
                .collect()
        };
        Ok(AdamW {
            first: zeros()?,
            second: zeros()?,
            updates: 0,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
        })
    }

    fn update(
        &mut self,
        model: &TrainableModel,
        grads: &GradStore,
        lr: f64,
        config: &TrainConfig,
    ) -> Result<(), TrainError> {
        // Global norm clipping: one scale for every gradient.
        let mut norm_sq = 0f64;
        for (_, var) in &model.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = norm_sq.sqrt();
        let scale = if norm > config.clip {
            config.clip / norm
        } else {
            1.0
        };
        self.updates += 1;
        let c1 = 1.0 - self.beta1.powi(self.updates);
        let c2 = 1.0 - self.beta2.powi(self.updates);
        for (i, (name, var)) in model.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients remember the graph that made them (they are computed from the variables):
            // detached, the moments do not keep every step's graph alive.
            let g = (g.detach() * scale)?;
            self.first[i] = ((&self.first[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?.detach();
            self.second[i] =
                ((&self.second[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?.detach();
            let m_hat = (&self.first[i] / c1)?;
            let v_hat = (&self.second[i] / c2)?;
            let step = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            // Norms and embeddings are not decayed.
            let decay = if name.ends_with("norm") || name.contains("emb") || name == "text_pos" {
                0.0
            } else {
                config.weight_decay
            };
            let w = var.as_tensor().detach();
            let updated = ((w * (1.0 - lr * decay))? - (step * lr)?)?;
            var.set(&updated)?;
        }
        Ok(())
    }
}
