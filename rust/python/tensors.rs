//! Conversions between PyTorch tensors and the engine's flat copy lists.
//!
//! A state_dict's tensors cross into Rust once per stage as a list. [`describe_tensors`] reads
//! each one's storage address, size and view (dtype, shape, stride, offset) through the C API and
//! lays the distinct storages out in one host buffer; [`PyTensorTable::materialize`] builds the
//! staged tensors over that buffer, one CPU storage per source storage. Doing these per-tensor
//! calls here rather than in a Python loop is what makes 20,000 tiny tensors cheap: the calls
//! are the same, the interpreter overhead around them is gone.

use std::collections::HashMap;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::invalid;
use super::staging::PyHostBuffer;
use crate::copy_engine::CopyRequest;

/// The view covers its whole storage: contiguous, offset 0, same byte count.
const WHOLE_STORAGE: u8 = 1;
const CONJ: u8 = 2;
const NEG: u8 = 4;
/// Not a plain strided tensor (subclass, sparse, quantized): staged by torch in Python.
const OPAQUE: u8 = 8;

/// torch objects looked up once per process.
struct Torch {
    frombuffer: Py<PyAny>,
    empty: Py<PyAny>,
    uint8: Py<PyAny>,
    tensor_type: Py<PyAny>,
    parameter_type: Py<PyAny>,
    strided: Py<PyAny>,
    quantized_dtypes: Vec<Py<PyAny>>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

fn torch(py: Python<'_>) -> PyResult<&Torch> {
    TORCH.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let quantized_dtypes = ["qint8", "quint8", "qint32", "quint4x2", "quint2x4"]
            .iter()
            .filter_map(|name| torch.getattr(*name).ok().map(Bound::unbind))
            .collect();
        Ok::<_, PyErr>(Torch {
            frombuffer: torch.getattr("frombuffer")?.unbind(),
            empty: torch.getattr("empty")?.unbind(),
            uint8: torch.getattr("uint8")?.unbind(),
            tensor_type: torch.getattr("Tensor")?.unbind(),
            parameter_type: torch.getattr("nn")?.getattr("Parameter")?.unbind(),
            strided: torch.getattr("strided")?.unbind(),
            quantized_dtypes,
        })
    })
}

/// The flat description of a state_dict's tensors and of where their storages go.
///
/// # Thread Safety
/// Immutable after construction (`frozen`); shared freely between threads.
#[pyclass(name = "TensorTable", module = "stager._native", frozen)]
pub(crate) struct PyTensorTable {
    // One entry per distinct tensor.
    tensor_storage: Vec<usize>,
    dtypes: Vec<Py<PyAny>>,
    shapes: Vec<Py<PyAny>>,
    strides: Vec<Py<PyAny>>,
    storage_offsets: Vec<i64>,
    numels: Vec<i64>,
    flags: Vec<u8>,
    // One entry per distinct storage.
    storages: Vec<Option<Py<PyAny>>>,
    devices: Vec<Option<Py<PyAny>>>,
    addresses: Vec<usize>,
    nbytes: Vec<usize>,
    offsets: Vec<usize>,
    users: Vec<u32>,
    total_nbytes: usize,
}

fn align_up(value: usize, alignment: usize) -> usize {
    value.div_ceil(alignment) * alignment
}

#[derive(Clone, Copy)]
struct DtypeInfo {
    itemsize: i64,
    is_complex: bool,
}

