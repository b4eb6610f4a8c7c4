//! Bindings for the host pool and the copy engine.

use std::os::raw::c_int;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::copy_engine::{CopyEngine, CopyJob, CopyRequest};
use crate::pool::{HostBuffer, HostPool, PoolOptions};

use super::invalid;
use super::tensors::PyTensorTable;

/// A pool of reusable host buffers (see `pool.rs`).
#[pyclass(name = "HostPool", module = "stager._native", frozen)]
struct PyHostPool {
    pool: HostPool,
}

#[pymethods]
impl PyHostPool {
    #[new]
    /// `pinned`: page-lock each buffer once for device copies (no-op without CUDA).
    #[pyo3(signature = (*, shared = false, budget_bytes = None, pinned = false))]
    fn new(shared: bool, budget_bytes: Option<usize>, pinned: bool) -> PyHostPool {
        PyHostPool {
            pool: HostPool::new(PoolOptions {
                shared,
                budget_bytes,
                pinner: if pinned { super::cuda::pinner() } else { None },
            }),
        }
    }

    /// A buffer of at least `nbytes`; raises StagerError when the budget can't hold it.
    fn acquire(&self, py: Python<'_>, nbytes: usize) -> PyResult<PyHostBuffer> {
        let buffer = py.detach(|| self.pool.acquire(nbytes))?;
        Ok(PyHostBuffer::new(buffer))
    }

    /// Maps and pre-faults `nbytes` in the background; the next acquire waits for it.
    fn reserve(&self, nbytes: usize, threads: usize) -> PyResult<()> {
        Ok(self.pool.reserve(nbytes, threads)?)
    }

    /// Waits for reservations still running.
    fn finish_reservations(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.pool.finish_reservations())?)
    }

    /// Returns free buffers to the operating system.
    fn trim(&self, py: Python<'_>) {
        py.detach(|| self.pool.trim())
    }

    #[getter]
    fn shared(&self) -> bool {
        self.pool.is_shared()
    }

    /// Whether buffers are page-locked (False without CUDA, whatever was asked).
    #[getter]
    fn pinned(&self) -> bool {
        self.pool.is_pinned()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.pool.stats();
        let dict = PyDict::new(py);
        dict.set_item("allocated_bytes", stats.allocated_bytes)?;
        dict.set_item("free_bytes", stats.free_bytes)?;
        dict.set_item("buffers_in_use", stats.buffers_in_use)?;
        dict.set_item("allocations", stats.allocations)?;
        dict.set_item("reuses", stats.reuses)?;
        Ok(dict)
    }
}

/// One pool buffer, exposed through the buffer protocol so `torch.frombuffer` can wrap it without
/// a copy. Tensors made from it keep it alive; when the last goes, the memory returns to the pool.
#[pyclass(name = "HostBuffer", module = "stager._native", frozen, weakref)]
pub(crate) struct PyHostBuffer {
    pub(crate) buffer: HostBuffer,
    // Py_buffer points at these for shape and strides; they live as long as the object.
    shape: [ffi::Py_ssize_t; 1],
    strides: [ffi::Py_ssize_t; 1],
}

impl PyHostBuffer {
    fn new(buffer: HostBuffer) -> PyHostBuffer {
        let len = buffer.len() as ffi::Py_ssize_t;
        PyHostBuffer {
            buffer,
            shape: [len],
            strides: [1],
        }
    }
}

#[pymethods]
impl PyHostBuffer {
    #[getter]
    fn nbytes(&self) -> usize {
        self.buffer.len()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.buffer.capacity()
    }

    #[getter]
    fn address(&self) -> usize {
        self.buffer.as_ptr() as usize
    }

    #[getter]
    fn shared_fd(&self) -> Option<i32> {
        self.buffer.shared_fd()
    }

