//! The built-in corpus: deterministic, seeded text in a small invented
//! language, so `barnraise up`, the bench and the tests train on something
//! real without a download (and the project ships no text copied from
//! anywhere).
//!
//! The text has structure a small model can learn at several levels:
//! - spelling: a fixed lexicon of made-up words built from a syllable
//!   inventory, with inflections (plural `-i`, past tense `-en`);
//! - syntax: subject–verb–object sentences with determiners, adjectives,
//!   prepositional phrases, and number agreement (a plural subject takes the
//!   verb suffix `-ra`);
//! - semantics: every verb prefers objects of one noun class, and every noun
//!   class prefers certain adjectives, so co-occurrence carries information;
//! - sequence: counting runs in the invented number words, and small sums
//!   written in digits ("12 + 7 = 19"), which need the digits to line up.
//!
//! The lexicon is the same for every seed (one language); the seed only
//! picks which sentences are written, so shards cut from different seeds are
//! different samples of the same distribution.

use crate::rng::Rng;

/// Seed of the lexicon itself; changing it changes the language.
const LEXICON_SEED: u64 = 0x6261_726E_7261_6973; // "barnrais"

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th", "kr", "pl",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ou"];
const CODAS: &[&str] = &["", "", "", "n", "r", "s", "l", "m"];

const NOUN_CLASSES: usize = 4;
const NOUNS_PER_CLASS: usize = 12;
const ADJECTIVES: usize = 24;
const VERBS: usize = 20;
const NAMES: usize = 12;
const NUMBER_WORDS: usize = 10;

struct Lexicon {
    /// nouns[class][i]
    nouns: Vec<Vec<String>>,
    adjectives: Vec<String>,
    verbs: Vec<String>,
    /// The noun class each verb prefers as its object.
    verb_object_class: Vec<usize>,
    names: Vec<String>,
    numbers: Vec<String>,
}

fn word(rng: &mut Rng, syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(ONSETS[rng.below(ONSETS.len() as u64) as usize]);
        w.push_str(VOWELS[rng.below(VOWELS.len() as u64) as usize]);
        w.push_str(CODAS[rng.below(CODAS.len() as u64) as usize]);
    }
    w
}

impl Lexicon {
    fn build() -> Lexicon {
        let mut rng = Rng::new(LEXICON_SEED);
        let mut seen = std::collections::HashSet::new();
        // Every word distinct, so the language has no accidental homonyms.
        let mut fresh = |rng: &mut Rng, syllables: usize| loop {
            let w = word(rng, syllables);
            if seen.insert(w.clone()) {
                return w;
            }
        };
        let nouns = (0..NOUN_CLASSES)
            .map(|_| {
                (0..NOUNS_PER_CLASS)
                    .map(|i| fresh(&mut rng, 1 + i % 2))
                    .collect()
            })
            .collect();
        let adjectives = (0..ADJECTIVES)
            .map(|i| fresh(&mut rng, 2 + i % 2))
            .collect();
        let verbs = (0..VERBS).map(|i| fresh(&mut rng, 1 + i % 2)).collect();
        let verb_object_class = (0..VERBS).map(|i| i % NOUN_CLASSES).collect();
        let mut names: Vec<String> = (0..NAMES).map(|_| fresh(&mut rng, 2)).collect();
        for name in &mut names {
            // Names are capitalised: another regularity to pick up.
            let mut chars = name.chars();
            if let Some(first) = chars.next() {
                *name = first.to_ascii_uppercase().to_string() + chars.as_str();
            }
        }
        let numbers = (0..NUMBER_WORDS).map(|_| fresh(&mut rng, 1)).collect();
        Lexicon {
            nouns,
            adjectives,
            verbs,
            verb_object_class,
            names,
            numbers,
        }
    }

