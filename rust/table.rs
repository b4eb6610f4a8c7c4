//! The tensor table: a state_dict's tensors as the engine sees them, flat.
//!
//! Python walks the state_dict once and hands the engine its tensors; the bindings read each one's
//! storage and view through the C API and feed them to a [`TableBuilder`], which keeps one entry
//! per distinct storage (views of one storage share it: sharing survives staging), decides how
//! each tensor views its storage ([`crate::layout`]'s view flags) and places the storages in one
//! buffer ([`crate::layout::place_storages`]). The finished [`TensorTable`] is what every later
//! step works from: the copy engine's host copies ([`TensorTable::host_copies`]), the CUDA
//! copier's device copies ([`TensorTable::device_copies`]), the writer's entries, the transport's
//! wire layout. Request `i` of a stage's [`crate::completion::Completion`] is storage `i`.
//!
//! A table can also be made from metadata alone ([`TensorTable::from_layout`]): a file header or
//! a peer's message, with storage sizes and views but no source memory. Such metadata is
//! untrusted, and `from_layout` is where it is checked: every view names an existing storage,
//! has at most [`MAX_DIMS`] non-negative sizes and strides and a known dtype, stays inside its
//! storage, and is conjugated only when complex. Python decodes the JSON around it and checks
//! its shape (lists, integers); the bounds are checked here only.
//!
//! Incremental staging marks storages whose bytes an earlier result already holds as *reused*
//! ([`TensorTable::reusing`]): they take no room in the new buffer and get no copy, and their
//! requests are complete from the start.
//!
//! # Example
//! ```
//! use stager::table::{Device, TableBuilder, ViewFacts};
//! let mut builder = TableBuilder::with_capacity(2);
//! let data = [0u8; 16];
//! let storage = builder.add_storage(1, data.as_ptr() as usize, 16, Device::Host);
//! builder.add_view(storage, ViewFacts { itemsize: 4, storage_offset: 0, numel: 4, contiguous: true, conj: false, neg: false });
//! builder.add_view(storage, ViewFacts { itemsize: 4, storage_offset: 2, numel: 2, contiguous: true, conj: false, neg: false });
//! let table = builder.finish().unwrap();
//! assert_eq!(table.storages().len(), 1);
//! assert_eq!(table.storages()[0].users, 2);
//! ```
//!
//! # Thread Safety
//! Plain owned data; immutable once finished (`Send + Sync`).

use std::collections::HashMap;

use crate::copy_engine::HostCopy;
use crate::dtype::Dtype;
use crate::error::{Result, StagerError};
use crate::layout::{
    self, check_disjoint_ranges, VIEW_CONJ, VIEW_NEG, VIEW_OPAQUE, VIEW_WHOLE_STORAGE,
};

/// The most dimensions a tensor described by metadata may have (stager files and the wire).
pub const MAX_DIMS: usize = 64;

/// Where a storage's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Host memory: copied by the copy engine.
    Host,
    /// A CUDA device (its ordinal): copied by the CUDA copier.
    Cuda(i32),
    /// Another accelerator: copied by torch, outside the engine.
    Other,
}

/// One distinct storage and its place in the staged buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Storage {
    /// Address of the source bytes (0 for a table made from metadata).
    pub address: usize,
    /// Bytes of the storage.
    pub nbytes: usize,
    /// Offset in the staged buffer (and in a file's data section).
    pub offset: usize,
    /// Where the source bytes live.
    pub device: Device,
    /// Number of tensors viewing it.
    pub users: u32,
    /// Its bytes are already staged elsewhere (an earlier result): no room, no copy.
    pub reused: bool,
}

/// One tensor: how it views its storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Index of its storage; `usize::MAX` for an opaque tensor.
    pub storage: usize,
    /// Element offset into the storage.
    pub storage_offset: i64,
    /// Number of elements.
    pub numel: i64,
    /// [`crate::layout`] view flags.
    pub flags: u8,
}

impl View {
    /// Whether the tensor is staged outside the engine (see [`VIEW_OPAQUE`]).
    pub fn is_opaque(&self) -> bool {
        self.flags & VIEW_OPAQUE != 0
    }
}

