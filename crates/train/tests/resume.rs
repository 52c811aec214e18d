//! A run checkpointed and resumed ends where the uninterrupted run ends: weights, pixel projections
//! and optimiser moments all survive the checkpoint.

mod common;

use candle_core::Device;
use kiln_model::ModelConfig;
use kiln_train::{Example, TrainConfig, Trainer};

fn examples(step: usize) -> Vec<Example> {
    (0..2)
        .map(|s| Example {
            prompt: ["a red circle", "a blue star"][s].to_string(),
            width: 32,
            height: 32,
            codes: (0..16)
                .map(|i| ((i * 7 + s * 3 + step * 5) % 64) as u32)
                .collect(),
        })
        .collect()
}

fn weights(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    trainer
        .model
        .vars
        .iter()
        .map(|(name, var)| {
            let values = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (name.clone(), values)
        })
        .collect()
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let cfg = ModelConfig::tiny();
    let device = Device::Cpu;
    let codebook = common::distinct_codebook(&cfg);
    let config = TrainConfig {
        steps: 4,
        warmup: 1,
        ..TrainConfig::default()
    };
    assert!(config.pixel_codes, "new runs tie codes to their pixels");

    let mut straight = Trainer::new(&cfg, config.clone(), &codebook, &device).unwrap();
    for step in 0..4 {
        straight.train_step(&examples(step)).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let mut first =
        Trainer::resume_or_new(dir.path(), &cfg, config.clone(), &codebook, &device).unwrap();
    for step in 0..2 {
        first.train_step(&examples(step)).unwrap();
    }
    first.checkpoint(dir.path()).unwrap();
    drop(first);
    let mut resumed = Trainer::resume_or_new(dir.path(), &cfg, config, &codebook, &device).unwrap();
    assert_eq!(resumed.step_count(), 2);
    assert!(resumed.model.ties_codes_to_pixels());
    for step in 2..4 {
        resumed.train_step(&examples(step)).unwrap();
    }

    let (a, b) = (weights(&straight), weights(&resumed));
    assert_eq!(
        a.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        b.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name} differs by {worst} after resuming");
    }
}
