//! `torch.save` records: the zip archive `torch.save(tensor, f)` produces for one tensor, which
//! dcp's `FileSystemWriter` stores per tensor item and its reader opens with `torch.load`.
//!
//! Writing: [`RecordFraming`] holds everything of a record except the storage's bytes: the
//! prefix (the entries `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`,
//! `version`, `.data/serialization_id`, then the local header of `data/0`, its extra field
//! padding the storage's first byte to the file offset the writer wants) and, once the
//! storage's crc32 is known, the suffix (the data descriptor of `data/0`, the central directory
//! and the zip64 end records). Entries use data descriptors (general purpose bit 3), as
//! PyTorch's writer does, so the prefix does not depend on the checksum: the writer streams the
//! storage straight from memory and renders the suffix last. `data/0` is the last entry, so only
//! its sizes can need zip64 fields.
//!
//! Reading: [`parse_record`] checks a record's end-of-central-directory records, its central
//! directory and its local headers against the record's bounds and returns `data.pkl` and the
//! byte range and crc32 of every `data/<key>` entry, without interpreting the pickle (the Python
//! side parses it with an unpickler that admits only the rebuild call of a plain tensor).
//!
//! # Example
//! ```
//! use stager::torch_record::{tensor_pickle, RecordFraming};
//! let pickle = tensor_pickle("FloatStorage", 4, 0, &[4], &[1], None);
//! let framing = RecordFraming::new(&pickle, 16, 0, None, "1").unwrap();
//! assert_eq!(framing.prefix().len() % 64, 0);
//! let suffix = framing.suffix(crc32fast::hash(&[0u8; 16]));
//! assert_eq!(framing.len(), framing.prefix().len() as u64 + 16 + suffix.len() as u64);
//! ```
//!
//! # Thread Safety
//! Plain values; [`parse_record`] only reads through a shared `File`.

use std::fs::File;
use std::io;

use crate::direct_io::pread_full;

/// The name of the archive's top folder inside every record (what `torch.save` uses for a
/// file object).
const ARCHIVE: &str = "archive";
/// Alignment of every entry's data inside a record (PyTorch's `.storage_alignment`).
pub const ENTRY_ALIGNMENT: u64 = 64;
const LOCAL_HEADER: u64 = 30;
const CENTRAL_HEADER: u64 = 46;
const EOCD: u64 = 22;
const ZIP64_EOCD: u64 = 56;
const ZIP64_LOCATOR: u64 = 20;
const FLAGS: u16 = 0x0808; // data descriptor follows, UTF-8 names
/// Largest value a 32-bit zip field holds before zip64 takes over.
const ZIP32_MAX: u64 = 0xFFFF_FFFF;

/// The `data.pkl` of `torch.save(tensor)` for a plain CPU tensor viewing storage key `"0"`:
/// `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, OrderedDict())`
/// in pickle protocol 2, opcode for opcode what Python's pickler writes for it. Dtypes without a
/// legacy typed storage (`v3_dtype = Some("uint16")`, ...) get what `torch.save` writes for them:
/// `_rebuild_tensor_v3` over an `UntypedStorage` of `numel` bytes, the dtype last.
pub fn tensor_pickle(
    storage_type: &str,
    numel: u64,
    storage_offset: u64,
    size: &[u64],
    stride: &[i64],
    v3_dtype: Option<&str>,
) -> Vec<u8> {
    let mut out = Pickle {
        bytes: Vec::with_capacity(200),
        memo: 0,
    };
    out.bytes.extend_from_slice(b"\x80\x02");
    if v3_dtype.is_some() {
        out.global("torch._utils", "_rebuild_tensor_v3");
    } else {
        out.global("torch._utils", "_rebuild_tensor_v2");
    }
    out.bytes.push(b'(');
    out.bytes.push(b'(');
    out.unicode("storage");
    if v3_dtype.is_some() {
        out.global("torch.storage", "UntypedStorage");
    } else {
        out.global("torch", storage_type);
    }
    out.unicode("0");
    out.unicode("cpu");
    out.int(numel as i128);
    out.bytes.push(b't');
    out.put();
    out.bytes.push(b'Q');
    out.int(storage_offset as i128);
    out.tuple(&size.iter().map(|&v| v as i128).collect::<Vec<_>>());
    out.tuple(&stride.iter().map(|&v| v as i128).collect::<Vec<_>>());
    out.bytes.push(0x89); // NEWFALSE: requires_grad
    out.global("collections", "OrderedDict");
    out.bytes.push(b')');
    out.bytes.push(b'R');
    out.put();
    if let Some(dtype) = v3_dtype {
        out.global("torch", dtype);
    }
    out.bytes.push(b't');
    out.put();
    out.bytes.push(b'R');
    out.put();
    out.bytes.push(b'.');
    out.bytes
}