/// What the bindings read off a tensor to describe its view.
#[derive(Clone, Copy, Debug)]
pub struct ViewFacts {
    /// Bytes per element.
    pub itemsize: usize,
    /// Element offset into the storage.
    pub storage_offset: i64,
    /// Number of elements.
    pub numel: i64,
    /// `tensor.is_contiguous()`.
    pub contiguous: bool,
    /// `tensor.is_conj()`.
    pub conj: bool,
    /// `tensor.is_neg()`.
    pub neg: bool,
}

/// A view's geometry from its sizes and strides: see [`ViewGeometry::of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewGeometry {
    /// Number of elements (saturating at `i64::MAX`).
    pub numel: i64,
    /// Whether it is contiguous, as `Tensor.is_contiguous()` says: row-major, where dimensions
    /// of size 1 may have any stride, and an empty tensor is contiguous.
    pub contiguous: bool,
    /// Offset of its last element from its first, in elements (saturating).
    pub span: u128,
}

impl ViewGeometry {
    /// The geometry of a view with `dims` as `(size, stride)` pairs, outermost first. Sizes and
    /// strides are non-negative (torch has no negative strides; metadata is checked first).
    pub fn of(dims: &[(i64, i64)]) -> ViewGeometry {
        let mut numel: i64 = 1;
        let mut expected: i64 = 1;
        let mut contiguous = true;
        let mut span: u128 = 0;
        for &(size, step) in dims.iter().rev() {
            if size != 1 && step != expected {
                contiguous = false;
            }
            expected = expected.saturating_mul(size);
            numel = numel.saturating_mul(size);
            span = span.saturating_add(
                (size.max(1) - 1).unsigned_abs() as u128 * step.unsigned_abs() as u128,
            );
        }
        ViewGeometry {
            numel,
            contiguous: contiguous || numel == 0,
            span,
        }
    }

    /// The byte just past the view's last element, starting `storage_offset` elements of
    /// `itemsize` bytes into its storage (saturating): the storage must hold that many bytes.
    pub fn end_byte(&self, storage_offset: i64, itemsize: usize) -> u128 {
        (storage_offset.unsigned_abs() as u128)
            .saturating_add(self.span)
            .saturating_add(1)
            .saturating_mul(itemsize as u128)
    }
}

/// The strides of a contiguous (row-major) tensor of `shape`.
pub fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    strides
}

/// One tensor as untrusted metadata describes it (a file's tree, a peer's message), before
/// [`TensorTable::from_layout`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewSpec {
    /// Index of its storage.
    pub storage: usize,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its sizes.
    pub shape: Vec<i64>,
    /// Its strides, in elements; `None`: contiguous.
    pub stride: Option<Vec<i64>>,
    /// Element offset into the storage.
    pub storage_offset: i64,
    /// A conjugated view (complex dtypes only).
    pub conj: bool,
    /// A negated view.
    pub neg: bool,
}

/// Builds a [`TensorTable`] one tensor at a time; see the module docs.
#[derive(Default)]
pub struct TableBuilder {
    storages: Vec<Storage>,
    views: Vec<View>,
    by_key: HashMap<usize, usize>,
}

impl TableBuilder {
    /// A builder expecting about `tensors` tensors.
    pub fn with_capacity(tensors: usize) -> TableBuilder {
        TableBuilder {
            storages: Vec::with_capacity(tensors),
            views: Vec::with_capacity(tensors),
            by_key: HashMap::with_capacity(tensors),
        }
    }

    /// The index of the storage known by `key` (any value unique per live storage, e.g. the
    /// address of its implementation), if it was added already.
    pub fn find_storage(&self, key: usize) -> Option<usize> {
        self.by_key.get(&key).copied()
    }

    /// Adds a storage known by `key`; returns its index (the existing one if `key` is known).
    pub fn add_storage(
        &mut self,
        key: usize,
        address: usize,
        nbytes: usize,
        device: Device,
    ) -> usize {
        if let Some(index) = self.find_storage(key) {
            return index;
        }
        let index = self.storages.len();
        self.storages.push(Storage {
            address,
            nbytes,
            offset: 0,
            device,
            users: 0,
            reused: false,
        });
        self.by_key.insert(key, index);
        index
    }

