//! Kiln's bitmap font: capital letters and digits, 5x7 pixels each, drawn in cells of 8x8 so
//! that at the data set's 64 px a character is exactly two by two 4-pixel patches (a small
//! codebook learns glyph pieces, not glyphs at every offset). [`read_text`] reads ink back by
//! template matching against the same glyphs: no OCR model, so drawing and reading cannot drift
//! apart.

/// The characters a word may hold.
pub const CHARSET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// A glyph's cell, in font pixels: the pitch from one character to the next, and the line height.
pub const CELL: usize = 8;
const GLYPH_WIDTH: usize = 5;
const GLYPH_HEIGHT: usize = 7;
/// Where the glyph sits in its cell: one column and one row of the cell are left blank before it.
const GLYPH_LEFT: usize = 1;
const GLYPH_TOP: usize = 0;

/// Rows of each glyph, top first; bit 4 is the leftmost column.
const GLYPHS: [[u8; GLYPH_HEIGHT]; 36] = [
    [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], // A
    [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E], // B
    [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E], // C
    [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C], // D
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F], // E
    [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10], // F
    [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F], // G
    [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11], // H
    [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E], // I
    [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C], // J
    [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11], // K
    [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F], // L
    [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11], // M
    [0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11], // N
    [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // O
    [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10], // P
    [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D], // Q
    [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11], // R
    [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E], // S
    [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04], // T
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // U
    [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04], // V
    [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A], // W
    [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11], // X
    [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04], // Y
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F], // Z
    [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E], // 0
    [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E], // 1
    [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F], // 2
    [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E], // 3
    [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02], // 4
    [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E], // 5
    [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E], // 6
    [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08], // 7
    [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E], // 8
    [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C], // 9
];

/// At most this many pixels of a cell may differ from the nearest glyph for a character to be
/// read: a stray or missing pixel, never a different letter (the closest glyphs, such as 8 and
/// B, 0 and O or 1 and I, differ in 3 pixels, so one wrong pixel still reads as the glyph meant).
pub const MAX_GLYPH_ERRORS: usize = 1;

/// Whether font pixel `(x, y)` of `character`'s cell is ink. Characters outside [`CHARSET`] are blank.
pub fn glyph_pixel(character: char, x: usize, y: usize) -> bool {
    let Some(index) = CHARSET.find(character) else {
        return false;
    };
    let (Some(gx), Some(gy)) = (x.checked_sub(GLYPH_LEFT), y.checked_sub(GLYPH_TOP)) else {
        return false;
    };
    gx < GLYPH_WIDTH && gy < GLYPH_HEIGHT && GLYPHS[index][gy] & (1 << (GLYPH_WIDTH - 1 - gx)) != 0
}

/// Every ink pixel of `text` drawn with its first cell's top left corner at the origin, in font
/// pixels.
pub fn text_pixels(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    text.chars().enumerate().flat_map(|(i, character)| {
        (0..CELL).flat_map(move |y| {
            (0..CELL)
                .filter(move |&x| glyph_pixel(character, x, y))
                .map(move |x| (i * CELL + x, y))
        })
    })
}

