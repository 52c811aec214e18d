//! The text side of the vocabulary: the prompt's UTF-8 bytes, or, for a model that lists its
//! words (`ModelConfig::words`), its words and signs; plus the special tokens that frame the image
//! (BOS, the image's width and height in patches, BOI).
//!
//! Words make a caption four to five times shorter than its bytes, so a small model trains on
//! shorter sequences and binds "red" to "circle" without first learning to spell them.

use crate::ModelConfig;

/// Beginning of sequence.
pub const BOS: u32 = 256;
/// Beginning of image: the input of the first image position.
pub const BOI: u32 = 257;

/// A prompt as a word vocabulary reads it: runs of letters and digits, lowercased, and every other
/// sign that is not white space on its own ("A red star, top left" is `a red star , top left`).
/// Never more pieces than the prompt has bytes.
pub fn prompt_pieces(prompt: &str) -> impl Iterator<Item = &str> + '_ {
    let mut rest = prompt;
    std::iter::from_fn(move || {
        rest = rest.trim_start();
        let first = rest.chars().next()?;
        let end = if first.is_alphanumeric() {
            rest.find(|c: char| !c.is_alphanumeric())
                .unwrap_or(rest.len())
        } else {
            first.len_utf8()
        };
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// The token ids that precede the image: BOS, the prompt (its bytes, or its words for a model that
/// lists words), the width and height tokens. A prompt has at most as many tokens as bytes.
pub fn prefix_tokens(cfg: &ModelConfig, prompt: &str, width: u32, height: u32) -> Vec<u32> {
    let grid = cfg.max_grid() as u32;
    let w = width / cfg.patch_size as u32;
    let h = height / cfg.patch_size as u32;
    let mut tokens = Vec::with_capacity(prompt.len() + 3);
    tokens.push(BOS);
    if cfg.words.is_empty() {
        tokens.extend(prompt.bytes().map(u32::from));
    } else {
        let unknown = cfg.words.len() as u32;
        tokens.extend(prompt_pieces(prompt).map(|piece| {
            let lower = piece.to_lowercase();
            cfg.words
                .iter()
                .position(|w| *w == lower)
                .map_or(unknown, |i| i as u32)
        }));
    }
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

    #[test]
    fn a_word_model_reads_words_and_signs_and_marks_unknown_ones() {
        let pieces: Vec<_> = prompt_pieces("  A red star, top-left ").collect();
        assert_eq!(pieces, ["A", "red", "star", ",", "top", "-", "left"]);
        let mut cfg = ModelConfig::tiny();
        cfg.words = ["a", "red", "star", ","].map(String::from).to_vec();
        cfg.validate().unwrap();
        let t = prefix_tokens(&cfg, "A red star, blue", 32, 16);
        assert_eq!(t, vec![BOS, 0, 1, 2, 3, 4, 258 + 3, 258 + 8 + 1]);
    }

    #[test]
    fn a_word_list_must_be_single_lowercase_pieces_listed_once() {
        let mut cfg = ModelConfig::tiny();
        for bad in [vec!["red star"], vec!["Red"], vec!["red", "red"], vec![""]] {
            cfg.words = bad.iter().map(|w| w.to_string()).collect();
            assert!(cfg.validate().is_err(), "{bad:?}");
        }
    }
}
