//! `Completion` and `CopyEngine`: per-request completion (`completion.rs`) and the host copy
//! engine (`copy_engine.rs`) as Python objects.
//!
//! A stage makes one `Completion(len(storages))`; `CopyEngine.submit_table` completes the host
//! storages, `DeviceCopier.submit_table` the CUDA ones, and anything else (a fallback torch copy, a
//! network receive) calls `mark_complete(i)`. Writers and senders wait on the same object. The
//! memory a batch reads and writes is kept alive by the batch itself until its last copy is done,
//! so dropping a `Completion` (or the staged result) mid-copy is safe.

use pyo3::intern;
use pyo3::prelude::*;

use crate::completion::{Completion, Next};
use crate::copy_engine::{CopyEngine, HostCopy, MAX_THREADS};

use super::buffer::PyHostBuffer;
use super::table::PyTensorTable;
use super::{deadline_of, invalid, usize_arg, wait_interruptibly};

/// Completion of a batch of requests; every wait releases the GIL and lets Ctrl-C through.
#[pyclass(name = "Completion", module = "stager._native", frozen)]
pub(crate) struct PyCompletion {
    pub(crate) completion: Completion,
}

impl PyCompletion {
    fn index(&self, index: &Bound<'_, PyAny>) -> PyResult<usize> {
        if self.completion.is_empty() {
            return Err(invalid(
                "request index out of range: the batch has no requests",
            ));
        }
        usize_arg(index, "request index", 0, self.completion.len() - 1)
    }
}

#[pymethods]
impl PyCompletion {
    /// A batch of `len` requests, none complete.
    #[new]
    fn new(len: Bound<'_, PyAny>) -> PyResult<PyCompletion> {
        let len = usize_arg(&len, "len", 0, isize::MAX as usize)?;
        Ok(PyCompletion {
            completion: Completion::new(len),
        })
    }

    fn __len__(&self) -> usize {
        self.completion.len()
    }

    /// Marks request `index` complete (its bytes are in place); returns whether this call did.
    fn mark_complete(&self, index: Bound<'_, PyAny>) -> PyResult<bool> {
        let index = self.index(&index)?;
        Ok(self.completion.mark_complete(index))
    }

    /// Ends the batch with a StagerError saying `message`; every waiter raises it.
    fn fail(&self, message: String) {
        self.completion.fail(crate::StagerError::Failed(message));
    }

    /// Whether request `index` (or, without one, every request) has completed.
    #[pyo3(signature = (index = None))]
    fn done(&self, index: Option<Bound<'_, PyAny>>) -> PyResult<bool> {
        match index {
            None => Ok(self.completion.all_done()),
            Some(index) => Ok(self.completion.is_done(self.index(&index)?)),
        }
    }

    /// Requests not complete yet.
    #[getter]
    fn outstanding(&self) -> usize {
        self.completion.outstanding()
    }

    /// The failure that ended the batch, or None.
    #[getter]
    fn failure(&self) -> Option<String> {
        self.completion.failure().map(|err| err.to_string())
    }

    /// Waits for request `index` (or, without one, for all) until `timeout` seconds pass;
    /// returns whether it completed. Raises the batch's StagerError if it failed.
    #[pyo3(signature = (index = None, timeout = None))]
    fn wait(
        &self,
        py: Python<'_>,
        index: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let index = index.map(|i| self.index(&i)).transpose()?;
        let deadline = deadline_of(timeout)?;
        let completion = &self.completion;
        let reached = wait_interruptibly(py, deadline, |slice| {
            let reached = match index {
                Some(index) => completion.wait(index, Some(slice))?,
                None => completion.wait_all(Some(slice))?,
            };
            Ok(reached.then_some(()))
        })?;
        Ok(reached.is_some())
    }

    /// The index of the next request to complete that no caller has taken yet; None once all were
    /// taken, or when `timeout` seconds pass first.
    #[pyo3(signature = (timeout = None))]
    fn next_completed(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<usize>> {
        let deadline = deadline_of(timeout)?;
        let completion = &self.completion;
        let next = wait_interruptibly(py, deadline, |slice| {
            Ok(match completion.next_completed(Some(slice))? {
                Next::TimedOut => None,
                found => Some(found),
            })
        })?;
        Ok(match next {
            Some(Next::Ready(index)) => Some(index),
            _ => None,
        })
    }
}

/// `(request, source storage, source_offset, target_offset, nbytes)` of one host copy, as Python
/// passes it.
type HostCopyArgs<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);

/// The copy engine's worker threads.
#[pyclass(name = "CopyEngine", module = "stager._native", frozen)]
pub(crate) struct PyCopyEngine {
    engine: CopyEngine,
}