/// Reads the characters in an ink mask of `width` x `height` font pixels (`ink[y * width + x]`),
/// or `None` when there is no ink. The line is found where its ink is; every alignment of the
/// cell grid to it is tried, and the one whose cells match glyphs with the fewest wrong pixels
/// wins. A cell further than [`MAX_GLYPH_ERRORS`] from every glyph reads as `?`, so a word with a
/// smudged letter never passes for another word.
pub fn read_text(ink: &[bool], width: usize, height: usize) -> Option<String> {
    let is_ink = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < width
            && (y as usize) < height
            && ink[y as usize * width + x as usize]
    };
    let inked: Vec<(usize, usize)> = (0..height)
        .flat_map(|y| (0..width).map(move |x| (x, y)))
        .filter(|&(x, y)| ink[y * width + x])
        .collect();
    let left = inked.iter().map(|p| p.0).min()? as isize;
    let right = inked.iter().map(|p| p.0).max()? as isize;
    let top = inked.iter().map(|p| p.1).min()? as isize;

    let mut best: Option<(usize, String)> = None;
    // Every glyph has ink in its top row, in a column from the glyph's first to its last.
    let origin_y = top - GLYPH_TOP as isize;
    for shift in 0..GLYPH_WIDTH as isize {
        let origin_x = left - GLYPH_LEFT as isize - shift;
        let cells = (right - origin_x) as usize / CELL + 1;
        let mut errors = 0;
        let mut text = String::with_capacity(cells);
        for cell in 0..cells {
            let cell_x = origin_x + (cell * CELL) as isize;
            let (character, wrong) = CHARSET
                .chars()
                .map(|character| {
                    let wrong = (0..CELL)
                        .flat_map(|y| (0..CELL).map(move |x| (x, y)))
                        .filter(|&(x, y)| {
                            glyph_pixel(character, x, y)
                                != is_ink(cell_x + x as isize, origin_y + y as isize)
                        })
                        .count();
                    (character, wrong)
                })
                .min_by_key(|&(_, wrong)| wrong)
                .expect("the character set is not empty");
            errors += wrong;
            text.push(if wrong <= MAX_GLYPH_ERRORS {
                character
            } else {
                '?'
            });
        }
        // Ink outside the lines read counts against this alignment too.
        errors += inked
            .iter()
            .filter(|&&(_, y)| (y as isize) < origin_y || y as isize >= origin_y + CELL as isize)
            .count();
        if best.as_ref().is_none_or(|(fewest, _)| errors < *fewest) {
            best = Some((errors, text));
        }
    }
    best.map(|(_, text)| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(text: &str, width: usize, height: usize, at: (usize, usize)) -> Vec<bool> {
        let mut ink = vec![false; width * height];
        for (x, y) in text_pixels(text) {
            ink[(at.1 + y) * width + at.0 + x] = true;
        }
        ink
    }

    #[test]
    fn every_glyph_is_readable_and_unlike_the_others() {
        for a in CHARSET.chars() {
            assert!(
                (0..CELL).any(|x| glyph_pixel(a, x, GLYPH_TOP)),
                "{a} has ink in its top row"
            );
            for b in CHARSET.chars().filter(|&b| b != a) {
                let differ = (0..CELL)
                    .flat_map(|y| (0..CELL).map(move |x| (x, y)))
                    .filter(|&(x, y)| glyph_pixel(a, x, y) != glyph_pixel(b, x, y))
                    .count();
                assert!(
                    differ > 2 * MAX_GLYPH_ERRORS,
                    "{a} and {b} differ in {differ}"
                );
            }
        }
    }

    #[test]
    fn words_read_back_wherever_they_are_drawn() {
        for (text, at) in [
            ("KILN", (3, 5)),
            ("OPEN", (0, 0)),
            ("A1B2C3D4", (0, 1)),
            ("I", (9, 2)),
        ] {
            let ink = mask(text, 64, 16, at);
            assert_eq!(
                read_text(&ink, 64, 16).as_deref(),
                Some(text),
                "{text} at {at:?}"
            );
        }
        assert_eq!(read_text(&[false; 64], 8, 8), None);
    }

    #[test]
    fn a_pixel_of_noise_is_forgiven_and_a_smudge_is_not() {
        let mut ink = mask("KILN", 40, 10, (2, 1));
        ink[3 * 40 + 12] ^= true;
        assert_eq!(read_text(&ink, 40, 10).as_deref(), Some("KILN"));
        for x in 18..24 {
            ink[4 * 40 + x] = true;
            ink[5 * 40 + x] = true;
        }
        let read = read_text(&ink, 40, 10).unwrap();
        assert_ne!(read, "KILN");
        assert!(read.contains('?'), "{read}");
    }
}
