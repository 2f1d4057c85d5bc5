//! Scorers: functions from a generated response to a number, higher is better.
//!
//! They label the synthetic preference pairs the demo ARMs are trained on (the base model
//! samples K continuations per prompt; the best and worst by a scorer become a pair) and
//! later judge guided generation. A *different* scorer than the labeller (e.g. AFINN
//! instead of VADER) checks that an ARM learned the preference rather than the
//! labeller's quirks.
//!
//! | spec              | scorer                                                          |
//! |-------------------|-----------------------------------------------------------------|
//! | `sentiment`       | [`SentimentScorer`] on VADER (`DATA_DIR/vader_lexicon.txt`)     |
//! | `sentiment-afinn` | [`SentimentScorer`] on AFINN-165 (`DATA_DIR/AFINN-en-165.txt`)  |
//! | `sentiment-once`  | VADER with each listed word or phrase counted once per text     |
//! | `concise`         | [`ConciseScorer`]: fewer tokens for a complete answer           |
//! | `length`          | [`LengthScorer`]: minus the response's tokens (concise, averaged) |
//! | `wordlist:FILE`   | [`WordlistScorer`]: minus the number of listed words in the text |
//!
//! The lexicon files come from package registries (`./build.sh fetch-data` puts them in
//! `models/data/`); nothing here touches the network.
//!
//! ## Words
//!
//! Text is split into words the same way for lexicon keys, word lists and responses
//! ([`words`]): a word is a maximal run of alphanumeric characters, lower-cased, that may
//! contain an apostrophe (`'` or `’`) or a hyphen *between* two alphanumerics (`don't`,
//! `well-known`). Everything else is a separator, so punctuation is stripped and case is
//! ignored. The clause punctuation `. , ; : ! ?` additionally ends a negation scope.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Something that rates a response. Higher is better.
pub trait Scorer: Send + Sync {
    fn name(&self) -> &str;
    /// Higher is better. `tokens` is the response length in tokens, `complete` whether it
    /// ended with EOS.
    fn score(&self, text: &str, tokens: usize, complete: bool) -> f64;
}

impl std::fmt::Debug for dyn Scorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scorer({})", self.name())
    }
}

/// The scorer names [`scorer_from_spec`] accepts.
pub const SCORER_SPECS: &str =
    "sentiment, sentiment-afinn, sentiment-once, concise, length, wordlist:FILE";

/// Builds a scorer from its spec (see the module docs). Lexicons are read from
/// `data_dir`; the `FILE` of `wordlist:FILE` is taken as given (relative paths are
/// relative to the working directory).
pub fn scorer_from_spec(spec: &str, data_dir: &Path) -> Result<Box<dyn Scorer>> {
    let spec = spec.trim();
    match spec {
        "sentiment" => {
            let lexicon = Lexicon::vader(&data_dir.join(VADER_FILE))?;
            Ok(Box::new(SentimentScorer::new("sentiment", lexicon)))
        }
        "sentiment-afinn" => {
            let lexicon = Lexicon::afinn(&data_dir.join(AFINN_FILE))?;
            Ok(Box::new(SentimentScorer::new("sentiment-afinn", lexicon)))
        }
        "sentiment-once" => {
            let lexicon = Lexicon::vader(&data_dir.join(VADER_FILE))?;
            Ok(Box::new(
                SentimentScorer::new("sentiment-once", lexicon).counting_repeats_once(),
            ))
        }
        "concise" => Ok(Box::new(ConciseScorer)),
        "length" => Ok(Box::new(LengthScorer)),
        _ => match spec.strip_prefix("wordlist:") {
            Some("") => Err(Error::Request(
                "scorer `wordlist:` needs a file: `wordlist:FILE`".into(),
            )),
            Some(file) => Ok(Box::new(WordlistScorer::from_file(Path::new(file))?)),
            None => Err(Error::Request(format!(
                "unknown scorer `{spec}`: expected one of {SCORER_SPECS}"
            ))),
        },
    }
}

/// File name of the VADER lexicon inside the data directory.
pub const VADER_FILE: &str = "vader_lexicon.txt";
/// File name of the AFINN-165 English lexicon inside the data directory.
pub const AFINN_FILE: &str = "AFINN-en-165.txt";