struct Pickle {
    bytes: Vec<u8>,
    memo: u32,
}

impl Pickle {
    fn put(&mut self) {
        if self.memo < 256 {
            self.bytes.push(b'q');
            self.bytes.push(self.memo as u8);
        } else {
            self.bytes.push(b'r');
            self.bytes.extend_from_slice(&self.memo.to_le_bytes());
        }
        self.memo += 1;
    }

    fn global(&mut self, module: &str, name: &str) {
        self.bytes.push(b'c');
        self.bytes.extend_from_slice(module.as_bytes());
        self.bytes.push(b'\n');
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(b'\n');
        self.put();
    }

    fn unicode(&mut self, text: &str) {
        self.bytes.push(b'X');
        self.bytes
            .extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(text.as_bytes());
        self.put();
    }

    fn int(&mut self, value: i128) {
        if (0..256).contains(&value) {
            self.bytes.push(b'K');
            self.bytes.push(value as u8);
        } else if (0..65536).contains(&value) {
            self.bytes.push(b'M');
            self.bytes.extend_from_slice(&(value as u16).to_le_bytes());
        } else if (i32::MIN as i128..=i32::MAX as i128).contains(&value) {
            self.bytes.push(b'J');
            self.bytes.extend_from_slice(&(value as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, as short as it goes.
            let mut raw = value.to_le_bytes().to_vec();
            while raw.len() > 1 {
                let last = raw[raw.len() - 1];
                let prev_sign = raw[raw.len() - 2] & 0x80;
                if (last == 0 && prev_sign == 0) || (last == 0xFF && prev_sign != 0) {
                    raw.pop();
                } else {
                    break;
                }
            }
            self.bytes.push(0x8a);
            self.bytes.push(raw.len() as u8);
            self.bytes.extend_from_slice(&raw);
        }
    }

    fn tuple(&mut self, values: &[i128]) {
        match values.len() {
            0 => {
                self.bytes.push(b')');
                return;
            }
            1..=3 => {
                for &v in values {
                    self.int(v);
                }
                self.bytes.push([0x85, 0x86, 0x87][values.len() - 1]);
            }
            _ => {
                self.bytes.push(b'(');
                for &v in values {
                    self.int(v);
                }
                self.bytes.push(b't');
            }
        }
        self.put();
    }
}

/// One stored entry of a record being built: name, offset of its local header, data length,
/// crc32 (of the small entries; `data/0`'s comes later).
struct Entry {
    name: String,
    header_at: u64,
    len: u64,
    crc: u32,
}

/// A record's bytes around its storage; see the module docs.
#[derive(Clone, Debug)]
pub struct RecordFraming {
    prefix: Vec<u8>,
    /// The central directory entries of the small entries (no checksum to wait for).
    central_small: Vec<u8>,
    entries: u64,
    data_header_at: u64,
    nbytes: u64,
}

impl RecordFraming {
    /// The framing of a record whose storage has `nbytes` bytes, starting at file offset
    /// `record_at`. The storage's first byte lands at a multiple of [`ENTRY_ALIGNMENT`] in the
    /// record; with `data_residue = Some(r)` also at a file offset `≡ r (mod 4096)` (the writer
    /// asks for its source address's residue, so it can write the storage with `O_DIRECT`
    /// straight from memory). `serialization_id` is the content of `.data/serialization_id`.
    pub fn new(
        pickle: &[u8],
        nbytes: u64,
        record_at: u64,
        data_residue: Option<u64>,
        serialization_id: &str,
    ) -> Result<RecordFraming, String> {
        let mut prefix = Vec::with_capacity(1024 + pickle.len());
        let mut entries = Vec::new();
        let small: [(&str, &[u8]); 6] = [
            ("data.pkl", pickle),
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
            ("version", b"3\n"),
            (".data/serialization_id", serialization_id.as_bytes()),
        ];
        for (name, data) in small {
            let name = format!("{ARCHIVE}/{name}");
            let header_at = prefix.len() as u64;
            push_local_header(&mut prefix, &name, record_at, None)?;
            prefix.extend_from_slice(data);
            let crc = crc32fast::hash(data);
            push_descriptor(&mut prefix, crc, data.len() as u64);
            entries.push(Entry {
                name,
                header_at,
                len: data.len() as u64,
                crc,
            });
        }
        let data_header_at = prefix.len() as u64;
        push_local_header(
            &mut prefix,
            &format!("{ARCHIVE}/data/0"),
            record_at,
            data_residue,
        )?;
        let mut central_small = Vec::new();
        for entry in &entries {
            push_central(
                &mut central_small,
                &entry.name,
                entry.crc,
                entry.len,
                entry.header_at,
            );
        }
        Ok(RecordFraming {
            prefix,
            central_small,
            entries: entries.len() as u64 + 1,
            data_header_at,
            nbytes,
        })
    }

    /// The bytes before the storage's.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Length of the suffix (it does not depend on the checksum).
    pub fn suffix_len(&self) -> u64 {
        let descriptor = if self.nbytes > ZIP32_MAX { 24 } else { 16 };
        let data_central = CENTRAL_HEADER
            + format!("{ARCHIVE}/data/0").len() as u64
            + zip64_extra(self.nbytes, self.data_header_at).len() as u64;
        descriptor
            + self.central_small.len() as u64
            + data_central
            + ZIP64_EOCD
            + ZIP64_LOCATOR
            + EOCD
    }

    /// The whole record's length.
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.nbytes + self.suffix_len()
    }

    /// Whether the record is empty (never: it always has its entries).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes after the storage's, given the storage's crc32 (zlib's polynomial).
    pub fn suffix(&self, crc: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.suffix_len() as usize);
        push_descriptor(&mut out, crc, self.nbytes);
        let central_at = self.prefix.len() as u64 + self.nbytes + out.len() as u64;
        out.extend_from_slice(&self.central_small);
        push_central(
            &mut out,
            &format!("{ARCHIVE}/data/0"),
            crc,
            self.nbytes,
            self.data_header_at,
        );
        let central_len = self.prefix.len() as u64 + self.nbytes + out.len() as u64 - central_at;
        let zip64_at = central_at + central_len;
        // zip64 end of central directory record.
        out.extend_from_slice(b"PK\x06\x06");
        out.extend_from_slice(&(ZIP64_EOCD - 12).to_le_bytes());
        out.extend_from_slice(&0x031eu16.to_le_bytes()); // made by (what PyTorch writes)
        out.extend_from_slice(&45u16.to_le_bytes()); // needed: 4.5 (zip64)
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&central_len.to_le_bytes());
        out.extend_from_slice(&central_at.to_le_bytes());
        // zip64 locator.
        out.extend_from_slice(b"PK\x06\x07");
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&zip64_at.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        // end of central directory.
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(self.entries as u16).to_le_bytes());
        out.extend_from_slice(&(self.entries as u16).to_le_bytes());
        out.extend_from_slice(&(central_len.min(ZIP32_MAX) as u32).to_le_bytes());
        out.extend_from_slice(&(central_at.min(ZIP32_MAX) as u32).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        debug_assert_eq!(out.len() as u64, self.suffix_len());
        out
    }
}

