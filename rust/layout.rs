//! The layout: where each storage's bytes go, one definition for host buffers, files and the wire.
//!
//! A staged state_dict is a list of storages laid out one after another in a single host buffer,
//! each at a [`STORAGE_ALIGNMENT`]-aligned offset ([`place_storages`]). A stager file's data
//! section uses exactly the same offsets (it starts on a [`DATA_ALIGNMENT`] boundary), and so does
//! the transport's wire layout, so one staged buffer is one aligned run everywhere: written to a
//! file in large direct writes, sent in a few large messages, read back into a buffer in one piece.
//!
//! Also defined here, once: the view flags that say how a tensor views its storage
//! ([`VIEW_WHOLE_STORAGE`]...), the header metadata keys of the file format ([`KEY_TREE`]...),
//! and the range check that every copy into a buffer goes through ([`check_disjoint_ranges`]).
//! The Python package reads all of them from `stager._native`.
//!
//! # Example
//! ```
//! use stager::layout::{place_storages, STORAGE_ALIGNMENT};
//! let placed = place_storages(&[10, 0, 100]).unwrap();
//! assert_eq!(placed.offsets, [0, 64, 64]);
//! assert_eq!(placed.total_nbytes, 64 + 128);
//! assert_eq!(placed.offsets[2] % STORAGE_ALIGNMENT, 0);
//! ```
//!
//! # Thread Safety
//! Constants and pure functions.

use crate::error::{Result, StagerError};

/// Alignment of every storage inside a host buffer, a file's data section and the wire layout:
/// a cache line, and enough for every dtype.
pub const STORAGE_ALIGNMENT: usize = 64;
/// A file's data section starts at a multiple of this (a page), so direct I/O can write a staged
/// buffer (page-aligned) to it as one run.
pub const DATA_ALIGNMENT: usize = 4096;

/// The view covers its whole storage: contiguous, offset 0, the same byte count.
pub const VIEW_WHOLE_STORAGE: u8 = 1;
/// A conjugated complex view (`tensor.is_conj()`).
pub const VIEW_CONJ: u8 = 2;
/// A negative-bit view (`tensor.is_neg()`).
pub const VIEW_NEG: u8 = 4;
/// Not a plain strided tensor (subclass, sparse, quantized): copied by torch, not the engine.
pub const VIEW_OPAQUE: u8 = 8;
/// The flags a view read from a file or a peer may carry (the others are the engine's own).
pub const VIEW_PORTABLE_FLAGS: u8 = VIEW_WHOLE_STORAGE | VIEW_CONJ | VIEW_NEG;

/// Metadata key: always `"stager"` in a stager file.
pub const KEY_FORMAT: &str = "format";
/// Metadata key: the format version ([`FORMAT_VERSION`]).
pub const KEY_VERSION: &str = "stager.version";
/// Metadata key: the tree, tensors and storages as JSON (`python/stager/tree.py`).
pub const KEY_TREE: &str = "stager.tree";
/// Metadata key: a JSON list naming the entry of each storage, in storage order.
pub const KEY_STORAGES: &str = "stager.storages";
/// Metadata key: the crc32c of each storage, 8 hex digits each, comma-separated.
pub const KEY_CRC: &str = "stager.crc32c";
/// Value of [`KEY_FORMAT`].
pub const FORMAT_NAME: &str = "stager";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: &str = "1";
/// Prefix of the entry names stager itself adds (padding, storages without one owning tensor).
pub const RESERVED_PREFIX: &str = "__stager__.";

/// `n` rounded up to a multiple of `alignment` (a power of two or not); `None` on overflow.
pub fn align_up(n: usize, alignment: usize) -> Option<usize> {
    let alignment = alignment.max(1);
    n.checked_add(alignment - 1)
        .map(|m| m / alignment * alignment)
}

/// Where a list of storages goes in one buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Byte offset of each storage, a multiple of [`STORAGE_ALIGNMENT`].
    pub offsets: Vec<usize>,
    /// Bytes the buffer needs: the end of the last storage, rounded up to the alignment.
    pub total_nbytes: usize,
}

/// Lays storages of `nbytes` out one after another, each [`STORAGE_ALIGNMENT`]-aligned (an empty
/// storage takes no room). Fails when the sizes overflow the address space.
pub fn place_storages(nbytes: &[usize]) -> Result<Placement> {
    let mut offsets = Vec::with_capacity(nbytes.len());
    let mut total = 0usize;
    for (index, &size) in nbytes.iter().enumerate() {
        offsets.push(total);
        total = align_up(size, STORAGE_ALIGNMENT)
            .and_then(|aligned| total.checked_add(aligned))
            .ok_or_else(|| {
                StagerError::invalid(format!(
                    "storage {index} ({size} bytes) overflows the address space of one buffer"
                ))
            })?;
    }
    Ok(Placement {
        offsets,
        total_nbytes: total,
    })
}

/// Proves every `(offset, len)` range lies inside `[0, capacity)` and that no two non-empty ranges
/// overlap: the precondition of every copy into a buffer. `what` names the ranges in the error
/// ("copy", "device copy", "read").
pub fn check_disjoint_ranges(
    ranges: impl IntoIterator<Item = (usize, usize)>,
    capacity: usize,
    what: &str,
) -> Result<()> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (index, (offset, len)) in ranges.into_iter().enumerate() {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= capacity)
            .ok_or_else(|| {
                StagerError::invalid(format!(
                    "{what} {index} ({len} bytes at offset {offset}) does not fit the {capacity}-byte buffer"
                ))
            })?;
        if len > 0 {
            spans.push((offset, end));
        }
    }
    spans.sort_unstable();
    if let Some(pair) = spans.windows(2).find(|pair| pair[0].1 > pair[1].0) {
        return Err(StagerError::invalid(format!(
            "{what} ranges overlap in the target buffer: [{}, {}) and [{}, {})",
            pair[0].0, pair[0].1, pair[1].0, pair[1].1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_aligns_every_storage_and_skips_empty_ones() {
        let placed = place_storages(&[1, 64, 65, 0, 3]).unwrap();
        assert_eq!(placed.offsets, [0, 64, 128, 256, 256]);
        assert_eq!(placed.total_nbytes, 320);
        assert!(place_storages(&[usize::MAX - 10]).is_err());
        assert_eq!(place_storages(&[]).unwrap().total_nbytes, 0);
    }

    #[test]
    fn ranges_must_fit_and_not_overlap() {
        assert!(check_disjoint_ranges([(0, 10), (10, 5), (3, 0)], 15, "copy").is_ok());
        let outside = check_disjoint_ranges([(10, 6)], 15, "copy").unwrap_err();
        assert!(outside.to_string().contains("does not fit"), "{outside}");
        let overflow = check_disjoint_ranges([(usize::MAX, 2)], 15, "copy").unwrap_err();
        assert!(overflow.to_string().contains("does not fit"), "{overflow}");
        let overlap = check_disjoint_ranges([(0, 10), (9, 2)], 15, "read").unwrap_err();
        assert!(
            overlap.to_string().contains("read ranges overlap"),
            "{overlap}"
        );
    }

    #[test]
    fn align_up_handles_edges() {
        assert_eq!(align_up(0, 64), Some(0));
        assert_eq!(align_up(65, 64), Some(128));
        assert_eq!(align_up(usize::MAX, 64), None);
        assert_eq!(align_up(5, 0), Some(5));
    }
}
