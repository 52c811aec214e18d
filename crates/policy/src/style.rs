//! The style policy: prompts that ask for the style of a living artist are refused; studio styles
//! ("Studio Ghibli style") and the styles of artists who have died ("in the style of Monet") are
//! allowed. It owns the schema of `data/artists.toml`, its validation, and the decision for one
//! prompt. It does not read files on a timer ([`crate::reload`]) nor map refusals to gRPC (the
//! gateway).
//!
//! Matching compares normalised words ([`crate::normalize`]), never raw substrings, so "art" can
//! never match inside "artgerm" nor "kaws" inside "claws". A full name, alias or transliteration
//! matches wherever its words appear in order — also with the two words of a two-word name swapped
//! ("Rutkowski Greg"), run together ("gregrutkowski") or one of them spelled out letter by letter
//! ("g.r.e.g rutkowski") — but never across a clause break. A surname matches on its own only where
//! the data says it is distinctive (`surname_alone = true`); otherwise only inside a style phrase
//! ("richter style", "in the style of richter", "by richter"), so that "a richter scale
//! earthquake poster" is not refused. Deceased artists are listed too: their longer names win
//! over a living artist's surname inside them ("hans richter style" is Hans Richter, who died).

use std::path::Path;

use serde::Deserialize;

use crate::normalize::{tokenize, Token};
use crate::PolicyError;

/// The name of the rule a [`Refusal`] comes from.
pub const LIVING_ARTIST_STYLE: &str = "living-artist-style";

/// The policy data shipped with Kiln, compiled in.
pub const SHIPPED_TOML: &str = include_str!("../data/artists.toml");

/// A normalised name shorter than this would match ordinary words ("ai", "oz").
const MIN_NAME_CHARS: usize = 3;

/// Words that, right before a name, ask for its style: "in the style of X", "by X", "à la X".
const STYLE_BEFORE: &[&[&str]] = &[
    &["style", "of"],
    &["styles", "of"],
    &["manner", "of"],
    &["vein", "of"],
    &["by"],
    &["a", "la"],
    &["alla"],
];

/// Words that, right after a name, ask for its style: "X style", "X-style", "X's style", "X-esque".
const STYLE_AFTER: &[&[&str]] = &[
    &["style"],
    &["styled"],
    &["styles"],
    &["s", "style"],
    &["esque"],
    &["inspired"],
];

/// Words that continue a list of names after a style phrase: "in the style of monet and X".
const LIST_JOINERS: &[&str] = &["and", "or", "plus", "x"];

/// One `[[artist]]` entry of the policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artist {
    /// The canonical name, reported in refusals; it always matches.
    pub name: String,
    /// Whether the artist is alive. Required, so that no entry is refused or allowed by default.
    pub living: bool,
    /// Other names and spellings in Latin script (pseudonyms, legal names); each always matches.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The name in other scripts (宮崎駿, Кусама); each always matches.
    #[serde(default)]
    pub transliterations: Vec<String>,
    /// The word people use alone for the artist, usually the family name ("Rutkowski").
    #[serde(default)]
    pub surname: Option<String>,
    /// Whether `surname` is distinctive enough to match anywhere; when false it matches only
    /// inside a style phrase ("richter style", "by richter").
    #[serde(default)]
    pub surname_alone: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default, rename = "artist")]
    artists: Vec<Artist>,
}

/// Why a prompt was refused, in terms a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "prompts may not ask for the style of a living artist ({artist}, matched as \"{matched}\"); \
     describe the style itself instead: medium, palette, brushwork, mood"
)]
pub struct Refusal {
    /// The rule that refused, e.g. [`LIVING_ARTIST_STYLE`].
    pub rule: &'static str,
    /// The artist's canonical name.
    pub artist: String,
    /// The name, alias or surname from the data that matched.
    pub matched: String,
}

/// The style policy compiled from its data: check prompts with [`StylePolicy::check`].
#[derive(Debug, Clone)]
pub struct StylePolicy {
    artists: Vec<Artist>,
    patterns: Vec<Pattern>,
}