/// A local header with data descriptor flags (checksum and sizes 0) and an extra field `FB`
/// padding the entry's data to [`ENTRY_ALIGNMENT`] in the record (and to `residue` mod 4096 in
/// the file when given).
fn push_local_header(
    out: &mut Vec<u8>,
    name: &str,
    record_at: u64,
    residue: Option<u64>,
) -> Result<(), String> {
    let start = out.len() as u64;
    let bare = start + LOCAL_HEADER + name.len() as u64 + 4; // with the extra field's own header
    let in_record = bare.div_ceil(ENTRY_ALIGNMENT) * ENTRY_ALIGNMENT;
    let mut data_at = in_record;
    if let Some(residue) = residue {
        let block = crate::direct_io::BLOCK as u64;
        let want = residue % block;
        let file_at = record_at + in_record;
        data_at = in_record + (want + block - file_at % block) % block;
    }
    let pad = data_at - bare;
    if pad > u16::MAX as u64 - 4 {
        return Err(format!(
            "padding of {pad} bytes does not fit a zip extra field"
        ));
    }
    out.extend_from_slice(b"PK\x03\x04");
    out.extend_from_slice(&0u16.to_le_bytes()); // version needed (as PyTorch writes)
    out.extend_from_slice(&FLAGS.to_le_bytes());
    out.extend_from_slice(&[0; 2 + 2 + 2]); // method stored, time, date
    out.extend_from_slice(&[0; 4 + 4 + 4]); // crc, sizes: in the data descriptor
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&(pad as u16 + 4).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"FB");
    out.extend_from_slice(&(pad as u16).to_le_bytes());
    out.resize(out.len() + pad as usize, b'Z');
    debug_assert_eq!(out.len() as u64, data_at);
    Ok(())
}

