//! The checker: scores an image against the prompt it was generated from. [`detect`] finds the
//! objects without knowing the prompt; [`check()`] then matches them to the prompt's objects. It is
//! built for the outputs of a generative model, so it tolerates stray pixels, small holes and
//! ragged edges:
//!
//! 1. every pixel takes the nearest palette colour, or the background, or "unknown" when it is
//!    far from all of them (a blend of two colours must not pass for a third);
//! 2. a pixel unlike all four of its neighbours, which agree, takes their colour (lone specks and
//!    pinholes are the commonest noise);
//! 3. 8-connected components per colour, dropping those smaller than a quarter of the smallest
//!    object the sampler draws;
//! 4. a component's shape is the shape drawn into its bounding box that overlaps it best
//!    (intersection over union), also trying boxes a pixel smaller or larger on some sides, so
//!    that stray edge pixels and tips between pixel centres do not skew the fit; under
//!    [`MIN_SHAPE_FIT`] it has no shape;
//! 5. its place is the grid cell holding its centroid;
//! 6. in the full scene set, near-black pixels are the ink of a word: they form no objects, and
//!    [`crate::font::read_text`] reads them (before step 2, which would erase thin strokes).
//!
//! An image is correct when the detected objects and the prompt's objects pair up one to one with
//! equal colour and shape, each detected centroid inside the prompted place, nothing is left
//! over, and the word reads exactly as prompted (or, without one, no ink is drawn).
//!
//! The checker knows the colours and shapes of one [`SceneSet`]: a classic image is scored as
//! kiln-shapes 0.x always was (a pink blob is unknown colour, not an extra object).

use serde::Serialize;

use crate::render::Frame;
use crate::scene::{Colour, ObjectSpec, Place, SceneSpec, Shape, BACKGROUND, INK};
use crate::{RgbImage, SceneSet};

/// A pixel further than this (Euclidean RGB) from every palette colour and the background is
/// unknown. An even blend of any colour with the background lies at least 120 from every colour,
/// so a soft edge does not pass for a third colour; a model's colour noise stays well inside 80.
pub const MAX_COLOUR_DISTANCE: u32 = 80;

/// The least overlap with a shape template for a component to count as that shape. Any blob
/// overlaps some template by 0.5 or so; a drawn shape, even ragged, by more than 0.8.
pub const MIN_SHAPE_FIT: f32 = 0.6;

/// Components smaller than this fraction of the image are specks. The smallest object drawn in a
/// 2x2 grid (a star in 55% of a cell) covers about 2.9% of the image; this is a quarter of that.
/// A 3x3 or 4x4 grid's cells are smaller, and so is its threshold, in proportion to the cell.
const MIN_AREA_FRACTION: f32 = 0.007;

/// Pixel labels: `0..n` index the set's colours, `n` is the background; then these.
fn background_label(set: SceneSet) -> u8 {
    set.colours().len() as u8
}
const INK_LABEL: u8 = 64;

/// Ink pixels (in font pixels) that make an image without a prompted word wrong: fewer than the
/// thinnest glyph ("1" has 10), so a stray letter counts and a dark speck or two does not.
const MIN_STRAY_INK: usize = 6;
const UNKNOWN_LABEL: u8 = 65;

/// An object found in an image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectedObject {
    pub colour: Colour,
    /// `None` when no shape fits well enough.
    pub shape: Option<Shape>,
    /// Intersection over union with the best shape template, 0 to 1.
    pub shape_fit: f32,
    /// The grid cell holding the centroid: always one of [`Place::QUADRANTS`].
    pub place: Place,
    /// `[x, y]` as fractions of the image size.
    pub centroid: [f32; 2],
    /// In pixels.
    pub area: usize,
}

/// How one prompted object fared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectOutcome {
    pub expected: ObjectSpec,
    /// Index into [`CheckResult::detected`] of the object that matches it in colour, shape and
    /// place, if any.
    pub matched: Option<usize>,
}

/// The verdict on one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub detected: Vec<DetectedObject>,
    /// One per prompted object, in the prompt's order.
    pub objects: Vec<ObjectOutcome>,
    /// The word, if the prompt has one.
    pub word: Option<WordOutcome>,
    /// Ink pixels (full set only) in an image whose prompt has no word, when more than a speck.
    pub stray_ink: usize,
    /// Every prompted object matched, no detected object left over, and the word read exactly.
    pub correct: bool,
}

/// How a prompted word fared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WordOutcome {
    pub expected: String,
    /// What the ink reads as (`?` for a character no glyph matches), or `None` without ink.
    pub read: Option<String>,
    pub correct: bool,
}