/// Reads every tensor of `tensors` once and lays their distinct storages out in one buffer,
/// each at an `alignment`-aligned offset. Raises StagerError for tensors without data (meta).
#[pyfunction]
pub(crate) fn describe_tensors(
    tensors: &Bound<'_, PyList>,
    alignment: usize,
) -> PyResult<PyTensorTable> {
    let py = tensors.py();
    let api = torch(py)?;
    let alignment = alignment.max(1);
    let count = tensors.len();
    let mut table = PyTensorTable {
        tensor_storage: Vec::with_capacity(count),
        dtypes: Vec::with_capacity(count),
        shapes: Vec::with_capacity(count),
        strides: Vec::with_capacity(count),
        storage_offsets: Vec::with_capacity(count),
        numels: Vec::with_capacity(count),
        flags: Vec::with_capacity(count),
        storages: Vec::new(),
        devices: Vec::new(),
        addresses: Vec::new(),
        nbytes: Vec::new(),
        offsets: Vec::new(),
        users: Vec::new(),
        total_nbytes: 0,
    };
    let mut storage_by_impl: HashMap<usize, usize> = HashMap::with_capacity(count);
    let mut dtype_info: HashMap<usize, DtypeInfo> = HashMap::new();
    for tensor in tensors.iter() {
        let dtype = tensor.getattr(intern!(py, "dtype"))?;
        let class = tensor.get_type();
        let plain = class.is(api.tensor_type.bind(py)) || class.is(api.parameter_type.bind(py));
        let opaque = !plain
            || !tensor
                .getattr(intern!(py, "layout"))?
                .is(api.strided.bind(py))
            || api.quantized_dtypes.iter().any(|q| dtype.is(q.bind(py)));
        if opaque {
            table.push_opaque(dtype.unbind(), py);
            continue;
        }
        let is_cpu = tensor.getattr(intern!(py, "is_cpu"))?.is_truthy()?;
        if !is_cpu && tensor.getattr(intern!(py, "is_meta"))?.is_truthy()? {
            return Err(invalid(format!(
                "cannot stage a meta tensor (no data) of shape {}: materialize it before checkpointing",
                tensor.getattr(intern!(py, "shape"))?
            )));
        }
        let storage = tensor.call_method0(intern!(py, "untyped_storage"))?;
        let storage_impl: usize = storage.getattr(intern!(py, "_cdata"))?.extract()?;
        let storage_index = match storage_by_impl.get(&storage_impl) {
            Some(&index) => index,
            None => {
                let index = table.storages.len();
                let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
                table
                    .addresses
                    .push(storage.call_method0(intern!(py, "data_ptr"))?.extract()?);
                table.nbytes.push(nbytes);
                table.offsets.push(table.total_nbytes);
                table.total_nbytes += align_up(nbytes, alignment);
                table.users.push(0);
                table.devices.push(if is_cpu {
                    None
                } else {
                    Some(tensor.getattr(intern!(py, "device"))?.unbind())
                });
                table.storages.push(Some(storage.unbind()));
                storage_by_impl.insert(storage_impl, index);
                index
            }
        };
        table.users[storage_index] += 1;
        let info = match dtype_info.get(&(dtype.as_ptr() as usize)) {
            Some(info) => *info,
            None => {
                let info = DtypeInfo {
                    itemsize: dtype.getattr(intern!(py, "itemsize"))?.extract()?,
                    is_complex: dtype.getattr(intern!(py, "is_complex"))?.is_truthy()?,
                };
                dtype_info.insert(dtype.as_ptr() as usize, info);
                info
            }
        };
        let storage_offset: i64 = tensor
            .call_method0(intern!(py, "storage_offset"))?
            .extract()?;
        let numel: i64 = tensor.call_method0(intern!(py, "numel"))?.extract()?;
        let storage_nbytes = table.nbytes[storage_index] as i64;
        let mut flags = 0;
        if storage_offset == 0
            && storage_nbytes > 0
            && numel * info.itemsize == storage_nbytes
            && tensor
                .call_method0(intern!(py, "is_contiguous"))?
                .is_truthy()?
        {
            flags |= WHOLE_STORAGE;
        }
        if info.is_complex {
            if tensor.call_method0(intern!(py, "is_conj"))?.is_truthy()? {
                flags |= CONJ;
            }
            if tensor.call_method0(intern!(py, "is_neg"))?.is_truthy()? {
                flags |= NEG;
            }
        }
        table.tensor_storage.push(storage_index);
        table.dtypes.push(dtype.unbind());
        table
            .shapes
            .push(tensor.getattr(intern!(py, "shape"))?.unbind());
        table
            .strides
            .push(tensor.call_method0(intern!(py, "stride"))?.unbind());
        table.storage_offsets.push(storage_offset);
        table.numels.push(numel);
        table.flags.push(flags);
    }
    Ok(table)
}

impl PyTensorTable {
    fn push_opaque(&mut self, dtype: Py<PyAny>, py: Python<'_>) {
        self.tensor_storage.push(usize::MAX);
        self.dtypes.push(dtype);
        self.shapes.push(py.None());
        self.strides.push(py.None());
        self.storage_offsets.push(0);
        self.numels.push(0);
        self.flags.push(OPAQUE);
    }