/// A name to look for, as normalised words.
#[derive(Debug, Clone)]
struct Pattern {
    words: Vec<String>,
    artist: usize,
    /// The name as written in the data, for the refusal.
    written: String,
    /// False for a surname that matches only inside a style phrase.
    anywhere: bool,
}

/// A pattern found in a prompt, over prompt words `start..end`.
struct Found<'a> {
    start: usize,
    end: usize,
    pattern: &'a Pattern,
}

impl StylePolicy {
    /// Parses and validates policy data in the `data/artists.toml` schema.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text)?;
        Self::from_artists(file.artists)
    }

    /// Reads, parses and validates a policy file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The policy shipped with Kiln (`data/artists.toml`, compiled in).
    pub fn shipped() -> Self {
        Self::from_toml(SHIPPED_TOML)
            .expect("the shipped data/artists.toml is valid: a unit test parses it")
    }

    /// Validates entries and compiles their names into patterns.
    pub fn from_artists(artists: Vec<Artist>) -> Result<Self, PolicyError> {
        let mut patterns = Vec::new();
        // Normalised name -> the entry that wrote it, to catch one name given to two artists.
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for (index, artist) in artists.iter().enumerate() {
            let invalid = |reason: String| PolicyError::Invalid {
                index,
                name: artist.name.clone(),
                reason,
            };
            if artist.surname_alone && artist.surname.is_none() {
                return Err(invalid("surname_alone is set but surname is not".into()));
            }
            let full_names = std::iter::once(&artist.name)
                .chain(&artist.aliases)
                .chain(&artist.transliterations)
                .map(|name| (name, true));
            let surname = artist.surname.iter().map(|s| (s, artist.surname_alone));
            for (written, anywhere) in full_names.chain(surname) {
                let words: Vec<String> = tokenize(written).into_iter().map(|t| t.text).collect();
                let chars: usize = words.iter().map(|w| w.chars().count()).sum();
                if chars < MIN_NAME_CHARS {
                    return Err(invalid(format!(
                        "{written:?} is shorter than {MIN_NAME_CHARS} letters once normalised \
                         and would match ordinary words"
                    )));
                }
                let key = words.join(" ");
                match seen.insert(key, index) {
                    Some(other) if other != index => {
                        return Err(invalid(format!(
                            "{written:?} is also a name of {:?}",
                            artists[other].name
                        )));
                    }
                    _ => {}
                }
                if let [first, second] = words.as_slice() {
                    // Family name first: "Miyazaki Hayao", "Rutkowski, Greg" minus the comma.
                    patterns.push(Pattern {
                        words: vec![second.clone(), first.clone()],
                        artist: index,
                        written: written.clone(),
                        anywhere,
                    });
                }
                patterns.push(Pattern {
                    words,
                    artist: index,
                    written: written.clone(),
                    anywhere,
                });
            }
        }
        Ok(Self { artists, patterns })
    }

    /// The entries this policy was built from.
    pub fn artists(&self) -> &[Artist] {
        &self.artists
    }

    /// Refuses a prompt that asks for the style of a living artist.
    pub fn check(&self, prompt: &str) -> Result<(), Refusal> {
        let tokens = tokenize(prompt);
        // Every pattern is tried at every word: the data is a few hundred names and prompts are
        // short, and a miss costs one comparison of the first word.
        let mut found = Vec::new();
        for start in 0..tokens.len() {
            for pattern in &self.patterns {
                let Some(end) = match_at(&tokens, start, &pattern.words) else {
                    continue;
                };
                if pattern.anywhere || in_style_phrase(&tokens, start, end) {
                    found.push(Found {
                        start,
                        end,
                        pattern,
                    });
                }
            }
        }
        let living = |f: &Found| self.artists[f.pattern.artist].living;
        let refused = found
            .iter()
            .filter(|m| living(m))
            .filter(|m| {
                // A longer name of a deceased artist around it wins: "hans richter style".
                !found.iter().any(|d| {
                    !living(d)
                        && d.start <= m.start
                        && m.end <= d.end
                        && d.end - d.start > m.end - m.start
                })
            })
            .min_by_key(|m| (m.start, std::cmp::Reverse(m.end)));
        match refused {
            Some(m) => Err(Refusal {
                rule: LIVING_ARTIST_STYLE,
                artist: self.artists[m.pattern.artist].name.clone(),
                matched: m.pattern.written.clone(),
            }),
            None => Ok(()),
        }
    }
}