    fn pick<'a>(&self, rng: &mut Rng, words: &'a [String]) -> &'a str {
        &words[rng.below(words.len() as u64) as usize]
    }

    /// An adjective that suits `class`: most of the time one of the six the
    /// class prefers, sometimes any.
    fn adjective(&self, rng: &mut Rng, class: usize) -> &str {
        if rng.below(5) < 4 {
            let per_class = ADJECTIVES / NOUN_CLASSES;
            &self.adjectives[class * per_class + rng.below(per_class as u64) as usize]
        } else {
            self.pick(rng, &self.adjectives)
        }
    }

    /// "the big stone", "a stonei" ...; returns the phrase and whether it is plural.
    fn noun_phrase(&self, rng: &mut Rng, class: usize, out: &mut String) -> bool {
        let plural = rng.below(3) == 0;
        out.push_str(if plural {
            "the "
        } else if rng.below(2) == 0 {
            "a "
        } else {
            "the "
        });
        if rng.below(2) == 0 {
            out.push_str(self.adjective(rng, class));
            out.push(' ');
        }
        out.push_str(self.pick(rng, &self.nouns[class]));
        if plural {
            out.push('i');
        }
        plural
    }

    fn sentence(&self, rng: &mut Rng, out: &mut String) {
        let verb = rng.below(VERBS as u64) as usize;
        // Subject: a name, or a noun phrase of any class.
        let plural = if rng.below(3) == 0 {
            out.push_str(self.pick(rng, &self.names));
            false
        } else {
            let class = rng.below(NOUN_CLASSES as u64) as usize;
            let start = out.len();
            let plural = self.noun_phrase(rng, class, out);
            // Sentence-initial capital.
            if let Some(first) = out[start..].chars().next() {
                out.replace_range(start..start + 1, &first.to_ascii_uppercase().to_string());
            }
            plural
        };
        out.push(' ');
        out.push_str(&self.verbs[verb]);
        if rng.below(4) == 0 {
            out.push_str("en");
        }
        if plural {
            out.push_str("ra");
        }
        out.push(' ');
        // Object: usually from the verb's preferred class.
        let class = if rng.below(10) < 8 {
            self.verb_object_class[verb]
        } else {
            rng.below(NOUN_CLASSES as u64) as usize
        };
        self.noun_phrase(rng, class, out);
        if rng.below(3) == 0 {
            out.push_str(" vo ");
            let place = rng.below(NOUN_CLASSES as u64) as usize;
            self.noun_phrase(rng, place, out);
        }
        out.push('.');
    }

    fn counting(&self, rng: &mut Rng, out: &mut String) {
        let start = rng.below(NUMBER_WORDS as u64 - 3) as usize;
        let len = 3 + rng.below((NUMBER_WORDS - start - 2) as u64) as usize;
        out.push_str("Kai:");
        for number in &self.numbers[start..start + len] {
            out.push(' ');
            out.push_str(number);
        }
        out.push('.');
    }

    fn sum(rng: &mut Rng, out: &mut String) {
        let a = rng.below(50);
        let b = rng.below(50);
        out.push_str(&format!("{a} + {b} = {}.", a + b));
    }
}

/// `bytes` bytes of corpus text for `seed` (ASCII, so any prefix is valid
/// UTF-8). Same seed and length, same text, on every machine.
pub fn generate(seed: u64, bytes: usize) -> String {
    let lexicon = Lexicon::build();
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        // A paragraph: a few lines of one kind of text.
        let lines = 2 + rng.below(4);
        let kind = rng.below(10);
        for line in 0..lines {
            if line > 0 {
                out.push(' ');
            }
            match kind {
                0 => lexicon.counting(&mut rng, &mut out),
                1 => Lexicon::sum(&mut rng, &mut out),
                _ => lexicon.sentence(&mut rng, &mut out),
            }
        }
        out.push('\n');
    }
    out.truncate(bytes);
    out
}

/// The corpus's three kinds of paragraph as separate texts of at least
/// `bytes` bytes each: counting ("Kai: one two three."), sums ("3 + 4 =
/// 7.") and prose. Shards of one kind each make a corpus of distinct
/// genres, where what a node trained on shows in its update
/// (docs/security.md, "The usefulness probe").
pub fn genres(bytes: usize) -> [String; 3] {
    let mut out = [String::new(), String::new(), String::new()];
    let mut seed = 1;
    while out.iter().any(|g| g.len() < bytes) {
        for paragraph in generate(seed, 1 << 20).lines() {
            let genre = if paragraph.starts_with("Kai:") {
                0
            } else if paragraph.contains(" + ") {
                1
            } else {
                2
            };
            if out[genre].len() < bytes {
                out[genre].push_str(paragraph);
                out[genre].push('\n');
            }
        }
        seed += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genres_are_separate_and_long_enough() {
        let [counting, sums, prose] = genres(20_000);
        assert!(counting.len() >= 20_000 && sums.len() >= 20_000 && prose.len() >= 20_000);
        assert!(counting.lines().all(|l| l.starts_with("Kai:")));
        assert!(sums.lines().all(|l| l.contains(" = ")));
        assert!(!prose.contains(" + ") && !prose.contains("Kai:"));
    }

    #[test]
    fn corpus_is_deterministic_and_seeded() {
        let a = generate(1, 5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a, generate(1, 5000));
        assert_ne!(a, generate(2, 5000));
        // A longer request extends the same stream.
        assert!(generate(1, 8000).starts_with(&a));
        assert!(a.is_ascii());
    }

    #[test]
    fn corpus_has_repeated_structure() {
        // A small lexicon: the text reuses few distinct words.
        let text = generate(9, 20_000);
        let words: std::collections::HashSet<&str> = text
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        assert!(words.len() < 400, "{} distinct words", words.len());
        assert!(text.contains(" = "));
        assert!(text.contains("Kai:"));
    }
}
