//! The `stager._native` extension module: conversions between Python and the engine, nothing more.
//!
//! One submodule per engine module. Every engine error becomes `stager.StagerError` (a
//! `RuntimeError`) here, in one place; every call that moves bytes or waits releases the GIL.

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod cuda;
mod files;
mod limits;
mod staging;
mod tensors;

create_exception!(
    stager,
    StagerError,
    PyRuntimeError,
    "Base of every error stager raises."
);

impl From<crate::StagerError> for PyErr {
    fn from(err: crate::StagerError) -> PyErr {
        StagerError::new_err(err.to_string())
    }
}

pub(crate) fn invalid(message: String) -> PyErr {
    StagerError::new_err(message)
}

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("StagerError", m.py().get_type::<StagerError>())?;
    staging::register(m)?;
    tensors::register(m)?;
    files::register(m)?;
    cuda::register(m)?;
    limits::register(m)?;
    Ok(())
}
