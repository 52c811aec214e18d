//! What trains is what serves: the training graph and the serving transformer, given the same
//! weights, compute the same logits (left padding, text positions and the image's row and column
//! embeddings included). A mismatch would train a model that serves noise.

use candle_core::Device;
use kiln_model::kv_cache::PagedKvCache;
use kiln_model::tokenizer::{code_token, prefix_tokens, BOI};
use kiln_model::transformer::{Position, SequenceInput, TokenInput};
use kiln_model::{ModelConfig, Transformer};
use kiln_train::{Example, PatchCodebook, TrainConfig, Trainer};

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

#[test]
fn the_training_graph_and_the_serving_model_agree() {
    let cfg = ModelConfig::tiny();
    let device = Device::Cpu;
    let trainer = Trainer::new(&cfg, TrainConfig::default(), &device).unwrap();
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
    let batch = trainer.model.batch(&examples, &device).unwrap();
    let logits: Vec<Vec<f32>> = trainer.model.logits(&batch).unwrap().to_vec2().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let codebook = PatchCodebook {
        patch: cfg.patch_size,
        patches: vec![128; cfg.codebook_size * cfg.patch_size * cfg.patch_size * 3],
    };
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