    /// Adds a tensor viewing storage `storage` (an index from [`TableBuilder::add_storage`]);
    /// returns its flags.
    pub fn add_view(&mut self, storage: usize, facts: ViewFacts) -> u8 {
        let entry = &mut self.storages[storage];
        entry.users += 1;
        let whole = facts.storage_offset == 0
            && entry.nbytes > 0
            && facts.contiguous
            && (facts.numel as u128) * (facts.itemsize as u128) == entry.nbytes as u128;
        let flags = (if whole { VIEW_WHOLE_STORAGE } else { 0 })
            | (if facts.conj { VIEW_CONJ } else { 0 })
            | (if facts.neg { VIEW_NEG } else { 0 });
        self.views.push(View {
            storage,
            storage_offset: facts.storage_offset,
            numel: facts.numel,
            flags,
        });
        flags
    }

    /// Adds a tensor the engine does not copy (see [`VIEW_OPAQUE`]).
    pub fn add_opaque(&mut self) {
        self.views.push(View {
            storage: usize::MAX,
            storage_offset: 0,
            numel: 0,
            flags: VIEW_OPAQUE,
        });
    }

    /// Places the storages in one buffer and returns the table.
    pub fn finish(self) -> Result<TensorTable> {
        TensorTable::placed(self.storages, self.views)
    }
}

/// The flat description of a state_dict's tensors and of where their storages go.
#[derive(Clone, Debug, Default)]
pub struct TensorTable {
    storages: Vec<Storage>,
    views: Vec<View>,
    total_nbytes: usize,
}

impl TensorTable {
    fn placed(mut storages: Vec<Storage>, views: Vec<View>) -> Result<TensorTable> {
        let sizes: Vec<usize> = storages
            .iter()
            .map(|s| if s.reused { 0 } else { s.nbytes })
            .collect();
        let placement = layout::place_storages(&sizes)?;
        for (storage, offset) in storages.iter_mut().zip(placement.offsets) {
            storage.offset = offset;
        }
        Ok(TensorTable {
            storages,
            views,
            total_nbytes: placement.total_nbytes,
        })
    }

    /// A table described by untrusted metadata (a file's tree, a peer's message): storages of
    /// `storage_nbytes` and the tensors `specs` viewing them. Checks every view (see the module
    /// docs) and derives its flags; returns the table and each view's strides (the given ones,
    /// or the contiguous ones where none were given).
    pub fn from_layout(
        storage_nbytes: &[usize],
        specs: &[ViewSpec],
    ) -> Result<(TensorTable, Vec<Vec<i64>>)> {
        let mut storages: Vec<Storage> = storage_nbytes
            .iter()
            .map(|&nbytes| Storage {
                address: 0,
                nbytes,
                offset: 0,
                device: Device::Host,
                users: 0,
                reused: false,
            })
            .collect();
        let mut views = Vec::with_capacity(specs.len());
        let mut strides = Vec::with_capacity(specs.len());
        let mut dims: Vec<(i64, i64)> = Vec::with_capacity(MAX_DIMS);
        for (index, spec) in specs.iter().enumerate() {
            let (view, stride) = check_view(index, spec, storage_nbytes, &mut dims)?;
            storages[view.storage].users += 1;
            views.push(view);
            strides.push(stride);
        }
        Ok((TensorTable::placed(storages, views)?, strides))
    }

    /// The same table with storages `reused` marked reused (see the module docs) and the others
    /// placed again, packed; fails on an index out of range.
    pub fn reusing(&self, reused: &[usize]) -> Result<TensorTable> {
        let mut storages = self.storages.clone();
        for &index in reused {
            let Some(storage) = storages.get_mut(index) else {
                return Err(StagerError::invalid(format!(
                    "storage {index} is out of range: the table has {}",
                    self.storages.len()
                )));
            };
            storage.reused = true;
        }
        TensorTable::placed(storages, self.views.clone())
    }

