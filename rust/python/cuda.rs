//! Bindings for the engine's `cuda` part: detection, the pool's pinner, device-to-host copies.
//!
//! Without CUDA, `cuda_available()` is False, `pinner()` gives no pinner (a pinned pool is an
//! ordinary one) and `DeviceCopier()` raises `StagerError`; nothing panics.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::copy_engine::{CopyEngine, CopyRequest};
use crate::cuda::{self, CudaPinner, DeviceBatch, DeviceCopier, DeviceCopy, StreamMark};
use crate::pool::MemoryPinner;

use super::invalid;
use super::staging::{check_disjoint_ranges, PyHostBuffer};

/// The pinner a pool with `pinned=True` installs: `None` (pageable memory) without CUDA.
pub(crate) fn pinner() -> Option<Arc<dyn MemoryPinner>> {
    CudaPinner::new()
        .ok()
        .map(|pinner| Arc::new(pinner) as Arc<dyn MemoryPinner>)
}

/// Whether a CUDA driver with at least one device can be used (never raises).
#[pyfunction]
fn cuda_available() -> bool {
    cuda::is_available()
}

/// Number of CUDA devices the driver sees; 0 without CUDA.
#[pyfunction]
fn cuda_device_count() -> usize {
    cuda::device_count()
}

/// Why CUDA can't be used, or None when it can.
#[pyfunction]
fn cuda_unavailable_reason() -> Option<String> {
    cuda::unavailable_reason()
}

/// Devices whose primary context is active (in use by PyTorch); never creates a context.
#[pyfunction]
fn cuda_active_devices() -> Vec<i32> {
    cuda::active_devices()
}

/// "Everything queued so far on a caller's stream", recorded by `DeviceCopier.mark`.
#[pyclass(name = "StreamMark", module = "stager._native", frozen)]
struct PyStreamMark {
    mark: StreamMark,
}

#[pymethods]
impl PyStreamMark {
    #[getter]
    fn device(&self) -> i32 {
        self.mark.device()
    }

    /// Whether the GPU has passed the marked point.
    fn reached(&self) -> PyResult<bool> {
        Ok(self.mark.is_reached()?)
    }
}

/// Device-to-host copies on streams the engine owns (see `cuda.rs`).
#[pyclass(name = "DeviceCopier", module = "stager._native", frozen)]
struct PyDeviceCopier {
    copier: DeviceCopier,
    /// Makes the jobs whose deferred requests the copies complete; its worker never runs.
    jobs: CopyEngine,
}

#[pymethods]
impl PyDeviceCopier {
    #[new]
    #[pyo3(signature = (streams_per_device = cuda::DEFAULT_STREAMS_PER_DEVICE))]
    fn new(streams_per_device: usize) -> PyResult<PyDeviceCopier> {
        Ok(PyDeviceCopier {
            copier: DeviceCopier::new(streams_per_device)?,
            jobs: CopyEngine::new(1),
        })
    }

    /// Records the current point of raw stream `stream` (`torch.cuda.current_stream(d).cuda_stream`)
    /// on `device`; copies submitted with the mark run after it.
    fn mark(&self, device: i32, stream: usize) -> PyResult<PyStreamMark> {
        Ok(PyStreamMark {
            mark: self.copier.mark(device, stream)?,
        })
    }

