//! The engine's `cuda` part as Python functions and objects: detection, the pool's pinner,
//! device-to-host copies.
//!
//! Without CUDA, `cuda_available()` is False, `pinner()` gives no pinner (a pinned pool is an
//! ordinary one) and `DeviceCopier()` raises `StagerError`; nothing panics.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::cuda::{self, CudaPinner, DeviceCopier, DeviceCopy, StreamMark};
use crate::pool::MemoryPinner;

use super::buffer::PyHostBuffer;
use super::copy::PyCompletion;
use super::usize_arg;

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

/// `(request, device, source_address, target_offset, nbytes)` of one device copy, as Python passes it.
type DeviceCopyArgs<'py> = (
    Bound<'py, PyAny>,
    i32,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);

/// Device-to-host copies on streams the engine owns (see `cuda.rs`).
#[pyclass(name = "DeviceCopier", module = "stager._native", frozen)]
struct PyDeviceCopier {
    copier: DeviceCopier,
}

#[pymethods]
impl PyDeviceCopier {
    #[new]
    #[pyo3(signature = (streams_per_device = None))]
    fn new(streams_per_device: Option<Bound<'_, PyAny>>) -> PyResult<PyDeviceCopier> {
        let streams = match streams_per_device {
            Some(streams) => usize_arg(
                &streams,
                "streams_per_device",
                1,
                cuda::MAX_STREAMS_PER_DEVICE,
            )?,
            None => cuda::DEFAULT_STREAMS_PER_DEVICE,
        };
        Ok(PyDeviceCopier {
            copier: DeviceCopier::new(streams)?,
        })
    }

    /// Records the current point of raw stream `stream` (`torch.cuda.current_stream(d).cuda_stream`)
    /// on `device`; copies submitted with the mark run after it.
    fn mark(&self, device: i32, stream: usize) -> PyResult<PyStreamMark> {
        Ok(PyStreamMark {
            mark: self.copier.mark(device, stream)?,
        })
    }

    /// Copies `(request, device, source_address, target_offset, nbytes)` for each entry of
    /// `copies` from device memory into `target`, after the marks (one per device the copies read
    /// from); returns at once. Request `request` of `completion` completes when that copy has
    /// landed; a driver error fails the completion. `owner` must own the device memory (the
    /// storages, or the table holding them); the copies keep it and `target` alive until they
    /// have landed. A stage passes `TensorTable.cuda_copies`.
    fn submit(
        &self,
        py: Python<'_>,
        target: Bound<'_, PyHostBuffer>,
        completion: Bound<'_, PyCompletion>,
        copies: Vec<DeviceCopyArgs<'_>>,
        marks: Vec<Bound<'_, PyStreamMark>>,
        owner: Py<PyAny>,
    ) -> PyResult<()> {
        let completion = &completion.get().completion;
        let buffer = &target.get().buffer;
        let base = buffer.as_ptr();
        let mut ranges = Vec::with_capacity(copies.len());
        let mut device_copies = Vec::with_capacity(copies.len());
        for (request, device, source, offset, nbytes) in &copies {
            let offset = usize_arg(offset, "target offset", 0, usize::MAX)?;
            let len = usize_arg(nbytes, "nbytes", 0, isize::MAX as usize)?;
            ranges.push((offset, len));
            device_copies.push(DeviceCopy {
                request: usize_arg(request, "request", 0, usize::MAX)?,
                device: *device,
                src: usize_arg(source, "source address", 0, usize::MAX)? as u64,
                dst: base.wrapping_add(offset),
                len,
            });
        }
        crate::layout::check_disjoint_ranges(ranges, buffer.len(), "device copy")?;
        let marks: Vec<&StreamMark> = marks.iter().map(|m| &m.get().mark).collect();
        let owner: crate::copy_engine::MemoryOwner = Box::new((owner, target.clone().unbind()));
        // SAFETY: every destination lies inside `target` and none overlap (checked just above);
        // the sources are device memory owned by `owner`. The copier keeps the owner and the
        // target alive until every copy has landed, and nothing reads the fresh target before
        // its requests complete.
        py.detach(|| unsafe {
            self.copier
                .submit(completion, &device_copies, &marks, Some(owner))
        })?;
        Ok(())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_active_devices, m)?)?;
    m.add_class::<PyStreamMark>()?;
    m.add_class::<PyDeviceCopier>()?;
    Ok(())
}