    /// The index of the storage whose placed bytes contain `offset` (a position in the staged
    /// buffer), if any; reused and empty storages hold no byte of it.
    pub fn storage_at(&self, offset: usize) -> Option<usize> {
        let storages = &self.storages;
        // Offsets never decrease with the index (reused and empty storages take no room).
        let index = storages
            .partition_point(|s| s.offset <= offset)
            .checked_sub(1)?;
        // Several storages may start at `offset` (empty ones before a full one): find the one
        // holding it.
        storages[..=index]
            .iter()
            .enumerate()
            .rev()
            .take_while(|(_, s)| s.offset == storages[index].offset)
            .find(|(_, s)| !s.reused && s.nbytes > 0 && offset < s.offset + s.nbytes)
            .map(|(i, _)| i)
    }

    /// For each storage, the indices of the tensors viewing it in table order, or `None` when
    /// `tracked` is false for one of them (what incremental staging can match across stages).
    pub fn views_per_storage(&self, tracked: impl Fn(usize) -> bool) -> Vec<Option<Vec<usize>>> {
        let mut out: Vec<Option<Vec<usize>>> = vec![Some(Vec::new()); self.storages.len()];
        for (index, view) in self.views.iter().enumerate() {
            if view.is_opaque() {
                continue;
            }
            let slot = &mut out[view.storage];
            match slot.as_mut() {
                Some(list) if tracked(index) => list.push(index),
                _ => *slot = None,
            }
        }
        out
    }

    /// For each storage, the version counters (`versions`, one per tensor) of the tensors
    /// viewing it in table order, or `None` when one of them has none.
    pub fn storage_versions(&self, versions: &[Option<i64>]) -> Vec<Option<Vec<i64>>> {
        let version = |index: usize| versions.get(index).copied().flatten();
        self.views_per_storage(|index| version(index).is_some())
            .into_iter()
            .map(|views| views.map(|list| list.into_iter().filter_map(version).collect()))
            .collect()
    }

    /// The distinct storages, in placement order.
    pub fn storages(&self) -> &[Storage] {
        &self.storages
    }

    /// The tensors, in the order they were added.
    pub fn views(&self) -> &[View] {
        &self.views
    }

    /// Bytes of the buffer every storage fits in.
    pub fn total_nbytes(&self) -> usize {
        self.total_nbytes
    }

    /// Indices of the tensors the engine does not copy.
    pub fn opaque(&self) -> impl Iterator<Item = usize> + '_ {
        self.views
            .iter()
            .enumerate()
            .filter(|(_, view)| view.is_opaque())
            .map(|(index, _)| index)
    }

    /// Indices of the storages with nothing to copy (no bytes, or reused): their requests are
    /// complete from the start.
    pub fn empty_storages(&self) -> impl Iterator<Item = usize> + '_ {
        self.storages
            .iter()
            .enumerate()
            .filter(|(_, storage)| storage.nbytes == 0 || storage.reused)
            .map(|(index, _)| index)
    }

    /// Checks that a buffer of `buffer_len` bytes holds every storage at its offset.
    pub fn check_buffer(&self, buffer_len: usize) -> Result<()> {
        if buffer_len < self.total_nbytes {
            return Err(StagerError::invalid(format!(
                "host buffer of {buffer_len} bytes is smaller than the {} bytes the tensors need",
                self.total_nbytes
            )));
        }
        check_disjoint_ranges(
            self.storages
                .iter()
                .filter(|s| !s.reused)
                .map(|s| (s.offset, s.nbytes)),
            buffer_len,
            "storage",
        )
    }

    /// The host copies of every non-empty host storage into the buffer at `dst` (`dst_len`
    /// bytes): request `i` copies storage `i`.
    pub fn host_copies(&self, dst: *mut u8, dst_len: usize) -> Result<Vec<HostCopy>> {
        self.check_buffer(dst_len)?;
        self.storages
            .iter()
            .enumerate()
            .filter(|(_, storage)| {
                storage.device == Device::Host && storage.nbytes > 0 && !storage.reused
            })
            .map(|(index, storage)| {
                if storage.address == 0 {
                    return Err(StagerError::invalid(format!(
                        "storage {index} has no source address (a table made from metadata)"
                    )));
                }
                Ok(HostCopy {
                    request: index,
                    src: storage.address as *const u8,
                    // `check_buffer` proved offset + nbytes <= dst_len; the pointer is only
                    // formed here, dereferenced by the engine under `submit`'s contract.
                    dst: dst.wrapping_add(storage.offset),
                    len: storage.nbytes,
                })
            })
            .collect()
    }

    /// The non-empty CUDA storages: `(storage index, device ordinal)`.
    pub fn cuda_storages(&self) -> impl Iterator<Item = (usize, i32)> + '_ {
        self.storages
            .iter()
            .enumerate()
            .filter_map(|(index, storage)| match storage.device {
                Device::Cuda(ordinal) if storage.nbytes > 0 && !storage.reused => {
                    Some((index, ordinal))
                }
                _ => None,
            })
    }
}

