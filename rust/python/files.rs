//! `write_file`, `AtomicFile` and `CheckpointFile`: the durable writer, the atomic commit and the
//! reader (`writer.rs`, `commit.rs`, `reader.rs`, `format.rs`) as Python functions and objects.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::commit::AtomicFile;
use crate::direct_io;
use crate::format::storage_entries;
use crate::reader::{CheckpointFile, RangeTarget, RecordFile, StorageTarget};
use crate::table::Device;
use crate::torch_record::tensor_pickle;
use crate::writer::{
    write_records_uncommitted, write_uncommitted, write_uncommitted_streamed, RecordItem, Source,
    StagedBuffer, Streaming,
};

use super::buffer::PyHostBuffer;
use super::copy::PyCompletion;
use super::invalid;
use super::table::PyTensorTable;

/// Writes a stager file of the storages of `table` atomically and durably; returns the file's
/// size in bytes, or with `commit=False` the written, fsynced but not yet renamed
/// :class:`AtomicFile` (the caller commits or aborts it).
///
/// Storage i is read from `buffer` at its offset when `buffer` is given (a staged buffer, written
/// to the device as one run, its padding zeroed), else from the source storage itself (CPU tables
/// only). With `completion`, storage i is written once
/// request i has completed, so writing overlaps staging or receiving. `tensor_names[i]` (the
/// dotted key path of tensor i, or None) names the file entry of a storage a single tensor covers.
/// The GIL is released while writing; the table and buffer stay alive for the whole call.
///
/// A streamed write (`consumed`, a completion with one request per storage; no `buffer`, no
/// `completion`): the sources are read in place, bounced only through `bounce` (a pool buffer
/// nothing else uses meanwhile), and request i completes once storage i is no longer read.
#[pyfunction]
#[pyo3(signature = (path, table, tensor_names, metadata, buffer = None, completion = None, *, commit = true, consumed = None, bounce = None))]
#[allow(clippy::too_many_arguments)]
fn write_file(
    py: Python<'_>,
    path: PathBuf,
    table: Bound<'_, PyTensorTable>,
    tensor_names: Vec<Option<String>>,
    metadata: BTreeMap<String, String>,
    buffer: Option<Bound<'_, PyHostBuffer>>,
    completion: Option<Bound<'_, PyCompletion>>,
    commit: bool,
    consumed: Option<Bound<'_, PyCompletion>>,
    bounce: Option<Bound<'_, PyHostBuffer>>,
) -> PyResult<Py<PyAny>> {
    if consumed.is_some() && (buffer.is_some() || completion.is_some()) {
        return Err(invalid(
            "a streamed write (consumed=...) reads the sources themselves: no buffer, no completion"
                .to_string(),
        ));
    }
    if bounce.is_some() && consumed.is_none() {
        return Err(invalid(
            "bounce memory is for a streamed write (consumed=...)".to_string(),
        ));
    }
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
    let mut staged = None;
    let sources: Vec<Source> = match &buffer {
        Some(buffer) => {
            let host = &buffer.get().buffer;
            staged = Some((host.as_ptr() as usize, host.len()));
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
    let consumed = consumed.as_ref().map(|c| c.get().completion.clone());
    let bounce_memory = bounce.as_ref().map(|b| {
        let host = &b.get().buffer;
        (host.as_ptr(), host.len())
    });
    let streaming = consumed.as_ref().map(|consumed| Streaming {
        consumed,
        bounce: bounce_memory,
    });
    // SAFETY: every source points into a storage the table holds (CPU, alive for this call) or
    // into `buffer` at the table's checked offsets (alive for this call; its bytes between the
    // storages are the table's padding, nobody's); bytes still being filled are only read after
    // their request of `completion` has completed (the writer waits). A streamed write's
    // `bounce` (held by the Bound for the call) is a pool buffer the caller uses for nothing else
    // meanwhile.
    let (file, report) = py.detach(|| unsafe {
        if let Some(streaming) = &streaming {
            return write_uncommitted_streamed(&path, &specs, &sources, metadata, streaming);
        }
        let staged = staged.map(|(ptr, len)| StagedBuffer {
            ptr: ptr as *mut u8,
            len,
        });
        write_uncommitted(
            &path,
            &specs,
            &sources,
            metadata,
            completion.as_ref(),
            staged,
        )
    })?;
    if commit {
        py.detach(|| file.commit())?;
        return Ok(report.file_bytes.into_pyobject(py)?.into_any().unbind());
    }
    let file = PyAtomicFile {
        file: Mutex::new(Some(file)),
        nbytes: report.file_bytes,
    };
    Ok(Py::new(py, file)?.into_any())
}

/// A file written under a temp name in its target's directory and renamed over the target by
/// :meth:`commit` (fsync, rename, directory fsync); see `rust/commit.rs`.
///
/// ``AtomicFile(path)`` resolves ``path`` (symlinks followed; anything but a regular file
/// refused), sweeps stale stager temp files from that directory and creates a locked temp file:
/// write it through :meth:`fileno`, then :meth:`commit` or :meth:`abort`. Used as a context
/// manager, it aborts unless committed.
#[pyclass(name = "AtomicFile", module = "stager._native", frozen)]
struct PyAtomicFile {
    file: Mutex<Option<AtomicFile>>,
    /// Bytes the writer wrote (0 for files Python writes).
    nbytes: u64,
}

impl PyAtomicFile {
    fn with_open<T>(&self, action: impl FnOnce(&mut AtomicFile) -> T) -> PyResult<T> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(file) => Ok(action(file)),
            None => Err(invalid("this AtomicFile was already committed or aborted")),
        }
    }

    fn take(&self) -> Option<AtomicFile> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[pymethods]
impl PyAtomicFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<PyAtomicFile> {
        let file = py.detach(|| AtomicFile::create(&path))?;
        Ok(PyAtomicFile {
            file: Mutex::new(Some(file)),
            nbytes: 0,
        })
    }

    /// The temp file's descriptor (owned by this object: don't close it).
    fn fileno(&self) -> PyResult<i32> {
        self.with_open(|file| {
            file.mark_dirty();
            file.file().as_raw_fd()
        })
    }

    /// The file the commit replaces (symlinks resolved).
    #[getter]
    fn path(&self) -> PyResult<PathBuf> {
        self.with_open(|file| file.target().to_path_buf())
    }

    /// Where the bytes are until the commit.
    #[getter]
    fn temp_path(&self) -> PyResult<PathBuf> {
        self.with_open(|file| file.temp_path().to_path_buf())
    }

    /// Bytes written by `write_file(commit=False)` (0 otherwise).
    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// Whether commit() or abort() has run.
    #[getter]
    fn closed(&self) -> bool {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// fsync (unless already done), rename over the target, fsync of its directory. On error the
    /// temp file is removed and the previous file stays.
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        let file = self
            .take()
            .ok_or_else(|| invalid("this AtomicFile was already committed or aborted"))?;
        py.detach(|| file.commit())?;
        Ok(())
    }

    /// Removes the temp file (a no-op once committed or aborted).
    fn abort(&self) {
        if let Some(file) = self.take() {
            file.abort();
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Aborts unless committed; never swallows the exception.
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.abort();
        false
    }
}

/// ``"direct"`` or ``"buffered"``: how stager reads and writes the regular file ``path`` (the
/// filesystem's support for direct I/O, or ``STAGER_DIRECT_IO=0``).
#[pyfunction]
fn io_mode(path: PathBuf) -> PyResult<&'static str> {
    let file = std::fs::File::open(&path)
        .map_err(|err| crate::StagerError::io("opening", path.clone(), err))?;
    Ok(direct_io::probe(&file).name())
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
                e.dtype.safetensors_name().unwrap_or("U8").to_string(),
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
    /// `verify`; returns ``"direct"`` or ``"buffered"`` (how the bytes were read).
    #[pyo3(signature = (buffer, table, verify = true))]
    fn read_into(
        &self,
        py: Python<'_>,
        buffer: Bound<'_, PyHostBuffer>,
        table: Bound<'_, PyTensorTable>,
        verify: bool,
    ) -> PyResult<&'static str> {
        let offsets: Vec<usize> = table
            .get()
            .table
            .storages()
            .iter()
            .map(|s| s.offset)
            .collect();
        let host = &buffer.get().buffer;
        let (address, len, capacity) = (host.as_ptr() as usize, host.len(), host.capacity());
        let file = &self.file;
        // SAFETY: `buffer` is a fresh pool buffer that Python holds (the Bound keeps it alive for
        // the call) and that no tensor reads before load() returns (its bytes past `len`, up to
        // the capacity, are nobody's); read_into checks the ranges.
        let mode = py.detach(|| unsafe {
            file.read_into(address as *mut u8, len, capacity, &offsets, verify)
        })?;
        Ok(mode.name())
    }

    /// Reads only the chosen storages, each into its own target, checking checksums when
    /// `verify`; returns the indices of the storages whose crc32c does not match. `targets` holds
    /// `(storage index, target)` pairs, a target being either a contiguous CPU tensor of exactly
    /// the storage's bytes (read straight into it) or `(HostBuffer, offset)` (a range of a pool
    /// buffer). Sizes and ranges are checked here, and no two targets may overlap, so no input can
    /// make the reader write outside the memory it was given. For stager.filesystem's dcp reader.
    #[pyo3(signature = (targets, verify = true))]
    fn read_storages(
        &self,
        py: Python<'_>,
        targets: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)>,
        verify: bool,
    ) -> PyResult<Vec<usize>> {
        let layout = self.file.layout()?;
        let count = layout.storages.len();
        let mut spans = Vec::with_capacity(targets.len());
        let mut reads = Vec::with_capacity(targets.len());
        for (index, target) in &targets {
            let storage = super::usize_arg(index, "storage index", 0, count.saturating_sub(1))?;
            let nbytes = layout.storages[storage].nbytes as usize;
            let address = if let Ok((buffer, offset)) =
                target.extract::<(Bound<'_, PyHostBuffer>, Bound<'_, PyAny>)>()
            {
                let host = &buffer.get().buffer;
                let offset = super::usize_arg(&offset, "buffer offset", 0, usize::MAX)?;
                if offset
                    .checked_add(nbytes)
                    .map_or(true, |end| end > host.len())
                {
                    return Err(invalid(format!(
                        "storage {storage} ({nbytes} bytes) does not fit the {}-byte buffer at offset {offset}",
                        host.len()
                    )));
                }
                host.as_ptr() as usize + offset
            } else {
                super::table::contiguous_cpu_bytes(target, nbytes)
                    .map_err(|why| invalid(format!("target of storage {storage}: {why}")))?
            };
            if nbytes > 0 {
                spans.push((address, nbytes));
            }
            reads.push(StorageTarget {
                storage,
                dst: address as *mut u8,
            });
        }
        crate::layout::check_disjoint_ranges(spans, usize::MAX, "read target")?;
        let file = &self.file;
        // SAFETY: every target is `nbytes` writable bytes inside a live pool buffer or a contiguous
        // CPU tensor of exactly the storage's size (checked above), all held by `targets` for the
        // call, and no two overlap (checked above).
        Ok(py.detach(|| unsafe { file.read_storages(&reads, verify) })?)
    }

    /// Checks every checksum; returns one message per damaged storage.
    fn verify(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let file = &self.file;
        Ok(py.detach(|| file.verify())?)
    }
}

