//! The portable kernel (also the reference for the SIMD ones).

use super::{BlockFormat, RowArgs, BLOCK, TILE};

/// Little-endian f16 at `at`, as f32.
#[inline]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// An f16's bits as f32, exactly, without branches: WebAssembly has no conversion
/// instruction, and `half`'s portable one (a call with branches per block scale) took a
/// sixth of the wasm matmul time. The magnitude's bits shifted into f32 position are
/// the value times 2^-112 (the exponent biases differ by 112; f16 subnormals land on f32
/// subnormals), so one exact multiply rescales it; infinities and NaNs keep an all-ones
/// exponent.
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    const TWO_POW_112: f32 = f32::from_bits((127 + 112) << 23);
    let sign = u32::from(h & 0x8000) << 16;
    let magnitude = u32::from(h & 0x7FFF);
    let finite = (f32::from_bits(magnitude << 13) * TWO_POW_112).to_bits();
    let special = 0x7F80_0000 | ((magnitude & 0x3FF) << 13);
    f32::from_bits(sign | if magnitude >= 0x7C00 { special } else { finite })
}

/// A block's scale and offset `(d, o)`, with `w = d·q + o`.
#[inline]
pub fn scales(format: BlockFormat, block: &[u8]) -> (f32, f32) {
    let d = f16_at(block, 0);
    let o = match format {
        BlockFormat::Q4_0 => -8.0 * d,
        BlockFormat::Q4_1 => f16_at(block, 2),
        BlockFormat::Q8_0 => 0.0,
    };
    (d, o)
}

/// A block's 32 integer codes (Q4: 0..=15, Q8_0: −128..=127) as `T`, element order.
pub fn block_codes<T: From<u8> + From<i8> + Copy + Default>(
    format: BlockFormat,
    block: &[u8],
) -> [T; BLOCK] {
    let codes = &block[format.codes_offset()..format.block_bytes()];
    let mut q = [T::default(); BLOCK];
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            // Element i is the low nibble of byte i, element i + 16 the high one.
            for (i, &b) in codes.iter().enumerate() {
                q[i] = T::from(b & 0x0F);
                q[i + 16] = T::from(b >> 4);
            }
        }
        BlockFormat::Q8_0 => {
            for (q_k, &b) in q.iter_mut().zip(codes) {
                *q_k = T::from(b as i8);
            }
        }
    }
    q
}

/// Decodes a block's codes into `q`; returns `(d, o)` with `w = d·q + o`.
pub fn decode(format: BlockFormat, block: &[u8], q: &mut [f32; BLOCK]) -> (f32, f32) {
    *q = block_codes(format, block);
    scales(format, block)
}

/// See `Kernel::row_dot`.
pub fn row_dot(args: RowArgs<'_>, res: &mut [f32]) {
    let (format, n) = (args.format, res.len());
    args.check(n);
    let mut acc = [0f32; TILE];
    let mut q = [0f32; BLOCK];
    for (b, block) in args.blocks() {
        // Decode once, use for every activation row of the tile.
        let (d, o) = decode(format, block, &mut q);
        for (i, acc_i) in acc[..n].iter_mut().enumerate() {
            let dot: f32 = q.iter().zip(args.x_block(i, b)).map(|(q, x)| q * x).sum();
            let offset = if format.has_offset() {
                o * args.block_sum(i, b)
            } else {
                0.0
            };
            *acc_i += d * dot + offset;
        }
    }
    res.copy_from_slice(&acc[..n]);
}
