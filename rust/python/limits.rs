//! `copy_limit_seconds`: the machine-limit measurements `stager bench` compares against (`limits.rs`).

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::limits::{copy_limit, copy_limit_from, Target};

use super::{invalid, usize_arg};

/// Seconds of each of `samples` parallel copies of `nbytes` bytes with `threads` threads into
/// `target` memory: "touched" (already faulted in), "private" (fresh anonymous mapping) or
/// "shared" (fresh memfd mapping). Copies from `source` (any contiguous buffer of `nbytes` bytes,
/// e.g. a numpy array; the caller must not write it meanwhile) when given, else from a touched
/// buffer of its own. Runs without the GIL.
#[pyfunction]
#[pyo3(signature = (nbytes, threads, target, samples = None, source = None))]
fn copy_limit_seconds(
    py: Python<'_>,
    nbytes: Bound<'_, PyAny>,
    threads: Bound<'_, PyAny>,
    target: &str,
    samples: Option<Bound<'_, PyAny>>,
    source: Option<PyBuffer<u8>>,
) -> PyResult<Vec<f64>> {
    let nbytes = usize_arg(&nbytes, "nbytes", 0, isize::MAX as usize)?;
    let threads = usize_arg(&threads, "threads", 1, crate::copy_engine::MAX_THREADS)?;
    let samples = match samples {
        Some(samples) => usize_arg(&samples, "samples", 1, 1_000_000)?,
        None => 1,
    };
    let target = Target::parse(target).ok_or_else(|| {
        invalid(format!(
            "unknown copy-limit target {target:?}; use \"touched\", \"private\" or \"shared\""
        ))
    })?;
    let Some(source) = source else {
        return Ok(py.detach(|| copy_limit(nbytes, threads, target, samples))?);
    };
    if !source.is_c_contiguous() || source.len_bytes() < nbytes {
        return Err(invalid(format!(
            "copy-limit source must be a contiguous buffer of at least {nbytes} bytes, got {} bytes",
            source.len_bytes()
        )));
    }
    let address = source.buf_ptr() as usize;
    Ok(py.detach(|| {
        // SAFETY: `source` (alive until this function returns) exposes at least `nbytes`
        // contiguous readable bytes at `address`; the caller promises not to write them meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, nbytes) };
        copy_limit_from(bytes, threads, target, samples)
    })?)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(copy_limit_seconds, m)?)?;
    Ok(())
}