/// A tensor item's record spec: `(storage type name, storage elements, storage offset, size,
/// stride, dtype name for `_rebuild_tensor_v3` or None)`, e.g.
/// `("FloatStorage", 10, 2, [2, 3], [3, 1], None)` or `("UntypedStorage", 8, 0, [4], [1], "uint16")`.
type RecordSpec = (String, u64, u64, Vec<u64>, Vec<i64>, Option<String>);

/// Writes a data file of dcp's format (see `rust/torch_record.rs`): for each item
/// `(bytes, nbytes, request, spec)`, `bytes` a contiguous CPU tensor of exactly `nbytes` bytes
/// (a tensor's whole storage as uint8, or a bytes item's bytes), `request` the request of
/// `completion` that fills them (or None), `spec` a tensor item's [`RecordSpec`] (a
/// `torch.save` record is written around the bytes) or None (the bytes are written as they
/// are). Returns `(file size or the uncommitted AtomicFile, [(offset, length)], [crc32],
/// [data offset])` per item. The GIL is released while writing.
///
/// A streamed write (`consumed`, a completion with one request per item): request i completes
/// once item i's bytes are no longer read (their owner may change them), and the write's error
/// fails it; bounced bytes go only through `bounce` (a pool buffer nothing else uses meanwhile).
#[pyfunction]
#[pyo3(signature = (path, items, serialization_id, completion = None, *, commit = true, consumed = None, bounce = None))]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn write_records(
    py: Python<'_>,
    path: PathBuf,
    items: Vec<(Bound<'_, PyAny>, usize, Option<usize>, Option<RecordSpec>)>,
    serialization_id: String,
    completion: Option<Bound<'_, PyCompletion>>,
    commit: bool,
    consumed: Option<Bound<'_, PyCompletion>>,
    bounce: Option<Bound<'_, PyHostBuffer>>,
) -> PyResult<(Py<PyAny>, Vec<(u64, u64)>, Vec<u32>, Vec<u64>)> {
    let completion = completion.as_ref().map(|c| c.get().completion.clone());
    if bounce.is_some() && consumed.is_none() {
        return Err(invalid(
            "bounce memory is for a streamed write (consumed=...)".to_string(),
        ));
    }
    let consumed = consumed.as_ref().map(|c| c.get().completion.clone());
    let bounce_memory = bounce.as_ref().map(|b| {
        let host = &b.get().buffer;
        (host.as_ptr(), host.len())
    });
    let streaming = consumed.as_ref().map(|consumed| Streaming {
        consumed,
        bounce: bounce_memory,
    });
    let mut records = Vec::with_capacity(items.len());
    for (index, (bytes, nbytes, request, spec)) in items.iter().enumerate() {
        let address = super::table::contiguous_cpu_bytes(bytes, *nbytes)
            .map_err(|why| invalid(format!("bytes of item {index}: {why}")))?;
        if request.is_some() && completion.is_none() {
            return Err(invalid(format!(
                "item {index} waits for a request but no completion was given"
            )));
        }
        let pickle = spec
            .as_ref()
            .map(|(storage_type, numel, offset, size, stride, dtype)| {
                tensor_pickle(
                    storage_type,
                    *numel,
                    *offset,
                    size,
                    stride,
                    dtype.as_deref(),
                )
            });
        if let Some((storage_type, .., dtype)) = spec {
            let name_ok = |name: &str| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            if !storage_type.ends_with("Storage")
                || !name_ok(storage_type)
                || dtype.as_deref().is_some_and(|d| !name_ok(d))
            {
                return Err(invalid(format!(
                    "item {index}: {storage_type:?} / {dtype:?} is not a storage type / dtype name"
                )));
            }
        }
        records.push(RecordItem {
            source: Source {
                ptr: address as *const u8,
                request: *request,
            },
            nbytes: *nbytes as u64,
            pickle,
        });
    }
    // SAFETY: every source is a contiguous CPU tensor of exactly `nbytes` bytes (checked above),
    // held by `items` for the call; bytes still being filled are read only after their request of
    // `completion` has completed (the writer waits). `bounce` (held by the Bound for the call)
    // is a pool buffer the caller uses for nothing else meanwhile.
    let (file, report) = py.detach(|| unsafe {
        write_records_uncommitted(
            &path,
            &records,
            &serialization_id,
            completion.as_ref(),
            streaming.as_ref(),
        )
    })?;
    let head = if commit {
        py.detach(|| file.commit())?;
        report.file_bytes.into_pyobject(py)?.into_any().unbind()
    } else {
        Py::new(
            py,
            PyAtomicFile {
                file: Mutex::new(Some(file)),
                nbytes: report.file_bytes,
            },
        )?
        .into_any()
    };
    Ok((head, report.ranges, report.crc32, report.data_offsets))
}

