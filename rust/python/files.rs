//! `write_file` and `CheckpointFile`: the durable writer and the reader (`writer.rs`, `reader.rs`,
//! `format.rs`) as Python functions and objects.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::format::storage_entries;
use crate::reader::{CheckpointFile, StorageTarget};
use crate::table::Device;
use crate::writer::{write_file as engine_write_file, Source};

use super::buffer::PyHostBuffer;
use super::copy::PyCompletion;
use super::invalid;
use super::table::PyTensorTable;

/// Writes a stager file of the storages of `table` atomically and durably; returns the file's
/// size in bytes.
///
/// Storage i is read from `buffer` at its offset when `buffer` is given (a staged buffer), else
/// from the source storage itself (CPU tables only). With `completion`, storage i is written once
/// request i has completed, so writing overlaps staging or receiving. `tensor_names[i]` (the
/// dotted key path of tensor i, or None) names the file entry of a storage a single tensor covers.
/// The GIL is released while writing; the table and buffer stay alive for the whole call.
#[pyfunction]
#[pyo3(signature = (path, table, tensor_names, metadata, buffer = None, completion = None))]
fn write_file(
    py: Python<'_>,
    path: PathBuf,
    table: Bound<'_, PyTensorTable>,
    tensor_names: Vec<Option<String>>,
    metadata: BTreeMap<String, String>,
    buffer: Option<Bound<'_, PyHostBuffer>>,
    completion: Option<Bound<'_, PyCompletion>>,
) -> PyResult<u64> {
    let table_ref = table.get();
    let described = &table_ref.table;
    if tensor_names.len() != described.views().len() {
        return Err(invalid(format!(
            "write_file needs one name (or None) per tensor: {} names for {} tensors",
            tensor_names.len(),
            described.views().len()
        )));
    }
    if let Some(index) = described.opaque().next() {
        return Err(invalid(format!(
            "tensor {index} is not a plain strided tensor and cannot be written"
        )));
    }
    let completion = completion.as_ref().map(|c| c.get().completion.clone());
    if let Some(completion) = &completion {
        if completion.len() != described.storages().len() {
            return Err(invalid(format!(
                "the completion has {} requests for {} storages",
                completion.len(),
                described.storages().len()
            )));
        }
    }
    let specs = storage_entries(described, &tensor_names, |i| {
        table_ref.safetensors_entry(py, i)
    });
    let sources: Vec<Source> = match &buffer {
        Some(buffer) => {
            let host = &buffer.get().buffer;
            described.check_buffer(host.len())?;
            let base = host.as_ptr() as *const u8;
            described
                .storages()
                .iter()
                .enumerate()
                .map(|(index, storage)| Source {
                    ptr: base.wrapping_add(storage.offset),
                    request: completion.as_ref().map(|_| index),
                })
                .collect()
        }
        None => described
            .storages()
            .iter()
            .enumerate()
            .map(|(index, storage)| {
                if storage.device != Device::Host {
                    return Err(invalid(format!(
                        "storage {index} is not in host memory: stage it into a buffer first"
                    )));
                }
                if storage.nbytes > 0 && storage.address == 0 {
                    return Err(invalid(format!("storage {index} has no source address")));
                }
                Ok(Source {
                    ptr: storage.address as *const u8,
                    request: completion.as_ref().map(|_| index),
                })
            })
            .collect::<PyResult<_>>()?,
    };
    // SAFETY: every source points into a storage the table holds (CPU, alive for this call) or
    // into `buffer` at the table's checked offsets (alive for this call); bytes still being
    // filled are only read after their request of `completion` has completed (write_file waits).
    let report = py.detach(|| unsafe {
        engine_write_file(&path, &specs, &sources, metadata, completion.as_ref())
    })?;
    Ok(report.file_bytes)
}

/// `(entry, file offset, nbytes, crc32c)` of each storage of a file.
type StorageRanges = Vec<(String, u64, u64, u32)>;

/// An open stager file whose header has been validated.
#[pyclass(name = "CheckpointFile", module = "stager._native", frozen)]
struct PyCheckpointFile {
    file: CheckpointFile,
}

