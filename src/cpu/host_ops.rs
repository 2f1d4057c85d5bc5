//! What the CPU ops that run on host slices share: the output pointer their parallel tasks
//! write through, and the eight-lane dot product.

/// An output slice that tasks on candle's pool write disjoint parts of.
pub struct SharedOut(*mut f32);

// SAFETY: tasks only write disjoint elements through it, and the `&mut [f32]` it was made
// from outlives the parallel loop (`new`'s contract).
unsafe impl Send for SharedOut {}
// SAFETY: as above; it is never read through.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Shares `out` with the tasks of one parallel loop that `out` outlives.
    pub fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// Writes `value` at `index`.
    ///
    /// # Safety
    /// `index` is inside the output and no other task touches that element.
    pub unsafe fn write(&self, index: usize, value: f32) {
        *self.0.add(index) = value;
    }

    /// The `len` elements from `at`.
    ///
    /// # Safety
    /// The range is inside the output and no other task touches it while this lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// `a · b`, in eight partial sums so the compiler can vectorise without reassociating
/// floats.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}