// ---------------------------------------------------------------------------------------
// Words

/// One word of a text, and whether clause punctuation (`. , ; : ! ?`) follows it before
/// the next word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    pub ends_clause: bool,
}

fn is_joiner(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}' | '-')
}

fn is_clause_punct(c: char) -> bool {
    matches!(c, '.' | ',' | ';' | ':' | '!' | '?')
}

/// Splits `text` into lower-cased words with punctuation stripped (see the module docs).
/// The curly apostrophe `’` is normalised to `'`.
pub fn words(text: &str) -> Vec<Word> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<Word> = Vec::new();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else if is_joiner(c)
            && !cur.is_empty()
            && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric())
        {
            cur.push(if c == '-' { '-' } else { '\'' });
        } else {
            if !cur.is_empty() {
                out.push(Word {
                    text: std::mem::take(&mut cur),
                    ends_clause: false,
                });
            }
            if is_clause_punct(c) {
                if let Some(last) = out.last_mut() {
                    last.ends_clause = true;
                }
            }
        }
    }
    if !cur.is_empty() {
        out.push(Word {
            text: cur,
            ends_clause: false,
        });
    }
    out
}

/// The words of `text` joined by single spaces: the form lexicon keys and word-list
/// entries are stored in.
fn normalize_key(text: &str) -> String {
    words(text)
        .into_iter()
        .map(|w| w.text)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a word flips the valence of what follows: `not`, `no`, `never`, `cannot`, or
/// any word ending in `n't` (`isn't`, `don't`, a lone `n't`).
pub fn is_negator(word: &str) -> bool {
    matches!(word, "not" | "no" | "never" | "cannot") || word.ends_with("n't")
}

// ---------------------------------------------------------------------------------------
// Lexicon

/// A sentiment lexicon: word or phrase → valence (VADER: about −4..4, AFINN: −5..5).
///
/// Keys are stored as their [`words`] joined by single spaces. Entries whose key is not
/// already in that form apart from case (emoticons such as `:)` or `:D`, which the
/// tokenizer could never produce) are dropped; when two entries normalise to the same key
/// the first one in the file wins.
#[derive(Debug, Clone, Default)]
pub struct Lexicon {
    entries: HashMap<String, f64>,
    /// The longest key, in words.
    max_words: usize,
}

impl Lexicon {
    /// Reads VADER's `vader_lexicon.txt`: `token<TAB>mean<TAB>std<TAB>[raw ratings]` per
    /// line; the mean rating is the valence.
    pub fn vader(path: &Path) -> Result<Lexicon> {
        Self::parse_vader(&read_data_file(path)?, path)
    }

    /// Reads AFINN's `AFINN-en-165.txt`: `word or phrase<TAB>integer in -5..=5` per line.
    pub fn afinn(path: &Path) -> Result<Lexicon> {
        Self::parse_afinn(&read_data_file(path)?, path)
    }

    /// Parses the contents of a VADER lexicon; `path` only names the file in errors.
    pub fn parse_vader(contents: &str, path: &Path) -> Result<Lexicon> {
        let mut lexicon = Lexicon::default();
        for (lineno, line) in data_lines(contents) {
            let mut fields = line.split('\t');
            let token = fields.next().unwrap_or("");
            let mean = fields.next().ok_or_else(|| {
                Error::format(
                    path,
                    format!("line {lineno}: expected `token<TAB>mean<TAB>std<TAB>[ratings]`, got {line:?}"),
                )
            })?;
            if token.trim().is_empty() {
                return Err(Error::format(path, format!("line {lineno}: empty token")));
            }
            let valence: f64 = mean.trim().parse().map_err(|_| {
                Error::format(
                    path,
                    format!("line {lineno}: mean rating {mean:?} of {token:?} is not a number"),
                )
            })?;
            if !valence.is_finite() {
                return Err(Error::format(
                    path,
                    format!("line {lineno}: mean rating of {token:?} is not finite"),
                ));
            }
            lexicon.insert(token, valence);
        }
        if lexicon.is_empty() {
            return Err(Error::format(path, "no lexicon entries"));
        }
        Ok(lexicon)
    }

    /// Parses the contents of an AFINN lexicon; `path` only names the file in errors.
    pub fn parse_afinn(contents: &str, path: &Path) -> Result<Lexicon> {
        let mut lexicon = Lexicon::default();
        for (lineno, line) in data_lines(contents) {
            let (phrase, score) = line.rsplit_once('\t').ok_or_else(|| {
                Error::format(
                    path,
                    format!("line {lineno}: expected `word or phrase<TAB>score`, got {line:?}"),
                )
            })?;
            if phrase.trim().is_empty() {
                return Err(Error::format(path, format!("line {lineno}: empty word")));
            }
            let valence: i32 = score.trim().parse().map_err(|_| {
                Error::format(
                    path,
                    format!("line {lineno}: score {score:?} of {phrase:?} is not an integer"),
                )
            })?;
            if !(-5..=5).contains(&valence) {
                return Err(Error::format(
                    path,
                    format!("line {lineno}: score {valence} of {phrase:?} is outside -5..=5"),
                ));
            }
            lexicon.insert(phrase, f64::from(valence));
        }
        if lexicon.is_empty() {
            return Err(Error::format(path, "no lexicon entries"));
        }
        Ok(lexicon)
    }

    /// A lexicon from `(word or phrase, valence)` pairs (tests, custom lexicons). Keys are
    /// normalised as in the files.
    pub fn from_str_pairs<'a, I>(pairs: I) -> Lexicon
    where
        I: IntoIterator<Item = (&'a str, f64)>,
    {
        let mut lexicon = Lexicon::default();
        for (key, valence) in pairs {
            lexicon.insert(key, valence);
        }
        lexicon
    }

    fn insert(&mut self, raw: &str, valence: f64) {
        let key = normalize_key(raw);
        // Keep only keys the tokenizer can produce: the raw key, lower-cased, with its
        // whitespace collapsed, must already be its own word sequence.
        let raw_lower = raw
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
            .replace('\u{2019}', "'");
        if key.is_empty() || key != raw_lower {
            return;
        }
        let n = key.split(' ').count();
        if let std::collections::hash_map::Entry::Vacant(e) = self.entries.entry(key) {
            e.insert(valence);
            self.max_words = self.max_words.max(n);
        }
    }

    /// The valence of a word or phrase (normalised like the keys), if listed.
    pub fn get(&self, word_or_phrase: &str) -> Option<f64> {
        self.entries.get(&normalize_key(word_or_phrase)).copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The longest multi-word entry starting at `words[i]` (at least 2 words), as
    /// (valence, words consumed).
    fn phrase_at(&self, words: &[Word], i: usize) -> Option<(f64, usize)> {
        let longest = self.max_words.min(words.len() - i);
        (2..=longest).rev().find_map(|len| {
            let key = words[i..i + len]
                .iter()
                .map(|w| w.text.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            self.entries.get(&key).map(|&v| (v, len))
        })
    }
}

/// Reads a data file, telling how to get it when it is missing.
fn read_data_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "file not found; run `./build.sh fetch-data` to download the evaluation data",
                ),
            )
        } else {
            Error::io(path, e)
        }
    })
}

