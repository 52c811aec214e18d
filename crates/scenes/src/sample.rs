//! Seeded sampling of scenes and the held-out split. The same seed gives the same scenes on every
//! platform (ChaCha8). About 10% of scene specs are held out, decided by a stable hash of what the
//! caption states, independent of geometry and of the order objects are named in ("a above b" and
//! "b below a" fall on the same side); the training iterator never yields them.
//!
//! Two scene sets share the layout and the split ([`SceneSet`]): the classic one that kiln-shapes
//! 0.x learned, sampled exactly as it always was, and the full one of 1.0.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::font::CHARSET;
use crate::scene::{
    Colour, Object, ObjectSpec, Place, PlacedWord, Scene, SceneSpec, Shape, WordSpec, MAX_WORD_LEN,
    REGION_MARGIN,
};
use crate::SceneError;

/// What a data set's scenes are made of. Both sets share the layout scheme, the captions and the
/// held-out split, so a classic scene is also a scene of the full set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SceneSet {
    /// kiln-shapes 0.x: 1 to 4 objects, four shapes ([`Shape::CLASSIC`]), six colours
    /// ([`Colour::CLASSIC`]), no words.
    Classic,
    /// kiln-shapes 1.0: 1 to 16 objects (3x3 and 4x4 grids beyond four), six shapes, nine colours,
    /// and words of 1 to 8 capital letters and digits, alone or beside an object.
    Full,
}

impl SceneSet {
    pub const ALL: [SceneSet; 2] = [SceneSet::Classic, SceneSet::Full];

    /// The name a command line takes.
    pub fn name(self) -> &'static str {
        match self {
            SceneSet::Classic => "classic",
            SceneSet::Full => "full",
        }
    }

    pub fn from_name(name: &str) -> Option<SceneSet> {
        SceneSet::ALL.into_iter().find(|set| set.name() == name)
    }

    pub fn shapes(self) -> &'static [Shape] {
        match self {
            SceneSet::Classic => &Shape::CLASSIC,
            SceneSet::Full => &Shape::ALL,
        }
    }

    pub fn colours(self) -> &'static [Colour] {
        match self {
            SceneSet::Classic => &Colour::CLASSIC,
            SceneSet::Full => &Colour::ALL,
        }
    }

    pub fn max_objects(self) -> usize {
        match self {
            SceneSet::Classic => 4,
            SceneSet::Full => 16,
        }
    }

    pub fn has_words(self) -> bool {
        self == SceneSet::Full
    }

    /// The smallest set whose vocabulary and layouts state `spec`.
    pub fn of(spec: &SceneSpec) -> SceneSet {
        let classic = spec.word().is_none()
            && spec.objects().iter().all(|object| {
                Shape::CLASSIC.contains(&object.shape)
                    && Colour::CLASSIC.contains(&object.colour)
                    && !matches!(object.place, Place::Cell { .. })
            });
        if classic {
            SceneSet::Classic
        } else {
            SceneSet::Full
        }
    }
}

/// Object side as a fraction of its region's shorter side.
const MIN_SIZE: f32 = 0.55;
const MAX_SIZE: f32 = 0.85;
/// The least side in a 3x3 or 4x4 grid's cell, and the margin kept inside the cell: at 64 px a
/// 4x4 cell's objects are 12 to 13.4 pixels with at least 2.5 between neighbours. Smaller ones
/// misread at some pixel phases (at 9 to 12 pixels, 1 % of clean renders: tiny stars as circles,
/// an 11-pixel circle centred on a pixel corner as a diamond).
const MIN_GRID_SIZE: f32 = 0.75;
const GRID_MARGIN: f32 = 0.02;

/// How far the two objects of a relation may stray from the middle of the other axis, as a
/// fraction of the image: little enough that "above" never looks like "left of".
const RELATION_BAND: f32 = 0.125;

/// One spec in `HELD_OUT_MODULUS` is held out.
const HELD_OUT_MODULUS: u64 = 10;

/// Relative weights of scenes with 1, 2, ... objects, and of scenes with a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCountMix {
    weights: Vec<u32>,
    words: u32,
}

