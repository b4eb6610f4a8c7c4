//! The `stager._native` extension module: conversions between Python and the engine, nothing more.
//!
//! One file per engine part: [`buffer`] and [`pool`] (host memory), [`table`] (tensors to the
//! engine's table and staged tensors back), [`copy`] (completion and the copy engine), [`cuda`],
//! [`files`] (writer and reader), [`limits`]. The rules of this layer, tested at the boundary:
//!
//! - every engine error becomes `stager.StagerError` (a `RuntimeError`) here, in one place, with
//!   `.kind`, `.errno` and `.cuda_code` attributes, so callers never parse messages; its class is
//!   the kind's subclass from `stager.errors` (a missing file is also a `FileNotFoundError`);
//! - every integer that comes from Python is range-checked into a StagerError ([`usize_arg`]):
//!   no input may raise `OverflowError`, abort the process or panic;
//! - every call that moves bytes or waits releases the GIL, and every wait wakes up at least every
//!   [`SIGNAL_CHECK`] to let `KeyboardInterrupt` through ([`wait_interruptibly`]).

use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

mod buffer;
mod copy;
mod cuda;
mod files;
mod limits;
mod pool;
mod shm;
mod table;
mod unchanged;

create_exception!(
    stager,
    StagerError,
    PyRuntimeError,
    "Base of every error stager raises. `kind` names the failure (\"invalid_argument\", \"io\", \
     \"invalid_file\", \"budget\", \"cuda\", \"timeout\", \"forked\", \"failed\", ...), `errno` is \
     the operating system's error number where there is one, `cuda_code` CUDA's CUresult."
);

/// How often a blocking wait wakes up to check for signals (Ctrl-C).
pub(crate) const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn kind_of(err: &crate::StagerError) -> &'static str {
    use crate::StagerError as E;
    match err {
        E::BudgetExceeded { .. } => "budget",
        E::Allocation { .. } => "allocation",
        E::InvalidArgument(_) => "invalid_argument",
        E::Io { .. } => "io",
        E::InvalidFile { .. } | E::InvalidData { .. } => "invalid_file",
        E::Cuda { .. } => "cuda",
        E::Timeout { .. } => "timeout",
        E::Forked { .. } => "forked",
        E::Failed(_) => "failed",
    }
}

/// The `StagerError` subclass of `kind` (and `errno`) from `stager.errors.error_class`, where the
/// Python package defines one class per kind (some also `FileNotFoundError`/`PermissionError`,
/// which a class made here could not be). None before that module is importable: the base class.
fn error_class<'py>(py: Python<'py>, kind: &str, errno: Option<i32>) -> Option<Bound<'py, PyType>> {
    let class = py
        .import("stager.errors")
        .ok()?
        .getattr("error_class")
        .ok()?
        .call1((kind, errno))
        .ok()?;
    class.cast_into::<PyType>().ok()
}

impl From<crate::StagerError> for PyErr {
    fn from(err: crate::StagerError) -> PyErr {
        Python::attach(|py| {
            let py_err = match error_class(py, kind_of(&err), err.errno()) {
                Some(class) => PyErr::from_type(class, err.to_string()),
                None => StagerError::new_err(err.to_string()),
            };
            let value = py_err.value(py);
            // Attributes on an exception instance cannot fail short of memory exhaustion; a
            // failure would only lose the attribute, never the error itself.
            let _ = value.setattr("kind", kind_of(&err));
            let _ = value.setattr("errno", err.errno());
            let _ = value.setattr("cuda_code", err.cuda_code());
            py_err
        })
    }
}

/// A `StagerError` of kind "invalid_argument" with `message`.
pub(crate) fn invalid(message: impl Into<String>) -> PyErr {
    crate::StagerError::invalid(message).into()
}

