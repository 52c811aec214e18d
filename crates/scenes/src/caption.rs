//! Captions: the English text of a [`SceneSpec`] and its parser, so that an evaluation can take a
//! held-out prompt as text. The grammar is small and regular on purpose (a small model must learn
//! it):
//!
//! ```text
//! caption  = object                                    "a red circle"
//!          | object relation object                    "a red triangle above a blue star"
//!          | placed ("," placed)* "and" placed         "a red circle top left, ... and a ..."
//!          | "a" n "by" n "grid" ":" cell ("," cell)*  "a 3 by 3 grid: red circle, empty, ..."
//!          | "a sign that says" word                   "a sign that says \"KILN\""
//!          | object ("above" | "below") "the word" word "a blue star above the word \"OPEN\""
//! object   = ("a" | "an") colour shape
//! placed   = object ("top" | "bottom") ("left" | "right")
//! relation = "above" | "below" | "left of" | "right of"
//! cell     = colour shape | "empty"                    n * n of them, in reading order
//! word     = '"' 1 to 8 capital letters and digits '"'
//! ```
//!
//! The parser folds case (a word's letters are read as capitals), ignores extra spaces and a final
//! full stop, and accepts any of ",", "and" or ", and" between placed objects; a word it cannot
//! use is named in the error.

use crate::font::CHARSET;
use crate::scene::{validate_word, Colour, ObjectSpec, Place, SceneSpec, Shape, WordSpec};
use crate::{SceneError, SceneSet};

impl SceneSpec {
    /// The caption in its one canonical form, which [`parse_caption`] reads back.
    pub fn caption(&self) -> String {
        if let Some(word) = self.word() {
            return match self.objects() {
                [object] => format!(
                    "{} {} the word \"{}\"",
                    object_phrase(object),
                    if word.place == Place::Bottom {
                        "above"
                    } else {
                        "below"
                    },
                    word.text
                ),
                _ => format!("a sign that says \"{}\"", word.text),
            };
        }
        if let Some(Place::Cell { grid, .. }) = self.objects().first().map(|o| o.place) {
            let cells: Vec<String> = Place::cells(grid)
                .map(
                    |cell| match self.objects().iter().find(|object| object.place == cell) {
                        Some(object) => format!("{} {}", object.colour.name(), object.shape.name()),
                        None => "empty".to_string(),
                    },
                )
                .collect();
            return format!("a {grid} by {grid} grid: {}", cells.join(", "));
        }
        match self.objects() {
            [single] => object_phrase(single),
            [subject, reference] => format!(
                "{} {} {}",
                object_phrase(subject),
                relation_words(subject.place),
                object_phrase(reference)
            ),
            objects => {
                let placed: Vec<String> = objects
                    .iter()
                    .map(|object| {
                        format!("{} {}", object_phrase(object), place_words(object.place))
                    })
                    .collect();
                match placed.split_last() {
                    Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                    None => String::new(),
                }
            }
        }
    }
}

/// Every word and sign the grammar writes for classic scenes (and the full stop the parser
/// accepts): the vocabulary a model that reads words needs for these captions.
pub fn caption_words() -> Vec<&'static str> {
    caption_words_in(SceneSet::Classic)
}

/// The words and signs of `set`'s captions. The classic list is the one kiln-shapes 0.x was
/// trained with, unchanged; the full set's adds its colours and shapes, the grid and word
/// phrases, and the characters a word may hold, as capitals (a tokenizer reads a quoted word
/// letter by letter, so "A" inside quotes is not the article "a").
pub fn caption_words_in(set: SceneSet) -> Vec<&'static str> {
    let mut words = vec!["a", "an"];
    words.extend(Colour::CLASSIC.map(Colour::name));
    words.extend(Shape::CLASSIC.map(Shape::name));
    words.extend([
        "above", "below", "left", "right", "of", "top", "bottom", "and", ",", ".",
    ]);
    if set == SceneSet::Full {
        words.extend(
            Colour::ALL[Colour::CLASSIC.len()..]
                .iter()
                .map(|c| c.name()),
        );
        words.extend(Shape::ALL[Shape::CLASSIC.len()..].iter().map(|s| s.name()));
        words.extend([
            "by", "grid", ":", "empty", "sign", "that", "says", "the", "word", "\"",
        ]);
        words.extend((0..CHARSET.len()).map(|i| &CHARSET[i..i + 1]));
    }
    words
}

