//! Why a caption, a scene or an image was refused. A prompt that an image fails is not an error of
//! this kind: it is a [`crate::CheckResult`] with `correct: false`.

/// A caption that does not parse, a layout the scheme does not allow, or an unreadable image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SceneError {
    /// The caption has a word where the grammar expects something else.
    #[error("unexpected word {word:?} (word {position}): expected {expected}")]
    UnexpectedWord {
        word: String,
        /// Position of the word in the caption, from 1; a comma counts as a word.
        position: usize,
        expected: &'static str,
    },
    /// The caption stops where the grammar expects more.
    #[error("the caption ends early: expected {expected}")]
    UnexpectedEnd { expected: &'static str },
    /// The objects cannot be laid out by the scheme (count, places, or geometry).
    #[error("invalid scene layout: {reason}")]
    InvalidLayout { reason: String },
    /// An image whose size and pixel buffer disagree, or a PNG that cannot be decoded.
    #[error("invalid image: {reason}")]
    InvalidImage { reason: String },
}

impl SceneError {
    /// A stable name for metrics and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            SceneError::UnexpectedWord { .. } | SceneError::UnexpectedEnd { .. } => "parse",
            SceneError::InvalidLayout { .. } => "layout",
            SceneError::InvalidImage { .. } => "image",
        }
    }

    pub(crate) fn layout(reason: impl Into<String>) -> Self {
        SceneError::InvalidLayout {
            reason: reason.into(),
        }
    }
}