/// `value` as a `usize` in `min..=max`, or a StagerError naming `what` (never `OverflowError` or
/// `TypeError`: Python ints of any size, bools and non-ints are all answered with a StagerError).
pub(crate) fn usize_arg(
    value: &Bound<'_, PyAny>,
    what: &str,
    min: usize,
    max: usize,
) -> PyResult<usize> {
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(format!(
            "{what} must be an integer, got a bool ({value})"
        )));
    }
    let parsed = match value.extract::<i128>() {
        Ok(number) => number,
        Err(_) if value.is_instance_of::<pyo3::types::PyInt>() => {
            return Err(invalid(format!(
                "{what} must be {min} to {max}, got {value}"
            )));
        }
        Err(_) => {
            let type_name = value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(invalid(format!(
                "{what} must be an integer, got {type_name}"
            )));
        }
    };
    if parsed < min as i128 || parsed > max as i128 {
        return Err(invalid(format!(
            "{what} must be {min} to {max}, got {parsed}"
        )));
    }
    Ok(parsed as usize)
}

/// An optional timeout in seconds as a deadline; a StagerError for a negative or non-finite one.
pub(crate) fn deadline_of(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(seconds) if seconds == f64::INFINITY => Ok(None),
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            // Durations past what `Instant` can hold mean "no deadline".
            Ok(Duration::try_from_secs_f64(seconds)
                .ok()
                .and_then(|d| Instant::now().checked_add(d)))
        }
        Some(seconds) => Err(invalid(format!(
            "timeout must be a non-negative number of seconds or None, got {seconds}"
        ))),
    }
}

/// Runs `step(slice_deadline)` without the GIL until it returns `Some`, or until `deadline`
/// passes (`None`). Between steps (at most [`SIGNAL_CHECK`] apart) it takes the GIL and checks for
/// signals, so Ctrl-C interrupts any wait with `KeyboardInterrupt` within a fraction of a second.
pub(crate) fn wait_interruptibly<T: Send>(
    py: Python<'_>,
    deadline: Option<Instant>,
    mut step: impl FnMut(Instant) -> crate::Result<Option<T>> + Send,
) -> PyResult<Option<T>> {
    loop {
        let slice = Instant::now() + SIGNAL_CHECK;
        let slice = deadline.map_or(slice, |d| d.min(slice));
        if let Some(value) = py.detach(|| step(slice))? {
            return Ok(Some(value));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        py.check_signals()?;
    }
}

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use crate::layout;
    let error_type = m.py().get_type::<StagerError>();
    // Defaults for errors raised from Python code (the engine's set their own on the instance).
    error_type.setattr("kind", "error")?;
    error_type.setattr("errno", m.py().None())?;
    error_type.setattr("cuda_code", m.py().None())?;
    m.add("StagerError", error_type)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("STORAGE_ALIGNMENT", layout::STORAGE_ALIGNMENT)?;
    m.add("DATA_ALIGNMENT", layout::DATA_ALIGNMENT)?;
    m.add("VIEW_WHOLE_STORAGE", layout::VIEW_WHOLE_STORAGE)?;
    m.add("VIEW_CONJ", layout::VIEW_CONJ)?;
    m.add("VIEW_NEG", layout::VIEW_NEG)?;
    m.add("VIEW_OPAQUE", layout::VIEW_OPAQUE)?;
    m.add("KEY_FORMAT", layout::KEY_FORMAT)?;
    m.add("KEY_VERSION", layout::KEY_VERSION)?;
    m.add("KEY_TREE", layout::KEY_TREE)?;
    m.add("KEY_STORAGES", layout::KEY_STORAGES)?;
    m.add("KEY_CRC", layout::KEY_CRC)?;
    m.add("FORMAT_NAME", layout::FORMAT_NAME)?;
    m.add("FORMAT_VERSION", layout::FORMAT_VERSION)?;
    m.add("RESERVED_PREFIX", layout::RESERVED_PREFIX)?;
    buffer::register(m)?;
    pool::register(m)?;
    table::register(m)?;
    unchanged::register(m)?;
    copy::register(m)?;
    files::register(m)?;
    cuda::register(m)?;
    limits::register(m)?;
    shm::register(m)?;
    Ok(())
}
