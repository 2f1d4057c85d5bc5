//! Synthetic preference pairs: the base samples K continuations of a prompt — as K rows
//! of one batch, decoded in lockstep so the weights are read once per step for all of
//! them — a scorer ranks them, and the best and worst become a (chosen, rejected) pair.

use crate::cpu::llama::{log_softmax, Llama};
use crate::error::Result;
use crate::guide::{Sampler, SamplingParams};
use crate::model::tokenizer::TextTokenizer;

/// One sampled continuation.
#[derive(Clone, Debug)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub text: String,
    /// Ended with an EOS token (rather than at the length limit).
    pub complete: bool,
}

/// Samples `model.rows()` continuations of `prompt`, each row with its own seeded draws.
pub fn sample_rows(
    model: &mut Llama,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    max_new_tokens: usize,
    params: &SamplingParams,
    eos_ids: &[u32],
) -> Result<Vec<Sample>> {
    let k = model.rows();
    let mut samplers: Vec<Sampler> = (0..k)
        .map(|row| {
            Sampler::new(SamplingParams {
                seed: params
                    .seed
                    .wrapping_mul(0x100_0000_01B3)
                    .wrapping_add(row as u64),
                ..params.clone()
            })
        })
        .collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); k];
    let mut done = vec![false; k];
    model.reset();
    let mut feed: Vec<Vec<u32>> = vec![prompt.to_vec(); k];
    let room = model.capacity().saturating_sub(prompt.len());
    for _ in 0..max_new_tokens.min(room) {
        let logits = model.forward_rows(&feed, false)?;
        let logp = log_softmax(&logits)?.to_vec2::<f32>()?;
        for row in 0..k {
            let next = if done[row] {
                // Finished rows keep feeding a token so the batch stays rectangular.
                *feed[row].last().unwrap_or(&0)
            } else {
                let id = samplers[row].sample(&logp[row]);
                if eos_ids.contains(&id) {
                    done[row] = true;
                } else {
                    tokens[row].push(id);
                }
                id
            };
            feed[row] = vec![next];
        }
        if done.iter().all(|&d| d) {
            break;
        }
    }
    tokens
        .into_iter()
        .zip(done)
        .map(|(tokens, complete)| {
            let text = tokenizer.decode(&tokens, true)?;
            Ok(Sample {
                tokens,
                text,
                complete,
            })
        })
        .collect()
}

/// The (best, worst) of scored samples, or `None` when the extremes tie.
pub fn best_and_worst(scores: &[f64]) -> Option<(usize, usize)> {
    let mut best = 0;
    let mut worst = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
        if s < scores[worst] {
            worst = i;
        }
    }
    (scores.len() >= 2 && scores[best] > scores[worst]).then_some((best, worst))
}

#[cfg(test)]
mod tests {
    use super::best_and_worst;

    #[test]
    fn picks_extremes_and_skips_ties() {
        assert_eq!(best_and_worst(&[0.1, 0.5, -0.2, 0.3]), Some((1, 2)));
        assert_eq!(best_and_worst(&[1.0, 1.0, 1.0]), None);
        assert_eq!(best_and_worst(&[2.0]), None);
    }
}

/// What a `prefs` run is made from, kept next to its partial output (`OUT.part`) so that
/// `--resume` continues only the same run: pairs from another model, prompt file, seed
/// or sampling setting would silently mix two data sets.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefsRun {
    pub model: crate::outdir::FileFingerprint,
    pub prompts: crate::outdir::FileFingerprint,
    pub seed: u64,
    pub samples: usize,
    pub scorer: String,
    pub template: String,
    pub chat: bool,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
}

impl PrefsRun {
    /// Where the record of the run writing `part` is kept.
    pub fn record_path(part: &std::path::Path) -> std::path::PathBuf {
        let mut name = part.as_os_str().to_owned();
        name.push(".run.json");
        name.into()
    }

