//! Element types: every dtype torch names, with its size and, where safetensors has one, its
//! safetensors name.
//!
//! The file format ([`crate::format`], which re-exports [`Dtype`]), the tensor table's checks of
//! untrusted layouts ([`crate::table::TensorTable::from_layout`]) and the bindings' dtype objects
//! all speak of dtypes through this one table. It is a module of its own, below both the table
//! and the format, so that imports keep running one way (the format builds on the table).
//!
//! # Example
//! ```
//! use stager::format::Dtype;
//! let dtype = Dtype::from_torch_name("bfloat16").unwrap();
//! assert_eq!((dtype.itemsize(), dtype.safetensors_name()), (2, Some("BF16")));
//! assert_eq!(Dtype::from_safetensors_name("BF16"), Some(dtype));
//! ```
//!
//! # Thread Safety
//! Plain `Copy` values and constant tables.

/// A tensor's element type: every dtype torch names, with its size and, where safetensors has
/// one, its safetensors name. File headers, the tree's tensor records and the bindings all speak
/// of dtypes through this one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `torch.float64` (safetensors `F64`).
    Float64,
    /// `torch.float32` (safetensors `F32`).
    Float32,
    /// `torch.float16` (safetensors `F16`).
    Float16,
    /// `torch.bfloat16` (safetensors `BF16`).
    BFloat16,
    /// `torch.complex128`.
    Complex128,
    /// `torch.complex64` (safetensors `C64`).
    Complex64,
    /// `torch.complex32`.
    Complex32,
    /// `torch.bcomplex32`.
    BComplex32,
    /// `torch.int64` (safetensors `I64`).
    Int64,
    /// `torch.int32` (safetensors `I32`).
    Int32,
    /// `torch.int16` (safetensors `I16`).
    Int16,
    /// `torch.int8` (safetensors `I8`).
    Int8,
    /// `torch.uint64` (safetensors `U64`).
    UInt64,
    /// `torch.uint32` (safetensors `U32`).
    UInt32,
    /// `torch.uint16` (safetensors `U16`).
    UInt16,
    /// `torch.uint8` (safetensors `U8`).
    UInt8,
    /// `torch.bool` (safetensors `BOOL`).
    Bool,
    /// `torch.float8_e4m3fn` (safetensors `F8_E4M3`).
    Float8E4m3fn,
    /// `torch.float8_e5m2` (safetensors `F8_E5M2`).
    Float8E5m2,
    /// `torch.float8_e4m3fnuz` (safetensors `F8_E4M3FNUZ`).
    Float8E4m3fnuz,
    /// `torch.float8_e5m2fnuz` (safetensors `F8_E5M2FNUZ`).
    Float8E5m2fnuz,
    /// `torch.float8_e8m0fnu` (safetensors `F8_E8M0`).
    Float8E8m0fnu,
    /// `torch.float4_e2m1fn_x2`.
    Float4E2m1fnX2,
    /// `torch.int1`.
    Int1,
    /// `torch.int2`.
    Int2,
    /// `torch.int3`.
    Int3,
    /// `torch.int4`.
    Int4,
    /// `torch.int5`.
    Int5,
    /// `torch.int6`.
    Int6,
    /// `torch.int7`.
    Int7,
    /// `torch.uint1`.
    UInt1,
    /// `torch.uint2`.
    UInt2,
    /// `torch.uint3`.
    UInt3,
    /// `torch.uint4`.
    UInt4,
    /// `torch.uint5`.
    UInt5,
    /// `torch.uint6`.
    UInt6,
    /// `torch.uint7`.
    UInt7,
    /// `torch.qint8`.
    QInt8,
    /// `torch.quint8`.
    QUInt8,
    /// `torch.qint32`.
    QInt32,
    /// `torch.quint4x2`.
    QUInt4x2,
    /// `torch.quint2x4`.
    QUInt2x4,
    /// `torch.bits1x8`.
    Bits1x8,
    /// `torch.bits2x4`.
    Bits2x4,
    /// `torch.bits4x2`.
    Bits4x2,
    /// `torch.bits8`.
    Bits8,
    /// `torch.bits16`.
    Bits16,
}

