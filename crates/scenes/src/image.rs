//! An 8-bit RGB image in memory and its PNG form, for the data set writer and the evaluation tool.
//! Decoding accepts any PNG colour type and folds it to RGB; drawing lives in [`crate::render()`].

use std::io::Cursor;

use crate::scene::BACKGROUND;
use crate::SceneError;

/// Row-major RGB pixels, three bytes each. Never empty, and the buffer always matches the size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: u32, height: u32, pixels: Vec<u8>) -> Result<RgbImage, SceneError> {
        let expected = u64::from(width) * u64::from(height) * 3;
        if width == 0 || height == 0 || pixels.len() as u64 != expected {
            return Err(SceneError::InvalidImage {
                reason: format!(
                    "a {width}x{height} RGB image needs {expected} bytes, not {}",
                    pixels.len()
                ),
            });
        }
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }

    /// An image of one colour. Panics on a zero size, which is a programming error here.
    pub fn filled(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
        assert!(width > 0 && height > 0, "an image is at least 1x1");
        let count = width as usize * height as usize;
        RgbImage {
            width,
            height,
            pixels: rgb.repeat(count),
        }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The pixels, to edit in place (the length cannot change).
    pub fn pixels_mut(&mut self) -> &mut [u8] {
        &mut self.pixels
    }

    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let at = self.offset(x, y);
        [self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]]
    }

    pub fn set_pixel(&mut self, x: u32, y: u32, rgb: [u8; 3]) {
        let at = self.offset(x, y);
        self.pixels[at..at + 3].copy_from_slice(&rgb);
    }

    fn offset(&self, x: u32, y: u32) -> usize {
        assert!(
            x < self.width && y < self.height,
            "pixel ({x}, {y}) outside the image"
        );
        (y as usize * self.width as usize + x as usize) * 3
    }
}

/// Encodes the image as an 8-bit RGB PNG.
pub fn to_png(image: &RgbImage) -> Vec<u8> {
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // The size is non-zero and matches the buffer (type invariants) and the sink is a Vec, so
        // the encoder has nothing that could fail.
        let mut writer = encoder
            .write_header()
            .expect("PNG header of a valid image into memory");
        writer
            .write_image_data(&image.pixels)
            .expect("PNG data of a valid image into memory");
    }
    png
}

/// Decodes a PNG of any colour type and depth to 8-bit RGB; transparency is composited onto the
/// scene background.
pub fn from_png(bytes: &[u8]) -> Result<RgbImage, SceneError> {
    let invalid = |e: png::DecodingError| SceneError::InvalidImage {
        reason: format!("cannot decode the PNG: {e}"),
    };
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(invalid)?;
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buffer).map_err(invalid)?;
    let data = &buffer[..info.buffer_size()];

    let over_background = |value: u8, alpha: u8, channel: usize| -> u8 {
        let blended = u32::from(value) * u32::from(alpha)
            + u32::from(BACKGROUND[channel]) * u32::from(255 - alpha);
        (blended / 255) as u8
    };
    let rgb: Vec<u8> = match info.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|c| over_background(p[c], p[3], c)))
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&v| [v, v, v]).collect(),
        png::ColorType::GrayscaleAlpha => data
            .chunks_exact(2)
            .flat_map(|p| [0, 1, 2].map(|c| over_background(p[0], p[1], c)))
            .collect(),
        png::ColorType::Indexed => {
            // The EXPAND transformation turns palettes into RGB(A); this is a decoder surprise.
            return Err(SceneError::InvalidImage {
                reason: "the PNG palette was not expanded".into(),
            });
        }
    };
    RgbImage::new(info.width, info.height, rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips() {
        let mut image = RgbImage::filled(5, 3, [1, 2, 3]);
        image.set_pixel(4, 2, [200, 100, 50]);
        let decoded = from_png(&to_png(&image)).unwrap();
        assert_eq!(decoded, image);
        assert_eq!(decoded.pixel(4, 2), [200, 100, 50]);
    }

    #[test]
    fn grey_and_transparent_pngs_become_rgb() {
        let mut png = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png, 2, 1);
            encoder.set_color(png::ColorType::GrayscaleAlpha);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[10, 255, 10, 0]).unwrap();
        }
        let image = from_png(&png).unwrap();
        assert_eq!(image.pixel(0, 0), [10, 10, 10]);
        assert_eq!(image.pixel(1, 0), BACKGROUND);
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(from_png(b"not a png").unwrap_err().error_type(), "image");
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
        assert!(RgbImage::new(0, 0, Vec::new()).is_err());
    }
}
