//! `UnchangedRecords`: incremental staging's records of the previous stage (`unchanged.rs`), plus
//! what only the interpreter can tell: whether a recorded storage object still lives (a torch
//! storage weak reference, `UntypedStorage._weak_ref()`), and whether the tensors viewing it now
//! may be the recorded tensor objects (their weak references, from the table).
//!
//! The reuse decision over every storage of a table is one call ([`PyUnchangedRecords::unchanged`]);
//! recording a stage is another ([`PyUnchangedRecords::remember`]).

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyInt, PyList, PyWeakrefReference};

use super::table::PyTensorTable;
use crate::unchanged::{StageRecords, StorageViews};

/// `torch.UntypedStorage._expired` and `_free_weak_ref`, looked up once per process.
struct StorageWeakRefs {
    expired: Py<PyAny>,
    free: Py<PyAny>,
}

static WEAK_REFS: PyOnceLock<StorageWeakRefs> = PyOnceLock::new();

fn weak_refs(py: Python<'_>) -> PyResult<&StorageWeakRefs> {
    WEAK_REFS.get_or_try_init(py, || {
        let storage = py.import("torch")?.getattr("UntypedStorage")?;
        Ok::<_, PyErr>(StorageWeakRefs {
            expired: storage.getattr("_expired")?.unbind(),
            free: storage.getattr("_free_weak_ref")?.unbind(),
        })
    })
}

/// One stager's records of its previous stage (see the module docs and `stager.incremental`).
///
/// # Thread Safety
/// Used by one stage at a time (the stagers serialize their incremental stages); PyO3's borrow
/// checking refuses a second concurrent use instead of racing.
#[pyclass(name = "UnchangedRecords", module = "stager._native")]
pub(crate) struct PyUnchangedRecords {
    records: StageRecords,
    /// Per record: a torch weak reference (`_weak_ref()`) to the source storage, freed on drop.
    storage_refs: Vec<usize>,
    /// Per record: what its bytes are now (a staged storage, or an index).
    staged: Vec<Py<PyAny>>,
    /// Weak references to the recorded tensors, indexed like the records' versions.
    identities: Vec<Py<PyAny>>,
    /// Number of storages of the recorded stage.
    #[pyo3(get)]
    storage_count: usize,
    /// Bytes the last decision left to copy, and reused.
    #[pyo3(get)]
    copied_nbytes: usize,
    #[pyo3(get)]
    reused_nbytes: usize,
}

impl PyUnchangedRecords {
    fn free_storage_refs(&mut self, py: Python<'_>) {
        let refs = std::mem::take(&mut self.storage_refs);
        if refs.is_empty() {
            return;
        }
        if let Ok(api) = weak_refs(py) {
            let free = api.free.bind(py);
            for handle in refs {
                // Nothing to do about a failure here (interpreter shutdown): the weak reference leaks.
                let _ = free.call1((handle,));
            }
        }
    }
}

impl Drop for PyUnchangedRecords {
    fn drop(&mut self) {
        if !self.storage_refs.is_empty() {
            Python::attach(|py| self.free_storage_refs(py));
        }
    }
}

/// Whether the tensors viewing a storage now may be the recorded ones: each recorded tensor that
/// still lives is the very object seen now (CPython shares one weak reference per live object,
/// so that is identity of the references), and one that died cannot be told apart.
fn same_objects(py: Python<'_>, before: &[Py<PyAny>], now: &[&Py<PyAny>]) -> bool {
    before.iter().zip(now).all(|(before, now)| {
        before.is(*now)
            || before
                .bind(py)
                .cast::<PyWeakrefReference>()
                .map(|r| r.upgrade().is_none())
                .unwrap_or(false)
    })
}

#[pymethods]
impl PyUnchangedRecords {
    #[new]
    fn new() -> Self {
        PyUnchangedRecords {
            records: StageRecords::default(),
            storage_refs: Vec::new(),
            staged: Vec::new(),
            identities: Vec::new(),
            storage_count: 0,
            copied_nbytes: 0,
            reused_nbytes: 0,
        }
    }