/// One row of [`DTYPES`].
struct DtypeInfo {
    dtype: Dtype,
    torch: &'static str,
    itemsize: usize,
    complex: bool,
    safetensors: Option<&'static str>,
}

/// Every [`Dtype`], in declaration order (`DTYPES[d as usize].dtype == d`).
#[rustfmt::skip]
const DTYPES: &[DtypeInfo] = &[
    DtypeInfo { dtype: Dtype::Float64, torch: "float64", itemsize: 8, complex: false, safetensors: Some("F64") },
    DtypeInfo { dtype: Dtype::Float32, torch: "float32", itemsize: 4, complex: false, safetensors: Some("F32") },
    DtypeInfo { dtype: Dtype::Float16, torch: "float16", itemsize: 2, complex: false, safetensors: Some("F16") },
    DtypeInfo { dtype: Dtype::BFloat16, torch: "bfloat16", itemsize: 2, complex: false, safetensors: Some("BF16") },
    DtypeInfo { dtype: Dtype::Complex128, torch: "complex128", itemsize: 16, complex: true, safetensors: None },
    DtypeInfo { dtype: Dtype::Complex64, torch: "complex64", itemsize: 8, complex: true, safetensors: Some("C64") },
    DtypeInfo { dtype: Dtype::Complex32, torch: "complex32", itemsize: 4, complex: true, safetensors: None },
    DtypeInfo { dtype: Dtype::BComplex32, torch: "bcomplex32", itemsize: 4, complex: true, safetensors: None },
    DtypeInfo { dtype: Dtype::Int64, torch: "int64", itemsize: 8, complex: false, safetensors: Some("I64") },
    DtypeInfo { dtype: Dtype::Int32, torch: "int32", itemsize: 4, complex: false, safetensors: Some("I32") },
    DtypeInfo { dtype: Dtype::Int16, torch: "int16", itemsize: 2, complex: false, safetensors: Some("I16") },
    DtypeInfo { dtype: Dtype::Int8, torch: "int8", itemsize: 1, complex: false, safetensors: Some("I8") },
    DtypeInfo { dtype: Dtype::UInt64, torch: "uint64", itemsize: 8, complex: false, safetensors: Some("U64") },
    DtypeInfo { dtype: Dtype::UInt32, torch: "uint32", itemsize: 4, complex: false, safetensors: Some("U32") },
    DtypeInfo { dtype: Dtype::UInt16, torch: "uint16", itemsize: 2, complex: false, safetensors: Some("U16") },
    DtypeInfo { dtype: Dtype::UInt8, torch: "uint8", itemsize: 1, complex: false, safetensors: Some("U8") },
    DtypeInfo { dtype: Dtype::Bool, torch: "bool", itemsize: 1, complex: false, safetensors: Some("BOOL") },
    DtypeInfo { dtype: Dtype::Float8E4m3fn, torch: "float8_e4m3fn", itemsize: 1, complex: false, safetensors: Some("F8_E4M3") },
    DtypeInfo { dtype: Dtype::Float8E5m2, torch: "float8_e5m2", itemsize: 1, complex: false, safetensors: Some("F8_E5M2") },
    DtypeInfo { dtype: Dtype::Float8E4m3fnuz, torch: "float8_e4m3fnuz", itemsize: 1, complex: false, safetensors: Some("F8_E4M3FNUZ") },
    DtypeInfo { dtype: Dtype::Float8E5m2fnuz, torch: "float8_e5m2fnuz", itemsize: 1, complex: false, safetensors: Some("F8_E5M2FNUZ") },
    DtypeInfo { dtype: Dtype::Float8E8m0fnu, torch: "float8_e8m0fnu", itemsize: 1, complex: false, safetensors: Some("F8_E8M0") },
    DtypeInfo { dtype: Dtype::Float4E2m1fnX2, torch: "float4_e2m1fn_x2", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int1, torch: "int1", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int2, torch: "int2", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int3, torch: "int3", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int4, torch: "int4", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int5, torch: "int5", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int6, torch: "int6", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Int7, torch: "int7", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt1, torch: "uint1", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt2, torch: "uint2", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt3, torch: "uint3", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt4, torch: "uint4", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt5, torch: "uint5", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt6, torch: "uint6", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::UInt7, torch: "uint7", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::QInt8, torch: "qint8", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::QUInt8, torch: "quint8", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::QInt32, torch: "qint32", itemsize: 4, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::QUInt4x2, torch: "quint4x2", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::QUInt2x4, torch: "quint2x4", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Bits1x8, torch: "bits1x8", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Bits2x4, torch: "bits2x4", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Bits4x2, torch: "bits4x2", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Bits8, torch: "bits8", itemsize: 1, complex: false, safetensors: None },
    DtypeInfo { dtype: Dtype::Bits16, torch: "bits16", itemsize: 2, complex: false, safetensors: None },
];

