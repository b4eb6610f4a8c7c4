//! `HostPool`: the engine's host pool (`pool.rs`) as a Python object.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::pool::{HostPool, PoolOptions, MAX_PREFAULT_THREADS};

use super::buffer::PyHostBuffer;
use super::{usize_arg, wait_interruptibly};

/// A pool of reusable host buffers (see `pool.rs`).
#[pyclass(name = "HostPool", module = "stager._native", frozen)]
pub(crate) struct PyHostPool {
    pool: HostPool,
}

impl PyHostPool {
    /// Waits (interruptibly) for reservations still mapping memory in the background.
    fn wait_reservations(&self, py: Python<'_>) -> PyResult<()> {
        let pool = &self.pool;
        wait_interruptibly(py, None, |slice| {
            Ok(pool.wait_reservations(Some(slice))?.then_some(()))
        })?;
        Ok(())
    }
}

#[pymethods]
impl PyHostPool {
    /// `shared`: memfd-backed buffers; `budget_bytes`: bound on the bytes held (None: unbounded);
    /// `pinned`: page-lock each buffer once for device copies (no-op without CUDA).
    #[new]
    #[pyo3(signature = (*, shared = false, budget_bytes = None, pinned = false))]
    fn new(
        shared: bool,
        budget_bytes: Option<Bound<'_, PyAny>>,
        pinned: bool,
    ) -> PyResult<PyHostPool> {
        let budget_bytes = budget_bytes
            .map(|b| usize_arg(&b, "memory_budget_bytes", 0, isize::MAX as usize))
            .transpose()?;
        Ok(PyHostPool {
            pool: HostPool::new(PoolOptions {
                shared,
                budget_bytes,
                pinner: if pinned { super::cuda::pinner() } else { None },
            }),
        })
    }

    /// A buffer of at least `nbytes`; raises StagerError when the budget can't hold it.
    fn acquire(&self, py: Python<'_>, nbytes: Bound<'_, PyAny>) -> PyResult<PyHostBuffer> {
        let nbytes = usize_arg(&nbytes, "nbytes", 0, isize::MAX as usize)?;
        self.wait_reservations(py)?;
        let buffer = py.detach(|| self.pool.acquire(nbytes))?;
        Ok(PyHostBuffer::new(buffer))
    }

    /// Maps and pre-faults `nbytes` in the background with `threads` threads; the next acquire
    /// waits for it.
    fn reserve(&self, nbytes: Bound<'_, PyAny>, threads: Bound<'_, PyAny>) -> PyResult<()> {
        let nbytes = usize_arg(&nbytes, "nbytes", 0, isize::MAX as usize)?;
        let threads = usize_arg(&threads, "threads", 1, usize::MAX)?.min(MAX_PREFAULT_THREADS);
        Ok(self.pool.reserve(nbytes, threads)?)
    }

    /// Waits for reservations still running (Ctrl-C interrupts the wait, not the reservation).
    fn finish_reservations(&self, py: Python<'_>) -> PyResult<()> {
        self.wait_reservations(py)
    }

    /// Returns free buffers to the operating system.
    fn trim(&self, py: Python<'_>) -> PyResult<()> {
        self.wait_reservations(py)?;
        py.detach(|| self.pool.trim());
        Ok(())
    }

    /// Whether buffers are backed by shared memory.
    #[getter]
    fn shared(&self) -> bool {
        self.pool.is_shared()
    }

    /// Whether buffers are page-locked (False without CUDA, whatever was asked).
    #[getter]
    fn pinned(&self) -> bool {
        self.pool.is_pinned()
    }

    /// The pool's counters: allocated_bytes, free_bytes, buffers_in_use, allocations, reuses,
    /// peak_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.pool.stats();
        let dict = PyDict::new(py);
        dict.set_item("allocated_bytes", stats.allocated_bytes)?;
        dict.set_item("free_bytes", stats.free_bytes)?;
        dict.set_item("buffers_in_use", stats.buffers_in_use)?;
        dict.set_item("allocations", stats.allocations)?;
        dict.set_item("reuses", stats.reuses)?;
        dict.set_item("peak_bytes", stats.peak_bytes)?;
        Ok(dict)
    }

    /// Starts a new high-water mark (`stats()["peak_bytes"]`) at what the pool holds now.
    fn reset_peak(&self) {
        self.pool.reset_peak();
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHostPool>()
}