    /// The copy requests for every CPU storage, into `target`.
    pub(crate) fn cpu_requests(&self, target: &PyHostBuffer) -> PyResult<Vec<CopyRequest>> {
        let buffer = &target.buffer;
        if buffer.len() < self.total_nbytes {
            return Err(invalid(format!(
                "host buffer of {} bytes is smaller than the {} bytes the tensors need",
                buffer.len(),
                self.total_nbytes
            )));
        }
        let base = buffer.as_ptr();
        Ok((0..self.storages.len())
            .filter(|&index| self.devices[index].is_none() && self.nbytes[index] > 0)
            .map(|index| {
                // SAFETY: offsets[index] + nbytes[index] <= total_nbytes <= buffer.len(), checked above.
                let dst = unsafe { base.add(self.offsets[index]) };
                CopyRequest::host(self.addresses[index] as *const u8, dst, self.nbytes[index])
            })
            .collect())
    }
}

#[pymethods]
impl PyTensorTable {
    /// A table for tensors described by metadata (a file header, a peer's message) rather than
    /// read from tensors: storages of `storage_nbytes` laid out at `alignment`, tensors viewing
    /// them. The caller validated that every view fits its storage.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn from_layout(
        storage_nbytes: Vec<usize>,
        alignment: usize,
        tensor_storage: Vec<usize>,
        dtypes: Vec<Py<PyAny>>,
        shapes: Vec<Py<PyAny>>,
        strides: Vec<Py<PyAny>>,
        storage_offsets: Vec<i64>,
        numels: Vec<i64>,
        flags: Vec<u8>,
    ) -> PyResult<PyTensorTable> {
        let count = tensor_storage.len();
        if [
            dtypes.len(),
            shapes.len(),
            strides.len(),
            storage_offsets.len(),
            numels.len(),
            flags.len(),
        ]
        .iter()
        .any(|&len| len != count)
        {
            return Err(invalid(
                "from_layout needs one entry per tensor in every list".into(),
            ));
        }
        if let Some(bad) = tensor_storage.iter().find(|&&s| s >= storage_nbytes.len()) {
            return Err(invalid(format!(
                "tensor refers to storage {bad} of {}",
                storage_nbytes.len()
            )));
        }
        let mut offsets = Vec::with_capacity(storage_nbytes.len());
        let mut total = 0usize;
        for &nbytes in &storage_nbytes {
            offsets.push(total);
            total = total
                .checked_add(align_up(nbytes, alignment.max(1)))
                .ok_or_else(|| invalid("storage sizes overflow".into()))?;
        }
        let mut users = vec![0u32; storage_nbytes.len()];
        for &storage in &tensor_storage {
            users[storage] += 1;
        }
        Ok(PyTensorTable {
            tensor_storage,
            dtypes,
            shapes,
            strides,
            storage_offsets,
            numels,
            flags: flags
                .into_iter()
                .map(|f| f & (WHOLE_STORAGE | CONJ | NEG))
                .collect(),
            storages: storage_nbytes.iter().map(|_| None).collect(),
            devices: storage_nbytes.iter().map(|_| None).collect(),
            addresses: vec![0; storage_nbytes.len()],
            nbytes: storage_nbytes,
            offsets,
            users,
            total_nbytes: total,
        })
    }

    #[getter]
    fn total_nbytes(&self) -> usize {
        self.total_nbytes
    }

    /// Indices of tensors that are not plain strided tensors (staged by torch instead).
    #[getter]
    fn opaque(&self) -> Vec<usize> {
        (0..self.flags.len())
            .filter(|&i| self.flags[i] & OPAQUE != 0)
            .collect()
    }

    #[getter]
    fn storage_addresses(&self) -> Vec<usize> {
        self.addresses.clone()
    }

    #[getter]
    fn storage_nbytes(&self) -> Vec<usize> {
        self.nbytes.clone()
    }

    #[getter]
    fn storage_offsets(&self) -> Vec<usize> {
        self.offsets.clone()
    }

    #[getter]
    fn storage_users(&self) -> Vec<u32> {
        self.users.clone()
    }

    /// The source storages (None for tables made from a layout).
    #[getter]
    fn storage_objects(&self, py: Python<'_>) -> Vec<Option<Py<PyAny>>> {
        self.storages
            .iter()
            .map(|s| s.as_ref().map(|s| s.clone_ref(py)))
            .collect()
    }

    /// Each storage's device, None for CPU.
    #[getter]
    fn storage_devices(&self, py: Python<'_>) -> Vec<Option<Py<PyAny>>> {
        self.devices
            .iter()
            .map(|d| d.as_ref().map(|d| d.clone_ref(py)))
            .collect()
    }

    #[getter]
    fn tensor_storage(&self) -> Vec<usize> {
        self.tensor_storage.clone()
    }

    #[getter]
    fn tensor_dtypes(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.dtypes.iter().map(|d| d.clone_ref(py)).collect()
    }

    #[getter]
    fn tensor_shapes(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.shapes.iter().map(|d| d.clone_ref(py)).collect()
    }

    #[getter]
    fn tensor_strides(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.strides.iter().map(|d| d.clone_ref(py)).collect()
    }

    #[getter]
    fn tensor_offsets(&self) -> Vec<i64> {
        self.storage_offsets.clone()
    }

    #[getter]
    fn tensor_flags(&self) -> Vec<u8> {
        self.flags.clone()
    }

    /// Builds one CPU tensor per described tensor over `buffer` (None for opaque ones). Each
    /// storage becomes one CPU storage, so views that shared one still do. The tensors alias the
    /// buffer: its bytes must be in place before anyone reads them.
    fn materialize<'py>(&self, buffer: &Bound<'py, PyHostBuffer>) -> PyResult<Bound<'py, PyList>> {
        let py = buffer.py();
        let api = torch(py)?;
        if buffer.get().buffer.len() < self.total_nbytes {
            return Err(invalid(format!(
                "host buffer of {} bytes is smaller than the {} bytes the tensors need",
                buffer.get().buffer.len(),
                self.total_nbytes
            )));
        }
        let frombuffer = api.frombuffer.bind(py);
        let empty = api.empty.bind(py);
        let uint8 = api.uint8.bind(py);
        let buffer_args = PyTuple::new(py, [buffer])?;
        // One kwargs dict, refilled per call: torch copies what it parses out of it.
        let kwargs = PyDict::new(py);
        // `torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)`: a tensor with a
        // CPU storage of its own over those bytes of the buffer.
        let view_bytes = |dtype: &Bound<'py, PyAny>,
                          count: usize,
                          offset: usize|
         -> PyResult<Bound<'py, PyAny>> {
            kwargs.set_item(intern!(py, "dtype"), dtype)?;
            kwargs.set_item(intern!(py, "count"), count)?;
            kwargs.set_item(intern!(py, "offset"), offset)?;
            frombuffer.call(&buffer_args, Some(&kwargs))
        };
        // `torch.empty(0, dtype=dtype)`.
        let empty_of = |dtype: &Bound<'py, PyAny>| -> PyResult<Bound<'py, PyAny>> {
            let dtype_kwargs = PyDict::new(py);
            dtype_kwargs.set_item(intern!(py, "dtype"), dtype)?;
            empty.call((0,), Some(&dtype_kwargs))
        };
        let mut bases: Vec<Option<Bound<'py, PyAny>>> = vec![None; self.nbytes.len()];
        let out = PyList::empty(py);
        for index in 0..self.flags.len() {
            let flags = self.flags[index];
            if flags & OPAQUE != 0 {
                out.append(py.None())?;
                continue;
            }
            let storage = self.tensor_storage[index];
            let dtype = self.dtypes[index].bind(py);
            let shape = self.shapes[index].bind(py);
            if flags == WHOLE_STORAGE && self.users[storage] == 1 {
                let mut tensor =
                    view_bytes(dtype, self.numels[index] as usize, self.offsets[storage])?;
                if shape.len()? != 1 {
                    tensor = tensor.call_method1(intern!(py, "view"), (shape,))?;
                }
                out.append(tensor)?;
                continue;
            }
            let base = match &bases[storage] {
                Some(base) => base.clone(),
                None => {
                    let base = if self.nbytes[storage] > 0 {
                        view_bytes(uint8, self.nbytes[storage], self.offsets[storage])?
                    } else {
                        empty_of(uint8)?
                    };
                    bases[storage] = Some(base.clone());
                    base
                }
            };
            let mut tensor = empty_of(dtype)?.call_method1(
                intern!(py, "set_"),
                (
                    base.call_method0(intern!(py, "untyped_storage"))?,
                    self.storage_offsets[index],
                    shape,
                    self.strides[index].bind(py),
                ),
            )?;
            if flags & CONJ != 0 {
                tensor = tensor.call_method0(intern!(py, "conj"))?;
            }
            if flags & NEG != 0 {
                tensor = tensor.call_method0(intern!(py, "_neg_view"))?;
            }
            out.append(tensor)?;
        }
        Ok(out)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTensorTable>()?;
    m.add_function(wrap_pyfunction!(describe_tensors, m)?)?;
    Ok(())
}
