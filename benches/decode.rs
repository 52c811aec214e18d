//! Criterion: one decode step of the ~20M-parameter model at batch 1, 4, 16 and 64, over the middle of
//! a 128x128 image (context of about 100 to 220 tokens).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kiln_model::transformer::Device;
use kiln_model::{CandleEngine, Engine, ModelConfig, Transformer};

fn decode_steps(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    Transformer::init_random(&ModelConfig::random_20m(), 0, dir.path()).expect("model written");
    let mut group = c.benchmark_group("decode_step_20m");
    group.sample_size(10);
    for batch in [1usize, 4, 16, 64] {
        let model = Transformer::load(dir.path(), &Device::Cpu).expect("model loads");
        let mut engine = CandleEngine::new(model, 64 * 24, 16, 64);
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    // A fresh batch a quarter of the way in; 128 timed steps stay inside the image.
                    let ids = kiln_benches::decode_fixture(&mut engine, batch, 128, 0.25);
                    let steps = (iters - done).min(128);
                    let start = Instant::now();
                    for _ in 0..steps {
                        engine.decode(&ids, 1).expect("step");
                    }
                    total += start.elapsed();
                    done += steps;
                    engine.release(&ids);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode_steps);
criterion_main!(benches);