    #[getter]
    fn pinned(&self) -> bool {
        self.buffer.is_pinned()
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill; we hand out our own mapping, which lives at
    /// least as long as `view.obj` (a strong reference to this object).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        let this = slf.get();
        let view = &mut *view;
        view.buf = this.buffer.as_ptr().cast();
        view.len = this.buffer.len() as ffi::Py_ssize_t;
        view.readonly = 0;
        view.itemsize = 1;
        view.format = if flags & ffi::PyBUF_FORMAT != 0 {
            c"B".as_ptr() as *mut _
        } else {
            std::ptr::null_mut()
        };
        view.ndim = 1;
        view.shape = if flags & ffi::PyBUF_ND != 0 {
            this.shape.as_ptr() as *mut _
        } else {
            std::ptr::null_mut()
        };
        view.strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
            this.strides.as_ptr() as *mut _
        } else {
            std::ptr::null_mut()
        };
        view.suboffsets = std::ptr::null_mut();
        view.internal = std::ptr::null_mut();
        view.obj = slf.into_any().into_ptr();
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// The copy engine's worker threads.
#[pyclass(name = "CopyEngine", module = "stager._native", frozen)]
pub(crate) struct PyCopyEngine {
    pub(crate) engine: CopyEngine,
}

#[pymethods]
impl PyCopyEngine {
    /// `niceness` > 0 lowers the workers' scheduling priority (background staging).
    #[new]
    #[pyo3(signature = (num_threads, niceness = 0))]
    fn new(num_threads: usize, niceness: i32) -> PyCopyEngine {
        PyCopyEngine {
            engine: CopyEngine::with_niceness(num_threads, niceness),
        }
    }

    #[getter]
    fn num_threads(&self) -> usize {
        self.engine.num_threads()
    }

    /// Copies every CPU storage of `table` into `target` at its offset. The job keeps the table
    /// (and so the source storages) and the target alive until the copies finish.
    fn submit_table(
        &self,
        py: Python<'_>,
        target: Bound<'_, PyHostBuffer>,
        table: Bound<'_, PyTensorTable>,
    ) -> PyResult<PyCopyJob> {
        let requests = table.get().cpu_requests(target.get())?;
        // SAFETY: destinations are the table's disjoint, aligned ranges inside `target`; sources
        // are the table's storages, which the job keeps alive with the target until the copies
        // finish (PyCopyJob's Drop waits).
        let job = py.detach(|| unsafe { self.engine.submit(requests) });
        Ok(PyCopyJob::new(
            job,
            table.into_any().unbind(),
            target.into_any().unbind(),
        ))
    }

    /// Copies `nbytes[i]` bytes from address `sources[i]` to `target` at `offsets[i]`, for every i.
    ///
    /// `keepalive` must own the memory at every source address (the tensors or storages); the
    /// returned job holds it, and `target`, until every copy has finished.
    fn submit(
        &self,
        py: Python<'_>,
        target: Bound<'_, PyHostBuffer>,
        sources: Vec<usize>,
        offsets: Vec<usize>,
        nbytes: Vec<usize>,
        keepalive: Py<PyAny>,
    ) -> PyResult<PyCopyJob> {
        if sources.len() != offsets.len() || sources.len() != nbytes.len() {
            return Err(invalid(format!(
                "submit needs one offset and one size per source: {} sources, {} offsets, {} sizes",
                sources.len(),
                offsets.len(),
                nbytes.len()
            )));
        }
        let buffer = &target.get().buffer;
        check_disjoint_ranges(&offsets, &nbytes, buffer.len(), "copy")?;
        let base = buffer.as_ptr();
        let requests: Vec<CopyRequest> = (0..sources.len())
            .map(|i| {
                if nbytes[i] > 0 && sources[i] == 0 {
                    return Err(invalid(format!("source {i} has a null address")));
                }
                // SAFETY: check_disjoint_ranges proved offsets[i] + nbytes[i] <= buffer.len().
                let dst = unsafe { base.add(offsets[i]) };
                Ok(CopyRequest::host(sources[i] as *const u8, dst, nbytes[i]))
            })
            .collect::<PyResult<_>>()?;
        // SAFETY: destinations are disjoint ranges inside `target`, which the job keeps alive;
        // sources are owned by `keepalive`, which the job keeps alive until the copies finish
        // (PyCopyJob's Drop waits). Nothing writes the fresh target before the job completes.
        let job = py.detach(|| unsafe { self.engine.submit(requests) });
        Ok(PyCopyJob::new(job, keepalive, target.unbind().into_any()))
    }