    /// Storage index → what `remember` recorded for it, for every storage of `table` (described
    /// with `track_versions`) that is the same live object at the same address with the same size,
    /// viewed by tensors with the same versions none of which replaced a recorded tensor object
    /// that still lives. Sets `copied_nbytes` and `reused_nbytes`.
    fn unchanged<'py>(
        &mut self,
        py: Python<'py>,
        table: &PyTensorTable,
    ) -> PyResult<Bound<'py, PyDict>> {
        let reused = PyDict::new(py);
        let storages = table.table.storages();
        let total: usize = storages.iter().map(|s| s.nbytes).sum();
        let mut reused_nbytes = 0;
        if !self.storage_refs.is_empty() {
            let views = StorageViews::of(&table.table);
            let expired = weak_refs(py)?.expired.bind(py);
            let candidates =
                self.records
                    .candidates(&table.table, &views, &table.keys, &table.versions);
            for (index, record_index) in candidates {
                let record = &self.records.records()[record_index];
                let now: Option<Vec<&Py<PyAny>>> = views
                    .tensors(index)
                    .iter()
                    .map(|&t| table.identities[t].as_ref())
                    .collect();
                let Some(now) = now else { continue };
                if !same_objects(py, &self.identities[record.tensors.clone()], &now) {
                    continue;
                }
                // The key's StorageImpl died: another object at the same address.
                if expired
                    .call1((self.storage_refs[record_index],))?
                    .is_truthy()?
                {
                    continue;
                }
                reused.set_item(index, self.staged[record_index].bind(py))?;
                reused_nbytes += storages[index].nbytes;
            }
        }
        self.reused_nbytes = reused_nbytes;
        self.copied_nbytes = total - reused_nbytes;
        Ok(reused)
    }

    /// Records the storages of `table` (described with `track_versions`) for the next stage, and
    /// for each where its bytes are now: the storage of its first staged tensor (`staged_tensors`,
    /// table order) or, without them, its own index in `table`; forgets everything else.
    #[pyo3(signature = (table, staged_tensors = None))]
    fn remember(
        &mut self,
        py: Python<'_>,
        table: &PyTensorTable,
        staged_tensors: Option<&Bound<'_, PyList>>,
    ) -> PyResult<()> {
        self.forget(py);
        let views = StorageViews::of(&table.table);
        let mut staged: Vec<Py<PyAny>> = Vec::new();
        let mut failure: Option<PyErr> = None;
        let (records, recorded) = StageRecords::record(
            &table.table,
            &views,
            &table.keys,
            &table.versions,
            |index| {
                let tensors = views.tensors(index);
                if table.storages[index].is_none()
                    || tensors.iter().any(|&t| table.identities[t].is_none())
                {
                    return false;
                }
                let target = match staged_tensors {
                    None => Ok(PyInt::new(py, index).into_any().unbind()),
                    Some(list) => {
                        let Some(&first) = tensors.first() else {
                            return false;
                        };
                        list.get_item(first).and_then(|tensor| {
                            if tensor.is_none() {
                                Ok(py.None())
                            } else {
                                Ok(tensor
                                    .call_method0(intern!(py, "untyped_storage"))?
                                    .unbind())
                            }
                        })
                    }
                };
                match target {
                    Ok(target) if !target.is_none(py) => {
                        staged.push(target);
                        true
                    }
                    Ok(_) => false,
                    Err(err) => {
                        failure.get_or_insert(err);
                        false
                    }
                }
            },
        );
        if let Some(err) = failure {
            return Err(err);
        }
        let mut storage_refs = Vec::with_capacity(recorded.len());
        let mut identities = Vec::with_capacity(records.versions().len());
        for &index in &recorded {
            let source = table.storages[index]
                .as_ref()
                .expect("recorded storages have their object");
            let handle: usize = source
                .bind(py)
                .call_method0(intern!(py, "_weak_ref"))?
                .extract()?;
            storage_refs.push(handle);
            for &tensor in views.tensors(index) {
                let identity = table.identities[tensor]
                    .as_ref()
                    .expect("recorded tensors have their identity");
                identities.push(identity.clone_ref(py));
            }
        }
        self.records = records;
        self.storage_refs = storage_refs;
        self.staged = staged;
        self.identities = identities;
        self.storage_count = table.table.storages().len();
        Ok(())
    }

    /// Drops every record (and the staged bytes they keep alive).
    fn forget(&mut self, py: Python<'_>) {
        self.free_storage_refs(py);
        self.records = StageRecords::default();
        self.staged = Vec::new();
        self.identities = Vec::new();
        self.storage_count = 0;
    }

    /// Number of recorded storages.
    fn __len__(&self) -> usize {
        self.records.records().len()
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyUnchangedRecords>()?;
    Ok(())
}