/// Dtypes whose whole-storage tensors a stager file stores under their own key: the ones the
/// `safetensors` package's torch loader names. (`F8_E8M0` is read in headers, but tensors of it
/// are stored as bytes, which every reader loads.)
const ENTRY_DTYPES: &[Dtype] = &[
    Dtype::Float64,
    Dtype::Float32,
    Dtype::Float16,
    Dtype::BFloat16,
    Dtype::Int64,
    Dtype::Int32,
    Dtype::Int16,
    Dtype::Int8,
    Dtype::UInt8,
    Dtype::Bool,
    Dtype::Complex64,
    Dtype::Float8E4m3fn,
    Dtype::Float8E5m2,
    Dtype::Float8E4m3fnuz,
    Dtype::Float8E5m2fnuz,
    Dtype::UInt16,
    Dtype::UInt32,
    Dtype::UInt64,
];

impl Dtype {
    fn info(self) -> &'static DtypeInfo {
        &DTYPES[self as usize]
    }

    /// Every dtype, in declaration order.
    pub fn all() -> impl Iterator<Item = Dtype> {
        DTYPES.iter().map(|info| info.dtype)
    }

    /// The dtype torch calls `name` (`"float32"`, an attribute of the `torch` module).
    pub fn from_torch_name(name: &str) -> Option<Dtype> {
        DTYPES
            .iter()
            .find(|info| info.torch == name)
            .map(|info| info.dtype)
    }

    /// Its torch name (`"float32"`).
    pub fn torch_name(self) -> &'static str {
        self.info().torch
    }

    /// The dtype safetensors calls `name` (`"F32"`).
    pub fn from_safetensors_name(name: &str) -> Option<Dtype> {
        DTYPES
            .iter()
            .find(|info| info.safetensors == Some(name))
            .map(|info| info.dtype)
    }

    /// Its safetensors name (`"F32"`), if safetensors has one.
    pub fn safetensors_name(self) -> Option<&'static str> {
        self.info().safetensors
    }

    /// Whether a stager file stores a whole-storage tensor of this dtype under its own key, as
    /// safetensors readers see tensors (see [`crate::format::storage_entries`]).
    pub fn names_file_entries(self) -> bool {
        ENTRY_DTYPES.contains(&self)
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        self.info().itemsize
    }

    /// Whether its elements are complex numbers (only those carry the conjugate bit).
    pub fn is_complex(self) -> bool {
        self.info().complex
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_declaration_order_and_names_are_unique() {
        let mut torch_names = std::collections::HashSet::new();
        let mut safetensors_names = std::collections::HashSet::new();
        for (index, info) in DTYPES.iter().enumerate() {
            assert_eq!(info.dtype as usize, index, "{}", info.torch);
            assert!(torch_names.insert(info.torch), "{}", info.torch);
            if let Some(name) = info.safetensors {
                assert!(safetensors_names.insert(name), "{name}");
                assert_eq!(Dtype::from_safetensors_name(name), Some(info.dtype));
            }
            assert_eq!(Dtype::from_torch_name(info.torch), Some(info.dtype));
        }
        assert!(ENTRY_DTYPES.iter().all(|d| d.safetensors_name().is_some()));
        assert_eq!(Dtype::from_torch_name("object"), None);
        assert_eq!(Dtype::from_safetensors_name("F128"), None);
        assert!(Dtype::Complex64.is_complex() && !Dtype::Float32.is_complex());
        assert_eq!(Dtype::Complex128.itemsize(), 16);
    }
}