/// The `data.pkl` `torch.save` writes for a plain CPU tensor (see `rust/torch_record.rs`).
#[pyfunction(name = "tensor_pickle")]
#[pyo3(signature = (storage_type, numel, storage_offset, size, stride, v3_dtype = None))]
fn py_tensor_pickle(
    py: Python<'_>,
    storage_type: &str,
    numel: u64,
    storage_offset: u64,
    size: Vec<u64>,
    stride: Vec<i64>,
    v3_dtype: Option<&str>,
) -> Py<PyBytes> {
    PyBytes::new(
        py,
        &tensor_pickle(
            storage_type,
            numel,
            storage_offset,
            &size,
            &stride,
            v3_dtype,
        ),
    )
    .unbind()
}

/// A data file of dcp's format opened for reading (a regular file, opened without blocking):
/// its `torch.save` records parsed without running their pickles, byte ranges read with direct,
/// parallel I/O and checked against crc32s.
#[pyclass(name = "RecordFile", module = "stager._native", frozen)]
struct PyRecordFile {
    file: RecordFile,
}

#[pymethods]
impl PyRecordFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<PyRecordFile> {
        let file = py.detach(|| RecordFile::open(&path))?;
        Ok(PyRecordFile { file })
    }

    /// The file's size in bytes.
    #[getter]
    fn file_size(&self) -> u64 {
        self.file.file_len()
    }

    /// `(data.pkl bytes, [(storage key, file offset, nbytes, crc32)])` of the record at
    /// `[offset, offset + length)`.
    #[allow(clippy::type_complexity)]
    fn parse_record<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: u64,
    ) -> PyResult<(Bound<'py, PyBytes>, Vec<(String, u64, u64, u32)>)> {
        let file = &self.file;
        let parsed = py.detach(|| file.parse_record(offset, length))?;
        let storages = parsed
            .storages
            .into_iter()
            .map(|e| (e.name, e.offset, e.len, e.crc32))
            .collect();
        Ok((PyBytes::new(py, &parsed.pickle), storages))
    }

    /// :meth:`parse_record` of every `(offset, length)`, several at once (GIL released); each
    /// result is that tuple, or the StagerError its record raised.
    #[allow(clippy::type_complexity)]
    fn parse_records<'py>(
        &self,
        py: Python<'py>,
        ranges: Vec<(u64, u64)>,
    ) -> PyResult<Vec<Py<PyAny>>> {
        let file = &self.file;
        let parsed = py.detach(|| file.parse_records(&ranges));
        parsed
            .into_iter()
            .map(|result| -> PyResult<Py<PyAny>> {
                match result {
                    Ok(record) => {
                        let storages: Vec<(String, u64, u64, u32)> = record
                            .storages
                            .into_iter()
                            .map(|e| (e.name, e.offset, e.len, e.crc32))
                            .collect();
                        Ok((PyBytes::new(py, &record.pickle), storages)
                            .into_pyobject(py)?
                            .into_any()
                            .unbind())
                    }
                    Err(err) => Ok(PyErr::from(err).into_value(py).into_any()),
                }
            })
            .collect()
    }

    /// Reads `(offset, length, target, crc32 or None)` ranges, `target` a contiguous CPU tensor
    /// of exactly `length` bytes (no two overlapping); returns the indices of the ranges whose
    /// crc32 does not match.
    fn read_ranges(
        &self,
        py: Python<'_>,
        targets: Vec<(u64, u64, Bound<'_, PyAny>, Option<u32>)>,
    ) -> PyResult<Vec<usize>> {
        let mut reads = Vec::with_capacity(targets.len());
        let mut spans = Vec::with_capacity(targets.len());
        for (index, (offset, len, target, crc32)) in targets.iter().enumerate() {
            let nbytes = usize::try_from(*len).map_err(|_| invalid("range too large"))?;
            let address = super::table::contiguous_cpu_bytes(target, nbytes)
                .map_err(|why| invalid(format!("target of range {index}: {why}")))?;
            if nbytes > 0 {
                spans.push((address, nbytes));
            }
            reads.push(RangeTarget {
                offset: *offset,
                len: *len,
                dst: address as *mut u8,
                crc32: *crc32,
            });
        }
        crate::layout::check_disjoint_ranges(spans, usize::MAX, "read target")?;
        let file = &self.file;
        // SAFETY: every target is a contiguous CPU tensor of exactly its range's length, held by
        // `targets` for the call, and no two overlap (checked above).
        Ok(py.detach(|| unsafe { file.read_ranges(&reads) })?)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_records, m)?)?;
    m.add_function(wrap_pyfunction!(py_tensor_pickle, m)?)?;
    m.add_class::<PyRecordFile>()?;
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_function(wrap_pyfunction!(io_mode, m)?)?;
    m.add_class::<PyAtomicFile>()?;
    m.add_class::<PyCheckpointFile>()?;
    m.add(
        "SAFETENSORS_MAX_HEADER_BYTES",
        crate::format::MAX_HEADER_BYTES,
    )?;
    m.add(
        "MAX_STAGER_HEADER_BYTES",
        crate::format::MAX_STAGER_HEADER_BYTES,
    )?;
    Ok(())
}
