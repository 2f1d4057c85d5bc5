//! Uniform structs, declared once: the macro emits the `#[repr(C)]` Rust struct and
//! the matching WGSL struct text (`struct Params` unless named otherwise) from the same
//! field list, so the two cannot drift. Fields are 4-byte scalars only and every struct pads itself to 16 bytes.

use bytemuck::{Pod, Zeroable};

/// A uniform struct whose WGSL declaration is prepended to its shader.
pub trait Uniform: Pod {
    /// `struct Params { ... }` (or the struct's own WGSL name) as WGSL.
    const WGSL: &'static str;
}

macro_rules! uniform {
    ($(#[$doc:meta])* $name:ident { $($body:tt)* }) => {
        uniform!($(#[$doc])* $name as Params { $($body)* });
    };
    ($(#[$doc:meta])* $name:ident as $wgsl:ident { $($field:ident : $ty:ident),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
        pub struct $name { $(pub $field: $ty),* }

        impl Uniform for $name {
            const WGSL: &'static str = concat!(
                "struct ", stringify!($wgsl), " {\n",
                $("  ", stringify!($field), ": ", stringify!($ty), ",\n",)*
                "}\n"
            );
        }

        const _: () = assert!(std::mem::size_of::<$name>() % 16 == 0, "pad uniforms to 16 bytes");
    };
}

uniform!(
    /// `y[r, row_offset + i] = Σ_c W[i, c] · x[r, c]` for one row chunk of W, plus (in
    /// the LoRA variant) the low-rank delta of rows `lora_first..`: rank `lora_rank`,
    /// their down-projections at `lora_t_offset` of `lora_t_stride`-wide rows of `t`,
    /// as `lora_parts` consecutive partial sums (1 unless split per attention head).
    /// A prompt chunk stacks `batch`-row batches, one per position: row `r` is batch
    /// row `r % batch`, its `t` slot `r − lora_first`.
    MatVecParams {
        rows: u32,
        cols: u32,
        row_offset: u32,
        y_stride: u32,
        lora_first: u32,
        lora_rank: u32,
        lora_t_offset: u32,
        lora_t_stride: u32,
        lora_parts: u32,
        batch: u32,
        _pad1: u32,
        _pad2: u32,
    }
);

uniform!(
    /// Per-row RMS norm over `n` columns.
    RmsNormParams {
        rows: u32,
        n: u32,
        eps: f32,
        _pad: u32,
    }
);

uniform!(
    /// [`RmsNormParams`] plus the LoRA down-projections of the normed rows
    /// `first..first + arms` of every `batch`-row position (t slot: row − first), `rank`
    /// stacked ranks each.
    RmsNormLoraParams {
        rows: u32,
        n: u32,
        eps: f32,
        first: u32,
        arms: u32,
        rank: u32,
        batch: u32,
        _pad1: u32,
    }
);

uniform!(
    /// Elementwise ops over `n` values.
    ElementwiseParams {
        n: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
);

uniform!(
    /// Embedding of token `ids[id_index + r / batch]` from a `[vocab, dim]` table into
    /// each of `rows` rows (a prompt chunk: `batch` rows per position); this dispatch
    /// holds table rows `row_start..row_start + chunk_rows`.
    EmbeddingParams {
        vocab: u32,
        dim: u32,
        rows: u32,
        id_index: u32,
        row_start: u32,
        chunk_rows: u32,
        batch: u32,
        _pad1: u32,
    }
);

uniform!(
    /// One-query attention over a `[rows, kv_heads, capacity, head_dim]` KV cache at
    /// position `pos[pos_index]`, over the last `window` positions only when it is
    /// not 0; in the LoRA variant also each head's part of the o projection's down half
    /// for rows `lora_first..`, rank `lora_rank`. A prompt chunk's `rows` are `batch`-row
    /// batches, one per position `pos[pos_index] + r / batch`, each reading batch row
    /// `r % batch`'s cache.
    AttentionParams {
        rows: u32,
        heads: u32,
        kv_heads: u32,
        head_dim: u32,
        capacity: u32,
        pos_index: u32,
        scale: f32,
        lora_first: u32,
        lora_rank: u32,
        window: u32,
        batch: u32,
        _pad2: u32,
    }
);

uniform!(
    /// The LoRA down-projections of batch rows `first..first + arms` for every
    /// projection reading one input `cols` wide: `rank` stacked ranks per row. Over a
    /// prompt chunk the batch repeats per position: `slots` t rows, row `first + s`
    /// for slot `s`, skipped where `(first + s) % (first + arms) < first`.
    LoraParams {
        arms: u32,
        rank: u32,
        cols: u32,
        first: u32,
        slots: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
);

uniform!(
    /// Max and log-sum-exp of `rows` logits rows of `vocab`, stored from `row_base` on.
    LogitStatsParams {
        rows: u32,
        vocab: u32,
        row_base: u32,
        _pad: u32,
    }
);

uniform!(
    /// The guided pick over `models` log-prob rows (base first) of the base `vocab`.
    SampleParams {
        models: u32,
        vocab: u32,
        _pad0: u32,
        _pad1: u32,
    }
);

uniform!(
    /// The guided pick's knobs, written by the host before each token: 1/T, top-p, the
    /// draw's uniform number `u`, top-k (0: off) and greedy (0/1). The ARM weights α
    /// travel beside it in a storage buffer: their number is the engine's.
    SampleKnobs as Knobs {
        inv_temperature: f32,
        top_p: f32,
        u: f32,
        top_k: u32,
        greedy: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
);
