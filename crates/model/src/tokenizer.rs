//! The text side of the vocabulary: the prompt's UTF-8 bytes, or, for a model that lists its
//! words (`ModelConfig::words`), its words and signs; plus the special tokens that frame the image
//! (BOS, the image's width and height in patches, BOI).
//!
//! Words make a caption four to five times shorter than its bytes, so a small model trains on
//! shorter sequences and binds "red" to "circle" without first learning to spell them. A model
//! that also lists the quote sign and capitals reads a quoted word letter by letter, as the
//! capitals it must draw (`"Kiln"` is `" K I L N "`), so it can draw words it never saw.

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
        tokens.extend(word_tokens(&cfg.words, prompt));
    }
    tokens.push(258 + (w - 1));
    tokens.push(258 + grid + (h - 1));
    tokens
}

/// The quote sign that opens and closes a word to be drawn.
pub const QUOTE: &str = "\"";

/// A prompt's word tokens: word `i` of `words` is token `i`, anything else the unknown token
/// `words.len()`. Outside quotes a piece is looked up lowercased. When `words` lists the quote
/// sign, a quoted piece is read one character at a time, each looked up as a capital; a list
/// without the quote sign (kiln-shapes 0.x) reads quotes as unknown signs, as it always did.
pub fn word_tokens<'a>(words: &'a [String], prompt: &'a str) -> impl Iterator<Item = u32> + 'a {
    let unknown = words.len() as u32;
    let lookup = move |piece: &str| {
        words
            .iter()
            .position(|w| w == piece)
            .map_or(unknown, |i| i as u32)
    };
    let spells = words.iter().any(|w| w == QUOTE);
    let mut quoted = false;
    prompt_pieces(prompt).flat_map(move |piece| {
        let inside = quoted && piece != QUOTE;
        if spells && piece == QUOTE {
            quoted = !quoted;
        }
        let ids: Vec<u32> = if spells && inside {
            piece
                .chars()
                .map(|c| lookup(&c.to_uppercase().to_string()))
                .collect()
        } else {
            vec![lookup(&piece.to_lowercase())]
        };
        ids
    })
}

/// Whether `word` may stand in a word list: one piece of a prompt, lowercase, or one capital
/// (a character of a quoted word).
pub fn is_listable_word(word: &str) -> bool {
    let one_piece = prompt_pieces(word).eq(std::iter::once(word));
    let mut chars = word.chars();
    let capital = matches!((chars.next(), chars.next()), (Some(c), None) if c.is_uppercase());
    one_piece && (word.to_lowercase() == word || capital)
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
        for bad in [
            vec!["red star"],
            vec!["Red"],
            vec!["red", "red"],
            vec![""],
            vec!["KI"],
        ] {
            cfg.words = bad.iter().map(|w| w.to_string()).collect();
            assert!(cfg.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_quoted_word_is_read_letter_by_letter_as_capitals() {
        let mut cfg = ModelConfig::tiny();
        cfg.words = ["a", "sign", "\"", "K", "I", "L", "N", "4"]
            .map(String::from)
            .to_vec();
        cfg.validate().unwrap();
        let t = prefix_tokens(&cfg, "A sign \"Kiln4\" a", 32, 16);
        assert_eq!(t[1..t.len() - 2], [0, 1, 2, 3, 4, 5, 6, 7, 2, 0]);
        // Outside quotes "kiln" is one unknown word, not four letters.
        let t = prefix_tokens(&cfg, "kiln", 32, 16);
        assert_eq!(t[1..t.len() - 2], [8]);
        // An unclosed quote spells to the end; a character off the list is unknown.
        let t = prefix_tokens(&cfg, "\"KQ", 32, 16);
        assert_eq!(t[1..t.len() - 2], [2, 3, 8]);
    }

    #[test]
    fn a_list_without_the_quote_sign_reads_quotes_as_before() {
        let mut cfg = ModelConfig::tiny();
        cfg.words = ["a", "k"].map(String::from).to_vec();
        let t = prefix_tokens(&cfg, "a \"K\"", 32, 16);
        assert_eq!(t[1..t.len() - 2], [0, 2, 1, 2]);
    }
}