fn push_descriptor(out: &mut Vec<u8>, crc: u32, len: u64) {
    out.extend_from_slice(b"PK\x07\x08");
    out.extend_from_slice(&crc.to_le_bytes());
    if len > ZIP32_MAX {
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
    }
}

/// The zip64 extended information field for an entry whose size or offset overflow 32 bits.
fn zip64_extra(len: u64, header_at: u64) -> Vec<u8> {
    let mut fields = Vec::new();
    if len >= ZIP32_MAX {
        fields.extend_from_slice(&len.to_le_bytes());
        fields.extend_from_slice(&len.to_le_bytes());
    }
    if header_at >= ZIP32_MAX {
        fields.extend_from_slice(&header_at.to_le_bytes());
    }
    if fields.is_empty() {
        return fields;
    }
    let mut out = vec![1, 0];
    out.extend_from_slice(&(fields.len() as u16).to_le_bytes());
    out.extend_from_slice(&fields);
    out
}

fn push_central(out: &mut Vec<u8>, name: &str, crc: u32, len: u64, header_at: u64) {
    let extra = zip64_extra(len, header_at);
    out.extend_from_slice(b"PK\x01\x02");
    out.extend_from_slice(&0u16.to_le_bytes()); // made by
    out.extend_from_slice(&0u16.to_le_bytes()); // needed
    out.extend_from_slice(&FLAGS.to_le_bytes());
    out.extend_from_slice(&[0; 6]); // method, time, date
    out.extend_from_slice(&crc.to_le_bytes());
    let small = len.min(ZIP32_MAX) as u32;
    out.extend_from_slice(&small.to_le_bytes());
    out.extend_from_slice(&small.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0; 2 + 2 + 2 + 4]); // comment, disk, internal, external attributes
    out.extend_from_slice(&(header_at.min(ZIP32_MAX) as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&extra);
}

/// One entry of a parsed record: where its bytes are in the file, how many, their crc32.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordEntry {
    /// The entry's name without the archive folder (`data.pkl`, `data/0`, ...).
    pub name: String,
    /// File offset of its first byte.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The crc32 the central directory records (0: not recorded).
    pub crc32: u32,
}

/// A record read by [`parse_record`]: its `data.pkl` and its storage entries (`data/<key>`).
#[derive(Clone, Debug)]
pub struct ParsedRecord {
    /// The pickle, not interpreted.
    pub pickle: Vec<u8>,
    /// The `data/<key>` entries, `name` holding the key.
    pub storages: Vec<RecordEntry>,
}