    /// A job of `len(nbytes)` requests the engine never copies: request i completes when
    /// `CopyJob.mark_complete(i)` is called, e.g. once its bytes arrived from the network. Lets
    /// the durable writer write each storage of a replica as soon as it is received.
    fn deferred(&self, nbytes: Vec<usize>) -> PyCopyJob {
        let requests = nbytes.into_iter().map(CopyRequest::deferred).collect();
        // SAFETY: deferred requests carry no pointers; the engine copies nothing for them.
        let job = unsafe { self.engine.submit(requests) };
        PyCopyJob {
            job,
            keepalive: Mutex::new(None),
        }
    }
}

/// Proves every `[offset, offset + len)` lies inside `capacity` and no two overlap; `what` names
/// the copies in the error ("copy", "device copy").
pub(crate) fn check_disjoint_ranges(
    offsets: &[usize],
    nbytes: &[usize],
    capacity: usize,
    what: &str,
) -> PyResult<()> {
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(offsets.len());
    for (i, (&offset, &len)) in offsets.iter().zip(nbytes).enumerate() {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= capacity)
            .ok_or_else(|| {
                invalid(format!(
                    "{what} {i} ({len} bytes at offset {offset}) does not fit the {capacity}-byte buffer"
                ))
            })?;
        if len > 0 {
            ranges.push((offset, end));
        }
    }
    ranges.sort_unstable();
    if let Some(pair) = ranges.windows(2).find(|pair| pair[0].1 > pair[1].0) {
        return Err(invalid(format!(
            "{what} ranges overlap in the target buffer: [{}, {}) and [{}, {})",
            pair[0].0, pair[0].1, pair[1].0, pair[1].1
        )));
    }
    Ok(())
}

/// A running copy job; waits release the GIL.
#[pyclass(name = "CopyJob", module = "stager._native", frozen)]
pub(crate) struct PyCopyJob {
    pub(crate) job: CopyJob,
    // Released once the copies are known to be finished; a Mutex so waits can take `&self`
    // and run from several threads at once.
    keepalive: Mutex<Option<(Py<PyAny>, Py<PyAny>)>>,
}

impl PyCopyJob {
    /// A job that keeps `sources` and `target` alive until its copies finish.
    pub(crate) fn new(job: CopyJob, sources: Py<PyAny>, target: Py<PyAny>) -> PyCopyJob {
        PyCopyJob {
            job,
            keepalive: Mutex::new(Some((sources, target))),
        }
    }
}

#[pymethods]
impl PyCopyJob {
    /// Waits for every copy; with a timeout (seconds) returns whether they finished.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> bool {
        let job = &self.job;
        let finished = py.detach(|| match timeout {
            None => {
                job.wait();
                true
            }
            Some(seconds) => job.wait_timeout(Duration::from_secs_f64(seconds.max(0.0))),
        });
        if finished {
            let released = self
                .keepalive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(released); // decref'd here, with the GIL held
        }
        finished
    }

    fn done(&self) -> bool {
        self.job.is_done()
    }

    fn __len__(&self) -> usize {
        self.job.len()
    }

    /// Completes request `index` of a job made by `CopyEngine.deferred` (its bytes are in place).
    fn mark_complete(&self, index: usize) -> PyResult<()> {
        if index >= self.job.len() {
            return Err(invalid(format!(
                "request {index} is out of range: the job has {} requests",
                self.job.len()
            )));
        }
        if !self.job.is_request_done(index) {
            self.job.mark_complete(index);
        }
        Ok(())
    }

    /// The index of the next copy to finish, in completion order; None when all were taken
    /// (or on timeout).
    #[pyo3(signature = (timeout = None))]
    fn next_completed(&self, py: Python<'_>, timeout: Option<f64>) -> Option<usize> {
        let job = &self.job;
        py.detach(|| job.next_completed(timeout.map(|s| Duration::from_secs_f64(s.max(0.0)))))
    }
}

impl Drop for PyCopyJob {
    fn drop(&mut self) {
        // Sources and target must outlive the copies: never release them mid-copy.
        let holding = self.keepalive.get_mut().map_or(true, |k| k.is_some());
        if holding {
            self.job.wait();
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHostPool>()?;
    m.add_class::<PyHostBuffer>()?;
    m.add_class::<PyCopyEngine>()?;
    m.add_class::<PyCopyJob>()?;
    Ok(())
}
