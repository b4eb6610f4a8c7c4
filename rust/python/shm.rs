//! `SegmentWriter`, `Segment` and the segment functions: named shared-memory segments
//! (`shm.rs`) as Python objects.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::shm::{self, OpenedSegment};

use super::buffer::PyHostBuffer;
use super::{invalid, usize_arg};

/// A segment being written: `buffer` is its data region (a pool buffer to copy or receive
/// into); `publish(record, ranges)` checksums the ranges, writes the record and renames it to
/// its final path. Dropped (or `abort()`ed) unpublished, its temp file is removed.
#[pyclass(name = "SegmentWriter", module = "stager._native", frozen)]
pub(crate) struct PySegmentWriter {
    writer: Mutex<Option<shm::SegmentWriter>>,
    buffer: Py<PyHostBuffer>,
}

#[pymethods]
impl PySegmentWriter {
    /// Creates `<path>.<pid>.tmp` with room for `nbytes` (page-locked with `pinned` when CUDA
    /// is present); raises StagerError naming the directory when it is missing, not writable or
    /// too small.
    /// `recycle`: an older generation's segment to reuse (its memory is already allocated);
    /// a fresh one is created when it can't be (gone, or mapped by someone).
    #[new]
    #[pyo3(signature = (path, nbytes, *, pinned = false, recycle = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        nbytes: Bound<'_, PyAny>,
        pinned: bool,
        recycle: Option<PathBuf>,
    ) -> PyResult<Self> {
        let nbytes = usize_arg(&nbytes, "nbytes", 0, isize::MAX as usize / 2)?;
        let pinner = if pinned { super::cuda::pinner() } else { None };
        let mut writer = py.detach(|| {
            if let Some(old) = recycle {
                if let Some(writer) =
                    shm::SegmentWriter::recycle(&old, &path, nbytes, pinner.clone())?
                {
                    return Ok(writer);
                }
            }
            shm::SegmentWriter::create(&path, nbytes, pinner)
        })?;
        let buffer = writer.take_buffer().expect("fresh writer has its buffer");
        Ok(PySegmentWriter {
            writer: Mutex::new(Some(writer)),
            buffer: Py::new(py, PyHostBuffer::new(buffer))?,
        })
    }

    /// The data region: tensors made from it write into the segment.
    #[getter]
    fn buffer(&self, py: Python<'_>) -> Py<PyHostBuffer> {
        self.buffer.clone_ref(py)
    }

    /// The temporary path being written.
    #[getter]
    fn temp_path(&self) -> PyResult<Option<PathBuf>> {
        let guard = self
            .writer
            .lock()
            .map_err(|_| invalid("segment writer poisoned"))?;
        Ok(guard.as_ref().map(|w| w.temp_path().to_path_buf()))
    }

    /// Checksums `ranges` ([(offset, length)] of the data), writes `record` and publishes the
    /// segment under its final name (GIL released). Every copy into the buffer must be complete.
    fn publish(&self, py: Python<'_>, record: &[u8], ranges: Vec<(u64, u64)>) -> PyResult<()> {
        let mut guard = self
            .writer
            .lock()
            .map_err(|_| invalid("segment writer poisoned"))?;
        let writer = guard
            .as_mut()
            .ok_or_else(|| invalid("segment already published or aborted"))?;
        let buffer = self.buffer.get();
        let record = record.to_vec();
        let result = py.detach(|| writer.publish(&buffer.buffer, &record, &ranges));
        // Published or failed: the temp is renamed or gone; the writer keeps the lock alive
        // through the buffer.
        guard.take();
        Ok(result?)
    }

    /// Drops the unpublished segment (its temp file); the final name is untouched.
    fn abort(&self) -> PyResult<()> {
        let mut guard = self
            .writer
            .lock()
            .map_err(|_| invalid("segment writer poisoned"))?;
        if let Some(writer) = guard.take() {
            writer.abort();
        }
        Ok(())
    }
}

/// A published segment opened for reading: `record` (bytes), `buffer` (its data, mapped
/// copy-on-write: writes through it never reach the segment), `verify()`.
#[pyclass(name = "Segment", module = "stager._native", frozen)]
pub(crate) struct PySegment {
    record: Vec<u8>,
    ranges: Vec<(u64, u64, u32)>,
    path: PathBuf,
    buffer: Py<PyHostBuffer>,
}

#[pymethods]
impl PySegment {
    /// The record written at publish.
    #[getter]
    fn record<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.record)
    }

    /// The data region.
    #[getter]
    fn buffer(&self, py: Python<'_>) -> Py<PyHostBuffer> {
        self.buffer.clone_ref(py)
    }

    /// How many checksummed ranges it records.
    #[getter]
    fn nranges(&self) -> usize {
        self.ranges.len()
    }

    /// Recomputes every checksum (GIL released); raises StagerError naming the first bad range.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        let bytes = self.buffer.get().buffer.as_slice();
        Ok(py.detach(|| shm::verify_ranges(bytes, &self.ranges, &self.path))?)
    }
}

/// Opens a published segment (header and record checked; data mapped, not read).
#[pyfunction]
fn open_segment(py: Python<'_>, path: PathBuf) -> PyResult<PySegment> {
    let OpenedSegment {
        record,
        ranges,
        buffer,
        path,
    } = py.detach(|| shm::open_segment(&path))?;
    Ok(PySegment {
        record,
        ranges,
        path,
        buffer: Py::new(py, PyHostBuffer::new(buffer))?,
    })
}

/// The record of a published segment, reading only its header and record.
#[pyfunction]
fn segment_record<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyBytes>> {
    let record = py.detach(|| shm::read_record(&path))?;
    Ok(PyBytes::new(py, &record))
}

/// Removes a segment unless another live process holds it: the bytes freed, or None when it
/// is in use (left alone).
#[pyfunction]
fn remove_segment(py: Python<'_>, path: PathBuf) -> PyResult<Option<u64>> {
    Ok(py.detach(|| shm::remove_segment(&path))?)
}

/// Whether a live process (this one included) holds the segment.
#[pyfunction]
fn segment_in_use(py: Python<'_>, path: PathBuf) -> PyResult<bool> {
    Ok(py.detach(|| shm::in_use(&path))?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySegmentWriter>()?;
    m.add_class::<PySegment>()?;
    m.add_function(wrap_pyfunction!(open_segment, m)?)?;
    m.add_function(wrap_pyfunction!(segment_record, m)?)?;
    m.add_function(wrap_pyfunction!(remove_segment, m)?)?;
    m.add_function(wrap_pyfunction!(segment_in_use, m)?)?;
    Ok(())
}
