//! The stager file format: a `.safetensors` file whose metadata also carries the rest.
//!
//! ```text
//! [u64 little-endian: N] [N bytes: JSON header, padded with spaces] [data section]
//! ```
//!
//! The JSON header maps each entry name to `{"dtype", "shape", "data_offsets": [begin, end]}`
//! (offsets relative to the data section) and `"__metadata__"` to a string→string map. Entries
//! tile the data section exactly, in order, with no gap and no overlap, as safetensors demands.
//! stager writes one entry per stored buffer (a tensor's storage), 64-byte aligned, with
//! `__stager__.pad.<i>` entries of `U8` filling the alignment gaps; the header is padded so the
//! data section starts on a 4 KiB boundary. Its `__metadata__` holds:
//!
//! - `format`: `"stager"`, `stager.version`: `"1"`;
//! - `stager.tree`: the tree, tensors and storages as JSON (`python/stager/tree.py`);
//! - `stager.storages`: a JSON list naming the entry of each storage, in storage order;
//! - `stager.crc32c`: the crc32c of each storage's bytes, 8 hex digits each, comma-separated.
//!
//! Everything read from a file is untrusted: [`parse_header`] checks sizes before allocating,
//! every dtype, shape and offset, the tiling of the data section and the file's length, and
//! [`stager_layout`] checks the stager metadata against the entries.
//!
//! # Example
//! ```
//! use std::collections::BTreeMap;
//! use stager::format::{build_header, layout_entries, parse_header, Dtype, EntrySpec};
//! let entries = layout_entries(&[EntrySpec { name: "w".into(), dtype: Dtype::Float32, shape: vec![2], nbytes: 8 }]).unwrap();
//! let header = build_header(&entries, &BTreeMap::new()).unwrap();
//! let parsed = parse_header(&header[8..], header.len() as u64 + 8).unwrap();
//! assert_eq!(parsed.entries[0].name, "w");
//! ```
//!
//! # Thread Safety
//! Pure functions over owned data.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

pub use crate::dtype::Dtype;
use crate::layout::{self, VIEW_WHOLE_STORAGE};
pub use crate::layout::{
    FORMAT_VERSION as VERSION, KEY_CRC, KEY_FORMAT, KEY_STORAGES, KEY_TREE, KEY_VERSION,
    RESERVED_PREFIX,
};
use crate::table::TensorTable;

/// The largest JSON header safetensors readers accept (their bound). stager writes larger ones
/// (a million tensors need more), and `stager inspect` says such a file is stager-only.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;
/// The largest JSON header stager writes or reads. A hostile length is bounded by the file's size
/// as well, so reading one allocates no more than the file holds.
pub const MAX_STAGER_HEADER_BYTES: u64 = 2 << 30;

/// Whether safetensors readers accept a header of `header_len` bytes.
pub fn safetensors_readable(header_len: u64) -> bool {
    header_len <= MAX_HEADER_BYTES
}
/// Alignment of every stored buffer inside the data section ([`layout::STORAGE_ALIGNMENT`]).
pub const STORAGE_ALIGNMENT: u64 = layout::STORAGE_ALIGNMENT as u64;
/// The data section starts at a multiple of this in the file ([`layout::DATA_ALIGNMENT`]).
pub const DATA_ALIGNMENT: u64 = layout::DATA_ALIGNMENT as u64;

/// What the writer is asked to store for one buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntrySpec {
    /// The entry's name in the header.
    pub name: String,
    /// Its dtype (one safetensors names).
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its bytes.
    pub nbytes: u64,
}

/// A tensor as a safetensors reader would see it: its dtype name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
}

