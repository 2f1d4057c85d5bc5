//! How one `matmul` is cut into work: row ranges as parallel tasks on candle's pool, and
//! inside a task, row blocks that stay in cache while activation tiles pass over them.

use std::ops::Range;

use super::super::host_ops::SharedOut;
use super::int16::QuantizedActs;
use super::interleaved::{GroupArgs, GROUP};
use super::{Activations, BlockFormat, BlockMatrix, Kernel, Layout, BLOCK, INT_ROWS, TILE};

/// Weight rows per cache block inside a task: with large `m` the rows are revisited once per
/// activation tile, so they should stay in L2 (64 rows × 1536 cols of Q8_0 is ~100 KB).
const ROW_BLOCK: usize = 64;

/// Tasks per thread in one matmul: threads take tasks from a shared cursor, so the last
/// one's straggling is at most one task (1/16 of a thread's share) of idle for the others.
const TASKS_PER_THREAD: usize = 16;

/// `out[i*rows + j] = Σ_c x[i*cols + c] · W[j, c]` on `kernel`; the caller has checked the
/// slice lengths.
pub(super) fn matmul(w: &BlockMatrix, kernel: Kernel, x: &[f32], m: usize, out: &mut [f32]) {
    if m == 0 || w.rows == 0 {
        return;
    }
    let acts = match w.activations {
        Activations::F32 if kernel.needs_sums(w.format) => Acts::F32(x, block_sums(x, w.cols)),
        Activations::F32 => Acts::F32(x, Vec::new()),
        Activations::Int16 => {
            let mut acts = QuantizedActs::new(x);
            if w.layout == Layout::Groups && w.format != BlockFormat::Q8_0 {
                acts.split_bytes();
            }
            Acts::Int16(acts)
        }
    };
    let job = Job {
        w,
        acts: &acts,
        m,
        kernel,
    };
    let chunk = rows_per_task(w.rows);
    let out = SharedOut::new(out);
    // candle's own spinning pool, not rayon: candle's ops already keep its workers hot,
    // and a second pool spinning beside it would steal the same cores.
    candle_core::utils::barrier_pool().execute_chunked(w.rows.div_ceil(chunk), |tasks| {
        for task in tasks {
            let start = task * chunk;
            let end = (start + chunk).min(w.rows);
            // SAFETY: tasks get disjoint row ranges, `out` is [m, rows] and exclusively
            // borrowed for the whole parallel loop (see `Job::run`).
            unsafe { job.run(start..end, &out) };
        }
    });
}

/// Rows per task: `TASKS_PER_THREAD` tasks per thread so uneven threads even out, in whole
/// 16-row groups (the interleaved layout's unit, and small per-task overhead).
fn rows_per_task(rows: usize) -> usize {
    let tasks = TASKS_PER_THREAD * (candle_core::utils::barrier_pool().n_workers() + 1);
    rows.div_ceil(tasks).next_multiple_of(GROUP)
}

/// `Σx` over every 32-block of every activation row: `[m, cols/32]`.
pub(super) fn block_sums(x: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect()
}

/// The activations as the kernel reads them.
enum Acts<'a> {
    /// `x` and its `Σx` per block (`[m, cols/32]`; empty when the kernel does not read it).
    F32(&'a [f32], Vec<f32>),
    Int16(QuantizedActs),
}

/// Everything one `matmul` call shares between its tasks.
struct Job<'a> {
    w: &'a BlockMatrix,
    acts: &'a Acts<'a>,
    m: usize,
    kernel: Kernel,
}

