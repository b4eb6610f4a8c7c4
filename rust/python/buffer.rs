//! `HostBuffer`: one pool buffer as a Python object, for `torch.frombuffer` without a copy.

use std::os::raw::c_int;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::pool::HostBuffer;

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
    pub(crate) fn new(buffer: HostBuffer) -> PyHostBuffer {
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
    /// Bytes asked for.
    #[getter]
    fn nbytes(&self) -> usize {
        self.buffer.len()
    }

    /// Bytes mapped (whole pages).
    #[getter]
    fn capacity(&self) -> usize {
        self.buffer.capacity()
    }

    /// Address of the first byte (page-aligned).
    #[getter]
    fn address(&self) -> usize {
        self.buffer.as_ptr() as usize
    }

    /// The memfd of a shared-memory buffer, else None.
    #[getter]
    fn shared_fd(&self) -> Option<i32> {
        self.buffer.shared_fd()
    }

    /// Whether the buffer is page-locked for device copies.
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
        // SAFETY: CPython passes a valid, exclusively owned Py_buffer to fill (checked non-null).
        let view = unsafe { &mut *view };
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

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHostBuffer>()
}
