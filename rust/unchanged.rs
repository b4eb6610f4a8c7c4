//! Incremental staging's memory of the previous stage: which storages it staged, and what they
//! looked like then.
//!
//! A [`StageRecords`] keeps, per recorded storage, its identity key (the StorageImpl's address
//! while it lives), its address, size, and the version counter of every tensor viewing it, in
//! table order. [`StageRecords::candidates`] matches the next stage's [`TensorTable`] against
//! them in one pass: a storage with the same key, address, size and versions, and bytes to reuse,
//! is a candidate. Whatever needs the interpreter to decide (the storage object still alive, the
//! same tensor objects) is left to the bindings, which check only the candidates.
//!
//! # Example
//! ```
//! use stager::table::{Device, TableBuilder, ViewFacts};
//! use stager::unchanged::{StageRecords, StorageViews};
//! let mut builder = TableBuilder::with_capacity(1);
//! let storage = builder.add_storage(7, 0x1000, 16, Device::Host);
//! builder.add_view(storage, ViewFacts { itemsize: 4, storage_offset: 0, numel: 4, contiguous: true, conj: false, neg: false });
//! let table = builder.finish().unwrap();
//! let views = StorageViews::of(&table);
//! let (records, recorded) = StageRecords::record(&table, &views, &[7], &[Some(3)], |_| true);
//! assert_eq!(recorded, [0]);
//! assert_eq!(records.candidates(&table, &views, &[7], &[Some(3)]), [(0, 0)]);
//! assert!(records.candidates(&table, &views, &[7], &[Some(4)]).is_empty());
//! ```
//!
//! # Thread Safety
//! Plain owned data (`Send + Sync`); the stagers use one at a time.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use crate::table::TensorTable;

/// The tensors viewing each storage of a table, in table order (opaque tensors view none).
pub struct StorageViews {
    starts: Vec<usize>,
    tensors: Vec<usize>,
}

impl StorageViews {
    /// Groups `table`'s tensors by storage.
    pub fn of(table: &TensorTable) -> StorageViews {
        let storage_count = table.storages().len();
        let mut counts = vec![0usize; storage_count + 1];
        for view in table.views().iter().filter(|v| !v.is_opaque()) {
            counts[view.storage + 1] += 1;
        }
        for index in 0..storage_count {
            counts[index + 1] += counts[index];
        }
        let mut next = counts.clone();
        let mut tensors = vec![0usize; counts[storage_count]];
        for (tensor, view) in table.views().iter().enumerate() {
            if !view.is_opaque() {
                tensors[next[view.storage]] = tensor;
                next[view.storage] += 1;
            }
        }
        StorageViews {
            starts: counts,
            tensors,
        }
    }

    /// The tensors viewing storage `storage`, in table order.
    pub fn tensors(&self, storage: usize) -> &[usize] {
        &self.tensors[self.starts[storage]..self.starts[storage + 1]]
    }
}

/// What one storage looked like when it was recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The storage's identity key.
    pub key: usize,
    /// Address of its bytes.
    pub address: usize,
    /// Its size in bytes.
    pub nbytes: usize,
    /// Where its tensors' versions lie in [`StageRecords::versions`] (table order); the bindings
    /// index their per-tensor data the same way.
    pub tensors: Range<usize>,
}

/// Hashes a storage key (an address: its low bits are alignment) with one multiplication;
/// SipHash, the default, cost more than the rest of the match.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, key: usize) {
        // Fibonacci hashing; the table uses the high bits too (hashbrown takes the top 7 for tags).
        self.0 = (key as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(32);
    }
}

/// The storages of one stage, see the module docs.
#[derive(Default)]
pub struct StageRecords {
    records: Vec<Record>,
    by_key: HashMap<usize, usize, BuildHasherDefault<KeyHasher>>,
    versions: Vec<i64>,
}

impl StageRecords {
    /// Records every storage `i` of `table` that has bytes, a version for each of its tensors
    /// (`versions`, one per tensor) and `keep(i)`, under key `keys[i]`; returns the records and,
    /// for each record, its storage index.
    pub fn record(
        table: &TensorTable,
        views: &StorageViews,
        keys: &[usize],
        versions: &[Option<i64>],
        mut keep: impl FnMut(usize) -> bool,
    ) -> (StageRecords, Vec<usize>) {
        let mut records = StageRecords::default();
        let mut recorded = Vec::new();
        for (index, storage) in table.storages().iter().enumerate() {
            let tensors = views.tensors(index);
            if storage.nbytes == 0 || tensors.iter().any(|&t| versions[t].is_none()) || !keep(index)
            {
                continue;
            }
            let start = records.versions.len();
            records
                .versions
                .extend(tensors.iter().filter_map(|&t| versions[t]));
            records.by_key.insert(keys[index], records.records.len());
            records.records.push(Record {
                key: keys[index],
                address: storage.address,
                nbytes: storage.nbytes,
                tensors: start..records.versions.len(),
            });
            recorded.push(index);
        }
        (records, recorded)
    }

    /// `(storage index, record index)` of every storage of `table` (keys and per-tensor
    /// versions as for [`StageRecords::record`]) recorded with the same key, address, size and
    /// versions, and with bytes.
    pub fn candidates(
        &self,
        table: &TensorTable,
        views: &StorageViews,
        keys: &[usize],
        versions: &[Option<i64>],
    ) -> Vec<(usize, usize)> {
        if self.records.is_empty() {
            return Vec::new();
        }
        let mut found = Vec::new();
        // A stage of the same state_dict lists its storages in the same order as the recorded
        // one: the record at the previous position is tried before the key lookup.
        let mut next = 0;
        for (index, storage) in table.storages().iter().enumerate() {
            let record_index = match self.records.get(next) {
                Some(record) if record.key == keys[index] => next,
                _ => match self.by_key.get(&keys[index]) {
                    Some(&record_index) => record_index,
                    None => continue,
                },
            };
            next = record_index + 1;
            let record = &self.records[record_index];
            let tensors = views.tensors(index);
            let same = storage.nbytes > 0
                && record.address == storage.address
                && record.nbytes == storage.nbytes
                && record.tensors.len() == tensors.len()
                && tensors
                    .iter()
                    .zip(&self.versions[record.tensors.clone()])
                    .all(|(&t, &before)| versions[t] == Some(before));
            if same {
                found.push((index, record_index));
            }
        }
        found
    }

