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
//! a peer's message, with storage sizes and views but no source memory.
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
use crate::error::{Result, StagerError};
use crate::layout::{
    self, check_disjoint_ranges, VIEW_CONJ, VIEW_NEG, VIEW_OPAQUE, VIEW_WHOLE_STORAGE,
};

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

    /// A table described by metadata (a file header, a peer's message): storages of
    /// `storage_nbytes` and tensors viewing them. Views must name existing storages and carry only
    /// [`layout::VIEW_PORTABLE_FLAGS`]; the caller has checked that each view fits its storage.
    pub fn from_layout(storage_nbytes: &[usize], views: Vec<View>) -> Result<TensorTable> {
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
        for (index, view) in views.iter().enumerate() {
            let Some(storage) = storages.get_mut(view.storage) else {
                return Err(StagerError::invalid(format!(
                    "tensor {index} refers to storage {} of {}",
                    view.storage,
                    storage_nbytes.len()
                )));
            };
            if view.flags & !layout::VIEW_PORTABLE_FLAGS != 0 {
                return Err(StagerError::invalid(format!(
                    "tensor {index} has view flags {:#x}, not a portable view",
                    view.flags
                )));
            }
            storage.users += 1;
        }
        TensorTable::placed(storages, views)
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

    #[test]
    fn tables_from_metadata_are_validated() {
        let view = View {
            storage: 1,
            storage_offset: 0,
            numel: 1,
            flags: 0,
        };
        assert!(TensorTable::from_layout(&[4], vec![view]).is_err());
        let opaque = View {
            storage: 0,
            flags: VIEW_OPAQUE,
            ..view
        };
        assert!(TensorTable::from_layout(&[4], vec![opaque]).is_err());
        let table = TensorTable::from_layout(&[4, 8], vec![View { storage: 0, ..view }]).unwrap();
        assert_eq!(table.storages()[1].offset, 64);
        let mut buffer = vec![0u8; table.total_nbytes()];
        assert!(table
            .host_copies(buffer.as_mut_ptr(), buffer.len())
            .is_err());
    }
}