/// Checks view `index` of untrusted metadata against its storage (see the module docs); returns
/// the view and its strides. `dims` is scratch space.
fn check_view(
    index: usize,
    spec: &ViewSpec,
    storage_nbytes: &[usize],
    dims: &mut Vec<(i64, i64)>,
) -> Result<(View, Vec<i64>)> {
    let fail = |reason: String| Err(StagerError::invalid(format!("tensor {index} {reason}")));
    let Some(&nbytes) = storage_nbytes.get(spec.storage) else {
        return fail(format!(
            "refers to storage {} of {}",
            spec.storage,
            storage_nbytes.len()
        ));
    };
    if spec.shape.len() > MAX_DIMS {
        return fail(format!(
            "has {} dimensions, at most {MAX_DIMS} are allowed",
            spec.shape.len()
        ));
    }
    if let Some(&size) = spec.shape.iter().find(|&&size| size < 0) {
        return fail(format!("shape must be >= 0, got {size}"));
    }
    let stride = match &spec.stride {
        Some(stride) if stride.len() != spec.shape.len() => {
            return fail(format!(
                "has mismatched shape/stride ({} sizes, {} strides)",
                spec.shape.len(),
                stride.len()
            ))
        }
        Some(stride) => stride.clone(),
        None => contiguous_strides(&spec.shape),
    };
    if let Some(&step) = stride.iter().find(|&&step| step < 0) {
        return fail(format!("stride must be >= 0, got {step}"));
    }
    if spec.storage_offset < 0 {
        return fail(format!("offset must be >= 0, got {}", spec.storage_offset));
    }
    dims.clear();
    dims.extend(spec.shape.iter().copied().zip(stride.iter().copied()));
    let geometry = ViewGeometry::of(dims);
    let itemsize = spec.dtype.itemsize();
    if geometry.numel > 0 && geometry.end_byte(spec.storage_offset, itemsize) > nbytes as u128 {
        return fail(format!(
            "({} {:?}, stride {stride:?}, offset {}) reaches past its storage of {nbytes} bytes",
            spec.dtype, spec.shape, spec.storage_offset
        ));
    }
    if spec.conj && !spec.dtype.is_complex() {
        return fail("is conjugated but not complex".into());
    }
    let whole = spec.storage_offset == 0
        && nbytes > 0
        && geometry.contiguous
        && geometry.numel as u128 * itemsize as u128 == nbytes as u128;
    let flags = (if whole { VIEW_WHOLE_STORAGE } else { 0 })
        | (if spec.conj { VIEW_CONJ } else { 0 })
        | (if spec.neg { VIEW_NEG } else { 0 });
    let view = View {
        storage: spec.storage,
        storage_offset: spec.storage_offset,
        numel: geometry.numel,
        flags,
    };
    Ok((view, stride))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(itemsize: usize, storage_offset: i64, numel: i64) -> ViewFacts {
        ViewFacts {
            itemsize,
            storage_offset,
            numel,
            contiguous: true,
            conj: false,
            neg: false,
        }
    }

    #[test]
    fn views_of_one_storage_share_it_and_only_a_covering_view_is_whole() {
        let mut builder = TableBuilder::with_capacity(3);
        let a = builder.add_storage(10, 0x1000, 64, Device::Host);
        let b = builder.add_storage(20, 0x2000, 8, Device::Host);
        assert_eq!(builder.add_storage(10, 0x1000, 64, Device::Host), a);
        assert_eq!(builder.add_view(a, facts(4, 0, 16)), VIEW_WHOLE_STORAGE);
        assert_eq!(builder.add_view(a, facts(4, 4, 4)), 0);
        assert_eq!(builder.add_view(b, facts(4, 0, 1)), 0);
        builder.add_opaque();
        let table = builder.finish().unwrap();
        assert_eq!(table.storages()[a].users, 2);
        assert_eq!(table.storages()[b].offset, 64);
        assert_eq!(table.total_nbytes(), 128);
        assert_eq!(table.opaque().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn host_copies_cover_host_storages_and_check_the_buffer() {
        let mut builder = TableBuilder::with_capacity(3);
        builder.add_storage(1, 0x1000, 100, Device::Host);
        builder.add_storage(2, 0x9000, 50, Device::Cuda(0));
        builder.add_storage(3, 0x3000, 0, Device::Host);
        let table = builder.finish().unwrap();
        let mut buffer = vec![0u8; table.total_nbytes()];
        let copies = table
            .host_copies(buffer.as_mut_ptr(), buffer.len())
            .unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!((copies[0].request, copies[0].len), (0, 100));
        assert_eq!(table.cuda_storages().collect::<Vec<_>>(), [(1, 0)]);
        assert_eq!(table.empty_storages().collect::<Vec<_>>(), [2]);
        let err = table.host_copies(buffer.as_mut_ptr(), 10).unwrap_err();
        assert!(err.to_string().contains("smaller"), "{err}");
    }

    #[test]
    fn reused_storages_take_no_room_and_get_no_copy() {
        let mut builder = TableBuilder::with_capacity(3);
        builder.add_storage(1, 0x1000, 1000, Device::Host);
        builder.add_storage(2, 0x9000, 500, Device::Cuda(0));
        builder.add_storage(3, 0x3000, 100, Device::Host);
        let table = builder.finish().unwrap().reusing(&[0, 1]).unwrap();
        assert_eq!(table.total_nbytes(), 128);
        assert_eq!(table.storages()[2].offset, 0);
        let mut buffer = vec![0u8; table.total_nbytes()];
        let copies = table
            .host_copies(buffer.as_mut_ptr(), buffer.len())
            .unwrap();
        assert_eq!(copies.iter().map(|c| c.request).collect::<Vec<_>>(), [2]);
        assert_eq!(table.cuda_storages().count(), 0);
        assert_eq!(table.empty_storages().collect::<Vec<_>>(), [0, 1]);
        assert!(table.reusing(&[7]).is_err());
    }

    fn spec(storage: usize, dtype: Dtype, shape: &[i64]) -> ViewSpec {
        ViewSpec {
            storage,
            dtype,
            shape: shape.to_vec(),
            stride: None,
            storage_offset: 0,
            conj: false,
            neg: false,
        }
    }

    fn refusal(storage_nbytes: &[usize], spec: ViewSpec) -> String {
        TensorTable::from_layout(storage_nbytes, &[spec])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn tables_from_metadata_are_placed_and_flagged() {
        let views = [
            spec(0, Dtype::Float32, &[4]),
            spec(1, Dtype::Float32, &[2]),
            ViewSpec {
                storage_offset: 2,
                ..spec(1, Dtype::Float32, &[2])
            },
            ViewSpec {
                conj: true,
                neg: true,
                ..spec(2, Dtype::Complex64, &[1])
            },
        ];
        let (table, strides) = TensorTable::from_layout(&[16, 16, 8], &views).unwrap();
        assert_eq!(table.storages()[1].offset, 64);
        assert_eq!(table.storages()[1].users, 2);
        let flags: Vec<u8> = table.views().iter().map(|v| v.flags).collect();
        assert_eq!(
            flags,
            [
                VIEW_WHOLE_STORAGE,
                0,
                0,
                VIEW_WHOLE_STORAGE | VIEW_CONJ | VIEW_NEG
            ]
        );
        assert_eq!(strides, [vec![1], vec![1], vec![1], vec![1]]);
        let mut buffer = vec![0u8; table.total_nbytes()];
        assert!(table
            .host_copies(buffer.as_mut_ptr(), buffer.len())
            .is_err());
    }

    #[test]
    fn hostile_views_from_metadata_are_refused() {
        let base = spec(0, Dtype::Float32, &[4]);
        let cases = [
            (spec(1, Dtype::Float32, &[1]), "refers to storage 1 of 1"),
            (
                ViewSpec {
                    storage_offset: 1,
                    ..base.clone()
                },
                "reaches past its storage of 16 bytes",
            ),
            (spec(0, Dtype::Float64, &[1 << 62, 1 << 62]), "reaches past"),
            (spec(0, Dtype::Float32, &[-1]), "shape must be >= 0"),
            (
                ViewSpec {
                    stride: Some(vec![-1]),
                    ..base.clone()
                },
                "stride must be >= 0",
            ),
            (
                ViewSpec {
                    stride: Some(vec![1, 1]),
                    ..base.clone()
                },
                "mismatched shape/stride",
            ),
            (
                ViewSpec {
                    storage_offset: -4,
                    ..base.clone()
                },
                "offset must be >= 0",
            ),
            (spec(0, Dtype::UInt8, &[1; 65]), "65 dimensions"),
            (
                ViewSpec {
                    conj: true,
                    ..base.clone()
                },
                "conjugated but not complex",
            ),
            (
                ViewSpec {
                    stride: Some(vec![i64::MAX]),
                    ..spec(0, Dtype::Float32, &[i64::MAX])
                },
                "reaches past",
            ),
        ];
        for (spec, message) in cases {
            let err = refusal(&[16], spec.clone());
            assert!(err.contains(message), "{spec:?}: {err}");
            assert!(err.contains(": tensor 0 "), "{err}");
        }
        // Empty views may sit anywhere; broadcast (stride 0) views need one element.
        let empty = ViewSpec {
            storage_offset: 1 << 40,
            ..spec(0, Dtype::Float32, &[0, 1 << 62])
        };
        let broadcast = ViewSpec {
            stride: Some(vec![0, 0]),
            ..spec(0, Dtype::Float32, &[1 << 40, 1 << 40])
        };
        let (table, _) = TensorTable::from_layout(&[4], &[empty, broadcast]).unwrap();
        assert_eq!(table.storages()[0].users, 2);
        assert!(table.views().iter().all(|v| v.flags == 0));
    }

    #[test]
    fn geometry_matches_torch_contiguity() {
        let of = |dims: &[(i64, i64)]| ViewGeometry::of(dims);
        assert_eq!(
            of(&[(2, 3), (3, 1)]),
            ViewGeometry {
                numel: 6,
                contiguous: true,
                span: 5
            }
        );
        assert!(!of(&[(2, 1), (3, 2)]).contiguous);
        assert!(of(&[(1, 99), (3, 1)]).contiguous); // size-1 dims take any stride
        assert!(of(&[(0, 7), (3, 5)]).contiguous); // empty tensors are contiguous
        assert!(of(&[]).contiguous && of(&[]).numel == 1);
        assert_eq!(of(&[(4, 2)]).end_byte(3, 4), (3 + 6 + 1) * 4);
        assert_eq!(contiguous_strides(&[2, 0, 5]), [5, 5, 1]);
    }

    #[test]
    fn storage_at_finds_the_storage_holding_a_byte() {
        let (table, _) = TensorTable::from_layout(
            &[10, 0, 100, 5],
            &[spec(0, Dtype::UInt8, &[10]), spec(2, Dtype::UInt8, &[100])],
        )
        .unwrap();
        let table = table.reusing(&[3]).unwrap();
        assert_eq!(table.storage_at(0), Some(0));
        assert_eq!(table.storage_at(9), Some(0));
        assert_eq!(table.storage_at(10), None); // padding
        assert_eq!(table.storage_at(64), Some(2)); // not the empty storage starting there too
        assert_eq!(table.storage_at(163), Some(2));
        assert_eq!(table.storage_at(164), None);
    }

    #[test]
    fn versions_per_storage_need_every_viewer_tracked() {
        let (table, _) = TensorTable::from_layout(
            &[16, 16],
            &[
                spec(0, Dtype::Float32, &[4]),
                spec(1, Dtype::Float32, &[2]),
                spec(0, Dtype::Float32, &[2]),
                spec(1, Dtype::Float32, &[4]),
            ],
        )
        .unwrap();
        assert_eq!(
            table.storage_versions(&[Some(3), None, Some(5), Some(1)]),
            [Some(vec![3, 5]), None]
        );
        assert_eq!(
            table.views_per_storage(|_| true),
            [Some(vec![0, 2]), Some(vec![1, 3])]
        );
    }
}
