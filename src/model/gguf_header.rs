//! A bounds-checked walk over a GGUF header, run before candle's reader sees the
//! bytes. candle trusts some fields a damaged or hostile file can set (an alignment of
//! 0 divides by zero, dims whose product wraps, unknown type ids); this walk refuses
//! them with the field's name, so the reader only ever parses a header that is
//! self-consistent and fits in the file.
//!
//! Every length is checked against the bytes that remain before anything is sized
//! from it, all arithmetic is checked, and nothing is allocated per declared element,
//! so no count in the file can make this walk allocate, loop or recurse past what the
//! file itself backs.

use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// llama.cpp's default when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal in the format but no model uses more than one level;
/// the cap keeps a file of nested empty arrays from recursing deep.
const MAX_ARRAY_DEPTH: usize = 4;

/// GGUF metadata value types, by their on-disk ids.
const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// The name llama.cpp gives a ggml type id (`enum ggml_type`), including the ids
/// genarm cannot read and those removed from the format, so a refusal can say what
/// the file holds.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31 => "Q4_0_4_4 (removed from GGUF)",
        32 => "Q4_0_4_8 (removed from GGUF)",
        33 => "Q4_0_8_8 (removed from GGUF)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4 (removed from GGUF)",
        37 => "IQ4_NL_4_8 (removed from GGUF)",
        38 => "IQ4_NL_8_8 (removed from GGUF)",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
}

/// The ggml types candle can read, by id.
fn supported_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K…Q8_K";

/// What the walk learnt that later checks use.
#[derive(Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    /// Where tensor data starts (the header's end rounded up to `alignment`).
    pub tensor_data_offset: u64,
}

/// Walks the header of `bytes` and checks it; `path` names the file in errors.
pub fn check_header(bytes: &[u8], path: &Path) -> Result<GgufHeader> {
    let mut r = Reader {
        bytes,
        pos: 0,
        path,
    };
    let magic = r.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(r.error(format!(
            "not a GGUF file: magic {magic:02x?}, expected \"GGUF\""
        )));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(r.error(format!(
            "GGUF version {version} (genarm reads versions 2 and 3)"
        )));
    }
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;
    // Each entry takes at least a length prefix and a type: a count the remaining
    // bytes cannot hold is a lie, refused before anything loops over it.
    r.fits(kv_count, 8 + 4 + 1, "metadata count")?;
    r.fits(tensor_count, 8 + 4 + 8 + 4 + 8, "tensor count")?;

    let mut keys = std::collections::HashSet::new();
    let mut alignment = None;
    for _ in 0..kv_count {
        let key = r.name("metadata key")?;
        let value_type = r.u32("metadata value type")?;
        if key == "general.alignment" {
            alignment = Some(r.alignment(value_type)?);
        } else {
            r.skip_value(value_type, &key, 0)?;
        }
        if !keys.insert(key.clone()) {
            return Err(r.error(format!("metadata key `{key}` appears twice")));
        }
    }
    let alignment = alignment.unwrap_or(DEFAULT_ALIGNMENT);

    let mut tensors = Vec::new();
    let mut names = std::collections::HashSet::new();
    for _ in 0..tensor_count {
        let tensor = r.tensor_info(alignment)?;
        if !names.insert(tensor.name.clone()) {
            return Err(r.error(format!("tensor `{}` appears twice", tensor.name)));
        }
        tensors.push(tensor);
    }

    let header_end = r.pos as u64;
    let tensor_data_offset = header_end
        .checked_next_multiple_of(alignment)
        .filter(|&o| o <= bytes.len() as u64 || tensors.is_empty())
        .ok_or_else(|| r.error("the header runs past the end of the file"))?;
    let file_len = bytes.len() as u64;
    for t in &tensors {
        let end = tensor_data_offset
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.size).map(|end| (start, end)))
            .filter(|&(_, end)| end <= file_len);
        if end.is_none() {
            return Err(r.error(format!(
                "truncated: tensor `{}` needs {} bytes at data offset {} but the file has {file_len} bytes",
                t.name,
                t.size,
                t.offset
            )));
        }
    }
    Ok(GgufHeader {
        version,
        alignment,
        tensor_data_offset,
    })
}

