//! The scene vocabulary and layout: shapes, colours, places, the prompt-level [`SceneSpec`] (what a
//! caption states) and the drawable [`Scene`] (a spec plus positions and sizes). Both validate the
//! layout scheme on construction, so every value of these types can be captioned, rendered and
//! checked. Sampling lives in [`crate::sample`], drawing in [`crate::render()`].

use serde::Serialize;

use crate::SceneError;

/// The plain background: one colour, so a small model learns it at once.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];

/// Gap kept between an object's box and its region's edge, as a fraction of the image side: two
/// pixels at 32x32, so neighbouring objects of the same colour never touch.
pub(crate) const REGION_MARGIN: f32 = 0.03;

/// An object's outline. Each is drawn to fill a square box: see [`crate::render()`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    /// Pointing up: apex at the top centre of its box, base along the bottom.
    Triangle,
    /// Five-pointed, one point up.
    Star,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    /// The word a caption uses.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }

    pub(crate) fn from_name(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|shape| shape.name() == word)
    }
}

/// An object's fill colour. The palette is far apart in RGB (the closest pair, yellow and orange,
/// is 90 apart) and far from the background, so a pixel's colour is unambiguous to the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    /// The word a caption uses.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    /// The exact colour every pixel of such an object is drawn in.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 160, 50],
            Colour::Blue => [30, 80, 230],
            Colour::Yellow => [250, 220, 0],
            Colour::Purple => [140, 50, 200],
            Colour::Orange => [255, 130, 0],
        }
    }

    pub(crate) fn from_name(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|colour| colour.name() == word)
    }
}

/// Where an object sits, as its caption states it. The variant also names the region the object
/// is drawn in; see the layout scheme in the crate documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// The only object of a scene: anywhere in the image, and not part of the caption.
    Anywhere,
    /// Halves, for the two objects of a relation ("above" puts the first object on top).
    Top,
    Bottom,
    Left,
    Right,
    /// Cells of the 2x2 grid, for scenes of 3 or 4 objects. The checker reports every detected
    /// object with one of these.
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl Place {
    pub const QUADRANTS: [Place; 4] = [
        Place::TopLeft,
        Place::TopRight,
        Place::BottomLeft,
        Place::BottomRight,
    ];

    /// The region `[x0, y0, x1, y1]` the object is drawn in, as fractions of the image side
    /// (y grows downwards).
    pub fn region(self) -> [f32; 4] {
        match self {
            Place::Anywhere => [0.0, 0.0, 1.0, 1.0],
            Place::Top => [0.0, 0.0, 1.0, 0.5],
            Place::Bottom => [0.0, 0.5, 1.0, 1.0],
            Place::Left => [0.0, 0.0, 0.5, 1.0],
            Place::Right => [0.5, 0.0, 1.0, 1.0],
            Place::TopLeft => [0.0, 0.0, 0.5, 0.5],
            Place::TopRight => [0.5, 0.0, 1.0, 0.5],
            Place::BottomLeft => [0.0, 0.5, 0.5, 1.0],
            Place::BottomRight => [0.5, 0.5, 1.0, 1.0],
        }
    }

    /// The grid cell holding a point given as fractions of the image size.
    pub fn quadrant_of(x: f32, y: f32) -> Place {
        match (y < 0.5, x < 0.5) {
            (true, true) => Place::TopLeft,
            (true, false) => Place::TopRight,
            (false, true) => Place::BottomLeft,
            (false, false) => Place::BottomRight,
        }
    }

    /// Whether an object found in grid cell `quadrant` is where this place says: a half admits
    /// its two cells, a cell itself, and `Anywhere` every cell.
    pub fn admits(self, quadrant: Place) -> bool {
        let [x0, y0, x1, y1] = quadrant.region();
        let [rx0, ry0, rx1, ry1] = self.region();
        rx0 <= x0 && ry0 <= y0 && x1 <= rx1 && y1 <= ry1
    }

    pub(crate) fn is_quadrant(self) -> bool {
        Place::QUADRANTS.contains(&self)
    }
}

/// One object as a prompt states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectSpec {
    pub colour: Colour,
    pub shape: Shape,
    pub place: Place,
}

/// What a caption states: 1 to 4 objects whose places follow the layout scheme. The objects keep
/// the caption's order (for two objects, the first is the subject of the relation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SceneSpec {
    objects: Vec<ObjectSpec>,
}

impl SceneSpec {
    /// Accepts the places the layout scheme allows: one object `Anywhere`; two objects on opposite
    /// halves (`Top`/`Bottom` or `Left`/`Right`); three or four objects in distinct grid cells.
    pub fn new(objects: Vec<ObjectSpec>) -> Result<SceneSpec, SceneError> {
        let places: Vec<Place> = objects.iter().map(|object| object.place).collect();
        validate_places(&places)?;
        Ok(SceneSpec { objects })
    }

    pub fn objects(&self) -> &[ObjectSpec] {
        &self.objects
    }
}