fn object_phrase(object: &ObjectSpec) -> String {
    let article = if object.colour == Colour::Orange {
        "an"
    } else {
        "a"
    };
    format!("{article} {} {}", object.colour.name(), object.shape.name())
}

/// The relation that puts the subject in `place` (the reference takes the opposite half).
fn relation_words(place: Place) -> &'static str {
    match place {
        Place::Top => "above",
        Place::Bottom => "below",
        Place::Left => "left of",
        Place::Right => "right of",
        // Unreachable for a valid two-object spec; kept total rather than panicking.
        _ => "and",
    }
}

fn place_words(place: Place) -> &'static str {
    match place {
        Place::TopLeft => "top left",
        Place::TopRight => "top right",
        Place::BottomLeft => "bottom left",
        Place::BottomRight => "bottom right",
        // Unreachable for a valid spec of three or four objects.
        _ => "",
    }
}

const EXPECT_ARTICLE: &str = "\"a\" or \"an\"";
const EXPECT_COLOUR: &str =
    "a colour (red, green, blue, yellow, purple, orange, cyan, pink, brown)";
const EXPECT_SHAPE: &str = "a shape (circle, square, triangle, star, diamond, cross)";
const EXPECT_AFTER_OBJECT: &str =
    "a relation (above, below, left of, right of), a place (top left, ...) or the end";
const EXPECT_VERTICAL: &str = "\"top\" or \"bottom\"";
const EXPECT_HORIZONTAL: &str = "\"left\" or \"right\"";
const EXPECT_OF: &str = "\"of\"";
const EXPECT_END: &str = "the end of the caption";
const EXPECT_SEPARATOR: &str = "\",\", \"and\" or the end";

const EXPECT_QUOTE: &str = "a word in double quotes, once";
const EXPECT_GRID_SIZE: &str = "a grid size (3 or 4)";
const EXPECT_CELL: &str = "a cell (a colour and a shape, or \"empty\")";

/// Reads a caption back into the spec it states.
pub fn parse_caption(text: &str) -> Result<SceneSpec, SceneError> {
    let text = text.trim().trim_end_matches('.');
    // A quoted word keeps its characters: split it off before the rest is folded to lower case.
    let (text, quoted) = match text.split('"').collect::<Vec<_>>()[..] {
        [whole] => (whole.to_string(), None),
        [before, quoted, after] if after.trim().is_empty() => {
            (before.to_string(), Some(quoted.trim().to_uppercase()))
        }
        _ => {
            return Err(SceneError::UnexpectedWord {
                word: "\"".into(),
                position: 0,
                expected: EXPECT_QUOTE,
            })
        }
    };
    let lowered = text.to_lowercase();
    let spaced = lowered.replace(',', " , ").replace(':', " : ");
    let mut words = Words {
        words: spaced.split_whitespace().collect(),
        next: 0,
    };
    if let Some(quoted) = quoted {
        return words.word_caption(quoted);
    }
    if words
        .words
        .get(1)
        .is_some_and(|w| w.chars().all(|c| c.is_ascii_digit()))
    {
        return words.grid();
    }

    let first = words.object()?;
    let objects = match words.peek() {
        None => vec![ObjectSpec {
            place: Place::Anywhere,
            ..first
        }],
        Some("above" | "below" | "left" | "right") => {
            let (subject, reference) = words.relation()?;
            let second = words.object()?;
            words.end()?;
            vec![
                ObjectSpec {
                    place: subject,
                    ..first
                },
                ObjectSpec {
                    place: reference,
                    ..second
                },
            ]
        }
        Some("top" | "bottom") => {
            let mut objects = vec![ObjectSpec {
                place: words.place()?,
                ..first
            }];
            loop {
                match words.peek() {
                    None => break,
                    Some("," | "and") => {
                        words.advance();
                        if words.peek() == Some("and") {
                            words.advance();
                        }
                    }
                    Some(_) => return Err(words.unexpected(EXPECT_SEPARATOR)),
                }
                let object = words.object()?;
                objects.push(ObjectSpec {
                    place: words.place()?,
                    ..object
                });
            }
            objects
        }
        Some(_) => return Err(words.unexpected(EXPECT_AFTER_OBJECT)),
    };
    SceneSpec::new(objects)
}