/// Where `words` match the prompt from word `start`, the end of the match. Besides word for word,
/// a prompt word may run several name words together ("gregrutkowski"), and a name word may be
/// spelled out in one-letter words ("g r e g"). No clause break may fall inside the match.
fn match_at(tokens: &[Token], start: usize, words: &[String]) -> Option<usize> {
    let mut i = start;
    let mut w = 0;
    while w < words.len() {
        let token = tokens.get(i)?;
        if i > start && token.after_break {
            return None;
        }
        if token.text == words[w] {
            i += 1;
            w += 1;
        } else if let Some(n) = words_run_together(&token.text, &words[w..]) {
            i += 1;
            w += n;
        } else if let Some(n) = spelled_out(tokens, start, i, &words[w]) {
            i += n;
            w += 1;
        } else {
            return None;
        }
    }
    Some(i)
}

/// How many of `words`, two or more, `text` is written as without spaces.
fn words_run_together(text: &str, words: &[String]) -> Option<usize> {
    let mut rest = text;
    for (n, word) in words.iter().enumerate() {
        rest = rest.strip_prefix(word.as_str())?;
        if rest.is_empty() {
            return (n > 0).then_some(n + 1);
        }
    }
    None
}

/// Whether `word` is spelled out in one-letter prompt words from word `i`; how many it takes.
fn spelled_out(tokens: &[Token], start: usize, i: usize, word: &str) -> Option<usize> {
    let letters = word.chars().count();
    if letters < 2 {
        return None;
    }
    for (k, letter) in word.chars().enumerate() {
        let token = tokens.get(i + k)?;
        let mut chars = token.text.chars();
        let one_letter = chars.next() == Some(letter) && chars.next().is_none();
        if !one_letter || (i + k > start && token.after_break) {
            return None;
        }
    }
    Some(letters)
}

/// Whether prompt words `start..end` stand in a phrase that asks for a style.
fn in_style_phrase(tokens: &[Token], start: usize, end: usize) -> bool {
    if style_phrase_ends_before(tokens, start) {
        return true;
    }
    let after = STYLE_AFTER.iter().any(|cue| {
        cue.iter().enumerate().all(|(k, word)| {
            tokens
                .get(end + k)
                .is_some_and(|t| t.text == *word && !t.after_break)
        })
    });
    if after {
        return true;
    }
    // A later name in a list: "in the style of monet and X", within one clause.
    let joined = start > 0 && LIST_JOINERS.contains(&tokens[start - 1].text.as_str());
    if !joined || tokens[start].after_break {
        return false;
    }
    let mut j = start - 1;
    while j > 0 && !tokens[j].after_break {
        if style_phrase_ends_before(tokens, j) {
            return true;
        }
        j -= 1;
    }
    false
}