/// One entry per storage of `table`, in storage order. A storage viewed by exactly one tensor
/// that covers it whole is stored under that tensor's name (`tensor_names[i]`, its dotted key
/// path) with the dtype and shape `describe(i)` gives, so any safetensors reader sees the tensor
/// itself; every other storage (views sharing it, a dtype safetensors lacks, a name that is taken,
/// reserved or missing) is a `__stager__.storage.<i>` byte entry.
pub fn storage_entries(
    table: &TensorTable,
    tensor_names: &[Option<String>],
    describe: impl Fn(usize) -> Option<TensorEntry>,
) -> Vec<EntrySpec> {
    let mut owner: Vec<Option<usize>> = vec![None; table.storages().len()];
    for (index, view) in table.views().iter().enumerate() {
        if view.flags == VIEW_WHOLE_STORAGE && table.storages()[view.storage].users == 1 {
            owner[view.storage] = Some(index);
        }
    }
    let mut used = std::collections::HashSet::with_capacity(owner.len());
    table
        .storages()
        .iter()
        .enumerate()
        .map(|(index, storage)| {
            let named = owner[index].and_then(|tensor| {
                let name = tensor_names.get(tensor)?.as_deref()?;
                if name.is_empty() || name.starts_with("__") || used.contains(name) {
                    return None;
                }
                let entry = describe(tensor).filter(|entry| entry.dtype.names_file_entries())?;
                Some((name.to_string(), entry))
            });
            let spec = match named {
                Some((name, entry)) => EntrySpec {
                    name,
                    dtype: entry.dtype,
                    shape: entry.shape,
                    nbytes: storage.nbytes as u64,
                },
                None => EntrySpec {
                    name: format!("{RESERVED_PREFIX}storage.{index}"),
                    dtype: Dtype::UInt8,
                    shape: vec![storage.nbytes as u64],
                    nbytes: storage.nbytes as u64,
                },
            };
            used.insert(spec.name.clone());
            spec
        })
        .collect()
}

/// One entry of the header: a named byte range of the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's name.
    pub name: String,
    /// Its dtype (one safetensors names).
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Start, relative to the start of the data section.
    pub begin: u64,
    /// End (exclusive), relative to the start of the data section.
    pub end: u64,
}

impl Entry {
    /// Bytes of the entry.
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// Lays `specs` out one after another, each 64-byte aligned, with padding entries in the gaps.
/// Returns every entry (storages and paddings) in file order; the i-th spec is the i-th entry
/// whose name does not start with `__stager__.pad.`.
pub fn layout_entries(specs: &[EntrySpec]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::with_capacity(specs.len());
    let mut offset = 0u64;
    let mut names = std::collections::HashSet::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        check_entry(&spec.name, spec.dtype, &spec.shape, spec.nbytes)
            .map_err(|reason| format!("storage {index}: {reason}"))?;
        if is_padding(&spec.name) {
            return Err(format!(
                "entry name {:?} is reserved for padding",
                spec.name
            ));
        }
        if !names.insert(spec.name.as_str()) {
            return Err(format!("entry name {:?} is used twice", spec.name));
        }
        // Empty buffers need no alignment (and get no padding).
        let aligned = if spec.nbytes == 0 {
            offset
        } else {
            offset.div_ceil(STORAGE_ALIGNMENT) * STORAGE_ALIGNMENT
        };
        if aligned > offset {
            entries.push(Entry {
                name: format!("{RESERVED_PREFIX}pad.{index}"),
                dtype: Dtype::UInt8,
                shape: vec![aligned - offset],
                begin: offset,
                end: aligned,
            });
        }
        entries.push(Entry {
            name: spec.name.clone(),
            dtype: spec.dtype,
            shape: spec.shape.clone(),
            begin: aligned,
            end: aligned + spec.nbytes,
        });
        offset = aligned + spec.nbytes;
    }
    Ok(entries)
}

/// Whether `padding entry` names one of the alignment fillers.
pub fn is_padding(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX) && name[RESERVED_PREFIX.len()..].starts_with("pad.")
}

