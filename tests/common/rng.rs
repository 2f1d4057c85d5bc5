//! The one seeded PRNG of the tests (SplitMix64), so fixtures are identical on every
//! machine. Only std: the browser tests and the kernel unit tests include this file too.

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [-1, 1) as f32, from 24 random bits (so every value is exact in f32).
    pub fn signed_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values of [`SplitMix64::signed_f32`].
    pub fn signed_f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed_f32()).collect()
    }

    /// Uniform in [lo, hi), rounded to an f32 value so that F32 files hold the
    /// fixture's weights exactly.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo + (hi - lo) * self.next_f64()) as f32 as f64
    }
}

/// FNV-1a, used to give every tensor its own PRNG stream derived from its name,
/// so e.g. a tied and an untied model share all the weights they have in common.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The stream for the tensor (or other fixture part) called `name`.
pub fn stream(seed: u64, name: &str) -> SplitMix64 {
    let mut rng = SplitMix64::new(seed ^ fnv1a(name));
    rng.next_u64(); // decorrelate nearby seeds
    rng
}
