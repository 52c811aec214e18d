//! The text side of the vocabulary: a byte-level tokenizer, plus the special tokens that frame the
//! image (BOS, the image's width and height in patches, BOI).

use crate::ModelConfig;

/// Beginning of sequence.
pub const BOS: u32 = 256;
/// Beginning of image: the input of the first image position.
pub const BOI: u32 = 257;

/// The token ids that precede the image: BOS, the prompt's UTF-8 bytes, the width and height tokens.
pub fn prefix_tokens(cfg: &ModelConfig, prompt: &str, width: u32, height: u32) -> Vec<u32> {
    let grid = cfg.max_grid() as u32;
    let w = width / cfg.patch_size as u32;
    let h = height / cfg.patch_size as u32;
    let mut tokens = Vec::with_capacity(prompt.len() + 3);
    tokens.push(BOS);
    tokens.extend(prompt.bytes().map(u32::from));
    tokens.push(258 + (w - 1));
    tokens.push(258 + grid + (h - 1));
    tokens
}

/// Token id of image code `code`.
pub fn code_token(cfg: &ModelConfig, code: u32) -> u32 {
    cfg.first_code_token() as u32 + code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_frames_the_prompt_bytes() {
        let cfg = ModelConfig::tiny();
        let t = prefix_tokens(&cfg, "ab", 32, 16);
        assert_eq!(t, vec![BOS, 97, 98, 258 + 3, 258 + 8 + 1]);
        assert!(t.iter().all(|&x| (x as usize) < cfg.first_code_token()));
    }
}