    /// Copies `nbytes[i]` bytes from device address `sources[i]` on `devices[i]` into `target` at
    /// `offsets[i]`, after the marks; returns at once with a job completed per copy.
    ///
    /// `keepalive` must own the device memory (the storages); the job holds it and `target`
    /// until every copy has landed.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        target: Bound<'_, PyHostBuffer>,
        devices: Vec<i32>,
        sources: Vec<u64>,
        offsets: Vec<usize>,
        nbytes: Vec<usize>,
        marks: Vec<Bound<'_, PyStreamMark>>,
        keepalive: Py<PyAny>,
    ) -> PyResult<PyDeviceJob> {
        let n = sources.len();
        if devices.len() != n || offsets.len() != n || nbytes.len() != n {
            return Err(invalid(format!(
                "submit needs one device, offset and size per source: {n} sources, {} devices, {} offsets, {} sizes",
                devices.len(),
                offsets.len(),
                nbytes.len()
            )));
        }
        let buffer = &target.get().buffer;
        check_disjoint_ranges(&offsets, &nbytes, buffer.len(), "device copy")?;
        let base = buffer.as_ptr();
        let copies: Vec<DeviceCopy> = (0..n)
            .map(|i| DeviceCopy {
                request: i,
                device: devices[i],
                src: sources[i],
                // SAFETY: check_disjoint_ranges proved offsets[i] + nbytes[i] <= buffer.len().
                dst: unsafe { base.add(offsets[i]) },
                len: nbytes[i],
            })
            .collect();
        let requests = nbytes
            .iter()
            .map(|&len| CopyRequest::deferred(len))
            .collect();
        // SAFETY: deferred requests carry no pointers; the engine copies nothing for them.
        let job = unsafe { self.jobs.submit(requests) };
        let marks: Vec<&StreamMark> = marks.iter().map(|m| &m.get().mark).collect();
        // SAFETY: destinations are disjoint ranges of `target`, which the returned job keeps
        // alive; sources are device storages owned by `keepalive`, also kept until every copy
        // has landed (PyDeviceJob's Drop waits). Nothing reads the fresh target before then.
        let batch = py.detach(|| unsafe { self.copier.submit(&job, &copies, &marks) })?;
        Ok(PyDeviceJob {
            batch,
            keepalive: Some((keepalive, target.unbind().into_any())),
        })
    }
}

/// Device copies in flight; completion per copy, waits release the GIL, errors raise StagerError.
#[pyclass(name = "DeviceJob", module = "stager._native")]
struct PyDeviceJob {
    batch: DeviceBatch,
    keepalive: Option<(Py<PyAny>, Py<PyAny>)>,
}

#[pymethods]
impl PyDeviceJob {
    /// Waits for every copy; with a timeout (seconds) returns whether they finished. Raises
    /// StagerError if a copy failed.
    #[pyo3(signature = (timeout = None))]
    fn wait(&mut self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let batch = &self.batch;
        let finished = py.detach(|| match timeout {
            None => batch.wait().map(|_| true),
            Some(seconds) => batch.wait_timeout(Duration::from_secs_f64(seconds.max(0.0))),
        });
        if !matches!(finished, Ok(false)) {
            // Done (or failed: a failed batch has synchronized its streams): release the memory.
            self.keepalive = None;
        }
        Ok(finished?)
    }

    /// `wait()` under the name torch events and streams use.
    fn synchronize(&mut self, py: Python<'_>) -> PyResult<()> {
        self.wait(py, None).map(|_| ())
    }

    fn done(&self) -> bool {
        self.batch.job().is_done()
    }

    fn __len__(&self) -> usize {
        self.batch.job().len()
    }

    /// The index of the next copy to land, in completion order; None when all were taken (or on
    /// timeout).
    #[pyo3(signature = (timeout = None))]
    fn next_completed(&self, py: Python<'_>, timeout: Option<f64>) -> Option<usize> {
        let job = self.batch.job();
        py.detach(|| job.next_completed(timeout.map(|s| Duration::from_secs_f64(s.max(0.0)))))
    }
}

impl Drop for PyDeviceJob {
    fn drop(&mut self) {
        // The device memory and the target must outlive the copies: never release them mid-copy.
        if self.keepalive.is_some() {
            let _ = self.batch.wait();
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_active_devices, m)?)?;
    m.add_class::<PyStreamMark>()?;
    m.add_class::<PyDeviceCopier>()?;
    m.add_class::<PyDeviceJob>()?;
    Ok(())
}