impl Job<'_> {
    /// Computes output columns `rows` for all `m` activation rows.
    ///
    /// # Safety
    /// `out` points at an `[m, w.rows]` buffer and no other thread writes these columns.
    unsafe fn run(&self, rows: Range<usize>, out: &SharedOut) {
        if let (Layout::Groups, Acts::Int16(acts)) = (self.w.layout, self.acts) {
            return self.run_groups(acts, rows, out);
        }
        let n_rows = self.w.rows;
        // Row blocks outside, activation tiles inside: a row block's weights stay in cache
        // while every tile passes over them, and a tile of x stays in L1 across the rows.
        for rb in rows.clone().step_by(ROW_BLOCK) {
            let rb_end = (rb + ROW_BLOCK).min(rows.end);
            for t0 in (0..self.m).step_by(TILE) {
                let n = TILE.min(self.m - t0);
                let mut j = rb;
                while j < rb_end {
                    // Several weight rows at a time where the kernel shares work between them.
                    let at_once = match self.acts {
                        Acts::F32(..) if self.kernel.pairs_rows(self.w.format) => 2,
                        Acts::Int16(_) if self.w.layout == Layout::Quads => INT_ROWS,
                        _ => 1,
                    };
                    let r = at_once.min(rb_end - j);
                    let mut res = [[0f32; TILE]; INT_ROWS];
                    self.rows_dot(j, r, t0, n, &mut res);
                    for (dj, res) in res[..r].iter().enumerate() {
                        for (k, &v) in res[..n].iter().enumerate() {
                            // SAFETY: (t0 + k) < m and j + dj < rows, so the index is inside
                            // [m, rows]; the column belongs to this task only (caller's
                            // contract).
                            out.write((t0 + k) * n_rows + j + dj, v);
                        }
                    }
                    j += r;
                }
            }
        }
    }

    /// `run` for interleaved weights (`rows` starts on a group): a group's weights stay in
    /// L1/L2 while every activation tile passes over them.
    ///
    /// # Safety
    /// As `run`.
    unsafe fn run_groups(&self, acts: &QuantizedActs, rows: Range<usize>, out: &SharedOut) {
        let (n_rows, cols) = (self.w.rows, self.w.cols);
        for g0 in rows.step_by(GROUP) {
            let group = self.w.group_bytes(g0 / GROUP);
            for t0 in (0..self.m).step_by(TILE) {
                let n = TILE.min(self.m - t0);
                let mut res = [[0f32; GROUP]; TILE];
                let args = GroupArgs {
                    format: self.w.format,
                    group,
                    acts: acts.tile(t0, n, cols),
                    cols,
                };
                self.kernel.group_dot(args, n, &mut res);
                for (k, res) in res[..n].iter().enumerate() {
                    for (r, &v) in res.iter().enumerate() {
                        // SAFETY: as in `run`; the group's rows are inside this task's.
                        out.write((t0 + k) * n_rows + g0 + r, v);
                    }
                }
            }
        }
    }

    /// `res[r][k]` = weight row `j + r` of the matrix times activation row `t0 + k`, for
    /// `r < rows` and `k < n` (`Layout::Quads`: `j` starts a quad, and `res` gets all four
    /// of its rows).
    fn rows_dot(
        &self,
        j: usize,
        rows: usize,
        t0: usize,
        n: usize,
        res: &mut [[f32; TILE]; INT_ROWS],
    ) {
        let (cols, nb, format) = (self.w.cols, self.w.blocks_per_row(), self.w.format);
        if let (Layout::Quads, Acts::Int16(acts)) = (self.w.layout, self.acts) {
            let q = j / INT_ROWS;
            let (quad, ahead) = (self.w.quad_bytes(q), self.w.quad_bytes(q + 1));
            let tile = acts.tile(t0, n, cols);
            return self
                .kernel
                .quad_dot(format, quad, ahead, tile, cols, n, res);
        }
        let w: [&[u8]; INT_ROWS] = std::array::from_fn(|k| {
            if k < rows {
                self.w.row_bytes(j + k)
            } else {
                &[]
            }
        });
        let w = &w[..rows];
        match self.acts {
            Acts::F32(x, sums) => {
                let xs = &x[t0 * cols..(t0 + n) * cols];
                let sums = if sums.is_empty() {
                    &[][..]
                } else {
                    &sums[t0 * nb..(t0 + n) * nb]
                };
                // The f32 kernels take at most two rows.
                let [pair @ .., _, _] = res;
                self.kernel.rows_dot(format, w, xs, sums, cols, n, pair);
            }
            Acts::Int16(acts) => {
                let tile = acts.tile(t0, n, cols);
                self.kernel.rows_dot_int(format, w, tile, cols, n, res);
            }
        }
    }
}
