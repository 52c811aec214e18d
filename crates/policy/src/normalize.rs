//! Turns text — a prompt, or a name from the policy data — into the words that matching compares, so
//! that case, accents, ligatures, invisible characters and punctuation cannot hide a name. It knows
//! nothing of artists or of what a match means; [`crate::style`] does.
//!
//! The steps: NFKD (which also folds full-width and other compatibility forms), drop combining
//! marks (accents), lowercase, spell out letters that do not decompose (`œ` -> `oe`, `ł` -> `l`),
//! drop invisible characters so that they cannot split a word, and split into words at anything
//! that is not a letter or digit. Han, kana and Hangul are written without spaces, so each of
//! their characters is a word of its own and a name in them matches inside a longer run. Inside a
//! word that mixes Latin letters with Cyrillic or Greek look-alikes (`bаnksy` with a Cyrillic `а`),
//! the look-alikes are read as Latin; a word wholly in Cyrillic is left as written.

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// One word of normalised text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub text: String,
    /// A clause break (comma, semicolon, colon, bracket, quote, `!`, `?`, line break) stands
    /// between this word and the one before it. A name never matches across one: in "portrait of
    /// alex, grey hair" the words "alex" and "grey" are not the name "Alex Grey".
    pub after_break: bool,
}

/// Splits `text` into normalised words.
pub fn tokenize(text: &str) -> Vec<Token> {
    let mut builder = Builder::default();
    for decomposed in text.nfkd() {
        for c in decomposed.to_lowercase() {
            if is_combining_mark(c) || is_invisible(c) {
                continue;
            }
            match spelled_out(c) {
                Some(letters) => letters.chars().for_each(|c| builder.push(c)),
                None => builder.push(c),
            }
        }
    }
    builder.flush();
    builder.tokens
}

/// The normalised words of `text` joined by single spaces: "Gerhard  Richtér" -> "gerhard richter".
pub fn normalize(text: &str) -> String {
    let words: Vec<String> = tokenize(text).into_iter().map(|t| t.text).collect();
    words.join(" ")
}

#[derive(Default)]
struct Builder {
    tokens: Vec<Token>,
    word: String,
    pending_break: bool,
}

impl Builder {
    fn push(&mut self, c: char) {
        if !c.is_alphanumeric() {
            self.flush();
            if is_clause_break(c) {
                self.pending_break = true;
            }
        } else if is_written_without_spaces(c) {
            self.flush();
            self.emit(c.to_string());
        } else {
            self.word.push(c);
        }
    }

    fn flush(&mut self) {
        if !self.word.is_empty() {
            let word = read_look_alikes_as_latin(std::mem::take(&mut self.word));
            self.emit(word);
        }
    }

    fn emit(&mut self, text: String) {
        self.tokens.push(Token {
            text,
            after_break: self.pending_break,
        });
        self.pending_break = false;
    }
}

/// Letters that NFKD leaves whole but that people write without the stroke or ligature.
fn spelled_out(c: char) -> Option<&'static str> {
    Some(match c {
        'œ' => "oe",
        'æ' => "ae",
        'ß' => "ss",
        'ø' => "o",
        'ł' => "l",
        'đ' | 'ð' => "d",
        'þ' => "th",
        'ı' => "i",
        'ħ' => "h",
        'ŧ' => "t",
        _ => return None,
    })
}

/// Characters that render as nothing, dropped so that "bank\u{200b}sy" is still one word.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}'
    )
}

fn is_clause_break(c: char) -> bool {
    matches!(
        c,
        ',' | ';'
            | ':'
            | '|'
            | '!'
            | '?'
            | '"'
            | '('
            | ')'
            | '['
            | ']'
            | '{'
            | '}'
            | '<'
            | '>'
            | '\n'
            | '\r'
            | '“'
            | '”'
            | '«'
            | '»'
            | '、'
            | '。'
            | '「'
            | '」'
            | '『'
            | '』'
    )
}