fn u16_at(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Most entries a record may have (a tensor's has 7).
const MAX_ENTRIES: u64 = 4096;
/// Largest `data.pkl` accepted.
const MAX_PICKLE: u64 = 1 << 20;

fn read_exact_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` holds `len` writable bytes.
    let got = unsafe { pread_full(file, buf.as_mut_ptr(), len, offset) }?;
    if got != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the file ends {} bytes into a {len}-byte read at {offset}",
                got
            ),
        ));
    }
    Ok(buf)
}

/// Parses the `torch.save` record occupying `[offset, offset + len)` of `file`; every entry
/// must lie inside those bounds. Errors are plain reasons (the caller names file and item).
pub fn parse_record(file: &File, offset: u64, len: u64) -> Result<ParsedRecord, String> {
    let io_reason = |err: io::Error| format!("reading the record: {err}");
    if len < EOCD {
        return Err(format!(
            "a record of {len} bytes is too short for a zip archive"
        ));
    }
    let tail_len = len.min(EOCD + 65535 + ZIP64_EOCD + ZIP64_LOCATOR) as usize;
    let tail_at = offset + len - tail_len as u64;
    let tail = read_exact_at(file, tail_at, tail_len).map_err(io_reason)?;
    let eocd = (0..=tail_len - EOCD as usize)
        .rev()
        .find(|&at| tail[at..at + 4] == *b"PK\x05\x06")
        .ok_or("no zip end-of-central-directory record: not a torch.save record")?;
    let mut entries = u16_at(&tail, eocd + 10);
    let mut central_len = u32_at(&tail, eocd + 12);
    let mut central_at = u32_at(&tail, eocd + 16);
    if eocd >= ZIP64_LOCATOR as usize && tail[eocd - 20..eocd - 16] == *b"PK\x06\x07" {
        let zip64_at = u64_at(&tail, eocd - 12);
        if zip64_at
            .checked_add(ZIP64_EOCD)
            .map_or(true, |end| end > len)
        {
            return Err("the zip64 end record lies outside the record".into());
        }
        let record =
            read_exact_at(file, offset + zip64_at, ZIP64_EOCD as usize).map_err(io_reason)?;
        if record[..4] != *b"PK\x06\x06" {
            return Err("damaged zip64 end record".into());
        }
        entries = u64_at(&record, 32);
        central_len = u64_at(&record, 40);
        central_at = u64_at(&record, 48);
    }
    if entries > MAX_ENTRIES {
        return Err(format!("{entries} zip entries in one record"));
    }
    if central_at
        .checked_add(central_len)
        .map_or(true, |end| end > len)
        || central_len > 64 << 20
    {
        return Err("the central directory lies outside the record".into());
    }
    let central =
        read_exact_at(file, offset + central_at, central_len as usize).map_err(io_reason)?;
    let mut at = 0usize;
    let mut pickle_entry = None;
    let mut storages = Vec::new();
    for _ in 0..entries {
        if at + CENTRAL_HEADER as usize > central.len() || central[at..at + 4] != *b"PK\x01\x02" {
            return Err("damaged central directory".into());
        }
        let method = u16_at(&central, at + 10);
        let crc32 = u32_at(&central, at + 16) as u32;
        let mut compressed = u32_at(&central, at + 20);
        let mut size = u32_at(&central, at + 24);
        let name_len = u16_at(&central, at + 28) as usize;
        let extra_len = u16_at(&central, at + 30) as usize;
        let comment_len = u16_at(&central, at + 32) as usize;
        let mut header_at = u32_at(&central, at + 42);
        let name_at = at + CENTRAL_HEADER as usize;
        let next = name_at + name_len + extra_len + comment_len;
        if next > central.len() {
            return Err("damaged central directory".into());
        }
        let name = std::str::from_utf8(&central[name_at..name_at + name_len])
            .map_err(|_| "a zip entry name is not UTF-8")?
            .to_string();
        // zip64 extended information, in the order of the fields that overflowed.
        let mut extra = &central[name_at + name_len..name_at + name_len + extra_len];
        while extra.len() >= 4 {
            let id = u16_at(extra, 0);
            let n = (u16_at(extra, 2) as usize).min(extra.len() - 4);
            if id == 1 {
                let mut fields = &extra[4..4 + n];
                for value in [&mut size, &mut compressed, &mut header_at] {
                    if *value == ZIP32_MAX && fields.len() >= 8 {
                        *value = u64_at(fields, 0);
                        fields = &fields[8..];
                    }
                }
            }
            extra = &extra[4 + n..];
        }
        at = next;
        let short = name.split_once('/').map_or("", |(_, rest)| rest);
        let wanted = short == "data.pkl" || short.starts_with("data/");
        if !wanted {
            continue;
        }
        if method != 0 || compressed != size {
            return Err(format!(
                "zip entry {name:?} is compressed; torch.save stores entries"
            ));
        }
        if header_at
            .checked_add(LOCAL_HEADER)
            .map_or(true, |end| end > len)
        {
            return Err(format!(
                "zip entry {name:?}: its header lies outside the record"
            ));
        }
        let local =
            read_exact_at(file, offset + header_at, LOCAL_HEADER as usize).map_err(io_reason)?;
        if local[..4] != *b"PK\x03\x04" {
            return Err(format!("zip entry {name:?}: damaged local header"));
        }
        let data_at = header_at + LOCAL_HEADER + u16_at(&local, 26) + u16_at(&local, 28);
        if data_at.checked_add(size).map_or(true, |end| end > len) {
            return Err(format!(
                "zip entry {name:?} ({size} bytes) runs past the end of the record ({len} bytes): truncated?"
            ));
        }
        let entry = RecordEntry {
            name: short.to_string(),
            offset: offset + data_at,
            len: size,
            crc32,
        };
        if short == "data.pkl" {
            pickle_entry = Some(entry);
        } else {
            storages.push(RecordEntry {
                name: short["data/".len()..].to_string(),
                ..entry
            });
        }
    }
    let pickle_entry = pickle_entry.ok_or("the record has no data.pkl")?;
    if pickle_entry.len > MAX_PICKLE {
        return Err(format!("data.pkl of {} bytes", pickle_entry.len));
    }
    let pickle =
        read_exact_at(file, pickle_entry.offset, pickle_entry.len as usize).map_err(io_reason)?;
    if pickle_entry.crc32 != 0 && crc32fast::hash(&pickle) != pickle_entry.crc32 {
        return Err("data.pkl fails its crc32: the record is damaged".into());
    }
    Ok(ParsedRecord { pickle, storages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn record(data: &[u8], record_at: u64, residue: Option<u64>) -> (Vec<u8>, RecordFraming) {
        let pickle = tensor_pickle(
            "ByteStorage",
            data.len() as u64,
            0,
            &[data.len() as u64],
            &[1],
            None,
        );
        let framing =
            RecordFraming::new(&pickle, data.len() as u64, record_at, residue, "7").unwrap();
        let mut bytes = framing.prefix().to_vec();
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&framing.suffix(crc32fast::hash(data)));
        assert_eq!(bytes.len() as u64, framing.len());
        (bytes, framing)
    }

    #[test]
    fn records_parse_back_at_any_offset_and_residue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let mut file = File::create(&path).unwrap();
        let lead = vec![9u8; 1000];
        file.write_all(&lead).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let (bytes, framing) = record(&data, 1000, Some(23 * 64));
        assert_eq!((1000 + framing.prefix().len()) % 4096, 23 * 64);
        file.write_all(&bytes).unwrap();
        file.write_all(b"trailing").unwrap();
        drop(file);
        let file = File::open(&path).unwrap();
        let parsed = parse_record(&file, 1000, bytes.len() as u64).unwrap();
        assert_eq!(parsed.storages.len(), 1);
        let entry = &parsed.storages[0];
        assert_eq!(entry.name, "0");
        assert_eq!(entry.offset, 1000 + framing.prefix().len() as u64);
        assert_eq!(entry.len, 5000);
        assert_eq!(entry.crc32, crc32fast::hash(&data));
        assert!(parsed
            .pickle
            .starts_with(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"));
    }

    #[test]
    fn a_cut_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let (bytes, framing) = record(&[1u8; 300], 0, None);
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let short = framing.prefix().len() as u64 + 100;
        assert!(parse_record(&file, 0, short).is_err());
        assert!(parse_record(&file, 0, 10).is_err());
    }

    #[test]
    fn long_ints_encode_minimally() {
        let mut p = Pickle {
            bytes: Vec::new(),
            memo: 0,
        };
        p.int(1 << 40);
        assert_eq!(p.bytes, [0x8a, 6, 0, 0, 0, 0, 0, 1]);
        p.bytes.clear();
        p.int(1 << 31);
        assert_eq!(p.bytes, [0x8a, 5, 0, 0, 0, 0x80, 0]);
    }
}
