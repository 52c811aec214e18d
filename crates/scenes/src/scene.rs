//! The scene vocabulary and layout: shapes, colours, places, the prompt-level [`SceneSpec`] (what a
//! caption states) and the drawable [`Scene`] (a spec plus positions and sizes). Both validate the
//! layout scheme on construction, so every value of these types can be captioned, rendered and
//! checked. Sampling lives in [`crate::sample`], drawing in [`crate::render()`].

use serde::Serialize;

use crate::SceneError;

/// The plain background: one colour, so a small model learns it at once.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];

/// The colour words are drawn in: near black, at least 110 from every palette colour.
pub const INK: [u8; 3] = [20, 20, 20];

/// The most characters a word holds: eight cells of the font fill a 64 px image's width.
pub const MAX_WORD_LEN: usize = 8;

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
    /// A square standing on a corner: its corners touch the middles of its box's sides.
    Diamond,
    /// A plus sign: two bars a third of the box thick, crossing at the centre.
    Cross,
}

impl Shape {
    /// Every shape, in the order of their discriminants (the held-out split hashes those).
    pub const ALL: [Shape; 6] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Diamond,
        Shape::Cross,
    ];
    /// The four shapes of the classic scene set (kiln-shapes 0.x).
    pub const CLASSIC: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    /// The word a caption uses.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }

    pub(crate) fn from_name(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|shape| shape.name() == word)
    }
}

/// An object's fill colour. The palette is far apart in RGB (the closest pair, yellow and orange,
/// is 90 apart) and far from the background and from the ink of words ([`INK`]), so a pixel's
/// colour is unambiguous to the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    Cyan,
    Pink,
    Brown,
}

impl Colour {
    /// Every colour, in the order of their discriminants (the held-out split hashes those).
    pub const ALL: [Colour; 9] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::Cyan,
        Colour::Pink,
        Colour::Brown,
    ];
    /// The six colours of the classic scene set (kiln-shapes 0.x).
    pub const CLASSIC: [Colour; 6] = [
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
            Colour::Cyan => "cyan",
            Colour::Pink => "pink",
            Colour::Brown => "brown",
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
            Colour::Cyan => [0, 190, 210],
            Colour::Pink => [255, 120, 200],
            Colour::Brown => [130, 80, 30],
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
    /// A cell of a `grid` x `grid` grid (3 or 4), for scenes of 5 to 16 objects; row and column
    /// count from 0 at the top left.
    Cell {
        grid: u8,
        row: u8,
        column: u8,
    },
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
            Place::Cell { grid, row, column } => {
                let side = 1.0 / f32::from(grid);
                let (x, y) = (f32::from(column) * side, f32::from(row) * side);
                [x, y, x + side, y + side]
            }
        }
    }

    /// The `grid` x `grid` cells in reading order.
    pub fn cells(grid: u8) -> impl Iterator<Item = Place> {
        (0..grid)
            .flat_map(move |row| (0..grid).map(move |column| Place::Cell { grid, row, column }))
    }

    /// Whether the point `[x, y]` (fractions of the image side) lies in this place's region.
    pub fn holds(self, [x, y]: [f32; 2]) -> bool {
        let [x0, y0, x1, y1] = self.region();
        (x0..x1).contains(&x) && (y0..y1).contains(&y)
            || (x1 == 1.0 && x == 1.0 && (y0..=y1).contains(&y))
            || (y1 == 1.0 && y == 1.0 && (x0..=x1).contains(&x))
    }

    /// One byte per place for the held-out split: the discriminant for the named places (as the
    /// classic set always hashed them), and `0x20 + 16 * (grid - 3) + index` for grid cells.
    pub(crate) fn code(self) -> u8 {
        match self {
            Place::Anywhere => 0,
            Place::Top => 1,
            Place::Bottom => 2,
            Place::Left => 3,
            Place::Right => 4,
            Place::TopLeft => 5,
            Place::TopRight => 6,
            Place::BottomLeft => 7,
            Place::BottomRight => 8,
            Place::Cell { grid, row, column } => 0x20 + 16 * (grid - 3) + row * grid + column,
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

/// A word drawn in the image, as a caption states it: capital letters and digits of the
/// [`crate::font`], 1 to [`MAX_WORD_LEN`] of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WordSpec {
    pub text: String,
    /// `Anywhere` for a word alone (a sign); `Top` or `Bottom` beside one object.
    pub place: Place,
}

/// What a caption states: 1 to 16 objects whose places follow the layout scheme, or a word alone
/// or beside one object. The objects keep the caption's order (for two objects, the first is the
/// subject of the relation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SceneSpec {
    objects: Vec<ObjectSpec>,
    word: Option<WordSpec>,
}

impl SceneSpec {
    /// Accepts the places the layout scheme allows: one object `Anywhere`; two objects on opposite
    /// halves (`Top`/`Bottom` or `Left`/`Right`); three or four objects in distinct cells of the
    /// 2x2 grid; or any number of objects in distinct cells of one 3x3 or 4x4 grid.
    pub fn new(objects: Vec<ObjectSpec>) -> Result<SceneSpec, SceneError> {
        SceneSpec::with_word(objects, None)
    }

    /// As [`SceneSpec::new`], with a word: alone (`Anywhere`, no objects), or on the half
    /// opposite a single object's (`Top`/`Bottom`).
    pub fn with_word(
        objects: Vec<ObjectSpec>,
        word: Option<WordSpec>,
    ) -> Result<SceneSpec, SceneError> {
        let places: Vec<Place> = objects.iter().map(|object| object.place).collect();
        validate(&places, word.as_ref())?;
        Ok(SceneSpec { objects, word })
    }