/// Non-blank lines with 1-based numbers, without a BOM or trailing `\r`.
fn data_lines(contents: &str) -> impl Iterator<Item = (usize, &str)> {
    contents
        .strip_prefix('\u{feff}')
        .unwrap_or(contents)
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty())
}

// ---------------------------------------------------------------------------------------
// Sentiment

/// The per-word valence after a negator is multiplied by this (flipped and damped).
pub const NEGATION_FACTOR: f64 = -0.74;
/// How many words after a negator are negated.
pub const NEGATION_SCOPE: usize = 3;

/// Lexicon sentiment of the response text.
///
/// With the text's words `w_1..w_n` ([`words`]):
///
/// ```text
/// score = Σ_m  v_m · f_m  /  sqrt(n + 1)
/// ```
///
/// where the sum runs over lexicon matches `m` — at each position the longest listed
/// phrase of two or more words, else the single word — `v_m` is the lexicon valence, and
/// `f_m = −0.74` if the match starts within [`NEGATION_SCOPE`] (3) words after a negator
/// ([`is_negator`]) with no clause punctuation (`. , ; : ! ?`) in between, else `1`.
/// Negators themselves carry no valence (VADER and AFINN list `no` as negative; here it
/// only negates). A phrase that contains its own negation (AFINN's `not good`) is taken
/// from the lexicon as is. `n` counts all words, so the score is a valence density that
/// still grows, slowly, with the amount of sentiment: `sqrt(n + 1)` sits between a sum
/// (favouring long texts) and a mean (favouring one-word answers). An empty text scores 0.
///
/// `tokens` and `complete` are ignored.
#[derive(Debug, Clone)]
pub struct SentimentScorer {
    name: String,
    lexicon: Lexicon,
    /// Count a listed word or phrase only at its first match in a text.
    once: bool,
}

