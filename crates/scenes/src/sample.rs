//! Seeded sampling of scenes and the held-out split. The same seed gives the same scenes on every
//! platform (ChaCha8). About 10% of scene specs are held out, decided by a stable hash of what the
//! caption states, independent of geometry and of the order objects are named in ("a above b" and
//! "b below a" fall on the same side); the training iterator never yields them.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scene::{Colour, Object, ObjectSpec, Place, Scene, SceneSpec, Shape, REGION_MARGIN};
use crate::SceneError;

/// Object side as a fraction of its region's shorter side.
const MIN_SIZE: f32 = 0.55;
const MAX_SIZE: f32 = 0.85;

/// How far the two objects of a relation may stray from the middle of the other axis, as a
/// fraction of the image: little enough that "above" never looks like "left of".
const RELATION_BAND: f32 = 0.125;

/// One spec in `HELD_OUT_MODULUS` is held out.
const HELD_OUT_MODULUS: u64 = 10;

/// Relative weights of scenes with 1, 2, 3 and 4 objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectCountMix {
    weights: [u32; 4],
}

impl ObjectCountMix {
    /// `weights[i]` is the weight of scenes with `i + 1` objects; at least one must be positive.
    pub fn new(weights: [u32; 4]) -> Result<ObjectCountMix, SceneError> {
        if weights.iter().all(|&weight| weight == 0) {
            return Err(SceneError::layout(
                "the object-count mix has no positive weight",
            ));
        }
        Ok(ObjectCountMix { weights })
    }

    /// Only scenes of `n_objects` objects (1 to 4).
    pub fn only(n_objects: usize) -> Result<ObjectCountMix, SceneError> {
        check_count(n_objects)?;
        let mut weights = [0; 4];
        weights[n_objects - 1] = 1;
        ObjectCountMix::new(weights)
    }

    fn pick(&self, rng: &mut ChaCha8Rng) -> usize {
        let total: u32 = self.weights.iter().sum();
        let mut ticket = rng.random_range(0..total);
        for (i, &weight) in self.weights.iter().enumerate() {
            if ticket < weight {
                return i + 1;
            }
            ticket -= weight;
        }
        unreachable!("the ticket is below the total weight")
    }
}

impl Default for ObjectCountMix {
    /// Every count equally often.
    fn default() -> Self {
        ObjectCountMix { weights: [1; 4] }
    }
}

fn check_count(n_objects: usize) -> Result<(), SceneError> {
    if (1..=4).contains(&n_objects) {
        Ok(())
    } else {
        Err(SceneError::layout(format!(
            "a scene has 1 to 4 objects, not {n_objects}"
        )))
    }
}

/// An endless iterator of training scenes: held-out specs are skipped.
#[derive(Debug, Clone)]
pub struct SceneSampler {
    rng: ChaCha8Rng,
    mix: ObjectCountMix,
}

impl SceneSampler {
    /// Every object count equally often.
    pub fn new(seed: u64) -> SceneSampler {
        SceneSampler::with_mix(seed, ObjectCountMix::default())
    }

    pub fn with_mix(seed: u64, mix: ObjectCountMix) -> SceneSampler {
        SceneSampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            mix,
        }
    }
}

impl Iterator for SceneSampler {
    type Item = Scene;

    fn next(&mut self) -> Option<Scene> {
        // The count is drawn once, so skipping held-out specs does not skew the mix.
        let n_objects = self.mix.pick(&mut self.rng);
        loop {
            let scene = sample_scene(&mut self.rng, n_objects);
            if !scene.is_held_out() {
                return Some(scene);
            }
        }
    }
}

/// `count` held-out scenes of `n_objects` objects, for evaluation; deterministic in `seed`.
pub fn held_out(seed: u64, n_objects: usize, count: usize) -> Result<Vec<Scene>, SceneError> {
    check_count(n_objects)?;
    // A different stream from the training sampler's with the same seed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6865_6c64_2d6f_7574);
    let mut scenes = Vec::with_capacity(count);
    while scenes.len() < count {
        let scene = sample_scene(&mut rng, n_objects);
        if scene.is_held_out() {
            scenes.push(scene);
        }
    }
    Ok(scenes)
}

/// Whether a spec belongs to the held-out split.
pub fn is_held_out(spec: &SceneSpec) -> bool {
    held_out_hash(spec.objects()).is_multiple_of(HELD_OUT_MODULUS)
}

impl Scene {
    /// Whether the scene's spec belongs to the held-out split.
    pub fn is_held_out(&self) -> bool {
        let objects: Vec<ObjectSpec> = self.objects().iter().map(Object::spec).collect();
        held_out_hash(&objects).is_multiple_of(HELD_OUT_MODULUS)
    }
}

/// FNV-1a over the sorted objects, then a SplitMix64 finaliser to spread the low bits. Written out
/// rather than `std::hash`, whose output may change between Rust releases and would move scenes
/// across the split.
fn held_out_hash(objects: &[ObjectSpec]) -> u64 {
    let mut sorted = objects.to_vec();
    sorted.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = sorted
        .iter()
        .flat_map(|o| [o.place as u8, o.colour as u8, o.shape as u8]);
    for byte in std::iter::once(sorted.len() as u8).chain(bytes) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Any scene of `n_objects` (1 to 4) objects, held out or not.
fn sample_scene(rng: &mut ChaCha8Rng, n_objects: usize) -> Scene {
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
            let colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
            let shape = Shape::ALL[rng.random_range(0..Shape::ALL.len())];
            place_object(rng, colour, shape, place)
        })
        .collect();
    Scene::new(objects).expect("the sampler follows the layout scheme")
}

/// Sizes the object to its region and jitters it anywhere the box keeps its margin (and, for a
/// relation, near the middle of the other axis).
fn place_object(rng: &mut ChaCha8Rng, colour: Colour, shape: Shape, place: Place) -> Object {
    let [x0, y0, x1, y1] = place.region();
    let size = rng.random_range(MIN_SIZE..=MAX_SIZE) * (x1 - x0).min(y1 - y0);
    let half = size / 2.0;
    let mut x_range = (x0 + REGION_MARGIN + half, x1 - REGION_MARGIN - half);
    let mut y_range = (y0 + REGION_MARGIN + half, y1 - REGION_MARGIN - half);
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
        let mix = ObjectCountMix::new([0, 1, 0, 3]).unwrap();
        let mut counts = [0; 5];
        for scene in SceneSampler::with_mix(1, mix).take(4000) {
            counts[scene.objects().len()] += 1;
        }
        assert_eq!((counts[1], counts[3]), (0, 0));
        assert!((2700..3300).contains(&counts[4]), "{counts:?}");
        assert!(ObjectCountMix::new([0; 4]).is_err());
        assert!(ObjectCountMix::only(5).is_err());
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
                .filter(|_| sample_scene(&mut rng, n_objects).is_held_out())
                .count();
            assert!(
                (700..1300).contains(&held),
                "{n_objects} objects: {held} of 10000"
            );
        }
        // Single objects have only 24 specs; some of them must be held out, not most.
        let singles = Colour::ALL
            .into_iter()
            .flat_map(|colour| Shape::ALL.map(|shape| (colour, shape)))
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
            (1..=5).contains(&singles),
            "{singles} of 24 single objects held out"
        );
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