impl ObjectCountMix {
    /// `weights[i]` is the weight of scenes with `i + 1` objects (at most 16 weights); at least
    /// one must be positive.
    pub fn new(weights: &[u32]) -> Result<ObjectCountMix, SceneError> {
        if weights.len() > SceneSet::Full.max_objects() {
            return Err(SceneError::layout(format!(
                "the object-count mix has {} weights, for at most {} objects",
                weights.len(),
                SceneSet::Full.max_objects()
            )));
        }
        if weights.iter().all(|&weight| weight == 0) {
            return Err(SceneError::layout(
                "the object-count mix has no positive weight",
            ));
        }
        Ok(ObjectCountMix {
            weights: weights.to_vec(),
            words: 0,
        })
    }

    /// Only scenes of `n_objects` objects (1 to 16).
    pub fn only(n_objects: usize) -> Result<ObjectCountMix, SceneError> {
        check_count(SceneSet::Full, n_objects)?;
        let mut weights = vec![0; n_objects];
        weights[n_objects - 1] = 1;
        ObjectCountMix::new(&weights)
    }

    /// Every count from 1 to `set`'s most objects equally often.
    pub fn uniform(set: SceneSet) -> ObjectCountMix {
        ObjectCountMix {
            weights: vec![1; set.max_objects()],
            words: 0,
        }
    }

    /// Adds scenes with a word (alone, or beside one object) at weight `words`.
    pub fn with_words(self, words: u32) -> ObjectCountMix {
        ObjectCountMix { words, ..self }
    }

    fn max_objects(&self) -> usize {
        self.weights
            .iter()
            .rposition(|&w| w > 0)
            .map_or(0, |i| i + 1)
    }

    /// A scene's object count, or 0 for a scene with a word. A mix without words draws exactly as
    /// the classic sampler always did.
    fn pick(&self, rng: &mut ChaCha8Rng) -> usize {
        let total: u32 = self.weights.iter().sum::<u32>() + self.words;
        let mut ticket = rng.random_range(0..total);
        for (i, &weight) in self.weights.iter().enumerate() {
            if ticket < weight {
                return i + 1;
            }
            ticket -= weight;
        }
        0
    }
}

impl Default for ObjectCountMix {
    /// Every count of the classic set equally often.
    fn default() -> Self {
        ObjectCountMix::uniform(SceneSet::Classic)
    }
}

fn check_count(set: SceneSet, n_objects: usize) -> Result<(), SceneError> {
    if (1..=set.max_objects()).contains(&n_objects) {
        Ok(())
    } else {
        Err(SceneError::layout(format!(
            "a scene of the {} set has 1 to {} objects, not {n_objects}",
            set.name(),
            set.max_objects()
        )))
    }
}

/// An endless iterator of training scenes: held-out specs are skipped.
#[derive(Debug, Clone)]
pub struct SceneSampler {
    rng: ChaCha8Rng,
    mix: ObjectCountMix,
    set: SceneSet,
}

impl SceneSampler {
    /// Classic scenes, every object count equally often.
    pub fn new(seed: u64) -> SceneSampler {
        SceneSampler::for_set(SceneSet::Classic, seed, ObjectCountMix::default())
            .expect("the default mix is classic")
    }

    /// Classic scenes in the proportions of `mix`, which must have at most four objects and no
    /// words.
    pub fn with_mix(seed: u64, mix: ObjectCountMix) -> Result<SceneSampler, SceneError> {
        SceneSampler::for_set(SceneSet::Classic, seed, mix)
    }

    /// Scenes of `set` in the proportions of `mix`.
    pub fn for_set(
        set: SceneSet,
        seed: u64,
        mix: ObjectCountMix,
    ) -> Result<SceneSampler, SceneError> {
        check_count(set, mix.max_objects().max(1))?;
        if mix.words > 0 && !set.has_words() {
            return Err(SceneError::layout(format!(
                "the {} set has no words",
                set.name()
            )));
        }
        Ok(SceneSampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            mix,
            set,
        })
    }
}

impl Iterator for SceneSampler {
    type Item = Scene;

    fn next(&mut self) -> Option<Scene> {
        // The count is drawn once, so skipping held-out specs does not skew the mix.
        let n_objects = self.mix.pick(&mut self.rng);
        loop {
            let scene = if n_objects == 0 {
                let length = self.rng.random_range(1..=MAX_WORD_LEN);
                sample_word_scene(&mut self.rng, length)
            } else {
                sample_scene(&mut self.rng, self.set, n_objects)
            };
            if !scene.is_held_out() {
                return Some(scene);
            }
        }
    }
}

