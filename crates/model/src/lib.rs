//! The image-generation model and everything that runs it on one device: the configuration, the
//! byte-level text tokenizer, the codebook that turns image tokens into pixels, the decoder-only
//! transformer (candle for the matrix products, hand-written attention over a paged KV cache),
//! seeded sampling, the [`Engine`] that holds live sequences and executes batched prefill and
//! decode steps (real, with optional speculative Jacobi decoding, or simulated with calibrated step
//! times), and the shipped trained model
//! ([`shipped`]). It knows nothing of networking, users or quotas.

// Unsafe code is refused everywhere but in the CPU kernels (`cpu`), which allow it module by module.
#![deny(unsafe_code)]

/// One test body per device: always on CPU, and on CUDA when the `cuda` feature is on (candle's
/// `test_device!` pattern). Declared before the modules so that their tests can use it.
#[cfg(test)]
macro_rules! device_test {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn cpu() {
                super::$body(&candle_core::Device::Cpu)
            }
            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                super::$body(&candle_core::Device::new_cuda(0).expect("a CUDA device"))
            }
        }
    };
}

pub mod codebook;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod kv_cache;
pub mod sampling;
pub mod shipped;
pub mod simulated;
pub mod tokenizer;
pub mod transformer;

pub use codebook::{Codebook, Image};
pub use config::{ModelConfig, MAX_SPECULATION};
pub use engine::{
    preview_due, CandleEngine, Engine, EngineInfo, NewSequence, Preview, SequenceOutput,
};
pub use error::ModelError;
pub use sampling::SamplingParams;
pub use simulated::{SimulatedEngine, StepCost};
pub use transformer::Transformer;
