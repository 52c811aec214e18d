//! Procedural scenes for teaching and testing attribute binding and text: a data set made by Kiln's
//! own code, and a programmatic checker that scores a generated image against its prompt. This
//! crate owns the scene vocabulary (six [`Shape`]s, nine [`Colour`]s on a white background, and
//! words in a bitmap [`font`]), the layout, the captions and their parser, seeded sampling with a
//! held-out split, the rasteriser, and the checker; it knows nothing of models, tokens or serving.
//! Two [`SceneSet`]s share all of it: the classic one (1 to 4 objects, four shapes, six colours,
//! as kiln-shapes 0.x learned it, sampled byte for byte as before) and the full one (1 to 16
//! objects and words).
//!
//! **Layout.** A scene holds 1 to 4 objects that never overlap, each filling 55%–85% of its region
//! with random jitter, so that a caption can state every place and the checker can verify it:
//! - 1 object: its region is the whole image and its place is not part of the caption
//!   ("a red circle").
//! - 2 objects: the image is split into halves, top/bottom or left/right, and the caption states a
//!   relation ("a red triangle above a blue star", "below", "left of", "right of"); the objects keep
//!   near the middle of the other axis so the relation is never diagonal.
//! - 3 or 4 objects: a 2x2 grid, one object per cell, named in reading order ("a red circle top
//!   left, a blue star top right and a green square bottom left").
//! - 5 to 9 objects (full set): a 3x3 grid; 10 to 16: a 4x4 grid. The caption lists every cell
//!   in reading order ("a 3 by 3 grid: red circle, empty, blue star, ...").
//! - A word (full set): alone ("a sign that says \"KILN\"") or on the half opposite one object
//!   ("a blue star above the word \"OPEN\""), its cells on the 4-pixel grid of a 64 px image.
//!
//! Positions and sizes are fractions of the image side, so one scene renders at any size (32, 64
//! and 128 pixels are tested). The checker ([`check()`]) finds objects without knowing the truth —
//! nearest palette colour per pixel, connected components, shape by template fit, place by
//! centroid — and then compares them with the prompt.

#![forbid(unsafe_code)]

pub mod caption;
pub mod check;
pub mod error;
pub mod font;
pub mod image;
pub mod render;
pub mod sample;
pub mod scene;

pub use caption::{caption_words, caption_words_in, parse_caption};
pub use check::{check, detect, CheckResult, DetectedObject, ObjectOutcome, WordOutcome};
pub use error::SceneError;
pub use image::{from_png, to_png, RgbImage};
pub use render::{render, DEFAULT_SIZE};
pub use sample::{
    held_out, held_out_in, held_out_words, is_held_out, ObjectCountMix, SceneSampler, SceneSet,
};
pub use scene::{
    Colour, Object, ObjectSpec, Place, PlacedWord, Scene, SceneSpec, Shape, WordSpec, BACKGROUND,
    INK, MAX_WORD_LEN,
};
