//! The content policy: which prompts Kiln refuses to draw. Today that is the style policy — prompts
//! that ask for the style of a living artist are refused, while studio styles and the styles of
//! artists who have died are allowed. This crate owns the policy's data (`data/artists.toml`,
//! shipped embedded and reloadable from a file at run time, see [`reload`]) and the matching of
//! prompts against it ([`normalize`] folds case, accents and punctuation; [`style`] decides). It
//! does no I/O beyond reading the policy file and knows nothing of gRPC: the gateway maps a
//! [`Refusal`] to its status and decides when to poll the file.

#![forbid(unsafe_code)]

pub mod error;
pub mod normalize;
pub mod reload;
pub mod style;

pub use error::PolicyError;
pub use reload::ReloadablePolicy;
pub use style::{Artist, Refusal, StylePolicy, LIVING_ARTIST_STYLE};