    pub fn write(&self, part: &std::path::Path) -> Result<()> {
        let path = Self::record_path(part);
        crate::model::lora::write_atomic(&path, serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// Refuses to continue `part` unless its record is this run's, naming what differs.
    pub fn check_continues(&self, part: &std::path::Path) -> Result<()> {
        use crate::error::Error;
        let path = Self::record_path(part);
        let fix = "resume with the same flags, or start over with --overwrite";
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Request(format!(
                "{}: no record of the run that wrote {} ({e}); {fix}",
                path.display(),
                part.display()
            ))
        })?;
        let was: PrefsRun = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("invalid run record: {e}")))?;
        match crate::outdir::first_difference(&was, self) {
            None => Ok(()),
            Some(diff) => Err(Error::Request(format!(
                "{} was written by another run ({diff}); {fix}",
                part.display()
            ))),
        }
    }
}

/// How far a `prefs` run has come, reported after each prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairsProgress {
    /// Prompts handled, counting those a resumed run found done.
    pub prompts_done: usize,
    pub prompts: usize,
    /// Pairs written, counting those a resumed run kept.
    pub pairs: usize,
    /// Prompts whose samples all scored alike (no pair).
    pub ties: usize,
}

/// Makes the run's pairs: for each prompt line (wrapped by `run.template`, `{}` standing
/// for the line) samples `model.rows()` continuations, scores them, and appends the best
/// and worst as one JSONL line tagged with its prompt index to `part`, flushed at once.
/// With `resume`, `part` must hold this run's record; its complete lines are kept (a line
/// cut by a kill is dropped) and the run continues after the last prompt written.
/// Returns the final progress; the caller renames `part` when it is complete.
#[allow(clippy::too_many_arguments)]
pub fn write_pairs(
    model: &mut Llama,
    tokenizer: &TextTokenizer,
    eos_ids: &[u32],
    prompts: &[String],
    scorer: &dyn crate::eval::scorers::Scorer,
    run: &PrefsRun,
    part: &std::path::Path,
    resume: bool,
    on_progress: &mut dyn FnMut(&PairsProgress),
) -> Result<PairsProgress> {
    use std::io::Write;

    use crate::error::Error;
    let io = |e: std::io::Error| Error::io(part, e);
    let mut progress = PairsProgress {
        prompts: prompts.len(),
        ..Default::default()
    };
    if resume && part.is_file() {
        run.check_continues(part)?;
        let done = std::fs::read_to_string(part).map_err(io)?;
        let mut kept = String::new();
        for line in done.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                break;
            };
            if let Some(i) = v["prompt_index"].as_u64() {
                progress.prompts_done = progress.prompts_done.max(i as usize + 1);
            }
            kept.push_str(line);
            kept.push('\n');
            progress.pairs += 1;
        }
        std::fs::write(part, kept).map_err(io)?;
    } else {
        std::fs::File::create(part).map_err(io)?;
        run.write(part)?;
    }
    let mut out = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(io)?,
    );
    for (i, line) in prompts.iter().enumerate().skip(progress.prompts_done) {
        let prompt = run.template.replace("{}", line);
        let ids = tokenizer.encode_prompt(&prompt, run.chat, None)?;
        let params = SamplingParams {
            temperature: run.temperature,
            top_p: run.top_p,
            seed: run.seed.wrapping_add(i as u64),
            ..Default::default()
        };
        let samples = sample_rows(model, tokenizer, &ids, run.max_new_tokens, &params, eos_ids)?;
        let scores: Vec<f64> = samples
            .iter()
            .map(|s| scorer.score(&s.text, s.tokens.len(), s.complete))
            .collect();
        match best_and_worst(&scores) {
            Some((b, w)) => {
                let line = serde_json::json!({
                    "prompt_index": i,
                    "prompt": prompt,
                    "chosen": samples[b].text,
                    "rejected": samples[w].text,
                    "chosen_score": scores[b],
                    "rejected_score": scores[w],
                });
                writeln!(out, "{line}")
                    .and_then(|()| out.flush())
                    .map_err(io)?;
                progress.pairs += 1;
            }
            None => progress.ties += 1,
        }
        progress.prompts_done = i + 1;
        on_progress(&progress);
    }
    out.flush().map_err(io)?;
    Ok(progress)
}