    pub fn objects(&self) -> &[ObjectSpec] {
        &self.objects
    }

    pub fn word(&self) -> Option<&WordSpec> {
        self.word.as_ref()
    }
}

/// Whether `text` can be drawn as a word: 1 to [`MAX_WORD_LEN`] characters of the font.
pub fn validate_word(text: &str) -> Result<(), SceneError> {
    let length = text.chars().count();
    if !(1..=MAX_WORD_LEN).contains(&length) {
        return Err(SceneError::layout(format!(
            "a word has 1 to {MAX_WORD_LEN} characters, not {length}"
        )));
    }
    match text.chars().find(|c| !crate::font::CHARSET.contains(*c)) {
        Some(c) => Err(SceneError::layout(format!(
            "a word holds capital letters A-Z and digits 0-9, not {c:?}"
        ))),
        None => Ok(()),
    }
}

fn validate(places: &[Place], word: Option<&WordSpec>) -> Result<(), SceneError> {
    let Some(word) = word else {
        return validate_places(places);
    };
    validate_word(&word.text)?;
    match (places, word.place) {
        ([], Place::Anywhere) | ([Place::Top], Place::Bottom) | ([Place::Bottom], Place::Top) => {
            Ok(())
        }
        _ => Err(SceneError::layout(format!(
            "a word stands alone (anywhere) or on the half opposite one object's (top/bottom), \
             not at {:?} beside objects at {places:?}",
            word.place
        ))),
    }
}

fn validate_places(places: &[Place]) -> Result<(), SceneError> {
    if let Some(&Place::Cell { grid, .. }) = places.first() {
        return validate_grid(places, grid);
    }
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
            "a scene has 1 to 4 objects, or up to 16 in the cells of a 3x3 or 4x4 grid, not {}",
            places.len()
        ))),
    }
}

fn validate_grid(places: &[Place], grid: u8) -> Result<(), SceneError> {
    if !(3..=4).contains(&grid) {
        return Err(SceneError::layout(format!(
            "a grid is 3x3 or 4x4, not {grid}x{grid}"
        )));
    }
    for (i, place) in places.iter().enumerate() {
        match *place {
            Place::Cell {
                grid: g,
                row,
                column,
            } if g == grid && row < grid && column < grid => {}
            other => {
                return Err(SceneError::layout(format!(
                    "the objects of a {grid}x{grid} grid take its cells, not {other:?}"
                )))
            }
        }
        if places[..i].contains(place) {
            return Err(SceneError::layout(format!("two objects share {place:?}")));
        }
    }
    Ok(())
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

/// Whether box `[x0, y0, x1, y1]` lies inside `region`, with float slack only (the sampler keeps
/// a margin inside the region).
fn lies_inside([x0, y0, x1, y1]: [f32; 4], [rx0, ry0, rx1, ry1]: [f32; 4]) -> bool {
    const SLACK: f32 = 1e-4;
    x0 >= rx0 - SLACK && y0 >= ry0 - SLACK && x1 <= rx1 + SLACK && y1 <= ry1 + SLACK
}

/// A drawable word: its spec, plus the top left corner of its first character's cell as fractions
/// of the image side. A font pixel is a 64th of the side, so a word is `8 * len` by 8 of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacedWord {
    pub text: String,
    pub place: Place,
    pub origin: [f32; 2],
}

impl PlacedWord {
    /// The side of a font pixel as a fraction of the image side.
    pub const FONT_PIXEL: f32 = 1.0 / 64.0;

    pub fn spec(&self) -> WordSpec {
        WordSpec {
            text: self.text.clone(),
            place: self.place,
        }
    }

    /// The word's box `[x0, y0, x1, y1]` as fractions of the image side.
    pub fn bounds(&self) -> [f32; 4] {
        let cell = crate::font::CELL as f32 * Self::FONT_PIXEL;
        let [x, y] = self.origin;
        [x, y, x + cell * self.text.chars().count() as f32, y + cell]
    }
}

/// A scene ready to render: objects (and a word) whose places follow the layout scheme and whose
/// boxes lie inside their places' regions, hence never overlap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scene {
    objects: Vec<Object>,
    word: Option<PlacedWord>,
}

impl Scene {
    pub fn new(objects: Vec<Object>) -> Result<Scene, SceneError> {
        Scene::with_word(objects, None)
    }

    pub fn with_word(objects: Vec<Object>, word: Option<PlacedWord>) -> Result<Scene, SceneError> {
        let places: Vec<Place> = objects.iter().map(|object| object.place).collect();
        validate(&places, word.as_ref().map(PlacedWord::spec).as_ref())?;
        if let Some(word) = &word {
            if !lies_inside(word.bounds(), word.place.region()) {
                return Err(SceneError::layout(format!(
                    "the word {:?} must lie inside its region {:?}, its box is {:?}",
                    word.text,
                    word.place,
                    word.bounds()
                )));
            }
        }
        for object in &objects {
            let inside = lies_inside(object.bounds(), object.place.region());
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
        Ok(Scene { objects, word })
    }

    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    pub fn word(&self) -> Option<&PlacedWord> {
        self.word.as_ref()
    }

    /// What the scene's caption states.
    pub fn spec(&self) -> SceneSpec {
        SceneSpec {
            objects: self.objects.iter().map(Object::spec).collect(),
            word: self.word.as_ref().map(PlacedWord::spec),
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
