//! The GenARM rule and the reference sampler.
//!
//! Each step the next token is drawn from
//! `softmax((log_softmax(base) + Σ_i α_i · log_softmax(arm_i)) / T)`;
//! at `T = 1` that is exactly `π_base · Π_i π_arm_i^{α_i}`, renormalised. ARM logits
//! are cut to the base vocabulary first. Greedy decoding takes the argmax of the sum.
//!
//! Randomness is counter based — draw `n` of seed `s` is `uniform(s, n)` — so a run is
//! reproducible from its seed alone, and a GPU sampler can draw the very same numbers.

/// How to pick a token from the guided scores.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Take the argmax; temperature, top-k and top-p are then ignored.
    pub greedy: bool,
    /// Divides the guided scores before the softmax; must be > 0.
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches p (1.0: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            greedy: false,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        let temperature_ok = self.temperature > 0.0 && self.temperature.is_finite();
        if !self.greedy && !temperature_ok {
            return Err(format!("temperature must be > 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return Err("top-k must be at least 1".into());
        }
        Ok(())
    }
}

/// `log_softmax(x)`, with the normaliser accumulated in f64 so a 150k vocabulary does
/// not lose the small terms.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - log_z) as f32).collect()
}

/// The guided scores `base + Σ α_i · arm_i` over the base vocabulary, where `base`
/// and `arms` are log-probabilities. Longer ARM vocabularies are cut to the base's.
pub fn combine(base: &[f32], arms: &[&[f32]], alphas: &[f32]) -> Vec<f32> {
    assert_eq!(arms.len(), alphas.len(), "one alpha per ARM");
    let mut scores = base.to_vec();
    for (arm, &alpha) in arms.iter().zip(alphas) {
        if alpha == 0.0 {
            continue;
        }
        assert!(
            arm.len() >= base.len(),
            "ARM vocabulary shorter than the base's"
        );
        for (s, &a) in scores.iter_mut().zip(arm.iter()) {
            *s += alpha * a;
        }
    }
    scores
}

/// The index of the largest score; the lowest index wins ties.
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// A uniform number in [0, 1) from (seed, counter): SplitMix64 finalisers over both,
/// 53 random bits. Counter based so that the GPU sampler can reproduce it.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    let mix = |z: u64| mix64(z.wrapping_add(SPLITMIX_GAMMA));
    let bits = mix(mix(seed) ^ counter);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// SplitMix64's increment (the golden ratio in 64 bits).
pub(crate) const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output finaliser: a bijective, well-mixed hash of a 64-bit word.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws tokens from guided scores; counts its draws so each is reproducible.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    draws: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self { params, draws: 0 }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Temperature, top-k, top-p and seed may change between tokens (the sliders).
    pub fn set_params(&mut self, params: SamplingParams) {
        self.params = params;
    }

    /// The uniform number of the next draw, counted (a device sampler takes it from
    /// here so that its draws follow the same seed sequence).
    pub fn next_uniform(&mut self) -> f64 {
        let u = self.peek_uniform();
        self.draws += 1;
        u
    }

    /// The uniform number of the next draw, not counted (for work that may be discarded).
    pub fn peek_uniform(&self) -> f64 {
        uniform(self.params.seed, self.draws)
    }

    /// Picks the next token from guided scores (see `combine`).
    pub fn sample(&mut self, scores: &[f32]) -> u32 {
        if self.params.greedy {
            return argmax(scores);
        }
        let u = self.next_uniform();
        let probs = self.probabilities(scores);
        pick(&probs, u)
    }

    /// The distribution `sample` draws from: `(index, weight)` pairs, not necessarily
    /// normalised, in the order the inverse CDF walks them.
    pub fn probabilities(&self, scores: &[f32]) -> Vec<(u32, f64)> {
        let t = self.params.temperature as f64;
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |s: f32| ((s as f64 - max) / t).exp();
        let full = self.params.top_k.is_none_or(|k| k >= scores.len());
        if full && self.params.top_p >= 1.0 {
            return scores
                .iter()
                .enumerate()
                .map(|(i, &s)| (i as u32, weight(s)))
                .collect();
        }
        let limit = self.params.top_k.unwrap_or(scores.len()).min(scores.len());
        let total: f64 = if self.params.top_p < 1.0 {
            scores.iter().map(|&s| weight(s)).sum()
        } else {
            0.0
        };
        // Grow a sorted head of the distribution until it covers top-k / top-p: the
        // nucleus is usually a few dozen tokens, so this avoids sorting the vocabulary.
        let mut head = 64.min(limit);
        loop {
            let top = top_indices(scores, head);
            let mut kept = Vec::with_capacity(top.len());
            let mut mass = 0.0;
            for &i in &top {
                let w = weight(scores[i as usize]);
                kept.push((i, w));
                mass += w;
                if self.params.top_p < 1.0 && mass >= self.params.top_p as f64 * total {
                    return kept;
                }
            }
            if head >= limit {
                return kept;
            }
            head = (head * 4).min(limit);
        }
    }
}

/// The `k` largest scores' indices, largest first, lowest index first among ties.
fn top_indices(scores: &[f32], k: usize) -> Vec<u32> {
    let order = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// Inverse-CDF pick: the first entry whose running weight exceeds `u · total`.
fn pick(probs: &[(u32, f64)], u: f64) -> u32 {
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &(i, w) in probs {
        acc += w;
        if acc > target {
            return i;
        }
    }
    // Rounding left the target past the last weight: take the last possible entry.
    probs
        .iter()
        .rev()
        .find(|p| p.1 > 0.0)
        .map_or(probs[0].0, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_indices_orders_and_breaks_ties_by_index() {
        let s = [0.5, 2.0, 2.0, -1.0, 3.0];
        assert_eq!(top_indices(&s, 3), vec![4, 1, 2]);
        assert_eq!(top_indices(&s, 5), vec![4, 1, 2, 0, 3]);
    }

    #[test]
    fn uniform_is_in_range_and_varies() {
        let xs: Vec<f64> = (0..1000).map(|i| uniform(7, i)).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
        assert_ne!(uniform(7, 0), uniform(8, 0));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let probs = [0.5f64, 0.3, 0.15, 0.05];
        let scores: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let sampler = Sampler::new(SamplingParams {
            top_p: 0.75,
            ..Default::default()
        });
        let kept: Vec<u32> = sampler.probabilities(&scores).iter().map(|p| p.0).collect();
        assert_eq!(kept, vec![0, 1]);
    }
}
