// Weight decoding shared by matvec and embedding; expects `w: array<u32>` holding raw
// GGUF bytes and the define FMT (0 F32, 1 Q4_0, 2 Q4_1, 3 Q8_0).
// Blocks are 18/20/34 bytes, so a block starts at any *even* byte offset: an f16
// scale always sits in one half of a word, while code words may straddle two words.

fn block_bytes() -> u32 {
    switch FMT {
        case 1u: { return 18u; }
        case 2u: { return 20u; }
        default: { return 34u; }
    }
}

// The 4 bytes starting at even byte offset `off`, little-endian.
fn word_at(off: u32) -> u32 {
    let i = off >> 2u;
    if ((off & 3u) == 0u) {
        return w[i];
    }
    return (w[i] >> 16u) | (w[i + 1u] << 16u);
}

// The f16 at even byte offset `off`, as f32 (no shader-f16 needed).
fn f16_at(off: u32) -> f32 {
    let pair = unpack2x16float(w[off >> 2u]);
    return select(pair.x, pair.y, (off & 2u) != 0u);
}

// Decodes the 32 weights of the block at byte offset `off`, exactly as ggml does.
fn decode_block(off: u32, q: ptr<function, array<f32, 32>>) {
    let d = f16_at(off);
    if (FMT == 3u) {
        for (var k = 0u; k < 8u; k++) {
            let word = bitcast<i32>(word_at(off + 2u + 4u * k));
            for (var j = 0u; j < 4u; j++) {
                (*q)[4u * k + j] = d * f32(extractBits(word, 8u * j, 8u));
            }
        }
        return;
    }
    // Q4: element i is the low nibble of code byte i, element i + 16 the high one.
    var codes = off + 2u;
    var bias = -8.0 * d;
    if (FMT == 2u) {
        codes = off + 4u;
        bias = f16_at(off + 2u);
    }
    for (var k = 0u; k < 4u; k++) {
        let word = word_at(codes + 4u * k);
        for (var j = 0u; j < 4u; j++) {
            let byte = (word >> (8u * j)) & 0xFFu;
            (*q)[4u * k + j] = d * f32(byte & 0xFu) + bias;
            (*q)[4u * k + j + 16u] = d * f32(byte >> 4u) + bias;
        }
    }
}