/// Whether a [`STYLE_BEFORE`] phrase ends right before word `at`, with no clause break between.
fn style_phrase_ends_before(tokens: &[Token], at: usize) -> bool {
    STYLE_BEFORE.iter().any(|cue| {
        let Some(from) = at.checked_sub(cue.len()) else {
            return false;
        };
        cue.iter()
            .enumerate()
            .all(|(k, word)| tokens[from + k].text == *word)
            && tokens[from + 1..=at].iter().all(|t| !t.after_break)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt and the canonical name of the living artist it must be refused for, or `None`
    /// where it must be allowed.
    const CASES: &[(&str, Option<&str>)] = &[
        // Plain requests for living artists.
        (
            "a castle on a cliff by greg rutkowski",
            Some("Greg Rutkowski"),
        ),
        (
            "dragon, trending on artstation, greg rutkowski",
            Some("Greg Rutkowski"),
        ),
        (
            "pumpkins in the style of Yayoi Kusama",
            Some("Yayoi Kusama"),
        ),
        (
            "a swimming pool, david hockney style",
            Some("David Hockney"),
        ),
        (
            "graffiti of a girl with a balloon by Banksy",
            Some("Banksy"),
        ),
        (
            "a forest spirit, Hayao Miyazaki style",
            Some("Hayao Miyazaki"),
        ),
        (
            "smiling flowers by takashi murakami",
            Some("Takashi Murakami"),
        ),
        ("a cyberpunk everyday render, beeple", Some("Beeple")),
        ("portrait of a girl, loish", Some("Loish")),
        ("artgerm portrait of a warrior", Some("Artgerm")),
        ("a fantasy heroine by Ross Tran", Some("Ross Tran")),
        ("rossdraws style girl with a sword", Some("Ross Tran")),
        (
            "an abstract squeegee painting, gerhard richter",
            Some("Gerhard Richter"),
        ),
        ("a balloon dog sculpture by jeff koons", Some("Jeff Koons")),
        ("a companion figure, KAWS", Some("KAWS")),
        (
            "sunflower seeds installation by Ai Weiwei",
            Some("Ai Weiwei"),
        ),
        ("a dreamy poster by james jean", Some("James Jean")),
        (
            "a sky full of clouds, makoto shinkai",
            Some("Makoto Shinkai"),
        ),
        (
            "a final fantasy hero by yoshitaka amano",
            Some("Yoshitaka Amano"),
        ),
        (
            "a robot in a swedish field by simon stalenhag",
            Some("Simon Stålenhag"),
        ),
        ("superman painted by alex ross", Some("Alex Ross")),
        ("a comic cover by jim lee", Some("Jim Lee")),
        ("a demon in the style of mike mignola", Some("Mike Mignola")),
        ("a goddess in the style of wlop", Some("WLOP")),
        ("an anime girl, ilya kuvshinov", Some("Ilya Kuvshinov")),
        ("a tentacle horror by junji ito", Some("Junji Ito")),
        ("a skeletal bride, tim burton style", Some("Tim Burton")),
        ("a symmetrical hotel, wes anderson", Some("Wes Anderson")),
        // Surnames: distinctive ones alone, the others only in a style phrase.
        (
            "a dragon, rutkowski, highly detailed",
            Some("Greg Rutkowski"),
        ),
        ("polka dot pumpkin, kusama", Some("Yayoi Kusama")),
        ("a pool with a diver, hockney", Some("David Hockney")),
        ("a retro robot, stålenhag", Some("Simon Stålenhag")),
        ("a murakami-style flower", Some("Takashi Murakami")),
        ("in the style of richter", Some("Gerhard Richter")),
        (
            "a blurred photo painting, richter style",
            Some("Gerhard Richter"),
        ),
        ("a forest in the manner of miyazaki", Some("Hayao Miyazaki")),
        ("a bride by burton", Some("Tim Burton")),
        (
            "in the style of monet and murakami",
            Some("Takashi Murakami"),
        ),
        ("a page, amano-esque", Some("Yoshitaka Amano")),
        // Evasions: case, accents, ligatures, spacing, punctuation, possessives, phrasings.
        ("GREG RUTKOWSKI", Some("Greg Rutkowski")),
        ("greg  rutkowski", Some("Greg Rutkowski")),
        ("g.r.e.g rutkowski", Some("Greg Rutkowski")),
        ("greg_rutkowski", Some("Greg Rutkowski")),
        ("greg-rutkowski", Some("Greg Rutkowski")),
        ("gregrutkowski", Some("Greg Rutkowski")),
        ("Rutkowski, Greg", Some("Greg Rutkowski")),
        ("Grzegorz Rutkowski", Some("Greg Rutkowski")),
        ("Gerhard Richtér", Some("Gerhard Richter")),
        ("richter's style", Some("Gerhard Richter")),
        ("a portrait à la Richter", Some("Gerhard Richter")),
        ("Yayoi-Kusama-style dots", Some("Yayoi Kusama")),
        ("k.a.w.s figure", Some("KAWS")),
        ("Ｂａｎｋｓｙ", Some("Banksy")),
        ("bank\u{200b}sy mural", Some("Banksy")),
        ("b\u{0430}nksy mural", Some("Banksy")),
        ("inspired by Beeple", Some("Beeple")),
        ("Koons's balloon animals", Some("Jeff Koons")),
        ("Stalenhag", Some("Simon Stålenhag")),
        ("jakub rozalski mech", Some("Jakub Różalski")),
        ("Miyazaki Hayao", Some("Hayao Miyazaki")),
        // Transliterations.
        ("宮崎駿風のイラスト", Some("Hayao Miyazaki")),
        ("草間彌生のかぼちゃ", Some("Yayoi Kusama")),
        ("草間弥生 水玉", Some("Yayoi Kusama")),
        ("тыква в стиле Кусама", Some("Yayoi Kusama")),
        ("картина Грег Рутковский", Some("Greg Rutkowski")),
        ("뱅크시 스타일 그래피티", Some("Banksy")),
        ("村上隆風の花", Some("Takashi Murakami")),
        // Allowed: studios, movements, and artists who have died.
        ("studio ghibli style forest", None),
        ("a pixar style robot", None),
        ("anime style girl with a sword", None),
        ("van gogh style starry night", None),
        ("in the style of Monet", None),
        ("water lilies, claude monet", None),
        ("an art nouveau poster à la Mucha", None),
        ("the great wave by hokusai", None),
        ("葛飾北斎の波", None),
        ("a crown in the style of basquiat", None),
        ("a self portrait, Frida Kahlo style", None),
        ("a desert city by Mœbius", None),
        ("moebius style comic", None),
        ("hans richter style dada collage", None),
        ("bob ross style happy little trees", None),
        ("a pop art soup can, andy warhol", None),
        ("in the style of kim jung gi", None),
        ("the tyger, in the style of william blake", None),
        ("an illustrated poem by blake", None),
        (
            "a children's book illustration by quentin blake",
            Some("Quentin Blake"),
        ),
        ("鳥山明風のドラゴン", None),
        // Allowed: innocent prompts with common words.
        ("a red triangle above a blue star", None),
        ("a sunset in the style of a watercolor", None),
        ("a banking app icon", None),
        ("the art of war poster", None),
        ("a richter scale earthquake poster", None),
        ("a cat with sharp claws", None),
        ("a travel poster of miyazaki prefecture", None),
        ("a murakami novel on a table", None),
        ("an aquarium with amano shrimp", None),
        ("portrait of alex, grey hair, soft light", None),
        ("a bell tower at dusk", None),
        ("a lee jeans billboard", None),
        ("ross sea ice shelf photograph", None),
        ("a burton snowboard", None),
        ("a banksia flower", None),
        ("a koi pond in the rain", None),
        ("", None),
    ];

    #[test]
    fn prompts_get_the_expected_verdict() {
        assert!(CASES.len() >= 70, "only {} cases", CASES.len());
        let policy = StylePolicy::shipped();
        let wrong: Vec<String> = CASES
            .iter()
            .filter_map(|&(prompt, expected)| {
                let got = policy.check(prompt).err();
                let got_artist = got.as_ref().map(|r| r.artist.as_str());
                (got_artist != expected)
                    .then(|| format!("{prompt:?}: expected {expected:?}, got {got:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
    }

    #[test]
    fn a_refusal_names_the_rule_the_artist_and_the_match() {
        let refusal = StylePolicy::shipped()
            .check("a castle, rutkowski style")
            .unwrap_err();
        assert_eq!(refusal.rule, LIVING_ARTIST_STYLE);
        assert_eq!(refusal.artist, "Greg Rutkowski");
        assert_eq!(refusal.matched, "Rutkowski");
        let message = refusal.to_string();
        assert!(message.contains("living artist"), "{message}");
        assert!(message.contains("describe the style"), "{message}");
    }

    /// Words that must never match on their own.
    const COMMON_WORDS: &[&str] = &[
        "a", "an", "and", "art", "artist", "blue", "bell", "bob", "brown", "by", "cat", "claws",
        "dark", "digital", "dog", "dots", "gold", "gray", "green", "grey", "jean", "jeans", "king",
        "lee", "light", "like", "man", "miller", "moon", "of", "oil", "painting", "photo", "red",
        "rich", "richter", "ross", "scale", "sea", "star", "studio", "style", "sun", "the",
        "white", "wood", "young", "anime", "pixar", "ghibli", "disney", "manga", "jim", "alex",
        "frank", "john", "alan", "julie", "james", "tim", "wes", "burton", "anderson", "blake",
        "wiley", "hopper", "turner", "ito", "oda", "brom", "vallejo", "amano", "miyazaki",
        "murakami",
    ];

    #[test]
    fn shipped_names_are_well_formed_and_no_common_word_matches_alone() {
        let policy = StylePolicy::shipped();
        assert!(policy.artists().iter().filter(|a| a.living).count() >= 40);
        assert!(policy.artists().iter().filter(|a| !a.living).count() >= 20);
        for artist in policy.artists() {
            assert!(!artist.name.trim().is_empty());
        }
        for pattern in policy.patterns.iter().filter(|p| p.anywhere) {
            if let [word] = pattern.words.as_slice() {
                assert!(
                    !COMMON_WORDS.contains(&word.as_str()),
                    "{:?} would refuse every prompt with the word {word:?}",
                    policy.artists[pattern.artist].name
                );
            }
        }
        // Each common word on its own, and in a style phrase where it is a bare word.
        for word in COMMON_WORDS {
            assert_eq!(policy.check(word), Ok(()), "{word:?}");
            assert_eq!(policy.check(&format!("a {word} on a table")), Ok(()));
        }
    }

    fn invalid(text: &str) -> String {
        match StylePolicy::from_toml(text) {
            Err(PolicyError::Invalid { reason, .. }) => reason,
            other => panic!("expected an invalid entry, got {other:?}"),
        }
    }

    #[test]
    fn unsafe_or_ambiguous_data_is_rejected() {
        let short = invalid("[[artist]]\nname = \"Ai\"\nliving = true\n");
        assert!(short.contains("shorter"), "{short}");
        let alone =
            invalid("[[artist]]\nname = \"Jim Lee\"\nliving = true\nsurname_alone = true\n");
        assert!(alone.contains("surname_alone"), "{alone}");
        let twice = invalid(
            "[[artist]]\nname = \"Jean Giraud\"\nliving = false\naliases = [\"Moebius\"]\n\
             [[artist]]\nname = \"MŒBIUS\"\nliving = true\n",
        );
        assert!(twice.contains("Jean Giraud"), "{twice}");
        let unknown = StylePolicy::from_toml("[[artist]]\nname = \"X Y\"\nlivng = true\n");
        assert!(matches!(unknown, Err(PolicyError::Parse(_))), "{unknown:?}");
        let no_status = StylePolicy::from_toml("[[artist]]\nname = \"Xavier Yz\"\n");
        assert!(
            matches!(no_status, Err(PolicyError::Parse(_))),
            "{no_status:?}"
        );
    }

    #[test]
    fn loading_a_missing_file_names_it() {
        let err = StylePolicy::load("/nonexistent/artists.toml").unwrap_err();
        assert_eq!(err.error_type(), "io");
        assert!(
            err.to_string().contains("/nonexistent/artists.toml"),
            "{err}"
        );
    }
}