#[pymethods]
impl PyCopyEngine {
    /// `num_threads` workers; `niceness` > 0 lowers their priority (background staging).
    #[new]
    #[pyo3(signature = (num_threads, niceness = None))]
    fn new(
        num_threads: Bound<'_, PyAny>,
        niceness: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyCopyEngine> {
        let threads = usize_arg(&num_threads, "num_threads", 1, MAX_THREADS)?;
        let niceness = match niceness {
            Some(niceness) => usize_arg(&niceness, "niceness", 0, 19)? as i32,
            None => 0,
        };
        Ok(PyCopyEngine {
            engine: CopyEngine::with_niceness(threads, niceness)?,
        })
    }

    /// Number of worker threads.
    #[getter]
    fn num_threads(&self) -> usize {
        self.engine.num_threads()
    }

    /// Raises StagerError in a process forked after this engine was made (its threads are gone).
    fn check_process(&self) -> PyResult<()> {
        Ok(self.engine.check_process()?)
    }

    /// Copies every CPU storage of `table` into `target` at its offset, completing request i of
    /// `completion` (one request per storage) when storage i has landed; empty storages complete
    /// at once. The other storages' requests are left to their producers. The batch keeps the
    /// table (and so the source storages) and the target alive until its copies finish.
    fn submit_table(
        &self,
        py: Python<'_>,
        target: Bound<'_, PyHostBuffer>,
        table: Bound<'_, PyTensorTable>,
        completion: Bound<'_, PyCompletion>,
    ) -> PyResult<()> {
        let completion = &completion.get().completion;
        let described = &table.get().table;
        if completion.len() != described.storages().len() {
            return Err(invalid(format!(
                "the completion has {} requests for a table of {} storages",
                completion.len(),
                described.storages().len()
            )));
        }
        let buffer = &target.get().buffer;
        let copies = described.host_copies(buffer.as_ptr(), buffer.len())?;
        completion.mark_all(described.empty_storages());
        let owner: crate::copy_engine::MemoryOwner = Box::new((table.unbind(), target.unbind()));
        // SAFETY: destinations are the table's disjoint placed ranges inside `target` (checked
        // by host_copies); sources are the table's storages. The owner keeps both alive until
        // the batch's last copy finishes, and nothing reads the fresh target before its
        // requests complete (the stagers publish results only after waiting).
        py.detach(|| unsafe { self.engine.submit(completion, copies, Some(owner)) })?;
        Ok(())
    }

    /// Copies `(request, source, source_offset, target_offset, nbytes)` for each entry of
    /// `copies` into `target`: `nbytes` bytes of the CPU `torch.UntypedStorage` `source` from
    /// byte `source_offset`, completing `request` of `completion`. Ranges are checked against the
    /// source storage and the target buffer, and the batch keeps the sources and the target alive
    /// until every copy has finished (for the transport's packing of small storages).
    fn submit(
        &self,
        py: Python<'_>,
        target: Bound<'_, PyHostBuffer>,
        completion: Bound<'_, PyCompletion>,
        copies: Vec<HostCopyArgs<'_>>,
    ) -> PyResult<()> {
        let completion = &completion.get().completion;
        let buffer = &target.get().buffer;
        let base = buffer.as_ptr();
        let mut ranges = Vec::with_capacity(copies.len());
        let mut host_copies = Vec::with_capacity(copies.len());
        let mut sources: Vec<Py<PyAny>> = Vec::with_capacity(copies.len());
        for (request, source, source_offset, offset, nbytes) in &copies {
            let request = usize_arg(request, "request", 0, usize::MAX)?;
            let source_offset = usize_arg(source_offset, "source offset", 0, usize::MAX)?;
            let offset = usize_arg(offset, "target offset", 0, usize::MAX)?;
            let nbytes = usize_arg(nbytes, "nbytes", 0, isize::MAX as usize)?;
            let (address, available) = cpu_storage_bytes(source)?;
            if source_offset
                .checked_add(nbytes)
                .map_or(true, |end| end > available)
            {
                return Err(invalid(format!(
                    "copy for request {request}: {nbytes} bytes at offset {source_offset} of a {available}-byte source storage"
                )));
            }
            ranges.push((offset, nbytes));
            host_copies.push(HostCopy {
                request,
                src: (address as *const u8).wrapping_add(source_offset),
                dst: base.wrapping_add(offset),
                len: nbytes,
            });
            sources.push(source.clone().unbind());
        }
        crate::layout::check_disjoint_ranges(ranges, buffer.len(), "copy")?;
        let owner: crate::copy_engine::MemoryOwner = Box::new((sources, target.unbind()));
        // SAFETY: every source range lies inside its live CPU storage and every destination inside
        // `target` with no two overlapping (checked just above); the batch owns the storages and
        // the target until its last copy has finished.
        py.detach(|| unsafe { self.engine.submit(completion, host_copies, Some(owner)) })?;
        Ok(())
    }
    /// Copies every `(source, target)` pair of contiguous CPU tensors of equal byte size, all
    /// pairs at once on the engine's workers (GIL released), and waits for them (Ctrl-C
    /// interrupts the wait; the batch keeps the tensors alive until its copies finish). A pair
    /// whose source and target are the same memory is skipped. Raises StagerError, before
    /// copying anything, when a tensor is not contiguous host memory, sizes differ, two targets
    /// overlap, or a target overlaps a source. For restore(into=...).
    fn copy_tensors(
        &self,
        py: Python<'_>,
        pairs: Vec<(Bound<'_, PyAny>, Bound<'_, PyAny>)>,
    ) -> PyResult<()> {
        let mut copies = Vec::with_capacity(pairs.len());
        let mut sources = Vec::with_capacity(pairs.len());
        let mut owned: Vec<(Py<PyAny>, Py<PyAny>)> = Vec::with_capacity(pairs.len());
        for (index, (source, target)) in pairs.iter().enumerate() {
            let nbytes = tensor_nbytes(source)
                .map_err(|why| invalid(format!("copy {index}: the source is {why}")))?;
            let src = super::table::contiguous_cpu_bytes(source, nbytes)
                .map_err(|why| invalid(format!("copy {index}: the source is {why}")))?;
            let dst = super::table::contiguous_cpu_bytes(target, nbytes)
                .map_err(|why| invalid(format!("copy {index}: the target is {why}")))?;
            if src == dst || nbytes == 0 {
                continue;
            }
            sources.push((src, nbytes));
            copies.push(HostCopy {
                request: copies.len(),
                src: src as *const u8,
                dst: dst as *mut u8,
                len: nbytes,
            });
            owned.push((source.clone().unbind(), target.clone().unbind()));
        }
        check_targets_apart_from_sources(&copies, sources)?;
        let completion = Completion::new(copies.len());
        let owner: crate::copy_engine::MemoryOwner = Box::new(owned);
        // SAFETY: every range lies inside its live contiguous CPU tensor (checked above, exact
        // byte sizes), no target overlaps another (checked by submit) or any source (checked
        // just above), and the batch owns the tensors until its last copy has finished.
        py.detach(|| unsafe { self.engine.submit(&completion, copies, Some(owner)) })?;
        wait_interruptibly(py, None, |slice| {
            Ok(completion.wait_all(Some(slice))?.then_some(()))
        })?;
        Ok(())
    }
}

/// Bytes of a tensor's elements (`numel * element_size`), or what it is instead.
fn tensor_nbytes(tensor: &Bound<'_, PyAny>) -> Result<usize, String> {
    let py = tensor.py();
    let attempt = || -> PyResult<Option<usize>> {
        let numel: usize = tensor.call_method0(intern!(py, "numel"))?.extract()?;
        let itemsize: usize = tensor
            .call_method0(intern!(py, "element_size"))?
            .extract()?;
        Ok(numel.checked_mul(itemsize))
    };
    match attempt() {
        Ok(Some(nbytes)) => Ok(nbytes),
        Ok(None) => Err("too large".into()),
        Err(err) => Err(format!("not a tensor ({err})")),
    }
}

/// StagerError when a copy's target overlaps any copy's source (the copies run concurrently).
fn check_targets_apart_from_sources(
    copies: &[HostCopy],
    mut sources: Vec<(usize, usize)>,
) -> PyResult<()> {
    sources.sort_unstable();
    // Merge into disjoint spans [start, end), sorted: one binary search per target.
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(sources.len());
    for (start, len) in sources {
        let end = start.saturating_add(len);
        match spans.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => spans.push((start, end)),
        }
    }
    for (index, copy) in copies.iter().enumerate() {
        let (start, end) = (
            copy.dst as usize,
            (copy.dst as usize).saturating_add(copy.len),
        );
        let after = spans.partition_point(|span| span.1 <= start);
        if spans.get(after).is_some_and(|span| span.0 < end) {
            return Err(invalid(format!(
                "copy {index}: its target overlaps the source of a copy"
            )));
        }
    }
    Ok(())
}

/// `(address, nbytes)` of a CPU `torch.UntypedStorage`, or a StagerError saying what it is instead.
fn cpu_storage_bytes(storage: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let py = storage.py();
    let device = storage
        .getattr(intern!(py, "device"))
        .and_then(|d| d.getattr(intern!(py, "type")))
        .and_then(|t| t.extract::<String>())
        .map_err(|_| invalid("a copy's source must be a torch.UntypedStorage"))?;
    if device != "cpu" {
        return Err(invalid(format!(
            "a copy's source must be in host memory, not {device}"
        )));
    }
    let address: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
    Ok((address, nbytes))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAX_COPY_THREADS", MAX_THREADS)?;
    m.add("MAX_BYTES", isize::MAX as usize)?;
    m.add_class::<PyCompletion>()?;
    m.add_class::<PyCopyEngine>()?;
    Ok(())
}
