//! Why a policy could not be loaded. A refused prompt is not an error of this kind: it is a
//! [`crate::Refusal`], the policy working as intended.

use std::path::PathBuf;

/// A policy file that could not be read, parsed or accepted.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the style policy {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the style policy is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    /// The file parsed but an entry would make matching unsafe or ambiguous.
    #[error("style policy entry {index} ({name:?}): {reason}")]
    Invalid {
        /// Position of the `[[artist]]` entry in the file, from 0.
        index: usize,
        name: String,
        reason: String,
    },
}

impl PolicyError {
    /// A stable name for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            PolicyError::Io { .. } => "io",
            PolicyError::Parse(_) => "parse",
            PolicyError::Invalid { .. } => "invalid",
        }
    }
}
