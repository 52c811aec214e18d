//! The rasteriser: a [`Scene`] to an [`RgbImage`] with hard edges (no anti-aliasing, so that every
//! pixel is the background or a palette colour, which is easiest to tokenize). Every shape is
//! defined on the unit square of its box, and a pixel is filled when its centre lies inside; the
//! checker fits the same definitions to what it finds, so drawing and checking cannot drift apart.

use std::sync::LazyLock;

use crate::scene::{PlacedWord, Scene, Shape, BACKGROUND, INK};
use crate::RgbImage;

/// The side of the images the data set is made of.
pub const DEFAULT_SIZE: u32 = 64;

/// Inner to outer radius of the star. A regular pentagram has 0.38; a plumper star keeps its
/// arms two pixels wide in the smallest boxes drawn at 32x32.
const STAR_INNER_RATIO: f32 = 0.45;

/// Half the thickness of a cross's bars, as a fraction of its box: bars a third of the box thick
/// stay three pixels wide in the smallest boxes of a 4x4 grid at 64 px.
const CROSS_HALF_BAR: f32 = 1.0 / 6.0;

/// Draws the scene on a `size` x `size` image (32, 64 and 128 are tested; a word is drawn a font
/// pixel per `size / 64` pixels, so words want a multiple of 64). Panics on size 0.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    let mut image = RgbImage::filled(size, size, BACKGROUND);
    let side = size as f32;
    for object in scene.objects() {
        let [x0, y0, _, _] = object.bounds();
        let frame = Frame {
            x: x0 * side,
            y: y0 * side,
            width: object.size * side,
            height: object.size * side,
        };
        let rgb = object.colour.rgb();
        frame.for_each_pixel(object.shape, size, size, |x, y| image.set_pixel(x, y, rgb));
    }
    if let Some(word) = scene.word() {
        draw_word(&mut image, word);
    }
    image
}

/// Inks every pixel whose centre falls on an ink pixel of the word's glyphs.
fn draw_word(image: &mut RgbImage, word: &PlacedWord) {
    let size = image.width();
    let side = size as f32;
    let [x0, y0, x1, y1] = word.bounds();
    let to_pixels = |fraction: f32| ((fraction * side).max(0.0) as u32).min(size);
    let characters: Vec<char> = word.text.chars().collect();
    let cell = crate::font::CELL;
    for y in to_pixels(y0)..=to_pixels(y1).min(size - 1) {
        for x in to_pixels(x0)..=to_pixels(x1).min(size - 1) {
            let font_x =
                (((x as f32 + 0.5) / side - word.origin[0]) / PlacedWord::FONT_PIXEL).floor();
            let font_y =
                (((y as f32 + 0.5) / side - word.origin[1]) / PlacedWord::FONT_PIXEL).floor();
            if font_x < 0.0 || font_y < 0.0 {
                continue;
            }
            let (font_x, font_y) = (font_x as usize, font_y as usize);
            let Some(&character) = characters.get(font_x / cell) else {
                continue;
            };
            if crate::font::glyph_pixel(character, font_x % cell, font_y) {
                image.set_pixel(x, y, INK);
            }
        }
    }
}

/// A shape's box in pixel units: `(x, y)` is its top left corner.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
}

impl Frame {
    /// Whether pixel `(x, y)` is filled when `shape` is drawn in this box. The coordinates are
    /// floats so that the checker can ask about pixels left of or above its own origin.
    pub fn covers(&self, shape: Shape, x: f32, y: f32) -> bool {
        let u = (x + 0.5 - self.x) / self.width;
        let v = (y + 0.5 - self.y) / self.height;
        shape_contains(shape, u, v)
    }

    /// Calls `fill` for every pixel of a `width` x `height` image that `shape` fills in this box.
    pub fn for_each_pixel(
        &self,
        shape: Shape,
        width: u32,
        height: u32,
        mut fill: impl FnMut(u32, u32),
    ) {
        let x_end = ((self.x + self.width).ceil().max(0.0) as u32).min(width);
        let y_end = ((self.y + self.height).ceil().max(0.0) as u32).min(height);
        let x_start = self.x.floor().max(0.0) as u32;
        let y_start = self.y.floor().max(0.0) as u32;
        for y in y_start..y_end {
            for x in x_start..x_end {
                if self.covers(shape, x as f32, y as f32) {
                    fill(x, y);
                }
            }
        }
    }
}