impl CheckResult {
    /// The fraction of prompted objects found with the right colour, shape and place, or `None`
    /// for a prompt with no objects (a sign alone), which a count of objects says nothing about.
    pub fn score(&self) -> Option<f32> {
        if self.objects.is_empty() {
            return None;
        }
        let matched = self.objects.iter().filter(|o| o.matched.is_some()).count();
        Some(matched as f32 / self.objects.len() as f32)
    }

    /// Detected objects that match nothing in the prompt.
    pub fn extra(&self) -> impl Iterator<Item = &DetectedObject> {
        self.detected.iter().enumerate().filter_map(|(i, object)| {
            let used = self.objects.iter().any(|o| o.matched == Some(i));
            (!used).then_some(object)
        })
    }
}

/// Scores `image` against the prompt `spec`, knowing the colours and shapes of `set`.
pub fn check(image: &RgbImage, spec: &SceneSpec, set: SceneSet) -> CheckResult {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let raw = classify_pixels(image, set);
    let detected = detect_labels(&raw, width, height, set, min_area_fraction(spec));
    let matched = match_objects(spec.objects(), &detected);
    let objects: Vec<ObjectOutcome> = spec
        .objects()
        .iter()
        .zip(matched)
        .map(|(&expected, matched)| ObjectOutcome { expected, matched })
        .collect();
    let ink = ink_mask(&raw, image.width());
    let word = spec.word().map(|word| {
        let read = crate::font::read_text(&ink, 64, 64);
        WordOutcome {
            correct: read.as_deref() == Some(word.text.as_str()),
            expected: word.text.clone(),
            read,
        }
    });
    let inked = ink.iter().filter(|&&ink| ink).count();
    let stray_ink = if word.is_none() && inked >= MIN_STRAY_INK {
        inked
    } else {
        0
    };
    let correct = objects.iter().all(|o| o.matched.is_some())
        && detected.len() == objects.len()
        && word.as_ref().is_none_or(|word| word.correct)
        && stray_ink == 0;
    CheckResult {
        detected,
        objects,
        word,
        stray_ink,
        correct,
    }
}

/// The speck threshold for the prompt's layout: smaller grid cells, smaller objects.
fn min_area_fraction(spec: &SceneSpec) -> f32 {
    match spec.objects().first().map(|object| object.place) {
        Some(Place::Cell { grid, .. }) => MIN_AREA_FRACTION * (2.0 / f32::from(grid)).powi(2),
        _ => MIN_AREA_FRACTION,
    }
}

/// Ink at the font's resolution (64 x 64 font pixels, whatever the image's size): the label at
/// each font pixel's centre.
fn ink_mask(labels: &[u8], size: u32) -> Vec<bool> {
    let size = size as usize;
    (0..64 * 64)
        .map(|i| {
            let (fx, fy) = (i % 64, i / 64);
            let (x, y) = ((2 * fx + 1) * size / 128, (2 * fy + 1) * size / 128);
            labels.get(y * size + x) == Some(&INK_LABEL)
        })
        .collect()
}

/// Finds the objects in a classic image, knowing nothing of its prompt.
pub fn detect(image: &RgbImage) -> Vec<DetectedObject> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let raw = classify_pixels(image, SceneSet::Classic);
    detect_labels(&raw, width, height, SceneSet::Classic, MIN_AREA_FRACTION)
}

fn detect_labels(
    raw: &[u8],
    width: usize,
    height: usize,
    set: SceneSet,
    min_area_fraction: f32,
) -> Vec<DetectedObject> {
    let labels = repair_lone_pixels(raw, width, height);
    let min_area = ((width * height) as f32 * min_area_fraction)
        .round()
        .max(1.0) as usize;
    components(&labels, width, height, set)
        .into_iter()
        .filter(|component| component.pixels.len() >= min_area)
        .map(|component| describe(&component, width, height, set))
        .collect()
}

fn classify_pixels(image: &RgbImage, set: SceneSet) -> Vec<u8> {
    // References in label order: the set's colours, the background, then ink for a set with words.
    let ink = set.has_words().then_some(INK);
    let references: Vec<[u8; 3]> = set
        .colours()
        .iter()
        .map(|colour| colour.rgb())
        .chain([BACKGROUND])
        .chain(ink)
        .collect();
    let ink_index = set.colours().len() + 1;
    image
        .pixels()
        .chunks_exact(3)
        .map(|pixel| {
            let distance = |reference: &[u8; 3]| -> u32 {
                (0..3)
                    .map(|c| u32::from(pixel[c].abs_diff(reference[c])).pow(2))
                    .sum()
            };
            let (label, nearest) = references
                .iter()
                .map(distance)
                .enumerate()
                .min_by_key(|&(_, d)| d)
                .expect("the palette is not empty");
            if nearest > MAX_COLOUR_DISTANCE.pow(2) {
                UNKNOWN_LABEL
            } else if label == ink_index {
                INK_LABEL
            } else {
                label as u8
            }
        })
        .collect()
}