/// `count` held-out classic scenes of `n_objects` objects, for evaluation; deterministic in `seed`.
pub fn held_out(seed: u64, n_objects: usize, count: usize) -> Result<Vec<Scene>, SceneError> {
    held_out_in(SceneSet::Classic, seed, n_objects, count)
}

/// `count` held-out scenes of `set` with `n_objects` objects; deterministic in `seed`.
pub fn held_out_in(
    set: SceneSet,
    seed: u64,
    n_objects: usize,
    count: usize,
) -> Result<Vec<Scene>, SceneError> {
    check_count(set, n_objects)?;
    // A different stream from the training sampler's with the same seed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6865_6c64_2d6f_7574);
    Ok(held_out_from(count, || {
        sample_scene(&mut rng, set, n_objects)
    }))
}

/// `count` held-out scenes with a word of `length` characters (alone or beside one object);
/// deterministic in `seed`.
pub fn held_out_words(seed: u64, length: usize, count: usize) -> Result<Vec<Scene>, SceneError> {
    if !(1..=MAX_WORD_LEN).contains(&length) {
        return Err(SceneError::layout(format!(
            "a word has 1 to {MAX_WORD_LEN} characters, not {length}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x776f_7264_2d6f_7574);
    Ok(held_out_from(count, || sample_word_scene(&mut rng, length)))
}

fn held_out_from(count: usize, mut sample: impl FnMut() -> Scene) -> Vec<Scene> {
    let mut scenes = Vec::with_capacity(count);
    while scenes.len() < count {
        let scene = sample();
        if scene.is_held_out() {
            scenes.push(scene);
        }
    }
    scenes
}

/// Whether a spec belongs to the held-out split.
pub fn is_held_out(spec: &SceneSpec) -> bool {
    held_out_hash(spec.objects(), spec.word()).is_multiple_of(HELD_OUT_MODULUS)
}

impl Scene {
    /// Whether the scene's spec belongs to the held-out split.
    pub fn is_held_out(&self) -> bool {
        let objects: Vec<ObjectSpec> = self.objects().iter().map(Object::spec).collect();
        let word = self.word().map(PlacedWord::spec);
        held_out_hash(&objects, word.as_ref()).is_multiple_of(HELD_OUT_MODULUS)
    }
}

/// FNV-1a over the sorted objects (and a word's text), then a SplitMix64 finaliser to spread the
/// low bits. Written out rather than `std::hash`, whose output may change between Rust releases
/// and would move scenes across the split. A word is held out by its text alone, wherever it is
/// drawn, so no held-out word is ever trained on.
fn held_out_hash(objects: &[ObjectSpec], word: Option<&WordSpec>) -> u64 {
    if let Some(word) = word {
        return finish_hash(fnv1a(0xFF, word.text.bytes()));
    }
    let mut sorted = objects.to_vec();
    sorted.sort();
    let bytes = sorted
        .iter()
        .flat_map(|o| [o.place.code(), o.colour as u8, o.shape as u8]);
    finish_hash(fnv1a(sorted.len() as u8, bytes))
}

fn fnv1a(first: u8, rest: impl Iterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in std::iter::once(first).chain(rest) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn finish_hash(mut hash: u64) -> u64 {
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Any scene of `n_objects` objects from `set`, held out or not. Beyond four objects they take
/// cells of a 3x3 grid (up to nine) or a 4x4 one.
fn sample_scene(rng: &mut ChaCha8Rng, set: SceneSet, n_objects: usize) -> Scene {
    let places: Vec<Place> = match n_objects {
        1 => vec![Place::Anywhere],
        2 => {
            let pairs = [
                [Place::Top, Place::Bottom],
                [Place::Bottom, Place::Top],
                [Place::Left, Place::Right],
                [Place::Right, Place::Left],
            ];
            pairs[rng.random_range(0..pairs.len())].to_vec()
        }
        5.. => {
            let grid = if n_objects <= 9 { 3 } else { 4 };
            let mut cells: Vec<Place> = Place::cells(grid).collect();
            cells.shuffle(rng);
            let mut chosen = cells[..n_objects].to_vec();
            chosen.sort();
            chosen
        }
        _ => {
            let mut cells = Place::QUADRANTS;
            cells.shuffle(rng);
            let mut chosen = cells[..n_objects].to_vec();
            // Captions name cells in reading order: regular text is easier to learn.
            chosen.sort();
            chosen
        }
    };
    let objects = places
        .into_iter()
        .map(|place| {
            let colour = set.colours()[rng.random_range(0..set.colours().len())];
            let shape = set.shapes()[rng.random_range(0..set.shapes().len())];
            place_object(rng, colour, shape, place)
        })
        .collect();
    Scene::new(objects).expect("the sampler follows the layout scheme")
}

/// Sizes the object to its region and jitters it anywhere the box keeps its margin (and, for a
/// relation, near the middle of the other axis).
fn place_object(rng: &mut ChaCha8Rng, colour: Colour, shape: Shape, place: Place) -> Object {
    let [x0, y0, x1, y1] = place.region();
    let side = (x1 - x0).min(y1 - y0);
    // Grid cells are small: their objects keep to a narrower range of sizes. A classic region's
    // draws are unchanged.
    let size = if matches!(place, Place::Cell { .. }) {
        let largest = (MAX_SIZE * side).min(side - 2.0 * GRID_MARGIN);
        rng.random_range(MIN_GRID_SIZE * side..=largest)
    } else {
        rng.random_range(MIN_SIZE..=MAX_SIZE) * side
    };
    let half = size / 2.0;
    let margin = if matches!(place, Place::Cell { .. }) {
        GRID_MARGIN
    } else {
        REGION_MARGIN
    };
    let mut x_range = (x0 + margin + half, x1 - margin - half);
    let mut y_range = (y0 + margin + half, y1 - margin - half);
    let band = (0.5 - RELATION_BAND, 0.5 + RELATION_BAND);
    match place {
        Place::Top | Place::Bottom => x_range = band,
        Place::Left | Place::Right => y_range = band,
        _ => {}
    }
    Object {
        colour,
        shape,
        place,
        centre: [
            rng.random_range(x_range.0..=x_range.1),
            rng.random_range(y_range.0..=y_range.1),
        ],
        size,
    }
}

/// A word of `length` random characters, alone (half of the time) or on the half opposite one
/// object. Words start on the 4-pixel grid of a 64 px image, so that their cells line up with
/// the patches a tokenizer cuts.
fn sample_word_scene(rng: &mut ChaCha8Rng, length: usize) -> Scene {
    let charset: Vec<char> = CHARSET.chars().collect();
    let text: String = (0..length)
        .map(|_| charset[rng.random_range(0..charset.len())])
        .collect();
    const STEP: f32 = 4.0 / 64.0;
    let width_steps = 2 * length; // a cell is two steps wide
    let x_steps = 16 - width_steps;
    let x = rng.random_range(0..=x_steps) as f32 * STEP;
    let (objects, place, y) = if rng.random_bool(0.5) {
        (
            Vec::new(),
            Place::Anywhere,
            rng.random_range(0..=14) as f32 * STEP,
        )
    } else {
        let (word_place, object_place, first_row) = if rng.random_bool(0.5) {
            (Place::Top, Place::Bottom, 0)
        } else {
            (Place::Bottom, Place::Top, 8)
        };
        let set = SceneSet::Full;
        let colour = set.colours()[rng.random_range(0..set.colours().len())];
        let shape = set.shapes()[rng.random_range(0..set.shapes().len())];
        let object = place_object(rng, colour, shape, object_place);
        let y = (first_row + rng.random_range(0..=6)) as f32 * STEP;
        (vec![object], word_place, y)
    };
    let word = PlacedWord {
        text,
        place,
        origin: [x, y],
    };
    Scene::with_word(objects, Some(word)).expect("the sampler follows the layout scheme")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_scenes() {
        let first: Vec<Scene> = SceneSampler::new(7).take(200).collect();
        let again: Vec<Scene> = SceneSampler::new(7).take(200).collect();
        let other: Vec<Scene> = SceneSampler::new(8).take(200).collect();
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(held_out(3, 2, 20).unwrap(), held_out(3, 2, 20).unwrap());
    }

    #[test]
    fn the_mix_sets_the_object_counts() {
        let mix = ObjectCountMix::new(&[0, 1, 0, 3]).unwrap();
        let mut counts = [0; 5];
        for scene in SceneSampler::with_mix(1, mix).unwrap().take(4000) {
            counts[scene.objects().len()] += 1;
        }
        assert_eq!((counts[1], counts[3]), (0, 0));
        assert!((2700..3300).contains(&counts[4]), "{counts:?}");
        assert!(ObjectCountMix::new(&[0; 4]).is_err());
        assert!(ObjectCountMix::only(17).is_err());
        let five = ObjectCountMix::only(5).unwrap();
        assert!(
            SceneSampler::with_mix(1, five.clone()).is_err(),
            "classic scenes have 4 at most"
        );
        assert!(SceneSampler::for_set(SceneSet::Full, 1, five).is_ok());
    }

    #[test]
    fn the_full_set_draws_grids_words_and_its_whole_vocabulary() {
        let mix = ObjectCountMix::uniform(SceneSet::Full).with_words(4);
        let scenes: Vec<Scene> = SceneSampler::for_set(SceneSet::Full, 3, mix)
            .unwrap()
            .take(4000)
            .collect();
        let words = scenes.iter().filter(|s| s.word().is_some()).count();
        assert!((600..1000).contains(&words), "{words} of 4000 with a word");
        let objects = || scenes.iter().flat_map(|s| s.objects());
        for shape in Shape::ALL {
            assert!(objects().any(|o| o.shape == shape), "{shape:?}");
        }
        for colour in Colour::ALL {
            assert!(objects().any(|o| o.colour == colour), "{colour:?}");
        }
        for scene in &scenes {
            assert!(!scene.is_held_out());
            let grid = scene.objects().first().and_then(|o| match o.place {
                Place::Cell { grid, .. } => Some(grid),
                _ => None,
            });
            let n = scene.objects().len();
            match n {
                5..=9 => assert_eq!(grid, Some(3), "{}", scene.caption()),
                10..=16 => assert_eq!(grid, Some(4), "{}", scene.caption()),
                _ => assert_eq!(grid, None, "{}", scene.caption()),
            }
        }
        // The classic sampler never strays from its vocabulary.
        for scene in SceneSampler::new(3).take(2000) {
            assert_eq!(SceneSet::of(&scene.spec()), SceneSet::Classic);
        }
    }

    #[test]
    fn training_never_yields_held_out_scenes() {
        for scene in SceneSampler::new(11).take(20_000) {
            assert!(!scene.is_held_out(), "{}", scene.caption());
            assert!(!is_held_out(&scene.spec()));
        }
    }

    #[test]
    fn about_a_tenth_of_scenes_are_held_out() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for n_objects in 2..=4 {
            let held = (0..10_000)
                .filter(|_| sample_scene(&mut rng, SceneSet::Classic, n_objects).is_held_out())
                .count();
            assert!(
                (700..1300).contains(&held),
                "{n_objects} objects: {held} of 10000"
            );
        }
        // Single objects have only 24 classic specs (54 in the full set); some of them must be
        // held out, not most.
        for (set, most) in [(SceneSet::Classic, 5), (SceneSet::Full, 10)] {
            let singles = set
                .colours()
                .iter()
                .flat_map(|&colour| set.shapes().iter().map(move |&shape| (colour, shape)))
                .filter(|&(colour, shape)| {
                    let place = Place::Anywhere;
                    let spec = SceneSpec::new(vec![ObjectSpec {
                        colour,
                        shape,
                        place,
                    }]);
                    is_held_out(&spec.unwrap())
                })
                .count();
            assert!(
                (1..=most).contains(&singles),
                "{set:?}: {singles} single objects held out"
            );
        }
        let words = (0..10_000)
            .filter(|_| sample_word_scene(&mut rng, 4).is_held_out())
            .count();
        assert!((700..1300).contains(&words), "{words} of 10000 words");
        for n_objects in [8, 16] {
            let held = (0..2_000)
                .filter(|_| sample_scene(&mut rng, SceneSet::Full, n_objects).is_held_out())
                .count();
            assert!(
                (140..260).contains(&held),
                "{n_objects} objects: {held} of 2000"
            );
        }
    }

    #[test]
    fn held_out_scenes_are_held_out_with_the_asked_count() {
        for n_objects in 1..=4 {
            let scenes = held_out(9, n_objects, 30).unwrap();
            assert_eq!(scenes.len(), 30);
            for scene in scenes {
                assert!(scene.is_held_out());
                assert_eq!(scene.objects().len(), n_objects);
            }
        }
        assert!(held_out(9, 0, 1).is_err());
    }

    #[test]
    fn the_split_ignores_the_order_objects_are_named_in() {
        let a_above_b = crate::parse_caption("a red star above a blue circle").unwrap();
        let b_below_a = crate::parse_caption("a blue circle below a red star").unwrap();
        assert_eq!(is_held_out(&a_above_b), is_held_out(&b_below_a));
    }
}