fn check_entry(name: &str, dtype: Dtype, shape: &[u64], nbytes: u64) -> Result<(), String> {
    if name == "__metadata__" {
        return Err("an entry cannot be named __metadata__".into());
    }
    if dtype.safetensors_name().is_none() {
        return Err(format!(
            "entry {name:?} has dtype {dtype}, which safetensors has no name for"
        ));
    }
    let size = dtype.itemsize() as u64;
    let expected = shape
        .iter()
        .try_fold(size, |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| format!("entry {name:?}: shape {shape:?} overflows"))?;
    if expected != nbytes {
        return Err(format!(
            "entry {name:?}: {dtype} {shape:?} needs {expected} bytes but spans {nbytes}"
        ));
    }
    Ok(())
}

/// The full file prefix: the 8-byte length and the JSON header, padded with spaces so the data
/// section starts on a [`DATA_ALIGNMENT`] boundary.
pub fn build_header(
    entries: &[Entry],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let mut root = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        root.insert("__metadata__".into(), Value::Object(meta));
    }
    for entry in entries {
        let mut object = Map::new();
        let Some(dtype) = entry.dtype.safetensors_name() else {
            return Err(format!(
                "entry {:?} has dtype {}, which safetensors has no name for",
                entry.name, entry.dtype
            ));
        };
        object.insert("dtype".into(), Value::String(dtype.into()));
        object.insert(
            "shape".into(),
            Value::Array(entry.shape.iter().map(|&d| Value::from(d)).collect()),
        );
        object.insert(
            "data_offsets".into(),
            Value::Array(vec![Value::from(entry.begin), Value::from(entry.end)]),
        );
        if root
            .insert(entry.name.clone(), Value::Object(object))
            .is_some()
        {
            return Err(format!("entry name {:?} is used twice", entry.name));
        }
    }
    let json = serde_json::to_vec(&Value::Object(root)).map_err(|err| err.to_string())?;
    let unpadded = 8 + json.len() as u64;
    let total = unpadded.div_ceil(DATA_ALIGNMENT) * DATA_ALIGNMENT;
    let header_len = total - 8;
    if header_len > MAX_STAGER_HEADER_BYTES {
        return Err(format!(
            "the header would take {header_len} bytes, more than the {MAX_STAGER_HEADER_BYTES} stager writes (too many tensors or too long key names for one file)"
        ));
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(total as usize, b' ');
    Ok(out)
}

/// Formats checksums the way [`KEY_CRC`] stores them (fixed width, so the header's length does
/// not depend on their values).
pub fn format_crcs(crcs: &[u32]) -> String {
    let mut out = String::with_capacity(crcs.len() * 9);
    for (i, crc) in crcs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{crc:08x}"));
    }
    out
}

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Bytes of the JSON header (without the 8-byte length).
    pub header_len: u64,
    /// File offset of the data section (`8 + header_len`).
    pub data_start: u64,
    /// Bytes of the data section.
    pub data_len: u64,
    /// Every entry, sorted by offset; they tile `[0, data_len)`.
    pub entries: Vec<Entry>,
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

/// Reads the header length from the first 8 bytes and checks it against the file size.
pub fn header_len(prefix: &[u8; 8], file_len: u64) -> Result<u64, String> {
    if prefix.starts_with(b"PK\x03\x04") {
        return Err(
            "this is a zip archive (a torch.save file?), not a safetensors/stager file".into(),
        );
    }
    if prefix[0] == 0x80 && (2..=5).contains(&prefix[1]) {
        return Err("this is a pickle (a torch.save or pickle file?), not a safetensors/stager file; stager never unpickles it".into());
    }
    let n = u64::from_le_bytes(*prefix);
    if n > MAX_STAGER_HEADER_BYTES {
        return Err(format!(
            "header length {n} is absurd (limit {MAX_STAGER_HEADER_BYTES}); not a safetensors file or a damaged one"
        ));
    }
    if n < 2 {
        return Err(format!("header length {n} is too small for a JSON object"));
    }
    if 8 + n > file_len {
        return Err(format!(
            "header claims {n} bytes but the file has only {} after the length (truncated?)",
            file_len.saturating_sub(8)
        ));
    }
    Ok(n)
}