/// Gives a pixel the label its four neighbours share when it differs from all of them. Edge
/// pixels have fewer neighbours and need them all to agree too (at least two).
fn repair_lone_pixels(labels: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut repaired = labels.to_vec();
    for y in 0..height {
        for x in 0..width {
            let neighbours = [
                (x > 0).then(|| labels[y * width + x - 1]),
                (x + 1 < width).then(|| labels[y * width + x + 1]),
                (y > 0).then(|| labels[(y - 1) * width + x]),
                (y + 1 < height).then(|| labels[(y + 1) * width + x]),
            ];
            let mut present = neighbours.iter().flatten();
            let Some(&first) = present.next() else {
                continue;
            };
            let others_agree = present.clone().all(|&label| label == first);
            if others_agree && present.count() >= 1 && first != labels[y * width + x] {
                repaired[y * width + x] = first;
            }
        }
    }
    repaired
}

struct Component {
    colour: Colour,
    /// `(x, y)` of every pixel.
    pixels: Vec<(usize, usize)>,
}

/// 8-connected runs of one palette colour; background, ink and unknown pixels belong to none.
fn components(labels: &[u8], width: usize, height: usize, set: SceneSet) -> Vec<Component> {
    let background = background_label(set);
    let mut seen = vec![false; labels.len()];
    let mut found = Vec::new();
    for start in 0..labels.len() {
        let label = labels[start];
        if seen[start] || label >= background {
            continue;
        }
        seen[start] = true;
        let mut pixels = Vec::new();
        let mut stack = vec![(start % width, start / width)];
        while let Some((x, y)) = stack.pop() {
            pixels.push((x, y));
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let at = ny * width + nx;
                    if !seen[at] && labels[at] == label {
                        seen[at] = true;
                        stack.push((nx, ny));
                    }
                }
            }
        }
        found.push(Component {
            colour: set.colours()[label as usize],
            pixels,
        });
    }
    found
}

fn describe(component: &Component, width: usize, height: usize, set: SceneSet) -> DetectedObject {
    let area = component.pixels.len();
    let (sum_x, sum_y) = component
        .pixels
        .iter()
        .fold((0.0, 0.0), |(sx, sy), &(x, y)| {
            (sx + x as f32 + 0.5, sy + y as f32 + 0.5)
        });
    let centroid = [
        sum_x / area as f32 / width as f32,
        sum_y / area as f32 / height as f32,
    ];
    let (shape, shape_fit) = fit_shape(&component.pixels, set.shapes());
    DetectedObject {
        colour: component.colour,
        shape: (shape_fit >= MIN_SHAPE_FIT).then_some(shape),
        shape_fit,
        place: Place::quadrant_of(centroid[0], centroid[1]),
        centroid,
        area,
    }
}

/// The shape whose template, drawn into the component's bounding box or a box up to a pixel off
/// on some sides, overlaps the component best; with that overlap. Trimmed boxes discount stray
/// pixels stuck to the edges; widened ones a point's tip that fell between pixel centres.
fn fit_shape(pixels: &[(usize, usize)], shapes: &[Shape]) -> (Shape, f32) {
    let x0 = pixels.iter().map(|p| p.0).min().unwrap_or(0);
    let y0 = pixels.iter().map(|p| p.1).min().unwrap_or(0);
    let x1 = pixels.iter().map(|p| p.0).max().unwrap_or(0);
    let y1 = pixels.iter().map(|p| p.1).max().unwrap_or(0);
    let (width, height) = (x1 - x0 + 1, y1 - y0 + 1);
    let mut mask = vec![false; width * height];
    for &(x, y) in pixels {
        mask[(y - y0) * width + (x - x0)] = true;
    }
    let in_mask = |x: i32, y: i32| {
        (0..width as i32).contains(&x)
            && (0..height as i32).contains(&y)
            && mask[y as usize * width + x as usize]
    };

    // Moves of the left, top, right and bottom edges of the bounding box, in pixels. Trimming
    // every side is for large boxes only: in a small one a pixel is a big part of the shape, and
    // a tiny star trimmed all round passes for a circle.
    let large = width.min(height) >= 16;
    const EDGE_MOVES: [[f32; 4]; 11] = [
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, -1.0, -1.0],
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, -1.0, 0.0],
        [0.0, 0.0, 0.0, -1.0],
        [-1.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [-0.5, -0.5, 0.5, 0.5],
    ];
    let mut best = (Shape::Square, 0.0);
    for [left, top, right, bottom] in EDGE_MOVES {
        let frame = Frame {
            x: left,
            y: top,
            width: width as f32 + right - left,
            height: height as f32 + bottom - top,
        };
        let trims_every_side = left > 0.0 && top > 0.0;
        if frame.width < 2.0 || frame.height < 2.0 || (trims_every_side && !large) {
            continue;
        }
        for &shape in shapes {
            let (mut both, mut either) = (0usize, 0usize);
            for y in -1..=height as i32 {
                for x in -1..=width as i32 {
                    let template = frame.covers(shape, x as f32, y as f32);
                    let mask = in_mask(x, y);
                    both += usize::from(template && mask);
                    either += usize::from(template || mask);
                }
            }
            let fit = both as f32 / either.max(1) as f32;
            if fit > best.1 {
                best = (shape, fit);
            }
        }
    }
    best
}