    /// The records, in the order [`StageRecords::record`] made them.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Every recorded version, indexed by [`Record::tensors`].
    pub fn versions(&self) -> &[i64] {
        &self.versions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Device, TableBuilder, ViewFacts};

    fn facts(storage_offset: i64, numel: i64) -> ViewFacts {
        ViewFacts {
            itemsize: 4,
            storage_offset,
            numel,
            contiguous: true,
            conj: false,
            neg: false,
        }
    }

    /// Storages (key, address, nbytes) each viewed by `views` tensors; tensor order interleaves
    /// storages so grouping is exercised.
    fn table(storages: &[(usize, usize, usize)], views: usize) -> TensorTable {
        let mut builder = TableBuilder::with_capacity(storages.len() * views);
        let indices: Vec<usize> = storages
            .iter()
            .map(|&(key, address, nbytes)| builder.add_storage(key, address, nbytes, Device::Host))
            .collect();
        for view in 0..views {
            for &index in &indices {
                builder.add_view(index, facts(view as i64, 1));
            }
        }
        builder.add_opaque();
        builder.finish().unwrap()
    }

    #[test]
    fn views_are_grouped_by_storage_in_table_order() {
        let table = table(&[(1, 0x1000, 64), (2, 0x2000, 64)], 2);
        let views = StorageViews::of(&table);
        assert_eq!(views.tensors(0), [0, 2]);
        assert_eq!(views.tensors(1), [1, 3]);
    }

    #[test]
    fn only_storages_alike_in_every_respect_are_candidates() {
        let before = table(
            &[(1, 0x1000, 64), (2, 0x2000, 64), (3, 0x3000, 64), (4, 0, 0)],
            1,
        );
        let views = StorageViews::of(&before);
        let versions = [Some(1), Some(1), None, Some(1), None];
        let (records, recorded) =
            StageRecords::record(&before, &views, &[1, 2, 3, 4], &versions, |i| i != 1);
        // storage 1 not kept, 2 has an untracked version, 3 has no bytes
        assert_eq!(recorded, [0]);
        // same key elsewhere (moved), other size, other version, other key
        for (storages, versions) in [
            (&[(1, 0x1000, 64)], [Some(1)]),
            (&[(1, 0x1800, 64)], [Some(1)]),
            (&[(1, 0x1000, 128)], [Some(1)]),
            (&[(1, 0x1000, 64)], [Some(2)]),
            (&[(9, 0x1000, 64)], [Some(1)]),
        ] {
            let now = table(storages, 1);
            let now_views = StorageViews::of(&now);
            let keys: Vec<usize> = storages.iter().map(|s| s.0).collect();
            let mut per_tensor = versions.to_vec();
            per_tensor.push(None); // the opaque tensor
            let found = records.candidates(&now, &now_views, &keys, &per_tensor);
            let expected = storages[0] == (1, 0x1000, 64) && versions[0] == Some(1);
            assert_eq!(found == [(0, 0)], expected, "{storages:?} {versions:?}");
        }
    }

    #[test]
    fn reordered_added_and_removed_storages_find_their_own_records() {
        let before = table(&[(1, 0x1000, 64), (2, 0x2000, 64), (3, 0x3000, 64)], 1);
        let (records, _) = StageRecords::record(
            &before,
            &StorageViews::of(&before),
            &[1, 2, 3],
            &[Some(0), Some(0), Some(0), None],
            |_| true,
        );
        let now = table(&[(3, 0x3000, 64), (9, 0x9000, 64), (1, 0x1000, 64)], 1);
        let found = records.candidates(
            &now,
            &StorageViews::of(&now),
            &[3, 9, 1],
            &[Some(0), Some(0), Some(0), None],
        );
        assert_eq!(found, [(0, 2), (2, 0)]);
    }

    #[test]
    fn a_storage_with_another_number_of_views_is_not_a_candidate() {
        let before = table(&[(1, 0x1000, 64)], 2);
        let (records, _) = StageRecords::record(
            &before,
            &StorageViews::of(&before),
            &[1],
            &[Some(0), Some(0), None],
            |_| true,
        );
        let now = table(&[(1, 0x1000, 64)], 1);
        let found = records.candidates(&now, &StorageViews::of(&now), &[1], &[Some(0), None]);
        assert!(found.is_empty());
    }

    #[test]
    fn candidates_scale_to_many_storages() {
        let storages: Vec<(usize, usize, usize)> =
            (1..=20_000).map(|i| (i, i * 0x1000, 64)).collect();
        let before = table(&storages, 1);
        let views = StorageViews::of(&before);
        let keys: Vec<usize> = storages.iter().map(|s| s.0).collect();
        let mut versions = vec![Some(0); storages.len()];
        versions.push(None);
        let (records, recorded) = StageRecords::record(&before, &views, &keys, &versions, |_| true);
        assert_eq!(recorded.len(), 20_000);
        versions[7] = Some(1);
        let found = records.candidates(&before, &views, &keys, &versions);
        assert_eq!(found.len(), 19_999);
        assert!(!found.iter().any(|&(s, _)| s == 7));
    }
}