impl SentimentScorer {
    pub fn new(name: impl Into<String>, lexicon: Lexicon) -> Self {
        Self {
            name: name.into(),
            lexicon,
            once: false,
        }
    }

    /// The same scorer with each listed word or phrase counted once per text (its
    /// first match; later ones add nothing), so that repeating a sentiment word scores
    /// no higher than saying it once: a labeller for ARMs that should stay fluent.
    pub fn counting_repeats_once(mut self) -> Self {
        self.once = true;
        self
    }

    pub fn lexicon(&self) -> &Lexicon {
        &self.lexicon
    }

    /// The sum of (negation-adjusted) valences and the word count `n`.
    pub fn valence_sum(&self, text: &str) -> (f64, usize) {
        let words = words(text);
        let mut sum = 0.0;
        // Words still inside the current negation scope.
        let mut negated_left = 0usize;
        let mut counted = std::collections::HashSet::new();
        let mut i = 0;
        while i < words.len() {
            let (valence, used) = if let Some(hit) = self.lexicon.phrase_at(&words, i) {
                (Some(hit.0), hit.1)
            } else if is_negator(&words[i].text) {
                // Scope starts at the next word; this word is consumed below.
                i += 1;
                negated_left = if words[i - 1].ends_clause {
                    0
                } else {
                    NEGATION_SCOPE
                };
                continue;
            } else {
                (self.lexicon.entries.get(&words[i].text).copied(), 1)
            };
            let first = !self.once || {
                let key: Vec<&str> = words[i..i + used].iter().map(|w| w.text.as_str()).collect();
                counted.insert(key)
            };
            if let (Some(v), true) = (valence, first) {
                sum += if negated_left > 0 {
                    v * NEGATION_FACTOR
                } else {
                    v
                };
            }
            negated_left = negated_left.saturating_sub(used);
            if words[i + used - 1].ends_clause {
                negated_left = 0;
            }
            i += used;
        }
        (sum, words.len())
    }

    /// The score of the module formula for `text`.
    pub fn sentiment(&self, text: &str) -> f64 {
        let (sum, n) = self.valence_sum(text);
        if n == 0 {
            return 0.0;
        }
        sum / ((n + 1) as f64).sqrt()
    }
}

impl Scorer for SentimentScorer {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, text: &str, _tokens: usize, _complete: bool) -> f64 {
        self.sentiment(text)
    }
}

// ---------------------------------------------------------------------------------------
// Concise

/// Subtracted from the score of a response that did not end with EOS.
pub const INCOMPLETE_PENALTY: f64 = 1_000_000.0;

/// "Fewer tokens for a complete answer":
///
/// ```text
/// complete:   −tokens
/// truncated:  −tokens − 1e6
/// ```
///
/// so any complete answer (under a million tokens) beats any truncated one, and within
/// each group shorter is better.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConciseScorer;

impl Scorer for ConciseScorer {
    fn name(&self) -> &str {
        "concise"
    }

    fn score(&self, _text: &str, tokens: usize, complete: bool) -> f64 {
        let t = tokens as f64;
        if complete {
            -t
        } else {
            -t - INCOMPLETE_PENALTY
        }
    }
}

/// `−tokens`, complete or not: the concise objective in a form whose mean reads as a
/// length. With a token budget a truncated response scores the budget, the worst
/// possible, so it agrees with [`ConciseScorer`] on which responses are worst; the
/// million-token penalty that makes `concise` a strict ranking for preference pairs
/// would swamp a mean (eval's `complete_rate` reports the other half).
#[derive(Debug, Clone, Copy, Default)]
pub struct LengthScorer;

impl Scorer for LengthScorer {
    fn name(&self) -> &str {
        "length"
    }