/// Parses and validates the JSON header `json` (the `header_len` bytes after the 8-byte length)
/// of a file of `file_len` bytes.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Header, String> {
    let header_len = json.len() as u64;
    let data_start = 8 + header_len;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or_else(|| format!("file of {file_len} bytes is shorter than its header"))?;
    let text = std::str::from_utf8(json).map_err(|err| format!("header is not UTF-8: {err}"))?;
    if !text.starts_with('{') {
        return Err("header does not start with a JSON object".into());
    }
    let value: Value =
        serde_json::from_str(text).map_err(|err| format!("header is not valid JSON: {err}"))?;
    let Value::Object(root) = value else {
        return Err("header is not a JSON object".into());
    };
    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(root.len());
    for (name, value) in root {
        if name == "__metadata__" {
            let Value::Object(map) = value else {
                return Err("__metadata__ is not an object".into());
            };
            for (key, value) in map {
                let Value::String(value) = value else {
                    return Err(format!("__metadata__[{key:?}] is not a string"));
                };
                metadata.insert(key, value);
            }
            continue;
        }
        entries.push(parse_entry(&name, value)?);
    }
    entries.sort_by_key(|entry| (entry.begin, entry.end));
    let mut expected = 0u64;
    for entry in &entries {
        if entry.begin != expected {
            return Err(if entry.begin < expected {
                format!(
                    "entry {:?} [{}, {}) overlaps the previous entry ending at {expected}",
                    entry.name, entry.begin, entry.end
                )
            } else {
                format!(
                    "gap in the data section: nothing covers [{expected}, {}) before entry {:?}",
                    entry.begin, entry.name
                )
            });
        }
        expected = entry.end;
    }
    if expected != data_len {
        return Err(if expected > data_len {
            format!(
                "entries need a data section of {expected} bytes but the file holds only {data_len} (truncated?)"
            )
        } else {
            format!(
                "the data section holds {data_len} bytes but the entries cover only {expected} (trailing bytes)"
            )
        });
    }
    Ok(Header {
        header_len,
        data_start,
        data_len,
        entries,
        metadata,
    })
}

