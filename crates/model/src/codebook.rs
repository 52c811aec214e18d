//! The codebook: one RGB patch per image token, and the raster that turns a token sequence into a PNG.

use crate::ModelError;

/// A finished image.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// PNG bytes.
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Patches of `patch_size`² RGB pixels, one per image token, stored as bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    patch_size: usize,
    /// `len * patch_size * patch_size * 3` bytes, row-major RGB per patch.
    patches: Vec<u8>,
}

impl Codebook {
    /// Builds a codebook from raw patches (`len * patch_size² * 3` bytes).
    pub fn new(patch_size: usize, patches: Vec<u8>) -> Result<Self, ModelError> {
        let per = patch_size * patch_size * 3;
        if patch_size == 0 || patches.is_empty() || !patches.len().is_multiple_of(per) {
            return Err(ModelError::Weights(format!(
                "codebook of {} bytes does not hold whole {patch_size}x{patch_size} RGB patches",
                patches.len()
            )));
        }
        Ok(Codebook {
            patch_size,
            patches,
        })
    }

    /// A procedural codebook for untrained models: flat colours, gradients and edges over a palette,
    /// so that even random tokens render as a visible mosaic.
    pub fn procedural(len: usize, patch_size: usize) -> Self {
        let p = patch_size;
        let mut patches = Vec::with_capacity(len * p * p * 3);
        for code in 0..len {
            let hue = (code * 37 % 360) as f32;
            let light = 0.25 + 0.5 * ((code / 7) % 4) as f32 / 3.0;
            let base = hsl_to_rgb(hue, 0.7, light);
            let pattern = code % 4;
            for y in 0..p {
                for x in 0..p {
                    let t = match pattern {
                        0 => 1.0,
                        1 => 0.6 + 0.4 * x as f32 / (p - 1).max(1) as f32,
                        2 => 0.6 + 0.4 * y as f32 / (p - 1).max(1) as f32,
                        _ => {
                            if x + y < p {
                                1.0
                            } else {
                                0.55
                            }
                        }
                    };
                    for c in base {
                        patches.push((c * t * 255.0).round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
        }
        Codebook {
            patch_size,
            patches,
        }
    }

    /// Pixels per side of one patch.
    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.patches.len() / (self.patch_size * self.patch_size * 3)
    }

    /// True when the codebook holds no code (never for a valid one).
    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// Raw patch bytes, for saving.
    pub fn as_bytes(&self) -> &[u8] {
        &self.patches
    }

    /// Renders raster-ordered codes into RGB pixels of a `width` x `height` image.
    pub fn render_rgb(
        &self,
        codes: &[u32],
        width: u32,
        height: u32,
    ) -> Result<Vec<u8>, ModelError> {
        self.render_rgb_prefix(codes, width, height, false)
    }

    /// Renders the first `codes` of an image in raster order; with `partial`, fewer codes than
    /// the image has patches are allowed and the patches not yet drawn are mid-grey.
    fn render_rgb_prefix(
        &self,
        codes: &[u32],
        width: u32,
        height: u32,
        partial: bool,
    ) -> Result<Vec<u8>, ModelError> {
        let p = self.patch_size;
        let (w, h) = (width as usize, height as usize);
        let cols = w / p;
        let patches = cols * (h / p);
        let fits = if partial {
            codes.len() <= patches
        } else {
            codes.len() == patches
        };
        if w % p != 0 || h % p != 0 || !fits {
            return Err(ModelError::Encode(format!(
                "{} codes do not tile a {width}x{height} image with {p}px patches",
                codes.len()
            )));
        }
        let mut rgb = vec![if partial { 128u8 } else { 0u8 }; w * h * 3];
        for (i, &code) in codes.iter().enumerate() {
            let code = code as usize;
            if code >= self.len() {
                return Err(ModelError::Encode(format!(
                    "code {code} outside codebook of {}",
                    self.len()
                )));
            }
            let (py, px) = (i / cols * p, i % cols * p);
            let patch = &self.patches[code * p * p * 3..(code + 1) * p * p * 3];
            for y in 0..p {
                let dst = ((py + y) * w + px) * 3;
                rgb[dst..dst + p * 3].copy_from_slice(&patch[y * p * 3..(y + 1) * p * 3]);
            }
        }
        Ok(rgb)
    }

    /// Renders codes and encodes the result as PNG.
    pub fn render_png(&self, codes: &[u32], width: u32, height: u32) -> Result<Image, ModelError> {
        encode_png(self.render_rgb(codes, width, height)?, width, height)
    }

    /// A preview of an image from its first codes: the patches not yet drawn are mid-grey.
    pub fn render_partial_png(
        &self,
        codes: &[u32],
        width: u32,
        height: u32,
    ) -> Result<Image, ModelError> {
        encode_png(
            self.render_rgb_prefix(codes, width, height, true)?,
            width,
            height,
        )
    }
}

fn encode_png(rgb: Vec<u8>, width: u32, height: u32) -> Result<Image, ModelError> {
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let encode_err = |e: png::EncodingError| ModelError::Encode(e.to_string());
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer.write_image_data(&rgb).map_err(encode_err)?;
    }
    Ok(Image { png, width, height })
}

fn hsl_to_rgb(h: f32, s: f32, l: f32) -> [f32; 3] {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = h / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    [r + m, g + m, b + m]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_patches_in_raster_order() {
        let cb = Codebook::procedural(16, 2);
        let rgb = cb.render_rgb(&[0, 1, 2, 3], 4, 4).unwrap();
        let patch = |c: usize| &cb.as_bytes()[c * 12..c * 12 + 12];
        // Top-left pixel of the patch at row 1, column 1 is code 3's first pixel.
        assert_eq!(&rgb[(2 * 4 + 2) * 3..(2 * 4 + 2) * 3 + 3], &patch(3)[..3]);
        assert_eq!(&rgb[(4 + 2) * 3..(4 + 2) * 3 + 6], &patch(1)[6..12]);
    }

    #[test]
    fn png_round_trips_size_and_rejects_bad_tilings() {
        let cb = Codebook::procedural(8, 4);
        let img = cb.render_png(&[1; 6], 12, 8).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&img.png));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (12, 8));
        assert!(cb.render_png(&[1; 5], 12, 8).is_err());
        assert!(cb.render_png(&[9; 6], 12, 8).is_err());
    }
}