struct TensorEntry {
    name: String,
    offset: u64,
    /// Bytes of data.
    size: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::format(self.path, message.into())
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.remaining())
            .ok_or_else(|| {
                self.error(format!(
                    "truncated GGUF header: {what} needs {n} bytes at offset {}, {} remain",
                    self.pos,
                    self.remaining()
                ))
            })?;
        let bytes = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    /// Refuses `count` entries of at least `min_size` bytes each when the rest of the
    /// file is shorter than that.
    fn fits(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() as u64 => Ok(()),
            _ => Err(self.error(format!(
                "{what} {count} cannot fit in the {} bytes left in the file",
                self.remaining()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed string, as raw bytes.
    fn string(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    /// A key or tensor name as candle will see it: trailing NULs dropped, invalid
    /// UTF-8 replaced (so two names candle would merge are caught as duplicates).
    fn name(&mut self, what: &str) -> Result<String> {
        let mut bytes = self.string(what)?;
        while let [rest @ .., 0] = bytes {
            bytes = rest;
        }
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Skips one value of `value_type`, checking every nested length.
    fn skip_value(&mut self, value_type: u32, key: &str, depth: usize) -> Result<()> {
        let what = format!("metadata `{key}`");
        match value_type {
            TYPE_U8 | TYPE_I8 => self.take(1, &what).map(drop),
            TYPE_BOOL => match self.take(1, &what)?[0] {
                0 | 1 => Ok(()),
                b => Err(self.error(format!("{what}: bool byte {b}"))),
            },
            TYPE_U16 | TYPE_I16 => self.take(2, &what).map(drop),
            TYPE_U32 | TYPE_I32 | TYPE_F32 => self.take(4, &what).map(drop),
            TYPE_U64 | TYPE_I64 | TYPE_F64 => self.take(8, &what).map(drop),
            TYPE_STRING => self.string(&what).map(drop),
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.error(format!(
                        "metadata `{}`: arrays nested deeper than {MAX_ARRAY_DEPTH}",
                        key
                    )));
                }
                let item_type = self.u32(&what)?;
                let len = self.u64(&what)?;
                let min_size = match item_type {
                    TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
                    TYPE_U16 | TYPE_I16 => 2,
                    TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
                    TYPE_U64 | TYPE_I64 | TYPE_F64 | TYPE_STRING => 8,
                    TYPE_ARRAY => 12,
                    other => return Err(self.unknown_type(other, key)),
                };
                self.fits(len, min_size, &format!("metadata `{}`: array length", key))?;
                for _ in 0..len {
                    self.skip_value(item_type, key, depth + 1)?;
                }
                Ok(())
            }
            other => Err(self.unknown_type(other, key)),
        }
    }

    fn unknown_type(&self, id: u32, key: &str) -> Error {
        self.error(format!("metadata `{key}`: unknown value type {id}"))
    }

    /// `general.alignment`: a power of two, of an integer type candle reads the same
    /// way (it silently falls back to 32 for the others).
    fn alignment(&mut self, value_type: u32) -> Result<u64> {
        let value: Option<i64> = match value_type {
            TYPE_U8 => Some(self.array::<1>("value")?[0] as i64),
            TYPE_I8 => Some(i8::from_le_bytes(self.array("value")?) as i64),
            TYPE_U16 => Some(u16::from_le_bytes(self.array("value")?) as i64),
            TYPE_I16 => Some(i16::from_le_bytes(self.array("value")?) as i64),
            TYPE_U32 => Some(self.u32("value")? as i64),
            TYPE_I32 => Some(i32::from_le_bytes(self.array("value")?) as i64),
            _ => None,
        };
        match value {
            Some(a) if a > 0 && (a as u64).is_power_of_two() => Ok(a as u64),
            Some(a) => Err(self.error(format!(
                "general.alignment = {a}: must be a power of two greater than 0"
            ))),
            None => Err(self.error(format!(
                "general.alignment has value type {value_type}, expected an unsigned 32-bit integer"
            ))),
        }
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorEntry> {
        let name = self.name("tensor name")?;
        let shown = name.clone();
        let bad = |r: &Self, message: String| r.error(format!("tensor `{shown}`: {message}"));
        let n_dims = self.u32("tensor dimension count")?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(bad(
                self,
                format!("{n_dims} dimensions (must be 1 to {MAX_DIMS})"),
            ));
        }
        let mut dims = [0u64; MAX_DIMS as usize];
        let mut elems: u64 = 1;
        for d in dims.iter_mut().take(n_dims as usize) {
            *d = self.u64("tensor dimension")?;
            elems = elems.checked_mul(*d).filter(|_| *d > 0).ok_or_else(|| {
                bad(
                    self,
                    format!("dimension {d} is 0 or the element count overflows"),
                )
            })?;
        }
        let type_id = self.u32("tensor type")?;
        let offset = self.u64("tensor offset")?;
        let dtype = supported_type(type_id).ok_or_else(|| {
            let what = ggml_type_name(type_id)
                .map(|n| format!("type {n}"))
                .unwrap_or_else(|| format!("unknown ggml type id {type_id}"));
            Error::unsupported(
                self.path,
                format!(
                    "tensor `{shown}` has {what}, which genarm does not support (supported: {SUPPORTED_TYPES})"
                ),
            )
        })?;
        let block = dtype.block_size() as u64;
        // ggml quantizes along the innermost dimension, which is stored first.
        if dims[0] % block != 0 {
            return Err(bad(
                self,
                format!(
                    "innermost dimension {} is not a whole number of {dtype:?} blocks of {block}",
                    dims[0]
                ),
            ));
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .filter(|&s| usize::try_from(s).is_ok() && usize::try_from(elems).is_ok())
            .ok_or_else(|| bad(self, format!("{elems} elements do not fit in memory")))?;
        if offset % alignment != 0 {
            return Err(bad(
                self,
                format!("data offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        Ok(TensorEntry { name, offset, size })
    }
}