fn validate_places(places: &[Place]) -> Result<(), SceneError> {
    match places {
        [Place::Anywhere] => Ok(()),
        [single] => Err(SceneError::layout(format!(
            "a single object's place is `Anywhere`, not {single:?}"
        ))),
        [Place::Top, Place::Bottom]
        | [Place::Bottom, Place::Top]
        | [Place::Left, Place::Right]
        | [Place::Right, Place::Left] => Ok(()),
        [first, second] => Err(SceneError::layout(format!(
            "two objects take opposite halves (top/bottom or left/right), not {first:?} and \
             {second:?}"
        ))),
        [_, _, _] | [_, _, _, _] => {
            if let Some(place) = places.iter().find(|place| !place.is_quadrant()) {
                return Err(SceneError::layout(format!(
                    "three or four objects take cells of the 2x2 grid, not {place:?}"
                )));
            }
            for (i, place) in places.iter().enumerate() {
                if places[..i].contains(place) {
                    return Err(SceneError::layout(format!("two objects share {place:?}")));
                }
            }
            Ok(())
        }
        _ => Err(SceneError::layout(format!(
            "a scene has 1 to 4 objects, not {}",
            places.len()
        ))),
    }
}

/// A drawable object: its spec, plus the centre and side of its square box as fractions of the
/// image side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Object {
    pub colour: Colour,
    pub shape: Shape,
    pub place: Place,
    /// `[x, y]`, y downwards.
    pub centre: [f32; 2],
    pub size: f32,
}

impl Object {
    pub fn spec(&self) -> ObjectSpec {
        ObjectSpec {
            colour: self.colour,
            shape: self.shape,
            place: self.place,
        }
    }

    /// The object's box `[x0, y0, x1, y1]` as fractions of the image side.
    pub fn bounds(&self) -> [f32; 4] {
        let half = self.size / 2.0;
        let [x, y] = self.centre;
        [x - half, y - half, x + half, y + half]
    }
}

/// A scene ready to render: objects whose places follow the layout scheme and whose boxes lie
/// inside their places' regions, hence never overlap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scene {
    objects: Vec<Object>,
}

impl Scene {
    pub fn new(objects: Vec<Object>) -> Result<Scene, SceneError> {
        let places: Vec<Place> = objects.iter().map(|object| object.place).collect();
        validate_places(&places)?;
        // Float slack only: the sampler keeps a margin inside the region.
        const SLACK: f32 = 1e-4;
        for object in &objects {
            let [x0, y0, x1, y1] = object.bounds();
            let [rx0, ry0, rx1, ry1] = object.place.region();
            let inside =
                x0 >= rx0 - SLACK && y0 >= ry0 - SLACK && x1 <= rx1 + SLACK && y1 <= ry1 + SLACK;
            if !(object.size > 0.0 && inside) {
                return Err(SceneError::layout(format!(
                    "the {} {} must lie inside its region {:?}, its box is {:?}",
                    object.colour.name(),
                    object.shape.name(),
                    object.place,
                    object.bounds()
                )));
            }
        }
        Ok(Scene { objects })
    }

    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    /// What the scene's caption states.
    pub fn spec(&self) -> SceneSpec {
        SceneSpec {
            objects: self.objects.iter().map(Object::spec).collect(),
        }
    }

    pub fn caption(&self) -> String {
        self.spec().caption()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(places: &[Place]) -> Result<SceneSpec, SceneError> {
        SceneSpec::new(
            places
                .iter()
                .map(|&place| ObjectSpec {
                    colour: Colour::Red,
                    shape: Shape::Circle,
                    place,
                })
                .collect(),
        )
    }

    #[test]
    fn the_layout_scheme_is_enforced() {
        assert!(spec(&[Place::Anywhere]).is_ok());
        assert!(spec(&[Place::TopLeft]).is_err());
        assert!(spec(&[Place::Bottom, Place::Top]).is_ok());
        assert!(spec(&[Place::Top, Place::Left]).is_err());
        assert!(spec(&[Place::TopLeft, Place::BottomRight]).is_err());
        assert!(spec(&[Place::TopLeft, Place::BottomRight, Place::TopRight]).is_ok());
        assert!(spec(&[Place::TopLeft, Place::TopLeft, Place::TopRight]).is_err());
        assert!(spec(&[Place::TopLeft, Place::Top, Place::TopRight]).is_err());
        assert!(spec(&[]).is_err());
        assert!(spec(&[Place::TopLeft; 5]).is_err());
    }

    #[test]
    fn halves_admit_their_cells() {
        assert!(Place::Top.admits(Place::TopRight));
        assert!(!Place::Top.admits(Place::BottomRight));
        assert!(Place::Left.admits(Place::BottomLeft));
        assert!(Place::Anywhere.admits(Place::BottomRight));
        assert!(Place::TopLeft.admits(Place::TopLeft));
        assert!(!Place::TopLeft.admits(Place::TopRight));
    }

    #[test]
    fn objects_must_stay_in_their_region() {
        let object = Object {
            colour: Colour::Blue,
            shape: Shape::Star,
            place: Place::Top,
            centre: [0.5, 0.25],
            size: 0.4,
        };
        let below = Object {
            place: Place::Bottom,
            centre: [0.5, 0.75],
            ..object
        };
        assert!(Scene::new(vec![object, below]).is_ok());
        let straddling = Object {
            centre: [0.5, 0.4],
            ..object
        };
        let err = Scene::new(vec![straddling, below]).unwrap_err();
        assert_eq!(err.error_type(), "layout");
    }
}
