//! The prompt set of the sentiment task: short openings of English corpus sentences
//! (`models/data/sentences.txt`, from `./build.sh fetch-data`) that the base model then
//! continues, and a deterministic train/eval split of it.
//!
//! Everything here is a pure function of its inputs and a seed (a SplitMix64 stream, no
//! OS randomness), so the same corpus and seed give the same prompts on every machine.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::guide::{mix64, SPLITMIX_GAMMA};

/// Sentences shorter than this many words are skipped.
pub const MIN_SENTENCE_WORDS: usize = 8;
/// A prompt has between this many ...
pub const MIN_PROMPT_WORDS: usize = 4;
/// ... and this many words (and always fewer than its sentence).
pub const MAX_PROMPT_WORDS: usize = 8;
/// Sentences with more than this fraction of non-ASCII characters (among the
/// non-whitespace ones) are skipped.
pub const MAX_NON_ASCII_FRACTION: f64 = 0.05;

/// SplitMix64: a tiny, well-mixed, portable generator.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by rejection so it is unbiased.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Case-insensitive identity of a prompt: lower-cased, whitespace collapsed.
fn dedupe_key(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn is_url_like(token: &str) -> bool {
    let t = token.to_ascii_lowercase();
    t.contains("://") || t.starts_with("www.") || t.contains(".com") || t.contains('@')
}

/// A token made only of digits once surrounding punctuation is removed (`1984,`, `(12)`).
fn is_number(token: &str) -> bool {
    let core = token.trim_matches(|c: char| !c.is_alphanumeric());
    !core.is_empty() && core.chars().all(|c| c.is_ascii_digit())
}

/// The whitespace-separated tokens of `sentence` if it may give a prompt.
fn usable_tokens(sentence: &str) -> Option<Vec<&str>> {
    let tokens: Vec<&str> = sentence.split_whitespace().collect();
    if tokens.len() < MIN_SENTENCE_WORDS {
        return None;
    }
    // It must open like prose: with a letter or an opening quote and a letter.
    let first = tokens[0].trim_start_matches(['"', '\'']);
    if !first.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    if tokens.iter().any(|t| is_number(t) || is_url_like(t)) {
        return None;
    }
    let (mut total, mut non_ascii) = (0usize, 0usize);
    for c in sentence.chars().filter(|c| !c.is_whitespace()) {
        total += 1;
        if !c.is_ascii() {
            non_ascii += 1;
        } else if c.is_ascii_control() {
            return None;
        }
    }
    if non_ascii as f64 > MAX_NON_ASCII_FRACTION * total as f64 {
        return None;
    }
    Some(tokens)
}

/// Builds up to `n` distinct prompts for the sentiment task from corpus sentences.
///
/// A sentence is used if it has at least 8 whitespace-separated words, opens with an
/// ASCII letter (optionally after a quote), has no digits-only word (`1984`, `(12)`), no
/// URL-like or e-mail-like word (`://`, `www.`, `.com`, `@`), no control characters, and at
/// most 5% non-ASCII characters. The usable sentences are shuffled by `seed`; each in
/// turn gives its first `k` words, `k` drawn uniformly from `4..=min(8, words − 1)` (so the
/// sentence always goes on), with trailing `, ; : - ( [` removed. Prompts equal up to case
/// and whitespace are kept once (the first drawn). The result has exactly `n` prompts
/// unless the corpus runs out, then all it can give; the same sentences (in the same
/// order) and seed give the same prompts.
pub fn build_prompt_set(sentences: &[String], n: usize, seed: u64) -> Vec<String> {
    let mut usable: Vec<Vec<&str>> = sentences.iter().filter_map(|s| usable_tokens(s)).collect();
    let mut rng = SplitMix64(seed ^ 0x5052_4F4D_5054_5321); // "PROMPTS!"
    rng.shuffle(&mut usable);
    let mut seen = HashSet::new();
    let mut prompts = Vec::with_capacity(n.min(usable.len()));
    for tokens in usable {
        if prompts.len() >= n {
            break;
        }
        let max_k = MAX_PROMPT_WORDS.min(tokens.len() - 1);
        let k = MIN_PROMPT_WORDS + rng.below((max_k - MIN_PROMPT_WORDS + 1) as u64) as usize;
        let prompt = tokens[..k]
            .join(" ")
            .trim_end_matches([',', ';', ':', '-', '(', '['])
            .to_string();
        if prompt.split_whitespace().count() < MIN_PROMPT_WORDS {
            continue;
        }
        if seen.insert(dedupe_key(&prompt)) {
            prompts.push(prompt);
        }
    }
    prompts
}

/// Splits prompts into (train, eval), deterministically and disjointly.
///
/// Prompts equal up to case and whitespace are first kept once. Each prompt gets a rank
/// from a hash of the seed and its (lower-cased) text; the `round(len · eval_frac)` lowest
/// ranks go to eval (`eval_frac` is clamped to `0..=1`; NaN counts as 0). Both parts keep
/// the input order. Because the rank depends on the text, not the position, the split does
/// not change when the input is reordered.
pub fn split_train_eval(
    prompts: Vec<String>,
    eval_frac: f64,
    seed: u64,
) -> (Vec<String>, Vec<String>) {
    let mut seen = HashSet::new();
    let prompts: Vec<String> = prompts
        .into_iter()
        .filter(|p| seen.insert(dedupe_key(p)))
        .collect();
    let frac = if eval_frac.is_nan() {
        0.0
    } else {
        eval_frac.clamp(0.0, 1.0)
    };
    let n_eval = ((prompts.len() as f64 * frac).round() as usize).min(prompts.len());
    let salt = mix64(seed ^ 0x5350_4C49_5421_2121); // "SPLIT!!!"
    let mut ranked: Vec<(u64, String, usize)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (text_hash(&dedupe_key(p), salt), dedupe_key(p), i))
        .collect();
    ranked.sort_unstable();
    let mut is_eval = vec![false; prompts.len()];
    for (_, _, i) in &ranked[..n_eval] {
        is_eval[*i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (p, e) in prompts.into_iter().zip(is_eval) {
        if e {
            eval.push(p);
        } else {
            train.push(p);
        }
    }
    (train, eval)
}

/// FNV-1a over the bytes, salted and finished with the SplitMix64 mixer.
fn text_hash(text: &str, salt: u64) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64 ^ salt;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h)
}