/// Whether point `(u, v)` of the unit box (v downwards) lies inside the shape.
fn shape_contains(shape: Shape, u: f32, v: f32) -> bool {
    if !((0.0..=1.0).contains(&u) && (0.0..=1.0).contains(&v)) {
        return false;
    }
    match shape {
        Shape::Square => true,
        Shape::Circle => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
        Shape::Triangle => (u - 0.5).abs() <= v / 2.0,
        Shape::Star => inside_polygon(&*STAR, u, v),
        Shape::Diamond => (u - 0.5).abs() + (v - 0.5).abs() <= 0.5,
        Shape::Cross => (u - 0.5).abs() <= CROSS_HALF_BAR || (v - 0.5).abs() <= CROSS_HALF_BAR,
    }
}

/// The star's ten corners, stretched to touch all four sides of the unit box (the regular star is
/// 5% wider than tall; the stretch is invisible and lets one box describe every shape).
static STAR: LazyLock<[[f32; 2]; 10]> = LazyLock::new(|| {
    let corners: [[f32; 2]; 10] = std::array::from_fn(|i| {
        let radius = if i % 2 == 0 { 1.0 } else { STAR_INNER_RATIO };
        let angle = (-90.0 + 36.0 * i as f32).to_radians();
        [radius * angle.cos(), radius * angle.sin()]
    });
    let (min_x, max_x) = (-(72f32.to_radians().sin()), 72f32.to_radians().sin());
    let (min_y, max_y) = (-1.0, 36f32.to_radians().cos());
    corners.map(|[x, y]| [(x - min_x) / (max_x - min_x), (y - min_y) / (max_y - min_y)])
});

/// Even-odd rule: a ray to the right crosses the outline an odd number of times.
fn inside_polygon(corners: &[[f32; 2]], u: f32, v: f32) -> bool {
    let mut inside = false;
    let mut previous = corners[corners.len() - 1];
    for &corner in corners {
        let ([x1, y1], [x2, y2]) = (previous, corner);
        if (y1 > v) != (y2 > v) && u < x1 + (v - y1) * (x2 - x1) / (y2 - y1) {
            inside = !inside;
        }
        previous = corner;
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{Colour, Object, Place};

    fn single(shape: Shape, size: f32) -> Scene {
        Scene::new(vec![Object {
            colour: Colour::Purple,
            shape,
            place: Place::Anywhere,
            centre: [0.5, 0.5],
            size,
        }])
        .unwrap()
    }

    fn filled_fraction(shape: Shape) -> f32 {
        let image = render(&single(shape, 0.5), 128);
        let filled = image
            .pixels()
            .chunks(3)
            .filter(|p| *p != BACKGROUND)
            .count();
        filled as f32 / (64.0 * 64.0)
    }

    #[test]
    fn shapes_fill_their_box_as_designed() {
        let square = filled_fraction(Shape::Square);
        let circle = filled_fraction(Shape::Circle);
        let triangle = filled_fraction(Shape::Triangle);
        let star = filled_fraction(Shape::Star);
        let diamond = filled_fraction(Shape::Diamond);
        let cross = filled_fraction(Shape::Cross);
        assert!((diamond - 0.5).abs() < 0.02, "diamond {diamond}");
        assert!((cross - 5.0 / 9.0).abs() < 0.02, "cross {cross}");
        assert!((square - 1.0).abs() < 0.01, "square {square}");
        assert!(
            (circle - std::f32::consts::FRAC_PI_4).abs() < 0.02,
            "circle {circle}"
        );
        assert!((triangle - 0.5).abs() < 0.02, "triangle {triangle}");
        assert!((0.33..0.45).contains(&star), "star {star}");
    }

    #[test]
    fn shapes_reach_every_side_of_their_box() {
        for shape in Shape::ALL {
            let image = render(&single(shape, 0.5), 64);
            let filled: Vec<(u32, u32)> = (0..64)
                .flat_map(|y| (0..64).map(move |x| (x, y)))
                .filter(|&(x, y)| image.pixel(x, y) != BACKGROUND)
                .collect();
            let xs = filled.iter().map(|p| p.0);
            let ys = filled.iter().map(|p| p.1);
            // A point's tip may fall between pixel centres: one pixel of slack.
            let bounds = [xs.clone().min(), ys.clone().min(), xs.max(), ys.max()];
            let box_edges = [16, 16, 47, 47];
            for (edge, expected) in bounds.into_iter().zip(box_edges) {
                let edge = edge.expect("the shape is drawn");
                assert!(edge.abs_diff(expected) <= 1, "{shape:?}: {bounds:?}");
            }
        }
    }

    #[test]
    fn the_triangle_points_up() {
        let image = render(&single(Shape::Triangle, 0.5), 64);
        let row = |y| (0..64).filter(|&x| image.pixel(x, y) != BACKGROUND).count();
        assert!(
            row(17) <= 2 && row(47) >= 30,
            "top {} bottom {}",
            row(17),
            row(47)
        );
    }
}