/// A cursor over the caption's words.
struct Words<'a> {
    words: Vec<&'a str>,
    next: usize,
}

impl Words<'_> {
    fn peek(&self) -> Option<&str> {
        self.words.get(self.next).copied()
    }

    fn advance(&mut self) {
        self.next += 1;
    }

    /// The error for the word under the cursor (or for the missing one).
    fn unexpected(&self, expected: &'static str) -> SceneError {
        match self.peek() {
            Some(word) => SceneError::UnexpectedWord {
                word: word.to_string(),
                position: self.next + 1,
                expected,
            },
            None => SceneError::UnexpectedEnd { expected },
        }
    }

    /// Takes the next word if `parse` accepts it.
    fn take<T>(
        &mut self,
        expected: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, SceneError> {
        let value = self.peek().and_then(parse);
        match value {
            Some(value) => {
                self.advance();
                Ok(value)
            }
            None => Err(self.unexpected(expected)),
        }
    }

    /// The words before a quoted word: `"a sign that says"`, or an object, `above` or `below`,
    /// and `"the word"`.
    fn word_caption(&mut self, text: String) -> Result<SceneSpec, SceneError> {
        validate_word(&text)?;
        if self.peek() == Some("a") && self.words.get(1) == Some(&"sign") {
            for expected in ["a", "sign", "that", "says"] {
                self.keyword(expected)?;
            }
            self.end()?;
            let word = WordSpec {
                text,
                place: Place::Anywhere,
            };
            return SceneSpec::with_word(Vec::new(), Some(word));
        }
        let object = self.object()?;
        let (object_place, word_place) = self.take("\"above\" or \"below\"", |w| match w {
            "above" => Some((Place::Top, Place::Bottom)),
            "below" => Some((Place::Bottom, Place::Top)),
            _ => None,
        })?;
        self.keyword("the")?;
        self.keyword("word")?;
        self.end()?;
        let object = ObjectSpec {
            place: object_place,
            ..object
        };
        let word = WordSpec {
            text,
            place: word_place,
        };
        SceneSpec::with_word(vec![object], Some(word))
    }

    /// `"a" n "by" n "grid" ":"` and its `n * n` cells.
    fn grid(&mut self) -> Result<SceneSpec, SceneError> {
        self.keyword("a")?;
        let size = |w: &str| w.parse::<u8>().ok().filter(|n| (3..=4).contains(n));
        let grid = self.take(EXPECT_GRID_SIZE, size)?;
        self.keyword("by")?;
        let columns = self.take(EXPECT_GRID_SIZE, size)?;
        if columns != grid {
            return Err(SceneError::layout(format!(
                "a grid is square, not {grid} by {columns}"
            )));
        }
        self.keyword("grid")?;
        self.keyword(":")?;
        let mut objects = Vec::new();
        for (i, place) in Place::cells(grid).enumerate() {
            if i > 0 {
                self.keyword(",")?;
            }
            if self.peek() == Some("empty") {
                self.advance();
                continue;
            }
            let colour = self.take(EXPECT_CELL, Colour::from_name)?;
            let shape = self.take(EXPECT_SHAPE, Shape::from_name)?;
            objects.push(ObjectSpec {
                colour,
                shape,
                place,
            });
        }
        self.end()?;
        if objects.is_empty() {
            return Err(SceneError::layout("a grid holds at least one object"));
        }
        SceneSpec::new(objects)
    }

    /// The word `expected`, exactly.
    fn keyword(&mut self, expected: &'static str) -> Result<(), SceneError> {
        self.take(expected, |word| (word == expected).then_some(()))
    }

    /// `("a" | "an") colour shape`, with the place left `Anywhere` for the caller to set.
    fn object(&mut self) -> Result<ObjectSpec, SceneError> {
        self.take(EXPECT_ARTICLE, |word| {
            matches!(word, "a" | "an").then_some(())
        })?;
        let colour = self.take(EXPECT_COLOUR, Colour::from_name)?;
        let shape = self.take(EXPECT_SHAPE, Shape::from_name)?;
        Ok(ObjectSpec {
            colour,
            shape,
            place: Place::Anywhere,
        })
    }

    /// A relation word (or two), as the places of the subject and of the reference.
    fn relation(&mut self) -> Result<(Place, Place), SceneError> {
        let places = self.take(EXPECT_AFTER_OBJECT, |word| match word {
            "above" => Some((Place::Top, Place::Bottom)),
            "below" => Some((Place::Bottom, Place::Top)),
            "left" => Some((Place::Left, Place::Right)),
            "right" => Some((Place::Right, Place::Left)),
            _ => None,
        })?;
        if matches!(places.0, Place::Left | Place::Right) {
            self.take(EXPECT_OF, |word| (word == "of").then_some(()))?;
        }
        Ok(places)
    }

    /// `("top" | "bottom") ("left" | "right")`.
    fn place(&mut self) -> Result<Place, SceneError> {
        let top = self.take(EXPECT_VERTICAL, |word| match word {
            "top" => Some(true),
            "bottom" => Some(false),
            _ => None,
        })?;
        let left = self.take(EXPECT_HORIZONTAL, |word| match word {
            "left" => Some(true),
            "right" => Some(false),
            _ => None,
        })?;
        Ok(match (top, left) {
            (true, true) => Place::TopLeft,
            (true, false) => Place::TopRight,
            (false, true) => Place::BottomLeft,
            (false, false) => Place::BottomRight,
        })
    }

    fn end(&self) -> Result<(), SceneError> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.unexpected(EXPECT_END)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ObjectCountMix, SceneSampler};
    use proptest::prelude::*;

    fn object(colour: Colour, shape: Shape, place: Place) -> ObjectSpec {
        ObjectSpec {
            colour,
            shape,
            place,
        }
    }

    #[test]
    fn the_caption_words_cover_every_caption() {
        let words = caption_words();
        for scene in SceneSampler::new(5).take(2000) {
            let caption = scene.caption();
            for word in caption.replace(',', " , ").split_whitespace() {
                assert!(words.contains(&word), "{word:?} of {caption:?}");
            }
        }
    }

    #[test]
    fn captions_read_as_english() {
        let single = SceneSpec::new(vec![object(Colour::Red, Shape::Circle, Place::Anywhere)]);
        assert_eq!(single.unwrap().caption(), "a red circle");

        let pair = SceneSpec::new(vec![
            object(Colour::Orange, Shape::Triangle, Place::Right),
            object(Colour::Blue, Shape::Star, Place::Left),
        ]);
        assert_eq!(
            pair.unwrap().caption(),
            "an orange triangle right of a blue star"
        );

        let grid = SceneSpec::new(vec![
            object(Colour::Red, Shape::Circle, Place::TopLeft),
            object(Colour::Blue, Shape::Star, Place::TopRight),
            object(Colour::Green, Shape::Square, Place::BottomLeft),
        ]);
        assert_eq!(
            grid.unwrap().caption(),
            "a red circle top left, a blue star top right and a green square bottom left"
        );
    }

    #[test]
    fn parsing_tolerates_case_spaces_and_punctuation() {
        let canonical = parse_caption("a yellow square below a purple circle").unwrap();
        let sloppy = parse_caption("  A Yellow  SQUARE below an   purple circle. ").unwrap();
        assert_eq!(canonical, sloppy);

        let grid = "a red circle top left, a blue star top right and a green square bottom left";
        let oxford = "a red circle top left ,a blue star top right, and a green square bottom left";
        assert_eq!(parse_caption(grid).unwrap(), parse_caption(oxford).unwrap());
    }

    #[test]
    fn parse_errors_name_the_offending_word() {
        let err = parse_caption("a grey circle").unwrap_err();
        assert_eq!(
            err,
            SceneError::UnexpectedWord {
                word: "grey".into(),
                position: 2,
                expected: EXPECT_COLOUR,
            }
        );
        assert!(err.to_string().contains("\"grey\""), "{err}");

        let err = parse_caption("a red hexagon above a blue star").unwrap_err();
        assert!(err.to_string().contains("\"hexagon\""), "{err}");

        let err = parse_caption("a red circle beside a blue star").unwrap_err();
        assert!(err.to_string().contains("\"beside\""), "{err}");

        let err = parse_caption("a red circle left a blue star").unwrap_err();
        assert!(err.to_string().contains("\"a\" (word 5)"), "{err}");

        let err = parse_caption("a red circle top middle, a blue star top right").unwrap_err();
        assert!(err.to_string().contains("\"middle\""), "{err}");

        let err = parse_caption("a red circle above").unwrap_err();
        assert_eq!(
            err,
            SceneError::UnexpectedEnd {
                expected: EXPECT_ARTICLE
            }
        );
        assert_eq!(err.error_type(), "parse");
    }

    #[test]
    fn captions_outside_the_layout_scheme_are_refused() {
        // Two objects are related, not placed in cells; cells are not shared.
        for text in [
            "a red circle top left and a blue star bottom right",
            "a red circle top left, a blue star top left and a green square bottom left",
        ] {
            let err = parse_caption(text).unwrap_err();
            assert_eq!(err.error_type(), "layout", "{text}: {err}");
        }
    }

    #[test]
    fn full_set_captions_read_back_and_use_only_its_words() {
        let words = caption_words_in(SceneSet::Full);
        let mix = ObjectCountMix::uniform(SceneSet::Full).with_words(4);
        let sampler = SceneSampler::for_set(SceneSet::Full, 9, mix).unwrap();
        for scene in sampler.take(1000) {
            let caption = scene.caption();
            assert_eq!(parse_caption(&caption), Ok(scene.spec()), "{caption}");
            let spaced = caption.replace(['"', ',', ':'], " ");
            for word in spaced.split_whitespace() {
                let known =
                    words.contains(&word) || word.chars().all(|c| words.contains(&&*c.to_string()));
                assert!(known, "{word:?} of {caption:?}");
            }
        }
        let sign = parse_caption("A sign that says \"kiln\".").unwrap();
        assert_eq!(sign.word().map(|w| w.text.as_str()), Some("KILN"));
        assert_eq!(sign.caption(), "a sign that says \"KILN\"");
        for bad in [
            "a sign that says \"TOO-LONG!\"",
            "a sign that says \"ABCDEFGHI\"",
            "a red star above the word \"OK",
            "a 3 by 4 grid: red star",
            "a 3 by 3 grid: red star, empty",
        ] {
            assert!(parse_caption(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn captions_round_trip(seed in any::<u64>(), n_objects in 1usize..=4) {
            let mix = ObjectCountMix::only(n_objects).unwrap();
            let scene = SceneSampler::with_mix(seed, mix).unwrap().next().unwrap();
            let spec = scene.spec();
            prop_assert_eq!(parse_caption(&scene.caption()), Ok(spec.clone()));
            // Case and spacing do not matter.
            let shouted = scene.caption().to_uppercase().replace(' ', "   ");
            prop_assert_eq!(parse_caption(&shouted), Ok(spec));
        }
    }
}