/// The non-blank lines of a UTF-8 text file, without line endings (`\n` or `\r\n`) or a
/// leading BOM.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let contents = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(contents
        .strip_prefix('\u{feff}')
        .unwrap_or(&contents)
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// Writes one line per entry (each ending in `\n`) atomically: to a temporary file next to
/// `path`, synced, then renamed over it, so readers see the old file or the whole new
/// one. The parent directory is created if needed. Lines containing `\n` or `\r` are
/// refused, as they would not read back as one line.
pub fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    if let Some(i) = lines.iter().position(|l| l.contains(['\n', '\r'])) {
        return Err(Error::format(
            path,
            format!("entry {} contains a line break", i + 1),
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Request(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent.join(tmp_name);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::new(file);
        for line in lines {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic corpus: `count` distinct usable sentences plus noise that must be
    /// skipped.
    fn corpus(count: usize) -> Vec<String> {
        let subjects = [
            "The old man",
            "A young girl",
            "My neighbour",
            "Our teacher",
            "The dog",
        ];
        let verbs = [
            "walked", "looked", "talked", "waited", "laughed", "smiled", "ran",
        ];
        let places = [
            "to the river",
            "near the house",
            "in the garden",
            "at the market",
        ];
        let mut out = Vec::new();
        let mut i = 0usize;
        while out.len() < count {
            let s = subjects[i % subjects.len()];
            let v = verbs[(i / subjects.len()) % verbs.len()];
            let p = places[(i / 35) % places.len()];
            out.push(format!("{s} {v} word{i} slowly {p} and then went home."));
            i += 1;
        }
        out.extend(
            [
                "Too short to use here.",
                "In 1984 the party ruled over every single citizen there.",
                "See https://example.org for all the details you will ever need.",
                "Write to me at someone@example.org when you get this letter.",
                "Ünïcödé ĥéàvý ŧëxŧ ŵîţĥ ŝõ ŵàńÿ áççéñţš ïñ ïţ ħëŕë.",
                "— a dash opens this sentence and then it keeps going on.",
            ]
            .map(String::from),
        );
        out
    }

    #[test]
    fn filters() {
        assert!(usable_tokens("The cat sat on the mat all day long.").is_some());
        assert!(usable_tokens("\"Well, I never saw such a thing before,\" she said.").is_some());
        assert!(usable_tokens("The cat sat on the mat all day.").is_some());
        assert!(usable_tokens("The cat sat on the mat all").is_none());
        assert!(usable_tokens("He was born in (1984) and lived a long life.").is_none());
        assert!(usable_tokens("He scored 3rd in the race and went home happy.").is_some());
        assert!(usable_tokens("Visit www.example.net for more of this and that today.").is_none());
        assert!(usable_tokens("Café culture is a big part of life in this city.").is_some());
        assert!(usable_tokens("Ça me plaît beaucoup, ô ma chère amie, très très fort.").is_none());
        assert!(usable_tokens("1 2 3 4 5 6 7 8 9").is_none());
    }

    #[test]
    fn prompt_set_size_distinct_deterministic() {
        let sentences = corpus(1000);
        let prompts = build_prompt_set(&sentences, 700, 7);
        assert_eq!(prompts.len(), 700);
        let keys: HashSet<String> = prompts.iter().map(|p| dedupe_key(p)).collect();
        assert_eq!(
            keys.len(),
            700,
            "prompts must be distinct case-insensitively"
        );
        for p in &prompts {
            let n = p.split_whitespace().count();
            assert!((MIN_PROMPT_WORDS..=MAX_PROMPT_WORDS).contains(&n), "{p:?}");
            assert!(!p.ends_with(',') && p.is_ascii(), "{p:?}");
            let sentence = sentences.iter().find(|s| s.starts_with(p.as_str()));
            let sentence = sentence.unwrap_or_else(|| panic!("{p:?} is no sentence's opening"));
            assert!(sentence.len() > p.len());
            assert!(!p.contains("1984") && !p.contains("http") && !p.contains("Ün"));
        }
        assert_eq!(prompts, build_prompt_set(&sentences, 700, 7));
        assert_ne!(prompts, build_prompt_set(&sentences, 700, 8));
        // A prefix of a larger request with the same seed.
        assert_eq!(build_prompt_set(&sentences, 100, 7), prompts[..100]);
    }

    #[test]
    fn prompt_set_dedupes_and_runs_out() {
        let s = |t: &str| t.to_string();
        let sentences = vec![
            s("The quick brown fox jumps over the lazy dog."),
            s("the QUICK brown fox jumps over the lazy dog."),
            s("Short one."),
        ];
        for seed in 0..20 {
            let prompts = build_prompt_set(&sentences, 10, seed);
            // Both sentences may give different-length openings, never the same one twice.
            let keys: HashSet<String> = prompts.iter().map(|p| dedupe_key(p)).collect();
            assert_eq!(keys.len(), prompts.len());
            assert!(!prompts.is_empty() && prompts.len() <= 2);
        }
        assert!(build_prompt_set(&[], 10, 1).is_empty());
        assert!(build_prompt_set(&sentences, 0, 1).is_empty());
    }

    #[test]
    fn split_is_disjoint_and_deterministic() {
        let prompts = build_prompt_set(&corpus(800), 600, 3);
        let (train, eval) = split_train_eval(prompts.clone(), 0.2, 11);
        assert_eq!(eval.len(), 120);
        assert_eq!(train.len(), 480);
        let train_keys: HashSet<String> = train.iter().map(|p| dedupe_key(p)).collect();
        assert!(eval.iter().all(|p| !train_keys.contains(&dedupe_key(p))));
        let all: HashSet<&String> = train.iter().chain(&eval).collect();
        assert_eq!(all.len(), 600);
        assert_eq!(
            (train.clone(), eval.clone()),
            split_train_eval(prompts.clone(), 0.2, 11)
        );
        assert_ne!(eval, split_train_eval(prompts.clone(), 0.2, 12).1);
        // Independent of the input order.
        let mut reversed = prompts.clone();
        reversed.reverse();
        let (_, eval_rev) = split_train_eval(reversed, 0.2, 11);
        let a: HashSet<&String> = eval.iter().collect();
        let b: HashSet<&String> = eval_rev.iter().collect();
        assert_eq!(a, b);
        // Duplicates (up to case) never straddle the split.
        let dup = vec![
            "Hello there".to_string(),
            "hello  THERE".to_string(),
            "Other".to_string(),
        ];
        let (t, e) = split_train_eval(dup, 0.5, 1);
        assert_eq!(t.len() + e.len(), 2);
        // Edge fractions.
        assert_eq!(split_train_eval(prompts.clone(), 0.0, 1).1.len(), 0);
        assert_eq!(split_train_eval(prompts.clone(), 1.0, 1).0.len(), 0);
        assert_eq!(split_train_eval(prompts.clone(), f64::NAN, 1).1.len(), 0);
        assert_eq!(split_train_eval(prompts, 7.0, 1).1.len(), 600);
    }

    #[test]
    fn lines_round_trip() {
        let dir = std::env::temp_dir().join(format!("genarm-prompts-{}", std::process::id()));
        let path = dir.join("sub/prompts.txt");
        let lines = vec![
            "first line".to_string(),
            "  second ".to_string(),
            "third".to_string(),
        ];
        write_lines(&path, &lines).unwrap();
        assert_eq!(read_lines(&path).unwrap(), lines);
        // Overwrite atomically; no temporary file is left behind.
        write_lines(&path, &lines[..1]).unwrap();
        assert_eq!(read_lines(&path).unwrap(), lines[..1]);
        let names: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
        // CRLF, BOM and blank lines.
        std::fs::write(&path, "\u{feff}a\r\n\r\nb\n  \nc").unwrap();
        assert_eq!(read_lines(&path).unwrap(), ["a", "b", "c"]);
        let err = write_lines(&path, &["a\nb".to_string()]).unwrap_err();
        assert!(matches!(err, Error::Format { .. }));
        assert_eq!(read_lines(&path).unwrap(), ["a", "b", "c"]);
        let err = read_lines(&dir.join("missing.txt")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.txt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The real corpus, when fetched: at least 600 prompts come out of it.
    #[test]
    fn real_corpus_gives_enough_prompts() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/data/sentences.txt");
        if !path.exists() {
            eprintln!(
                "skipping: {} is absent (run ./build.sh fetch-data)",
                path.display()
            );
            return;
        }
        let sentences = read_lines(&path).unwrap();
        let prompts = build_prompt_set(&sentences, 2000, 0);
        assert_eq!(prompts.len(), 2000);
    }
}
