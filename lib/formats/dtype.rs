//! The element types of stored tensors: one enum for every file format zerokit reads or writes
//! (safetensors, torch pickles, zerokit checkpoints) and for libtorch's tensors, with each
//! format's spelling and the element conversions zero-to-fp32 and `ckpt verify` apply.
//!
//! Two other enums in lib/ are named `Dtype` and are deliberately not this one:
//! - `data::Dtype` (u16 / u32) is the width of token ids in a prepared token file, with numpy's
//!   names in its meta.json; it never describes a tensor.
//! - `memory::Dtype` (fp32 / fp16 / bf16) is the precision a training set-up would use, a
//!   command-line choice of `ckpt estimate`; it maps onto this enum for its element size.

use tch::Kind;

/// Element types of stored tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

/// Every element type, for lookups by name.
const ALL: [DType; 10] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DTypeError {
    #[error("tensors of libtorch kind {0:?} cannot be stored (no safetensors dtype)")]
    Kind(Kind),
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// The safetensors spelling, also used in zerokit manifests' `dtypes`.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        ALL.into_iter().find(|d| d.safetensors_name() == s)
    }

    /// The safetensors crate's value; every element type here has one.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F64 => safetensors::Dtype::F64,
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::I64 => safetensors::Dtype::I64,
            DType::I32 => safetensors::Dtype::I32,
            DType::I16 => safetensors::Dtype::I16,
            DType::I8 => safetensors::Dtype::I8,
            DType::U8 => safetensors::Dtype::U8,
            DType::Bool => safetensors::Dtype::BOOL,
        }
    }

    /// None for the safetensors types zerokit does not read (F8 variants, unsigned wide ints).
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        ALL.into_iter().find(|x| x.to_safetensors() == d)
    }

    /// libtorch's kind of the same element type.
    pub fn kind(self) -> Kind {
        match self {
            DType::F64 => Kind::Double,
            DType::F32 => Kind::Float,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
            DType::I64 => Kind::Int64,
            DType::I32 => Kind::Int,
            DType::I16 => Kind::Int16,
            DType::I8 => Kind::Int8,
            DType::U8 => Kind::Uint8,
            DType::Bool => Kind::Bool,
        }
    }

    /// The element type of a libtorch kind; complex and quantized kinds have none, and are an
    /// error rather than being written as bytes under a wrong name.
    pub fn from_kind(kind: Kind) -> Result<DType, DTypeError> {
        ALL.into_iter().find(|d| d.kind() == kind).ok_or(DTypeError::Kind(kind))
    }

    /// The legacy typed-storage class names torch pickles (`torch.FloatStorage`, ...); an
    /// untyped storage holds bytes.
    pub fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" | "UntypedStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }
}

/// Converts little-endian elements between dtypes, rounding to nearest-even as torch's `.to()`.
pub fn cast(src: &[u8], from: DType, to: DType, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(src.len() / from.size() * to.size());
    let n = src.len() / from.size();
    match (from, to) {
        (DType::F32, DType::F16) => {
            for c in src.chunks_exact(4) {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
            }
        }
        (DType::F32, DType::BF16) => {
            for c in src.chunks_exact(4) {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
        }
        _ => {
            for i in 0..n {
                let x = read_f64(&src[i * from.size()..], from);
                write_f64(out, x, to);
            }
        }
    }
}

fn read_f64(b: &[u8], d: DType) -> f64 {
    match d {
        DType::F64 => f64::from_le_bytes(b[..8].try_into().unwrap()),
        DType::F32 => f32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        // Integer tensors are never cast (zero-to-fp32 keeps their dtype), so this is unreachable in use.
        DType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()) as f64,
        DType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        DType::I8 => b[0] as i8 as f64,
        DType::U8 | DType::Bool => b[0] as f64,
    }
}

fn write_f64(out: &mut Vec<u8>, x: f64, d: DType) {
    match d {
        // f64 -> f32 -> half would round twice; go straight from f64.
        DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
        DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
        DType::I64 => out.extend_from_slice(&(x as i64).to_le_bytes()),
        DType::I32 => out.extend_from_slice(&(x as i32).to_le_bytes()),
        DType::I16 => out.extend_from_slice(&(x as i16).to_le_bytes()),
        DType::I8 => out.push(x as i8 as u8),
        DType::U8 | DType::Bool => out.push(x as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_round_trips() {
        for d in ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_safetensors(d.to_safetensors()), Some(d));
            assert_eq!(DType::from_kind(d.kind()), Ok(d));
            assert_eq!(d.kind().elt_size_in_bytes(), d.size());
            assert_eq!(d.to_safetensors().bitsize(), 8 * d.size());
        }
        assert_eq!(DType::from_kind(Kind::ComplexFloat), Err(DTypeError::Kind(Kind::ComplexFloat)));
        assert_eq!(DType::from_safetensors_name("F8_E4M3"), None);
    }

    #[test]
    fn casts_round_to_nearest_even_like_torch() {
        // 1 + 2^-8 + 2^-9 lies above the bf16 midpoint: rounds up; 1 + 2^-8 is a tie: to even.
        let xs = [1.0f32 + 1.0 / 256.0 + 1.0 / 512.0, 1.0 + 1.0 / 256.0, -2.5, 65520.0];
        let src: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut out = vec![];
        cast(&src, DType::F32, DType::BF16, &mut out);
        let got: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, vec![0x3f81, 0x3f80, 0xc020, 0x4780]);
        cast(&src, DType::F32, DType::F16, &mut out);
        let got: Vec<u16> = out.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        // 65520 overflows half's range on rounding: inf, as torch gives.
        assert_eq!(got, vec![0x3c06, 0x3c04, 0xc100, 0x7c00]);
        let mut back = vec![];
        cast(&out, DType::F16, DType::F32, &mut back);
        assert_eq!(f32::from_le_bytes(back[8..12].try_into().unwrap()), -2.5);
    }
}