    fn score(&self, _text: &str, tokens: usize, _complete: bool) -> f64 {
        -(tokens as f64)
    }
}

// ---------------------------------------------------------------------------------------
// Word list

/// Penalises listed words and phrases: `score = −(number of occurrences)`, matching whole
/// [`words`] case-insensitively (so `cat` does not match `category`, and `thank you`
/// matches `Thank  you!`). Every entry is counted at every position it matches, so with
/// the list `very`, `very good` the text `very good` scores −2.
#[derive(Debug, Clone)]
pub struct WordlistScorer {
    name: String,
    /// First word → the entries (as word sequences) starting with it.
    by_first: HashMap<String, Vec<Vec<String>>>,
    len: usize,
}

impl WordlistScorer {
    /// A scorer for the given words or phrases; blank entries are ignored, duplicates
    /// (after normalisation) count once.
    pub fn new<S: AsRef<str>>(
        name: impl Into<String>,
        entries: impl IntoIterator<Item = S>,
    ) -> Self {
        let mut by_first: HashMap<String, Vec<Vec<String>>> = HashMap::new();
        let mut len = 0;
        for entry in entries {
            let ws: Vec<String> = words(entry.as_ref()).into_iter().map(|w| w.text).collect();
            let Some(first) = ws.first().cloned() else {
                continue;
            };
            let list = by_first.entry(first).or_default();
            if !list.contains(&ws) {
                list.push(ws);
                len += 1;
            }
        }
        Self {
            name: name.into(),
            by_first,
            len,
        }
    }

    /// Reads one word or phrase per line; blank lines and lines starting with `#` are
    /// skipped. The scorer is named `wordlist:PATH`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let contents = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let entries = data_lines(&contents)
            .map(|(_, l)| l.trim())
            .filter(|l| !l.starts_with('#'));
        let scorer = Self::new(format!("wordlist:{}", path.display()), entries);
        if scorer.is_empty() {
            return Err(Error::format(path, "the word list has no words"));
        }
        Ok(scorer)
    }

    /// Number of distinct entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many times listed entries occur in `text`.
    pub fn count(&self, text: &str) -> usize {
        let ws = words(text);
        let mut count = 0;
        for i in 0..ws.len() {
            if let Some(entries) = self.by_first.get(&ws[i].text) {
                count += entries
                    .iter()
                    .filter(|e| {
                        e.len() <= ws.len() - i && e.iter().zip(&ws[i..]).all(|(a, b)| *a == b.text)
                    })
                    .count();
            }
        }
        count
    }
}

impl Scorer for WordlistScorer {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, text: &str, _tokens: usize, _complete: bool) -> f64 {
        -(self.count(text) as f64)
    }
}

