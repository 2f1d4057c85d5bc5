"""A minimal GGUF v3 writer in numpy: F32, Q8_0 and Q4_1 tensors, scalar metadata.

The GPU machine has torch but not the `gguf` package, and genarm has no GGUF writer, so
the check quantizes its SmolLM2-shaped model here. Only what a llama-arch checkpoint for
genarm needs is written: no tokenizer (the check passes token ids), no arrays.
"""

import struct

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF's default `general.alignment`

# ggml tensor types and their (elements, bytes) per block.
F32, Q4_1, Q8_0 = 0, 3, 8
BLOCK = {F32: (1, 4), Q4_1: (32, 20), Q8_0: (32, 34)}

# GGUF metadata value types used here.
_U32, _F32, _STRING = 4, 6, 8


def _string(s):
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(v):
    """(type, bytes) of a metadata value: str, int (u32) or float (f32)."""
    if isinstance(v, str):
        return _STRING, _string(v)
    if isinstance(v, bool):
        raise TypeError("bool metadata is not needed here")
    if isinstance(v, int):
        return _U32, struct.pack("<I", v)
    if isinstance(v, float):
        return _F32, struct.pack("<f", v)
    raise TypeError(f"unsupported metadata value {v!r}")


def quantize_q8_0(w):
    """Rows of 32 → f16 scale d = max|x|/127 and 32 int8 codes (ggml's Q8_0)."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def quantize_q4_1(w):
    """Rows of 32 → f16 step d, f16 minimum m and 32 four-bit codes (ggml's Q4_1):
    byte j holds element j in its low nibble and element j + 16 in its high one."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    d = (hi - lo) / 15.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint((blocks - lo[:, None]) * inv[:, None]), 0, 15).astype(np.uint8)
    out = np.empty((blocks.shape[0], 20), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = lo.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def dequantize(data, ggml_type, shape):
    """The f32 values a reader decodes from `data` (for the writer's own test)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if ggml_type == F32:
        return raw.view(np.float32).reshape(shape)
    if ggml_type == Q8_0:
        b = raw.reshape(-1, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(shape)
    if ggml_type == Q4_1:
        b = raw.reshape(-1, 20)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = b[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (q * d + m).reshape(shape)
    raise ValueError(f"unknown ggml type {ggml_type}")


def encode(w, ggml_type):
    if w.ndim < 1 or w.shape[-1] % BLOCK[ggml_type][0]:
        raise ValueError(f"row length {w.shape[-1]} is not a multiple of the block size")
    if ggml_type == F32:
        return np.ascontiguousarray(w, dtype=np.float32).tobytes()
    if ggml_type == Q8_0:
        return quantize_q8_0(w)
    if ggml_type == Q4_1:
        return quantize_q4_1(w)
    raise ValueError(f"unknown ggml type {ggml_type}")


def write_gguf(path, metadata, tensors):
    """Writes `metadata` (dict of str → str/int/float) and `tensors` (list of
    (name, row-major f32 array, ggml type)) as a GGUF v3 file. GGUF lists a tensor's
    dimensions innermost first, so a [rows, cols] matrix is written as (cols, rows)."""
    header = bytearray(GGUF_MAGIC)
    header += struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))
    for key, v in metadata.items():
        kind, raw = _value(v)
        header += _string(key) + struct.pack("<I", kind) + raw
    blobs, offset = [], 0
    for name, w, ggml_type in tensors:
        data = encode(w, ggml_type)
        header += _string(name) + struct.pack("<I", w.ndim)
        header += struct.pack(f"<{w.ndim}Q", *reversed(w.shape))
        header += struct.pack("<IQ", ggml_type, offset)
        pad = -len(data) % ALIGNMENT
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    header += b"\0" * (-len(header) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(header)
        for blob in blobs:
            f.write(blob)
    return len(header) + offset
