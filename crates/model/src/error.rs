//! Errors of the model crate, each with a stable `error_type()` string.

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tensor backend: {0}")]
    Backend(#[from] candle_core::Error),
    #[error("invalid sequence request: {0}")]
    InvalidSequence(String),
    #[error("not enough KV-cache blocks: need {needed}, free {free}")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("batch is full: {max_batch} sequences")]
    BatchFull { max_batch: usize },
    #[error("image encoding: {0}")]
    Encode(String),
}

impl ModelError {
    /// Maps an I/O error on `path` (for `map_err`).
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ModelError {
        let path = path.display().to_string();
        move |source| ModelError::Io { path, source }
    }

    /// A stable machine-readable name of the error kind.
    pub fn error_type(&self) -> &'static str {
        match self {
            ModelError::Io { .. } => "io",
            ModelError::Config(_) => "config",
            ModelError::Weights(_) => "weights",
            ModelError::Backend(_) => "backend",
            ModelError::InvalidSequence(_) => "invalid_sequence",
            ModelError::OutOfBlocks { .. } => "out_of_blocks",
            ModelError::BatchFull { .. } => "batch_full",
            ModelError::Encode(_) => "encode",
        }
    }
}