fn parse_entry(name: &str, value: Value) -> Result<Entry, String> {
    let Value::Object(object) = value else {
        return Err(format!("entry {name:?} is not an object"));
    };
    let dtype = match object.get("dtype") {
        Some(Value::String(dtype)) => Dtype::from_safetensors_name(dtype)
            .ok_or_else(|| format!("entry {name:?} has unknown dtype {dtype:?}"))?,
        _ => return Err(format!("entry {name:?} has no dtype string")),
    };
    let u64_list = |key: &str| -> Result<Vec<u64>, String> {
        match object.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_u64().ok_or_else(|| {
                        format!("entry {name:?}: {key} holds {item}, not a non-negative integer")
                    })
                })
                .collect(),
            _ => Err(format!("entry {name:?} has no {key} list")),
        }
    };
    let shape = u64_list("shape")?;
    let offsets = u64_list("data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(format!(
            "entry {name:?}: data_offsets must hold two numbers"
        ));
    };
    if end < begin {
        return Err(format!(
            "entry {name:?}: data_offsets [{begin}, {end}) end before they begin"
        ));
    }
    check_entry(name, dtype, &shape, end - begin)?;
    Ok(Entry {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Where one stored buffer lies in the file and its checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRange {
    /// The entry holding the storage.
    pub entry: String,
    /// Absolute file offset.
    pub offset: u64,
    /// Bytes of the storage.
    pub nbytes: u64,
    /// Its recorded checksum.
    pub crc32c: u32,
}

/// The stager part of a file: the tree JSON and each storage's range and checksum.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The tree JSON (`stager.tree`).
    pub tree: String,
    /// Each storage's range and checksum, in storage order.
    pub storages: Vec<StorageRange>,
}

/// Reads and checks the stager metadata of `header` against its entries.
pub fn stager_layout(header: &Header) -> Result<Layout, String> {
    let meta = &header.metadata;
    match meta.get(KEY_FORMAT).map(String::as_str) {
        Some("stager") => {}
        _ => {
            return Err(
                "no stager metadata (format != \"stager\"): a plain safetensors file? load it with safetensors".into(),
            )
        }
    }
    match meta.get(KEY_VERSION).map(String::as_str) {
        Some(VERSION) => {}
        other => {
            return Err(format!(
                "unsupported stager format version {other:?} (this build reads {VERSION:?})"
            ))
        }
    }
    let tree = meta
        .get(KEY_TREE)
        .ok_or_else(|| format!("metadata has no {KEY_TREE}"))?
        .clone();
    let names: Vec<String> = serde_json::from_str(
        meta.get(KEY_STORAGES)
            .ok_or_else(|| format!("metadata has no {KEY_STORAGES}"))?,
    )
    .map_err(|err| format!("{KEY_STORAGES} is not a JSON list of names: {err}"))?;
    let crc_text = meta
        .get(KEY_CRC)
        .ok_or_else(|| format!("metadata has no {KEY_CRC} checksums"))?;
    let crcs: Vec<u32> = if crc_text.is_empty() {
        Vec::new()
    } else {
        crc_text
            .split(',')
            .map(|hex| {
                if hex.len() != 8 {
                    return Err(format!("{KEY_CRC} holds {hex:?}, not 8 hex digits"));
                }
                u32::from_str_radix(hex, 16)
                    .map_err(|_| format!("{KEY_CRC} holds {hex:?}, not 8 hex digits"))
            })
            .collect::<Result<_, _>>()?
    };
    if crcs.len() != names.len() {
        return Err(format!(
            "{} storages but {} crc32c checksums",
            names.len(),
            crcs.len()
        ));
    }
    let by_name: std::collections::HashMap<&str, &Entry> = header
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let mut used = std::collections::HashSet::with_capacity(names.len());
    let storages = names
        .into_iter()
        .zip(crcs)
        .enumerate()
        .map(|(index, (name, crc32c))| {
            let entry = by_name.get(name.as_str()).ok_or_else(|| {
                format!("storage {index} names entry {name:?}, which the header lacks")
            })?;
            if !used.insert(name.clone()) {
                return Err(format!("entry {name:?} is claimed by two storages"));
            }
            Ok(StorageRange {
                offset: header.data_start + entry.begin,
                nbytes: entry.nbytes(),
                crc32c,
                entry: name,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Layout { tree, storages })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: &str, shape: &[u64]) -> EntrySpec {
        let dtype = Dtype::from_safetensors_name(dtype).unwrap();
        let nbytes = shape.iter().product::<u64>() * dtype.itemsize() as u64;
        EntrySpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            nbytes,
        }
    }

    fn sample() -> (Vec<Entry>, Vec<u8>) {
        let entries = layout_entries(&[
            spec("a", "F32", &[3]),
            spec("b", "I64", &[2, 2]),
            spec("c", "U8", &[0]),
        ])
        .unwrap();
        let mut meta = BTreeMap::new();
        meta.insert(KEY_FORMAT.into(), "stager".into());
        meta.insert(KEY_VERSION.into(), VERSION.into());
        meta.insert(KEY_TREE.into(), "{}".into());
        meta.insert(KEY_STORAGES.into(), r#"["a","b","c"]"#.into());
        meta.insert(KEY_CRC.into(), format_crcs(&[1, 2, 0xdeadbeef]));
        let header = build_header(&entries, &meta).unwrap();
        (entries, header)
    }

    #[test]
    fn layout_aligns_and_pads() {
        let (entries, header) = sample();
        assert_eq!(header.len() as u64 % DATA_ALIGNMENT, 0);
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "__stager__.pad.1", "b", "c"]);
        assert_eq!((entries[2].begin, entries[2].end), (64, 96));
        let data_len = entries.last().unwrap().end;
        let parsed = parse_header(&header[8..], header.len() as u64 + data_len).unwrap();
        assert_eq!(parsed.entries, entries);
        let layout = stager_layout(&parsed).unwrap();
        assert_eq!(layout.storages[2].crc32c, 0xdeadbeef);
        assert_eq!(layout.storages[1].offset, header.len() as u64 + 64);
    }

    #[test]
    fn rejects_truncated_and_trailing_data() {
        let (entries, header) = sample();
        let data_len = entries.last().unwrap().end;
        let short = parse_header(&header[8..], header.len() as u64 + data_len - 1).unwrap_err();
        assert!(short.contains("truncated"), "{short}");
        let long = parse_header(&header[8..], header.len() as u64 + data_len + 1).unwrap_err();
        assert!(long.contains("trailing"), "{long}");
    }

    #[test]
    fn rejects_hostile_headers() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#,
                "needs 4 bytes",
            ),
            (
                r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}"#,
                "end before",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                "overlaps",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                "gap",
            ),
            (
                r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                "overflows",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                "non-negative",
            ),
            (r#"{"__metadata__":{"x":1}}"#, "not a string"),
            (r#"[1,2]"#, "JSON object"),
            (r#"{"a":"#, "not valid JSON"),
        ];
        for (json, expected) in cases {
            let err = parse_header(json.as_bytes(), 8 + json.len() as u64 + 6).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
        let deep = "[".repeat(100_000);
        assert!(parse_header(format!("{{\"a\":{deep}").as_bytes(), 1 << 20).is_err());
    }

    #[test]
    fn headers_over_the_safetensors_limit_are_read_when_the_file_holds_them() {
        let big = MAX_HEADER_BYTES + 4096;
        assert!(!safetensors_readable(big));
        assert_eq!(header_len(&big.to_le_bytes(), big + 8).unwrap(), big);
        assert!(header_len(&big.to_le_bytes(), big)
            .unwrap_err()
            .contains("truncated"));
        let over = MAX_STAGER_HEADER_BYTES + 1;
        assert!(header_len(&over.to_le_bytes(), u64::MAX)
            .unwrap_err()
            .contains("absurd"));
    }

    #[test]
    fn header_len_rejects_absurd_and_foreign_files() {
        assert!(header_len(&u64::MAX.to_le_bytes(), 100)
            .unwrap_err()
            .contains("absurd"));
        assert!(header_len(&50u64.to_le_bytes(), 20)
            .unwrap_err()
            .contains("truncated"));
        assert!(header_len(b"PK\x03\x04\0\0\0\0", 100)
            .unwrap_err()
            .contains("zip"));
        assert!(header_len(b"\x80\x04\x95\0\0\0\0\0", 100)
            .unwrap_err()
            .contains("pickle"));
    }

    #[test]
    fn layout_metadata_is_checked() {
        let (entries, _) = sample();
        let mut meta = BTreeMap::new();
        meta.insert(KEY_FORMAT.into(), "stager".into());
        meta.insert(KEY_VERSION.into(), VERSION.into());
        meta.insert(KEY_TREE.into(), "{}".into());
        meta.insert(KEY_STORAGES.into(), r#"["a","a"]"#.into());
        meta.insert(KEY_CRC.into(), format_crcs(&[1, 2]));
        let header = Header {
            header_len: 0,
            data_start: 8,
            data_len: 0,
            entries,
            metadata: meta.clone(),
        };
        assert!(stager_layout(&header).unwrap_err().contains("two storages"));
        let mut missing = header.clone();
        missing
            .metadata
            .insert(KEY_STORAGES.into(), r#"["zz"]"#.into());
        missing.metadata.insert(KEY_CRC.into(), format_crcs(&[1]));
        assert!(stager_layout(&missing).unwrap_err().contains("lacks"));
        let mut bad_crc = header.clone();
        bad_crc
            .metadata
            .insert(KEY_STORAGES.into(), r#"["a"]"#.into());
        bad_crc.metadata.insert(KEY_CRC.into(), "xyz".into());
        assert!(stager_layout(&bad_crc).unwrap_err().contains("hex"));
    }
}

/// Property tests: whatever the writer may be asked to store round-trips through the header,
/// and no byte string makes the parser panic.
#[cfg(test)]
mod round_trip {
    use super::*;
    use proptest::prelude::*;

    /// Specs the writer accepts: distinct names (not reserved ones), dtypes safetensors names,
    /// shapes whose bytes stay small.
    fn specs() -> impl Strategy<Value = Vec<EntrySpec>> {
        let dtypes: Vec<Dtype> = Dtype::all()
            .filter(|d| d.safetensors_name().is_some())
            .collect();
        let spec = (
            "[a-z][a-z0-9_.]{0,12}",
            proptest::sample::select(dtypes),
            proptest::collection::vec(0u64..5, 0..4),
        );
        proptest::collection::vec(spec, 0..12).prop_map(|raw| {
            let mut seen = std::collections::HashSet::new();
            raw.into_iter()
                .filter(|(name, ..)| seen.insert(name.clone()))
                .map(|(name, dtype, shape)| EntrySpec {
                    nbytes: shape.iter().product::<u64>() * dtype.itemsize() as u64,
                    name,
                    dtype,
                    shape,
                })
                .collect()
        })
    }

    fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map("[ -~]{0,10}", "\\PC{0,20}", 0..5)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn headers_round_trip(specs in specs(), metadata in metadata()) {
            let entries = layout_entries(&specs).unwrap();
            let stored: Vec<&Entry> = entries.iter().filter(|e| !is_padding(&e.name)).collect();
            prop_assert_eq!(stored.len(), specs.len());
            for (entry, spec) in stored.iter().zip(&specs) {
                prop_assert_eq!(&entry.name, &spec.name);
                prop_assert_eq!(entry.dtype, spec.dtype);
                prop_assert_eq!(&entry.shape, &spec.shape);
                prop_assert_eq!(entry.nbytes(), spec.nbytes);
                prop_assert!(spec.nbytes == 0 || entry.begin % STORAGE_ALIGNMENT == 0);
            }
            let header = build_header(&entries, &metadata).unwrap();
            prop_assert_eq!(header.len() as u64 % DATA_ALIGNMENT, 0);
            let data_len = entries.last().map_or(0, |e| e.end);
            let file_len = header.len() as u64 + data_len;
            let prefix: [u8; 8] = header[..8].try_into().unwrap();
            let json_len = header_len(&prefix, file_len).unwrap();
            let parsed = parse_header(&header[8..8 + json_len as usize], file_len).unwrap();
            prop_assert_eq!(parsed.data_start, header.len() as u64);
            prop_assert_eq!(parsed.data_len, data_len);
            // JSON objects are unordered: entries come back in file order, empty ones at one
            // offset in any order.
            let by_place = |list: &[Entry]| {
                let mut list = list.to_vec();
                list.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
                list
            };
            prop_assert_eq!(by_place(&parsed.entries), by_place(&entries));
            prop_assert_eq!(&parsed.metadata, &metadata);
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(json in proptest::collection::vec(any::<u8>(), 0..256),
                                           extra in 0u64..1024) {
            let _ = parse_header(&json, 8 + json.len() as u64 + extra);
        }

        #[test]
        fn any_json_entries_parse_or_fail_cleanly(
            dtype in "[A-Z0-9_]{1,12}",
            shape in proptest::collection::vec(any::<i64>(), 0..4),
            begin in any::<i64>(),
            end in any::<i64>(),
        ) {
            let json = format!(
                r#"{{"a":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{begin},{end}]}}}}"#
            );
            let _ = parse_header(json.as_bytes(), 8 + json.len() as u64 + 4096);
        }
    }
}