/// Han, kana and Hangul (after NFKD, Hangul arrives as jamo).
fn is_written_without_spaces(c: char) -> bool {
    matches!(
        c,
        '\u{1100}'..='\u{11ff}'
            | '\u{3005}'
            | '\u{3040}'..='\u{30ff}'
            | '\u{3130}'..='\u{318f}'
            | '\u{31f0}'..='\u{31ff}'
            | '\u{3400}'..='\u{4dbf}'
            | '\u{4e00}'..='\u{9fff}'
            | '\u{ac00}'..='\u{d7a3}'
            | '\u{f900}'..='\u{faff}'
            | '\u{20000}'..='\u{2ffff}'
    )
}

/// Cyrillic and Greek lowercase letters that look like a Latin one.
fn latin_look_alike(c: char) -> Option<char> {
    Some(match c {
        'а' | 'α' => 'a',
        'в' => 'b',
        'с' => 'c',
        'ԁ' => 'd',
        'е' | 'ε' => 'e',
        'һ' | 'н' => 'h',
        'і' | 'ι' => 'i',
        'ј' => 'j',
        'к' | 'κ' => 'k',
        'м' => 'm',
        'о' | 'ο' => 'o',
        'р' | 'ρ' => 'p',
        'ԛ' => 'q',
        'ѕ' => 's',
        'т' | 'τ' => 't',
        'υ' => 'u',
        'ν' => 'v',
        'ԝ' => 'w',
        'х' | 'χ' => 'x',
        'у' => 'y',
        _ => return None,
    })
}

fn read_look_alikes_as_latin(word: String) -> String {
    let mixed = word.chars().any(|c| c.is_ascii_alphabetic())
        && word.chars().any(|c| latin_look_alike(c).is_some());
    if !mixed {
        return word;
    }
    word.chars()
        .map(|c| latin_look_alike(c).unwrap_or(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_accents_ligatures_and_widths() {
        assert_eq!(normalize("Gerhard  Richtér"), "gerhard richter");
        assert_eq!(normalize("Mœbius"), "moebius");
        assert_eq!(normalize("Simon Stålenhag"), "simon stalenhag");
        assert_eq!(normalize("Jakub Różalski"), "jakub rozalski");
        assert_eq!(normalize("Zdzisław Beksiński"), "zdzislaw beksinski");
        assert_eq!(normalize("ＢＡＮＫＳＹ"), "banksy");
        assert_eq!(normalize("Salvador Dalí"), "salvador dali");
    }

    #[test]
    fn punctuation_splits_and_invisibles_join() {
        assert_eq!(
            normalize("g.r.e.g_rutkowski-style"),
            "g r e g rutkowski style"
        );
        assert_eq!(normalize("Rutkowski's style"), "rutkowski s style");
        assert_eq!(normalize("bank\u{200b}sy"), "banksy");
        assert_eq!(normalize("  ...  "), "");
    }

    #[test]
    fn clause_breaks_are_marked() {
        let tokens = tokenize("alex, grey hair");
        let breaks: Vec<bool> = tokens.iter().map(|t| t.after_break).collect();
        assert_eq!(breaks, [false, true, false]);
        let tokens = tokenize("g.r.e.g");
        assert!(tokens.iter().all(|t| !t.after_break));
    }

    #[test]
    fn scripts_without_spaces_are_split_per_character() {
        assert_eq!(
            normalize("宮崎駿風のイラスト"),
            "宮 崎 駿 風 の イ ラ ス ト"
        );
        assert_eq!(normalize("宮崎・駿"), "宮 崎 駿");
        assert_eq!(normalize("banksy風"), "banksy 風");
    }

    #[test]
    fn look_alikes_are_latin_only_inside_mixed_words() {
        // "bаnksy" with a Cyrillic "а".
        assert_eq!(normalize("b\u{0430}nksy"), "banksy");
        assert_eq!(normalize("Кусама"), "кусама");
    }
}