#[pymethods]
impl PyCheckpointFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<PyCheckpointFile> {
        let file = py.detach(|| CheckpointFile::open(&path))?;
        Ok(PyCheckpointFile { file })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }

    #[getter]
    fn file_size(&self) -> u64 {
        self.file.file_len()
    }

    #[getter]
    fn data_start(&self) -> u64 {
        self.file.header().data_start
    }

    #[getter]
    fn data_nbytes(&self) -> u64 {
        self.file.header().data_len
    }

    /// The `__metadata__` map.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in &self.file.header().metadata {
            dict.set_item(key, value)?;
        }
        Ok(dict)
    }

    /// Every entry as (name, dtype, shape, begin, end), in file order.
    #[getter]
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self.file.header().entries.iter().map(|e| {
            (
                e.name.clone(),
                e.dtype.clone(),
                e.shape.clone(),
                e.begin,
                e.end,
            )
        });
        PyList::new(py, items)
    }

    /// (tree JSON, [(entry, file offset, nbytes, crc32c), ...]); raises StagerError when the
    /// stager metadata is missing or inconsistent.
    fn layout(&self) -> PyResult<(String, StorageRanges)> {
        let layout = self.file.layout()?;
        let storages = layout
            .storages
            .into_iter()
            .map(|s| (s.entry, s.offset, s.nbytes, s.crc32c))
            .collect();
        Ok((layout.tree, storages))
    }

    /// Reads storage i into `buffer` at the offset `table` places it, checking checksums when
    /// `verify`.
    #[pyo3(signature = (buffer, table, verify = true))]
    fn read_into(
        &self,
        py: Python<'_>,
        buffer: Bound<'_, PyHostBuffer>,
        table: Bound<'_, PyTensorTable>,
        verify: bool,
    ) -> PyResult<()> {
        let offsets: Vec<usize> = table
            .get()
            .table
            .storages()
            .iter()
            .map(|s| s.offset)
            .collect();
        let host = &buffer.get().buffer;
        let (address, len) = (host.as_ptr() as usize, host.len());
        let file = &self.file;
        // SAFETY: `buffer` is a fresh pool buffer that Python holds (the Bound keeps it alive for
        // the call) and that no tensor reads before load() returns; read_into checks the ranges.
        py.detach(|| unsafe { file.read_into(address as *mut u8, len, &offsets, verify) })?;
        Ok(())
    }

    /// Reads storage `storages[k]` to address `addresses[k]` for every k (only those storages),
    /// checking checksums when `verify`; returns the indices of the storages whose crc32c does
    /// not match. For stager.filesystem's dcp reader, which reads straight into destination
    /// tensors and scratch pool buffers.
    ///
    /// The caller passes, for each storage, the address of that storage's `nbytes` writable bytes
    /// (a contiguous CPU tensor or a pool buffer it holds for the call), disjoint from the others.
    #[pyo3(signature = (storages, addresses, verify = true))]
    fn read_storages(
        &self,
        py: Python<'_>,
        storages: Vec<usize>,
        addresses: Vec<usize>,
        verify: bool,
    ) -> PyResult<Vec<usize>> {
        if storages.len() != addresses.len() {
            return Err(invalid(format!(
                "read_storages needs one address per storage: {} storages, {} addresses",
                storages.len(),
                addresses.len()
            )));
        }
        let targets: Vec<StorageTarget> = storages
            .into_iter()
            .zip(addresses)
            .map(|(storage, address)| StorageTarget {
                storage,
                dst: address as *mut u8,
            })
            .collect();
        let file = &self.file;
        // SAFETY: stager.filesystem passes addresses of memory it holds for the call (destination
        // tensors checked to be contiguous and exactly the storage's size, or pool buffers), one
        // disjoint range per storage; read_storages checks the indices.
        Ok(py.detach(|| unsafe { file.read_storages(&targets, verify) })?)
    }

    /// Checks every checksum; returns one message per damaged storage.
    fn verify(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let file = &self.file;
        Ok(py.detach(|| file.verify())?)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_class::<PyCheckpointFile>()?;
    Ok(())
}
