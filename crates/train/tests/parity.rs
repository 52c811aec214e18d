//! What trains is what serves: the training graph and the serving transformer, given the same
//! weights, compute the same logits (left padding, text positions and the image's row and column
//! embeddings included). A mismatch would train a model that serves noise.

mod common;

use candle_core::Device;
use kiln_model::kv_cache::PagedKvCache;
use kiln_model::tokenizer::{code_token, prefix_tokens, BOI};
use kiln_model::transformer::{Position, SequenceInput, TokenInput};
use kiln_model::{ModelConfig, Transformer};
use kiln_train::{Example, TrainConfig, Trainer};

fn serving_logits(model: &Transformer, example: &Example, image_inputs: usize) -> Vec<f32> {
    let cfg = model.config();
    let cols = example.width as usize / cfg.patch_size;
    let mut tokens: Vec<TokenInput> =
        prefix_tokens(cfg, &example.prompt, example.width, example.height)
            .into_iter()
            .enumerate()
            .map(|(i, token)| TokenInput {
                token,
                position: Position::Text(i),
            })
            .collect();
    for i in 0..image_inputs {
        tokens.push(TokenInput {
            token: if i == 0 {
                BOI
            } else {
                code_token(cfg, example.codes[i - 1])
            },
            position: Position::Image {
                row: i / cols,
                col: i % cols,
            },
        });
    }
    let mut cache = PagedKvCache::new(cfg.n_layers, 16, 16, cfg.d_model);
    let table: Vec<u32> = (0..16).collect();
    let seqs = [SequenceInput {
        tokens,
        cached: 0,
        block_table: &table,
    }];
    model.forward(&seqs, &mut cache).unwrap().remove(0)
}

/// Trains `trainer` a few steps on `examples` when asked (so every weight, pixel projections
/// included, is off its initial value), exports it and compares the served logits with the graph's.
fn assert_graph_and_served_agree(pixel_codes: bool) {
    let cfg = ModelConfig::tiny();
    let device = Device::Cpu;
    let codebook = common::distinct_codebook(&cfg);
    let config = TrainConfig {
        pixel_codes,
        warmup: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&cfg, config, &codebook, &device).unwrap();
    assert_eq!(trainer.model.ties_codes_to_pixels(), pixel_codes);
    let examples: Vec<Example> = ["a red circle", "a blue star above a green square"]
        .iter()
        .enumerate()
        .map(|(s, prompt)| Example {
            prompt: prompt.to_string(),
            width: 32,
            height: 32,
            codes: (0..16).map(|i| ((i * 7 + s * 3) % 64) as u32).collect(),
        })
        .collect();
    if pixel_codes {
        for _ in 0..3 {
            trainer.train_step(&examples).unwrap();
        }
        let moved = trainer
            .model
            .vars
            .iter()
            .filter(|(name, _)| name.starts_with("code_pixels"))
            .map(|(_, var)| var.as_tensor().abs().unwrap().max_all().unwrap())
            .map(|max| max.to_scalar::<f32>().unwrap())
            .collect::<Vec<_>>();
        assert_eq!(moved.len(), 2, "two pixel projections");
        assert!(
            moved.iter().all(|&m| m > 0.0),
            "projections trained: {moved:?}"
        );
    }
    let batch = trainer.model.batch(&examples, &device).unwrap();
    let logits: Vec<Vec<f32>> = trainer.model.logits(&batch).unwrap().to_vec2().unwrap();
    let dir = tempfile::tempdir().unwrap();
    trainer.export(&codebook, dir.path()).unwrap();
    let model = Transformer::load(dir.path(), &device).unwrap();
    for (s, example) in examples.iter().enumerate() {
        // Image position i is predicted from i + 1 image inputs.
        for i in [0, 5, 15] {
            let served = serving_logits(&model, example, i + 1);
            let trained = &logits[s * 16 + i];
            let worst = served
                .iter()
                .zip(trained)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-3,
                "example {s}, image position {i}: logits differ by {worst}"
            );
        }
    }
}

#[test]
fn the_training_graph_and_the_serving_model_agree() {
    assert_graph_and_served_agree(false);
}

#[test]
fn codes_tied_to_their_pixels_are_served_as_trained() {
    assert_graph_and_served_agree(true);
}

/// `--free-head-scale`: the exported output weights are the free part scaled plus the pixel
/// projection, so they move linearly with the scale; the embeddings and every other weight stay
/// as trained. An untied model has no free parts to scale.
#[test]
fn scaling_the_free_output_weights_moves_only_the_head_linearly() {
    let cfg = ModelConfig::tiny();
    let device = Device::Cpu;
    let codebook = common::distinct_codebook(&cfg);
    let config = TrainConfig {
        pixel_codes: true,
        warmup: 1,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&cfg, config.clone(), &codebook, &device).unwrap();
    let example = Example {
        prompt: "a red circle".into(),
        width: 32,
        height: 32,
        codes: (0..16).map(|i| (i * 5 % 64) as u32).collect(),
    };
    for _ in 0..3 {
        trainer.train_step(std::slice::from_ref(&example)).unwrap();
    }
    let flat = |scale: f64| -> std::collections::HashMap<String, Vec<f32>> {
        let weights = trainer.model.served_weights_with(scale).unwrap();
        weights
            .into_iter()
            .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    let (one, zero, half) = (flat(1.0), flat(0.0), flat(0.5));
    let mut moved = 0;
    for (i, ((a, b), h)) in one["head"]
        .iter()
        .zip(&zero["head"])
        .zip(&half["head"])
        .enumerate()
    {
        assert!(
            (h - (a + b) / 2.0).abs() < 1e-5,
            "head[{i}]: {h} vs {a}, {b}"
        );
        moved += usize::from((a - b).abs() > 1e-6);
    }
    // Every output weight has a free part (initialised at random), so nearly all move.
    assert!(
        moved > one["head"].len() * 9 / 10,
        "only {moved} output weights moved"
    );
    for (name, weights) in &one {
        if name != "head" {
            assert_eq!(weights, &zero[name], "{name}");
        }
    }
    let untied = Trainer::new(
        &cfg,
        TrainConfig {
            pixel_codes: false,
            ..config
        },
        &codebook,
        &device,
    )
    .unwrap();
    assert!(untied.model.served_weights_with(0.5).is_err());
    assert!(untied.model.served_weights_with(1.0).is_ok());
}