/// The default data directory relative to the repository root (`build.sh fetch-data`).
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("models/data")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn tiny() -> SentimentScorer {
        SentimentScorer::new(
            "tiny",
            Lexicon::from_str_pairs([
                ("good", 2.0),
                ("bad", -2.0),
                ("happy", 3.0),
                ("problem", -1.5),
                ("can't stand", -3.0),
                ("no", -1.0),
                (":)", 2.0),
            ]),
        )
    }

    #[test]
    fn word_splitting() {
        let w: Vec<String> = words("Don't STOP—well-known, 'quoted' ... a-  b’s!")
            .into_iter()
            .map(|w| w.text)
            .collect();
        assert_eq!(w, ["don't", "stop", "well-known", "quoted", "a", "b's"]);
        let w = words("one, two three. four");
        let ends: Vec<bool> = w.iter().map(|w| w.ends_clause).collect();
        assert_eq!(ends, [true, false, true, false]);
        assert!(words("  ...  ").is_empty());
    }

    #[test]
    fn lexicon_keys() {
        let lex = tiny().lexicon;
        // The emoticon is dropped: the tokenizer never yields it.
        assert_eq!(lex.len(), 6);
        assert_eq!(lex.get("GOOD"), Some(2.0));
        assert_eq!(lex.get("Can't   stand"), Some(-3.0));
        assert_eq!(lex.get(":)"), None);
        assert_eq!(lex.max_words, 2);
        // First entry wins on a collision.
        let lex = Lexicon::from_str_pairs([("Nice", 1.0), ("nice", 5.0)]);
        assert_eq!(lex.get("nice"), Some(1.0));
    }

    #[test]
    fn sentiment_hand_computed() {
        let s = tiny();
        assert_eq!(s.sentiment(""), 0.0);
        assert_eq!(s.sentiment("the cat sat"), 0.0);
        // n = 4, sum = 2 + 3 = 5.
        assert!(close(s.sentiment("a good happy cat"), 5.0 / 5f64.sqrt()));
        // Case and punctuation do not matter: n = 2, sum = 4.
        assert!(close(s.sentiment("Good, GOOD!"), 4.0 / 3f64.sqrt()));
        assert!(close(
            s.sentiment("good good"),
            s.sentiment("«Good»... (good)?")
        ));
        // Phrase: "I can't stand it" → n = 4, the phrase wins over the negator rule.
        assert!(close(s.sentiment("I can't stand it"), -3.0 / 5f64.sqrt()));
        let sc: &dyn Scorer = &s;
        assert_eq!(sc.name(), "tiny");
        assert!(close(
            sc.score("a good happy cat", 7, false),
            5.0 / 5f64.sqrt()
        ));
    }

    #[test]
    fn counting_repeats_once() {
        let s = tiny().counting_repeats_once();
        // n = 5, only the first "good" counts: sum = 2 + 3.
        assert!(close(
            s.sentiment("good good happy good cat"),
            5.0 / 6f64.sqrt()
        ));
        // Repeating adds nothing; words alone dilute, so repetition scores lower.
        assert!(s.sentiment("good happy good happy") < s.sentiment("good happy"));
        // Phrases count once too; a negated first match is the one counted.
        assert!(close(
            s.sentiment("I can't stand it, can't stand it"),
            -3.0 / 8f64.sqrt()
        ));
        assert!(close(s.sentiment("not good. good"), -1.48 / 4f64.sqrt()));
        // Without repeats it is the plain score.
        assert!(close(
            s.sentiment("a good happy cat"),
            tiny().sentiment("a good happy cat")
        ));
    }

    #[test]
    fn negation() {
        let s = tiny();
        // n = 4, good flipped and damped: -0.74 * 2.
        assert!(close(s.sentiment("This is not good."), -1.48 / 5f64.sqrt()));
        // n't, within 3 words: "isn't very very happy" → happy is 3 words after.
        assert!(close(
            s.sentiment("It isn't very very happy"),
            -0.74 * 3.0 / 6f64.sqrt()
        ));
        // 4 words after: outside the scope.
        assert!(close(s.sentiment("never a b c good"), 2.0 / 6f64.sqrt()));
        // Clause punctuation ends the scope; the negator itself carries no valence.
        assert!(close(s.sentiment("No, good"), 2.0 / 3f64.sqrt()));
        assert!(close(s.sentiment("no problem"), 0.74 * 1.5 / 3f64.sqrt()));
        // Every lexicon word in the scope is negated: n = 5, sum = -0.74 * (2 + 3).
        assert!(close(
            s.sentiment("not good or happy today"),
            -0.74 * 5.0 / 6f64.sqrt()
        ));
        // Lone n't (pre-tokenized text).
        assert!(close(s.sentiment("do n't bad"), 1.48 / 4f64.sqrt()));
        assert!(s.sentiment("cannot be happy") < 0.0);
    }

    #[test]
    fn concise_ordering() {
        let c = ConciseScorer;
        assert_eq!(c.name(), "concise");
        assert_eq!(c.score("x", 12, true), -12.0);
        assert!(c.score("", 5, true) > c.score("", 50, true));
        // Any complete answer beats any truncated one.
        assert!(c.score("", 4000, true) > c.score("", 1, false));
        assert!(c.score("", 10, false) > c.score("", 20, false));
        assert_eq!(c.score("", 0, true), 0.0);
    }

    #[test]
    fn length_counts_tokens_complete_or_not() {
        assert_eq!(LengthScorer.score("a b", 12, true), -12.0);
        assert_eq!(LengthScorer.score("a b", 40, false), -40.0);
        let s = scorer_from_spec("length", &std::env::temp_dir()).unwrap();
        assert_eq!(s.name(), "length");
    }

    #[test]
    fn wordlist_counting() {
        let w = WordlistScorer::new("w", ["very", "very good", " Cat ", "", "cat"]);
        assert_eq!(w.len(), 3);
        assert_eq!(w.count("Very good, VERY!"), 3);
        assert_eq!(w.count("category cats concatenate"), 0);
        assert_eq!(w.count("the cat; a CAT."), 2);
        assert_eq!(w.count("very"), 1);
        assert_eq!(w.score("cat very good", 3, true), -3.0);
        assert_eq!(w.score("", 0, false), 0.0);
    }

    #[test]
    fn wordlist_file_and_specs() {
        let dir = std::env::temp_dir().join(format!("genarm-scorers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("words.txt");
        std::fs::write(&list, "# hedges\r\nperhaps\r\n\r\nI think\r\n").unwrap();
        let s = scorer_from_spec(&format!("wordlist:{}", list.display()), &dir).unwrap();
        assert_eq!(s.score("Perhaps. I think, perhaps", 0, true), -3.0);
        assert_eq!(s.score("I think so", 0, true), -1.0);

        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "# nothing\n\n").unwrap();
        let err = WordlistScorer::from_file(&empty).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");

        assert_eq!(
            scorer_from_spec(" concise ", &dir).unwrap().name(),
            "concise"
        );
        let err = scorer_from_spec("happiness", &dir).unwrap_err().to_string();
        assert!(
            err.contains("happiness") && err.contains("sentiment-afinn"),
            "{err}"
        );
        assert!(matches!(
            scorer_from_spec("wordlist:", &dir),
            Err(Error::Request(_))
        ));
        // Missing lexicons say how to get them.
        for spec in ["sentiment", "sentiment-afinn"] {
            let err = scorer_from_spec(spec, &dir).unwrap_err();
            assert!(matches!(err, Error::Io { .. }));
            assert!(err.to_string().contains("./build.sh fetch-data"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lexicon_parsing() {
        let p = Path::new("lex.txt");
        let vader = "\u{feff}$:\t-1.5\t0.8\t[-1, -1]\r\ngood\t1.9\t0.9\t[2, 2]\r\n\r\ncan't stand\t-2.0\t0.5\t[-2]";
        let lex = Lexicon::parse_vader(vader, p).unwrap();
        assert_eq!(lex.len(), 2);
        assert_eq!(lex.get("good"), Some(1.9));
        assert_eq!(lex.get("can't stand"), Some(-2.0));

        let err = Lexicon::parse_vader("good\t1.9\t0.9\t[]\nbad\tx\t1\t[]\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("lex.txt: line 2:") && err.contains("\"x\""),
            "{err}"
        );
        let err = Lexicon::parse_vader("good 1.9\n", p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");

        let afinn = "abandon\t-2\nbad luck\t-2\ncool stuff\t3\n";
        let lex = Lexicon::parse_afinn(afinn, p).unwrap();
        assert_eq!(lex.len(), 3);
        assert_eq!(lex.get("Bad luck"), Some(-2.0));
        for (bad, line) in [
            ("a\t1\nb\t1.5\n", 2),
            ("a\t1\nb\t1\nc\t6\n", 3),
            ("a 1\n", 1),
        ] {
            let err = Lexicon::parse_afinn(bad, p).unwrap_err();
            assert!(matches!(err, Error::Format { .. }));
            assert!(err.to_string().contains(&format!("line {line}:")), "{err}");
        }
        assert!(Lexicon::parse_afinn("\n\n", p).is_err());
    }

    /// The real VADER lexicon (fetched by `./build.sh fetch-data`).
    #[test]
    fn real_vader_lexicon() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/data/vader_lexicon.txt");
        if !path.exists() {
            eprintln!(
                "skipping real_vader_lexicon: {} is absent (run ./build.sh fetch-data)",
                path.display()
            );
            return;
        }
        let lex = Lexicon::vader(&path).unwrap();
        assert!(lex.len() > 7000, "{} entries", lex.len());
        let s = SentimentScorer::new("sentiment", lex);
        let good = s.sentiment("This is a wonderful, happy day.");
        let bad = s.sentiment("This is a terrible, sad day.");
        assert!(good > 0.0 && bad < 0.0 && good > bad, "{good} vs {bad}");
        assert!(s.sentiment("This is not a good day.") < 0.0);
    }
}