/// A maximum one-to-one pairing of prompted and detected objects that agree in colour, shape and
/// place (augmenting paths; a handful of objects each side). Returns, per prompted object, its
/// detected partner.
fn match_objects(expected: &[ObjectSpec], detected: &[DetectedObject]) -> Vec<Option<usize>> {
    let agrees = |e: &ObjectSpec, d: &DetectedObject| {
        d.colour == e.colour && d.shape == Some(e.shape) && e.place.holds(d.centroid)
    };
    fn augment(
        i: usize,
        expected: &[ObjectSpec],
        detected: &[DetectedObject],
        agrees: &dyn Fn(&ObjectSpec, &DetectedObject) -> bool,
        tried: &mut [bool],
        partner_of_detected: &mut [Option<usize>],
    ) -> bool {
        for j in 0..detected.len() {
            if tried[j] || !agrees(&expected[i], &detected[j]) {
                continue;
            }
            tried[j] = true;
            let free = match partner_of_detected[j] {
                None => true,
                Some(k) => augment(k, expected, detected, agrees, tried, partner_of_detected),
            };
            if free {
                partner_of_detected[j] = Some(i);
                return true;
            }
        }
        false
    }

    let mut partner_of_detected = vec![None; detected.len()];
    for i in 0..expected.len() {
        let mut tried = vec![false; detected.len()];
        augment(
            i,
            expected,
            detected,
            &agrees,
            &mut tried,
            &mut partner_of_detected,
        );
    }
    let mut partner_of_expected = vec![None; expected.len()];
    for (j, partner) in partner_of_detected.into_iter().enumerate() {
        if let Some(i) = partner {
            partner_of_expected[i] = Some(j);
        }
    }
    partner_of_expected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_caption;

    #[test]
    fn a_blank_image_has_no_objects() {
        let blank = RgbImage::filled(64, 64, BACKGROUND);
        let result = check(
            &blank,
            &parse_caption("a red circle").unwrap(),
            SceneSet::Classic,
        );
        assert!(result.detected.is_empty());
        assert!(!result.correct);
        assert_eq!(result.score(), Some(0.0));
    }

    #[test]
    fn a_sign_alone_has_no_object_score() {
        let blank = RgbImage::filled(64, 64, BACKGROUND);
        let sign = parse_caption("a sign that says \"KILN\"").unwrap();
        let result = check(&blank, &sign, SceneSet::Full);
        assert!(result.objects.is_empty());
        assert!(!result.correct, "no ink reads as no word");
        assert_eq!(result.score(), None);
    }

    #[test]
    fn lone_pixels_take_their_neighbours_label() {
        #[rustfmt::skip]
        let labels = [
            6, 6, 6, 6,
            6, 0, 6, 6,
            6, 6, 1, 1,
            6, 6, 1, 2,
        ];
        let repaired = repair_lone_pixels(&labels, 4, 4);
        assert_eq!(repaired[5], 6, "a speck in the background goes");
        assert_eq!(
            repaired[15], 1,
            "a corner pixel joins its two agreeing neighbours"
        );
        assert_eq!(repaired[10], 1, "a pixel with a like neighbour stays");
    }

    #[test]
    fn blends_are_unknown_not_a_third_colour() {
        // Red half-blended with white is nearest to orange in RGB, but far from everything.
        let image = RgbImage::new(1, 1, vec![237, 142, 142]).unwrap();
        assert_eq!(
            classify_pixels(&image, SceneSet::Classic),
            vec![UNKNOWN_LABEL]
        );
    }

    #[test]
    fn matching_pairs_same_looking_objects_one_to_one() {
        let found = |place: Place| {
            let [x0, y0, x1, y1] = place.region();
            DetectedObject {
                colour: Colour::Red,
                shape: Some(Shape::Circle),
                shape_fit: 1.0,
                place,
                centroid: [(x0 + x1) / 2.0, (y0 + y1) / 2.0],
                area: 100,
            }
        };
        let expected = |place| ObjectSpec {
            colour: Colour::Red,
            shape: Shape::Circle,
            place,
        };
        // The first prompted object could take either detection; augmenting leaves the second
        // its only option.
        let prompt = [expected(Place::Top), expected(Place::TopLeft)];
        let detected = [found(Place::TopLeft), found(Place::TopRight)];
        assert_eq!(match_objects(&prompt, &detected), vec![Some(1), Some(0)]);
    }
}
