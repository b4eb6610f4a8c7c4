//! Bindings for the durable writer and the reader (`writer.rs`, `reader.rs`, `format.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::format::EntrySpec;
use crate::reader::CheckpointFile;
use crate::writer::{write_file as engine_write_file, Source};

use super::invalid;
use super::staging::{PyCopyJob, PyHostBuffer};

/// Writes a stager file atomically and durably; returns the file's size in bytes.
///
/// Storage i is entry `names[i]` (`dtypes[i]`, `shapes[i]`, `nbytes[i]` bytes) read from
/// address `addresses[i]`. When `job` is given, `requests[i]` (if not None) is the copy of that job
/// that fills storage i: it is written as soon as that copy completes.
///
/// The caller (stager.files) keeps every source alive and unchanged for the duration of the call;
/// the GIL is released while writing.
#[pyfunction]
#[pyo3(signature = (path, names, dtypes, shapes, nbytes, addresses, metadata, job = None, requests = None))]
#[allow(clippy::too_many_arguments)]
fn write_file(
    py: Python<'_>,
    path: PathBuf,
    names: Vec<String>,
    dtypes: Vec<String>,
    shapes: Vec<Vec<u64>>,
    nbytes: Vec<u64>,
    addresses: Vec<usize>,
    metadata: BTreeMap<String, String>,
    job: Option<PyRef<'_, PyCopyJob>>,
    requests: Option<Vec<Option<usize>>>,
) -> PyResult<u64> {
    let count = names.len();
    if dtypes.len() != count
        || shapes.len() != count
        || nbytes.len() != count
        || addresses.len() != count
        || requests.as_ref().is_some_and(|r| r.len() != count)
    {
        return Err(invalid(format!(
            "write_file needs one name, dtype, shape, size, address (and request) per storage: {count} names"
        )));
    }
    if requests.is_some() && job.is_none() {
        return Err(invalid("write_file: requests given without a job".into()));
    }
    let specs: Vec<EntrySpec> = names
        .into_iter()
        .zip(dtypes)
        .zip(shapes)
        .zip(&nbytes)
        .map(|(((name, dtype), shape), &nbytes)| EntrySpec {
            name,
            dtype,
            shape,
            nbytes,
        })
        .collect();
    let sources: Vec<Source> = (0..count)
        .map(|i| Source {
            ptr: addresses[i] as *const u8,
            request: requests.as_ref().and_then(|r| r[i]),
        })
        .collect();
    let job = job.map(|job| job.job.clone());
    // SAFETY: stager.files passes the addresses of storages (or of a host buffer filled by `job`)
    // that it holds references to for the whole call; write_file checks sizes against the specs.
    let report = py
        .detach(|| unsafe { engine_write_file(&path, &specs, &sources, metadata, job.as_ref()) })?;
    Ok(report.file_bytes)
}

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
    fn layout(&self) -> PyResult<(String, Vec<(String, u64, u64, u32)>)> {
        let layout = self.file.layout()?;
        let storages = layout
            .storages
            .into_iter()
            .map(|s| (s.entry, s.offset, s.nbytes, s.crc32c))
            .collect();
        Ok((layout.tree, storages))
    }

    /// Reads storage i into `buffer` at `offsets[i]`, checking checksums when `verify`.
    #[pyo3(signature = (buffer, offsets, verify = true))]
    fn read_into(
        &self,
        py: Python<'_>,
        buffer: Bound<'_, PyHostBuffer>,
        offsets: Vec<usize>,
        verify: bool,
    ) -> PyResult<()> {
        let host = &buffer.get().buffer;
        let (address, len) = (host.as_ptr() as usize, host.len());
        let file = &self.file;
        // SAFETY: `buffer` is a fresh pool buffer that Python holds (the Bound keeps it alive for
        // the call) and that no tensor reads before load() returns; read_into checks the ranges.
        py.detach(|| unsafe { file.read_into(address as *mut u8, len, &offsets, verify) })?;
        Ok(())
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
