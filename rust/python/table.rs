//! `TensorTable`: PyTorch tensors into the engine's table (`table.rs`), staged tensors back out.
//!
//! A state_dict's tensors cross into Rust once per stage as a list. [`describe_tensors`] reads each
//! one's storage (identity, address, size, device) and view (dtype, shape, stride, offset) through
//! the C API and feeds them to the engine's [`TableBuilder`], which dedups storages and places
//! them. [`PyTensorTable::materialize`] builds the staged tensors over a host buffer, one CPU
//! storage per source storage. Doing these per-tensor calls here rather than in a Python loop is
//! what makes 20,000 tiny tensors cheap: the calls are the same, the interpreter around them is gone.
//!
//! The Python objects the engine does not need (dtype objects, shape and stride tuples, source
//! storages, non-CUDA devices) stay here, next to the table, for building tensors back.

use std::collections::HashMap;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyInt, PyList, PyString, PyTuple, PyWeakrefReference};

use super::buffer::PyHostBuffer;
use super::{invalid, usize_arg};
use crate::dtype::Dtype;
use crate::layout::{VIEW_CONJ, VIEW_NEG, VIEW_OPAQUE, VIEW_WHOLE_STORAGE};
use crate::table::{Device, TableBuilder, TensorTable, ViewFacts, ViewGeometry, ViewSpec};

/// torch objects looked up once per process.
struct Torch {
    frombuffer: Py<PyAny>,
    empty: Py<PyAny>,
    uint8: Py<PyAny>,
    tensor_type: Py<PyAny>,
    parameter_type: Py<PyAny>,
    strided: Py<PyAny>,
    size_type: Py<PyAny>,
    quantized_dtypes: Vec<Py<PyAny>>,
    /// The engine's dtype → torch's dtype object (those this torch has).
    dtypes: Vec<(Dtype, Py<PyAny>)>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

fn torch(py: Python<'_>) -> PyResult<&Torch> {
    TORCH.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let quantized_dtypes = ["qint8", "quint8", "qint32", "quint4x2", "quint2x4"]
            .iter()
            .filter_map(|name| torch.getattr(*name).ok().map(Bound::unbind))
            .collect();
        let dtypes = Dtype::all()
            .filter_map(|dtype| {
                let object = torch.getattr(dtype.torch_name()).ok()?;
                Some((dtype, object.unbind()))
            })
            .collect();
        Ok::<_, PyErr>(Torch {
            frombuffer: torch.getattr("frombuffer")?.unbind(),
            empty: torch.getattr("empty")?.unbind(),
            uint8: torch.getattr("uint8")?.unbind(),
            tensor_type: torch.getattr("Tensor")?.unbind(),
            parameter_type: torch.getattr("nn")?.getattr("Parameter")?.unbind(),
            strided: torch.getattr("strided")?.unbind(),
            size_type: torch.getattr("Size")?.unbind(),
            quantized_dtypes,
            dtypes,
        })
    })
}

/// The engine's name for a torch dtype object (None for a dtype newer than the engine's table).
fn engine_dtype(api: &Torch, py: Python<'_>, dtype: &Bound<'_, PyAny>) -> Option<Dtype> {
    api.dtypes
        .iter()
        .find(|(_, object)| object.bind(py).is(dtype))
        .map(|(dtype, _)| *dtype)
}

/// torch's dtype object for `dtype`.
fn torch_dtype<'py>(api: &Torch, py: Python<'py>, dtype: Dtype) -> PyResult<Bound<'py, PyAny>> {
    api.dtypes
        .iter()
        .find(|(known, _)| *known == dtype)
        .map(|(_, object)| object.bind(py).clone())
        .ok_or_else(|| invalid(format!("this torch has no dtype {dtype}")))
}

#[derive(Clone, Copy)]
struct DtypeInfo {
    itemsize: usize,
    is_complex: bool,
    dtype: Option<Dtype>,
}

/// The flat description of a state_dict's tensors and of where their storages go.
///
/// # Thread Safety
/// Immutable after construction (`frozen`); shared freely between threads.
#[pyclass(name = "TensorTable", module = "stager._native", frozen)]
pub(crate) struct PyTensorTable {
    pub(crate) table: TensorTable,
    // One entry per tensor.
    dtypes: Vec<Py<PyAny>>,
    shapes: Vec<Py<PyAny>>,
    strides: Vec<Py<PyAny>>,
    /// The engine's name for each tensor's dtype (None for opaque tensors and unknown dtypes).
    engine_dtypes: Vec<Option<Dtype>>,
    /// `tensor._version` when asked for (None: not tracked, or an inference tensor without one).
    pub(crate) versions: Vec<Option<i64>>,
    /// With versions tracked, a weak reference to each tensor object: a tensor's identity, since
    /// a re-wrapped `nn.Parameter(p.data)` views the same storage with a fresh version counter
    /// that can reach the recorded value again. CPython hands out one shared weak reference per
    /// live object, so two stages saw the same tensor object exactly when their references are
    /// the same object.
    pub(crate) identities: Vec<Option<Py<PyAny>>>,
    // One entry per storage.
    pub(crate) storages: Vec<Option<Py<PyAny>>>,
    devices: Vec<Option<Py<PyAny>>>,
    /// The storage's identity (`UntypedStorage._cdata`, its StorageImpl); 0 from metadata.
    pub(crate) keys: Vec<usize>,
    /// For [`PyTensorTable::revalidated`] (tables from `describe_tensors(..., cacheable=True)`):
    /// a weak reference to each plain tensor and its data pointer when described.
    cache_refs: Vec<Option<Py<PyAny>>>,
    data_ptrs: Vec<usize>,
}

impl PyTensorTable {
    /// The dtype and shape of tensor `index`, for naming file entries.
    pub(crate) fn safetensors_entry(
        &self,
        py: Python<'_>,
        index: usize,
    ) -> Option<crate::format::TensorEntry> {
        let dtype = self.engine_dtypes.get(index).copied().flatten()?;
        let shape: Vec<u64> = self.shapes[index].bind(py).extract().ok()?;
        Some(crate::format::TensorEntry { dtype, shape })
    }
}

/// Reads every tensor of `tensors` once and describes their distinct storages, placed in one
/// buffer. With `track_versions`, also reads each tensor's version counter (for incremental
/// staging). Raises StagerError for tensors without data (meta) and for views that reach past
/// their storage (one freed or shrunk behind the view, `resize_(0)`): copying only the storage's
/// bytes would give a staged view over memory that holds garbage. That error carries
/// `tensor_index`, the position in `tensors`, so the caller can name the tensor's key. Nested
/// tensors (no sizes or strides) are described as opaque, staged through torch.
#[pyfunction]
#[pyo3(signature = (tensors, track_versions = false, cacheable = false))]
pub(crate) fn describe_tensors(
    tensors: &Bound<'_, PyList>,
    track_versions: bool,
    cacheable: bool,
) -> PyResult<PyTensorTable> {
    let py = tensors.py();
    let api = torch(py)?;
    let count = tensors.len();
    let mut builder = TableBuilder::with_capacity(count);
    let mut dtypes = Vec::with_capacity(count);
    let mut shapes = Vec::with_capacity(count);
    let mut strides = Vec::with_capacity(count);
    let mut engine_dtypes = Vec::with_capacity(count);
    let mut storages: Vec<Option<Py<PyAny>>> = Vec::with_capacity(count);
    let mut devices: Vec<Option<Py<PyAny>>> = Vec::with_capacity(count);
    let mut keys: Vec<usize> = Vec::with_capacity(count);
    let mut storage_nbytes: Vec<usize> = Vec::with_capacity(count);
    let mut versions: Vec<Option<i64>> = Vec::with_capacity(count);
    let mut identities: Vec<Option<Py<PyAny>>> = Vec::with_capacity(count);
    let mut cache_refs: Vec<Option<Py<PyAny>>> = Vec::with_capacity(count);
    let mut data_ptrs: Vec<usize> = Vec::with_capacity(count);
    let mut storage_addresses: Vec<usize> = Vec::with_capacity(count);
    let mut dtype_info: HashMap<usize, DtypeInfo> = HashMap::new();
    let mut dims: Vec<(i64, i64)> = Vec::new();
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
            builder.add_opaque();
            dtypes.push(dtype.unbind());
            shapes.push(py.None());
            strides.push(py.None());
            engine_dtypes.push(None);
            versions.push(None);
            identities.push(None);
            cache_refs.push(None);
            data_ptrs.push(0);
            continue;
        }
        let is_cpu = tensor.getattr(intern!(py, "is_cpu"))?.is_truthy()?;
        if !is_cpu && tensor.getattr(intern!(py, "is_meta"))?.is_truthy()? {
            return Err(invalid(format!(
                "cannot stage a meta tensor (no data) of shape {}: materialize it before checkpointing",
                tensor.getattr(intern!(py, "shape"))?
            )));
        }
        // A (strided-layout) nested tensor has no sizes: asking is the cheap test, `is_nested`
        // is read only when it fails.
        let shape = match tensor.getattr(intern!(py, "shape")) {
            Ok(shape) => shape,
            Err(_) if tensor.getattr(intern!(py, "is_nested"))?.is_truthy()? => {
                builder.add_opaque();
                dtypes.push(dtype.unbind());
                shapes.push(py.None());
                strides.push(py.None());
                engine_dtypes.push(None);
                versions.push(None);
                identities.push(None);
                cache_refs.push(None);
                data_ptrs.push(0);
                continue;
            }
            Err(err) => return Err(err),
        };
        let storage = tensor.call_method0(intern!(py, "untyped_storage"))?;
        let key: usize = storage.getattr(intern!(py, "_cdata"))?.extract()?;
        let index = match builder.find_storage(key) {
            Some(index) => index,
            None => {
                let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
                let address: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
                let (device, device_object) = if is_cpu {
                    (Device::Host, None)
                } else {
                    let device = tensor.getattr(intern!(py, "device"))?;
                    let kind: String = device.getattr(intern!(py, "type"))?.extract()?;
                    let ordinal: Option<i32> = device.getattr(intern!(py, "index"))?.extract()?;
                    let engine_device = match (kind.as_str(), ordinal) {
                        ("cuda", Some(ordinal)) => Device::Cuda(ordinal),
                        _ => Device::Other,
                    };
                    (engine_device, Some(device.unbind()))
                };
                devices.push(device_object);
                storages.push(Some(storage.unbind()));
                keys.push(key);
                storage_nbytes.push(nbytes);
                storage_addresses.push(address);
                builder.add_storage(key, address, nbytes, device)
            }
        };
        let info = match dtype_info.get(&(dtype.as_ptr() as usize)) {
            Some(info) => *info,
            None => {
                let info = match engine_dtype(api, py, &dtype) {
                    Some(known) => DtypeInfo {
                        itemsize: known.itemsize(),
                        is_complex: known.is_complex(),
                        dtype: Some(known),
                    },
                    None => DtypeInfo {
                        itemsize: dtype.getattr(intern!(py, "itemsize"))?.extract()?,
                        is_complex: dtype.getattr(intern!(py, "is_complex"))?.is_truthy()?,
                        dtype: None,
                    },
                };
                dtype_info.insert(dtype.as_ptr() as usize, info);
                info
            }
        };
        // Only complex tensors carry the conjugate bit, but any tensor may carry the negative bit
        // (`torch._neg_view` of a real tensor): skipping it staged such a view un-negated.
        let conj = info.is_complex && tensor.call_method0(intern!(py, "is_conj"))?.is_truthy()?;
        let neg = tensor.call_method0(intern!(py, "is_neg"))?.is_truthy()?;
        let stride = tensor.call_method0(intern!(py, "stride"))?;
        read_dims(&shape, &stride, &mut dims)?;
        let geometry = ViewGeometry::of(&dims);
        let storage_offset: i64 = tensor
            .call_method0(intern!(py, "storage_offset"))?
            .extract()?;
        if geometry.numel > 0 {
            check_view_fits(
                dtypes.len(),
                &shape,
                storage_offset,
                geometry.end_byte(storage_offset, info.itemsize),
                storage_nbytes[index],
            )?;
        }
        builder.add_view(
            index,
            ViewFacts {
                itemsize: info.itemsize,
                storage_offset,
                numel: geometry.numel,
                contiguous: geometry.contiguous,
                conj,
                neg,
            },
        );
        dtypes.push(dtype.unbind());
        shapes.push(shape.unbind());
        strides.push(stride.unbind());
        engine_dtypes.push(info.dtype);
        versions.push(if track_versions {
            // Inference tensors have no version counter: reading it raises, and they count as
            // changed every time.
            tensor
                .getattr(intern!(py, "_version"))
                .and_then(|v| v.extract::<i64>())
                .ok()
        } else {
            None
        });
        let identity = if track_versions || cacheable {
            Some(PyWeakrefReference::new(&tensor)?.into_any().unbind())
        } else {
            None
        };
        identities.push(if track_versions {
            identity.as_ref().map(|o| o.clone_ref(py))
        } else {
            None
        });
        cache_refs.push(if cacheable { identity } else { None });
        data_ptrs.push(
            storage_addresses[index]
                .wrapping_add((storage_offset as usize).wrapping_mul(info.itemsize)),
        );
    }
    Ok(PyTensorTable {
        table: builder.finish()?,
        dtypes,
        shapes,
        strides,
        engine_dtypes,
        versions,
        identities,
        storages,
        devices,
        keys,
        cache_refs,
        data_ptrs,
    })
}

/// Fails unless the view's bytes (up to `end`, [`ViewGeometry::end_byte`]) lie inside its
/// storage of `nbytes`; the error names tensor `index` and carries it as `tensor_index`.
fn check_view_fits(
    index: usize,
    shape: &Bound<'_, PyAny>,
    storage_offset: i64,
    end: u128,
    nbytes: usize,
) -> PyResult<()> {
    if end <= nbytes as u128 {
        return Ok(());
    }
    let err = invalid(format!(
        "tensor {index} (shape {shape}, storage offset {storage_offset}) reaches byte {end} of \
         a storage of {nbytes} bytes: its storage was freed or shrunk behind the view \
         (e.g. resize_(0))"
    ));
    let _ = err.value(shape.py()).setattr("tensor_index", index);
    Err(err)
}

/// A view's `(size, stride)` pairs, outermost first, into `dims`, from its shape (a
/// `torch.Size`) and strides (a tuple), without more calls into torch.
fn read_dims(
    shape: &Bound<'_, PyAny>,
    stride: &Bound<'_, PyAny>,
    dims: &mut Vec<(i64, i64)>,
) -> PyResult<()> {
    let shape = shape.cast::<PyTuple>()?;
    let stride = stride.cast::<PyTuple>()?;
    if stride.len() != shape.len() {
        return Err(invalid(format!(
            "tensor has {} dimensions but {} strides",
            shape.len(),
            stride.len()
        )));
    }
    dims.clear();
    for (size, step) in shape.iter().zip(stride.iter()) {
        dims.push((size.extract()?, step.extract()?));
    }
    Ok(())
}

/// The error for untrusted metadata (a file's tree, a peer's message) that fails a check:
/// `StagerError("invalid checkpoint metadata: ...")`, as Python's own JSON checks raise it.
fn bad_metadata(reason: impl std::fmt::Display) -> PyErr {
    super::StagerError::new_err(format!("invalid checkpoint metadata: {reason}"))
}

/// A list of JSON integers (exactly `int`: not `bool`, which Python counts as one), each within
/// `i64`; the error names `what`.
fn json_ints(value: &Bound<'_, PyAny>, what: &dyn Fn() -> String) -> PyResult<Vec<i64>> {
    let list = value
        .cast::<PyList>()
        .map_err(|_| bad_metadata(format!("{} must be a list of integers", what())))?;
    list.iter().map(|item| json_int(&item, what)).collect()
}

/// A JSON integer (exactly `int`) within `i64`; the error names `what`.
fn json_int(value: &Bound<'_, PyAny>, what: &dyn Fn() -> String) -> PyResult<i64> {
    if !value.is_exact_instance_of::<PyInt>() {
        return Err(bad_metadata(format!(
            "{} must be an integer, got {}",
            what(),
            value.get_type().name()?
        )));
    }
    value
        .extract()
        .map_err(|_| bad_metadata(format!("{} is out of range: {value}", what())))
}

#[pymethods]
impl PyTensorTable {
    /// A table for tensors described by untrusted metadata (a file's tree, a peer's message):
    /// storages of `storage_nbytes`, and one `(storage, dtype name, shape, stride or None,
    /// storage_offset, conj, neg)` per tensor, as decoded from JSON. The engine checks every
    /// view against its storage ([`TensorTable::from_layout`]); errors name the tensor.
    #[staticmethod]
    fn from_layout(
        py: Python<'_>,
        storage_nbytes: Vec<Bound<'_, PyAny>>,
        tensors: Vec<Bound<'_, PyTuple>>,
    ) -> PyResult<PyTensorTable> {
        let api = torch(py)?;
        let storage_nbytes = storage_nbytes
            .iter()
            .map(|n| usize_arg(n, "storage nbytes", 0, isize::MAX as usize))
            .collect::<PyResult<Vec<usize>>>()?;
        let count = tensors.len();
        let mut specs = Vec::with_capacity(count);
        for (index, tensor) in tensors.iter().enumerate() {
            if tensor.len() != 7 {
                return Err(bad_metadata(format!(
                    "tensor {index} must be (storage, dtype, shape, stride, storage_offset, conj, neg)"
                )));
            }
            let name = tensor.get_item(1)?;
            let dtype = name
                .cast::<PyString>()
                .ok()
                .and_then(|name| Dtype::from_torch_name(name.to_str().ok()?))
                .ok_or_else(|| {
                    bad_metadata(format!(
                        "tensor {index} has unknown dtype {}",
                        name.repr().map_or_else(|_| "?".into(), |r| r.to_string())
                    ))
                })?;
            let storage = json_int(&tensor.get_item(0)?, &|| format!("tensor {index} storage"))?;
            if storage < 0 {
                return Err(bad_metadata(format!(
                    "tensor {index} storage must be >= 0, got {storage}"
                )));
            }
            let stride = tensor.get_item(3)?;
            specs.push(ViewSpec {
                storage: usize::try_from(storage).unwrap_or(usize::MAX), // >= 0: checked
                dtype,
                shape: json_ints(&tensor.get_item(2)?, &|| format!("tensor {index} shape"))?,
                stride: if stride.is_none() {
                    None
                } else {
                    Some(json_ints(&stride, &|| format!("tensor {index} stride"))?)
                },
                storage_offset: json_int(&tensor.get_item(4)?, &|| {
                    format!("tensor {index} offset")
                })?,
                conj: tensor.get_item(5)?.is_truthy()?,
                neg: tensor.get_item(6)?.is_truthy()?,
            });
        }
        let (table, view_strides) = py
            .detach(|| TensorTable::from_layout(&storage_nbytes, &specs))
            .map_err(|err| match err {
                crate::StagerError::InvalidArgument(reason) => bad_metadata(reason),
                other => other.into(),
            })?;
        let size_type = api.size_type.bind(py);
        let mut dtypes = Vec::with_capacity(count);
        let mut shapes = Vec::with_capacity(count);
        let mut strides = Vec::with_capacity(count);
        for (spec, stride) in specs.iter().zip(view_strides) {
            dtypes.push(torch_dtype(api, py, spec.dtype)?.unbind());
            shapes.push(size_type.call1((PyList::new(py, &spec.shape)?,))?.unbind());
            strides.push(PyTuple::new(py, stride)?.into_any().unbind());
        }
        let storage_count = storage_nbytes.len();
        Ok(PyTensorTable {
            table,
            dtypes,
            shapes,
            strides,
            engine_dtypes: specs.iter().map(|spec| Some(spec.dtype)).collect(),
            versions: vec![None; count],
            identities: (0..count).map(|_| None).collect(),
            storages: (0..storage_count).map(|_| None).collect(),
            devices: (0..storage_count).map(|_| None).collect(),
            keys: vec![0; storage_count],
            cache_refs: (0..count).map(|_| None).collect(),
            data_ptrs: vec![0; count],
        })
    }

    /// The same table with `storages` (indices) marked reused: their bytes are staged already (an
    /// earlier result), so they take no room in the buffer, get no copy, and their requests are
    /// complete from the start; `materialize` must be given them as replacements.
    fn reusing(&self, py: Python<'_>, storages: Vec<Bound<'_, PyAny>>) -> PyResult<PyTensorTable> {
        let count = self.table.storages().len();
        let indices = storages
            .iter()
            .map(|i| usize_arg(i, "storage index", 0, count.saturating_sub(1)))
            .collect::<PyResult<Vec<usize>>>()?;
        let clone = |objects: &[Py<PyAny>]| objects.iter().map(|o| o.clone_ref(py)).collect();
        let clone_opt = |objects: &[Option<Py<PyAny>>]| {
            objects
                .iter()
                .map(|o| o.as_ref().map(|o| o.clone_ref(py)))
                .collect()
        };
        Ok(PyTensorTable {
            table: self.table.reusing(&indices)?,
            dtypes: clone(&self.dtypes),
            shapes: clone(&self.shapes),
            strides: clone(&self.strides),
            engine_dtypes: self.engine_dtypes.clone(),
            versions: self.versions.clone(),
            identities: clone_opt(&self.identities),
            storages: clone_opt(&self.storages),
            devices: clone_opt(&self.devices),
            keys: self.keys.clone(),
            cache_refs: clone_opt(&self.cache_refs),
            data_ptrs: self.data_ptrs.clone(),
        })
    }

    /// This table again for `tensors` (a new stage's leaves), or None when anything it describes
    /// may have changed: the plan cache's check. Each tensor must be the very object described
    /// (a live weak reference to it), with the same dtype, shape, stride and data pointer, and
    /// each storage the same StorageImpl of the same size. A replaced tensor, `.data =`, `set_()`, `resize_()`, a moved
    /// or resized storage all change one of those; a storage's bytes may change freely (they are
    /// copied anyway). Only tables described with `cacheable` and without opaque tensors
    /// qualify. Reads a third of what `describe_tensors` reads and builds no layout.
    #[pyo3(signature = (tensors, track_versions = false))]
    fn revalidated(
        &self,
        tensors: &Bound<'_, PyList>,
        track_versions: bool,
    ) -> PyResult<Option<PyTensorTable>> {
        let py = tensors.py();
        let count = self.dtypes.len();
        if tensors.len() != count || self.table.opaque().next().is_some() {
            return Ok(None);
        }
        let views = self.table.views();
        let storage_count = self.table.storages().len();
        let mut storages: Vec<Option<Py<PyAny>>> = (0..storage_count).map(|_| None).collect();
        let mut versions = Vec::with_capacity(count);
        for (index, tensor) in tensors.iter().enumerate() {
            let Some(identity) = self.cache_refs[index].as_ref() else {
                return Ok(None);
            };
            let same_object = identity
                .bind(py)
                .cast::<PyWeakrefReference>()
                .ok()
                .and_then(|r| r.upgrade())
                .is_some_and(|o| o.is(&tensor));
            if !same_object
                || !tensor
                    .getattr(intern!(py, "dtype"))?
                    .is(self.dtypes[index].bind(py))
            {
                return Ok(None);
            }
            let data_ptr: usize = tensor.call_method0(intern!(py, "data_ptr"))?.extract()?;
            if data_ptr != self.data_ptrs[index]
                || !tensor
                    .getattr(intern!(py, "shape"))?
                    .eq(self.shapes[index].bind(py))?
                || !tensor
                    .call_method0(intern!(py, "stride"))?
                    .eq(self.strides[index].bind(py))?
            {
                return Ok(None);
            }
            let storage_index = views[index].storage;
            if storages[storage_index].is_none() {
                // The same StorageImpl (incremental records compare it) of the same size.
                let storage = tensor.call_method0(intern!(py, "untyped_storage"))?;
                let key: usize = storage.getattr(intern!(py, "_cdata"))?.extract()?;
                if key != self.keys[storage_index] {
                    return Ok(None);
                }
                let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
                if nbytes != self.table.storages()[storage_index].nbytes {
                    return Ok(None);
                }
                storages[storage_index] = Some(storage.unbind());
            }
            versions.push(if track_versions {
                tensor
                    .getattr(intern!(py, "_version"))
                    .and_then(|v| v.extract::<i64>())
                    .ok()
            } else {
                None
            });
        }
        let clone = |objects: &[Py<PyAny>]| objects.iter().map(|o| o.clone_ref(py)).collect();
        let clone_opt = |objects: &[Option<Py<PyAny>>]| {
            objects
                .iter()
                .map(|o| o.as_ref().map(|o| o.clone_ref(py)))
                .collect::<Vec<_>>()
        };
        Ok(Some(PyTensorTable {
            table: self.table.clone(),
            dtypes: clone(&self.dtypes),
            shapes: clone(&self.shapes),
            strides: clone(&self.strides),
            engine_dtypes: self.engine_dtypes.clone(),
            versions,
            identities: if track_versions {
                clone_opt(&self.cache_refs)
            } else {
                (0..count).map(|_| None).collect()
            },
            storages,
            devices: clone_opt(&self.devices),
            keys: self.keys.clone(),
            cache_refs: clone_opt(&self.cache_refs),
            data_ptrs: self.data_ptrs.clone(),
        }))
    }

    /// This table without its source storages (`storage_objects` all None): what a plan cache
    /// keeps, so that it holds no source memory alive between stages.
    fn without_storages(&self, py: Python<'_>) -> PyTensorTable {
        let clone = |objects: &[Py<PyAny>]| objects.iter().map(|o| o.clone_ref(py)).collect();
        let clone_opt = |objects: &[Option<Py<PyAny>>]| {
            objects
                .iter()
                .map(|o| o.as_ref().map(|o| o.clone_ref(py)))
                .collect::<Vec<_>>()
        };
        PyTensorTable {
            table: self.table.clone(),
            dtypes: clone(&self.dtypes),
            shapes: clone(&self.shapes),
            strides: clone(&self.strides),
            engine_dtypes: self.engine_dtypes.clone(),
            versions: vec![None; self.versions.len()],
            identities: (0..self.identities.len()).map(|_| None).collect(),
            storages: (0..self.storages.len()).map(|_| None).collect(),
            devices: clone_opt(&self.devices),
            keys: self.keys.clone(),
            cache_refs: clone_opt(&self.cache_refs),
            data_ptrs: self.data_ptrs.clone(),
        }
    }

    /// Bytes of the buffer every storage fits in.
    #[getter]
    fn total_nbytes(&self) -> usize {
        self.table.total_nbytes()
    }

    /// Number of tensors.
    fn __len__(&self) -> usize {
        self.table.views().len()
    }

    /// Indices of tensors that are not plain strided tensors (staged by torch instead).
    #[getter]
    fn opaque(&self) -> Vec<usize> {
        self.table.opaque().collect()
    }

    /// Each storage's source address (0 for tables made from metadata).
    #[getter]
    fn storage_addresses(&self) -> Vec<usize> {
        self.table.storages().iter().map(|s| s.address).collect()
    }

    /// Each storage's bytes.
    #[getter]
    fn storage_nbytes(&self) -> Vec<usize> {
        self.table.storages().iter().map(|s| s.nbytes).collect()
    }

    /// Each storage's offset in the staged buffer.
    #[getter]
    fn storage_offsets(&self) -> Vec<usize> {
        self.table.storages().iter().map(|s| s.offset).collect()
    }

    /// Each storage's number of tensors.
    #[getter]
    fn storage_users(&self) -> Vec<u32> {
        self.table.storages().iter().map(|s| s.users).collect()
    }

    /// The source storages (None for tables made from metadata).
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

    /// `(request, device, source_address, target_offset, nbytes)` of every non-empty CUDA storage,
    /// for `DeviceCopier.submit` (request i is storage i).
    #[getter]
    fn cuda_copies(&self) -> Vec<(usize, i32, usize, usize, usize)> {
        self.table
            .cuda_storages()
            .map(|(index, device)| {
                let storage = &self.table.storages()[index];
                (
                    index,
                    device,
                    storage.address,
                    storage.offset,
                    storage.nbytes,
                )
            })
            .collect()
    }

    /// The index of the non-reused, non-empty storage whose placed bytes contain `offset`
    /// (a position in the staged buffer), if any.
    fn storage_at(&self, offset: usize) -> Option<usize> {
        self.table.storage_at(offset)
    }

    /// Whether any storage lives outside host memory.
    #[getter]
    fn has_device_storages(&self) -> bool {
        self.devices.iter().any(Option::is_some)
    }

    /// Each storage's identity (its StorageImpl's address while it lives; 0 from metadata).
    #[getter]
    fn storage_keys(&self) -> Vec<usize> {
        self.keys.clone()
    }

    /// Whether each storage is reused from an earlier result (see `reusing`).
    #[getter]
    fn storage_reused(&self) -> Vec<bool> {
        self.table.storages().iter().map(|s| s.reused).collect()
    }

    /// For each storage, the version counters of the tensors viewing it in table order, or None
    /// when one of them has none (not tracked, or an inference tensor).
    #[getter]
    fn storage_versions(&self) -> Vec<Option<Vec<i64>>> {
        self.table.storage_versions(&self.versions)
    }

    /// For each storage, weak references to the tensors viewing it in table order (the same
    /// object for the same live tensor), or None when versions are not tracked for all of them.
    #[getter]
    fn storage_identities(&self, py: Python<'_>) -> Vec<Option<Vec<Py<PyAny>>>> {
        let identity = |index: usize| self.identities.get(index).and_then(Option::as_ref);
        self.table
            .views_per_storage(|index| identity(index).is_some())
            .into_iter()
            .map(|views| {
                views.map(|list| {
                    list.into_iter()
                        .filter_map(|index| identity(index).map(|o| o.clone_ref(py)))
                        .collect()
                })
            })
            .collect()
    }

    /// Each tensor's storage index (a huge number for opaque tensors).
    #[getter]
    fn tensor_storage(&self) -> Vec<usize> {
        self.table.views().iter().map(|v| v.storage).collect()
    }

    /// Each tensor's dtype.
    #[getter]
    fn tensor_dtypes(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.dtypes.iter().map(|d| d.clone_ref(py)).collect()
    }

    /// Each tensor's shape (None for opaque tensors).
    #[getter]
    fn tensor_shapes(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.shapes.iter().map(|d| d.clone_ref(py)).collect()
    }

    /// Each tensor's stride (None for opaque tensors).
    #[getter]
    fn tensor_strides(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.strides.iter().map(|d| d.clone_ref(py)).collect()
    }

    /// Each tensor's storage offset (elements).
    #[getter]
    fn tensor_offsets(&self) -> Vec<i64> {
        self.table
            .views()
            .iter()
            .map(|v| v.storage_offset)
            .collect()
    }

    /// Each tensor's view flags (`VIEW_*`).
    #[getter]
    fn tensor_flags(&self) -> Vec<u8> {
        self.table.views().iter().map(|v| v.flags).collect()
    }

    /// Builds one CPU tensor per described tensor over `buffer` (None for opaque ones). Each
    /// storage becomes one CPU storage, so views that shared one still do. With `replacements`
    /// (storage index → `torch.UntypedStorage`), tensors of those storages view the given storage
    /// instead (e.g. in-place receives). The tensors alias the buffer: its bytes must be in place
    /// before anyone reads them. `previous` (the staged tensors of an earlier result, in the order
    /// of a table like this one) lets a tensor that is the only, whole view of a replaced storage
    /// be an alias (`detach()`) of the earlier staged tensor, several times cheaper than building
    /// it, when that tensor still views the replacement's bytes with the same dtype, shape and
    /// stride; anything else is built as usual.
    #[pyo3(signature = (buffer, replacements = None, previous = None))]
    fn materialize<'py>(
        &self,
        buffer: &Bound<'py, PyAny>,
        replacements: Option<&Bound<'py, PyDict>>,
        previous: Option<&Bound<'py, PyList>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let py = buffer.py();
        let api = torch(py)?;
        let available = match buffer.cast::<PyHostBuffer>() {
            Ok(host) => host.get().buffer.len(),
            Err(_) => buffer.len()?,
        };
        let storages = self.table.storages();
        let mut replaced: Vec<Option<Bound<'py, PyAny>>> = vec![None; storages.len()];
        if let Some(replacements) = replacements {
            for (key, storage) in replacements.iter() {
                let index = usize_arg(
                    &key,
                    "replacement storage index",
                    0,
                    storages.len().saturating_sub(1),
                )?;
                let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
                if nbytes != storages[index].nbytes {
                    return Err(invalid(format!(
                        "replacement for storage {index} has {nbytes} bytes, the storage {}",
                        storages[index].nbytes
                    )));
                }
                replaced[index] = Some(storage);
            }
        }
        let needed = storages
            .iter()
            .zip(&replaced)
            .filter(|(_, r)| r.is_none())
            .map(|(s, _)| s.offset + s.nbytes)
            .max()
            .unwrap_or(0);
        if available < needed {
            return Err(invalid(format!(
                "host buffer of {available} bytes is smaller than the {needed} bytes the tensors need"
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
        // Per storage, the UntypedStorage every view of it is set onto (made on first use).
        let mut bases: Vec<Option<Bound<'py, PyAny>>> = replaced;
        let out = PyList::empty(py);
        for (index, view) in self.table.views().iter().enumerate() {
            if view.flags & VIEW_OPAQUE != 0 {
                out.append(py.None())?;
                continue;
            }
            let storage = &storages[view.storage];
            let dtype = self.dtypes[index].bind(py);
            let shape = self.shapes[index].bind(py);
            if view.flags == VIEW_WHOLE_STORAGE
                && storage.users == 1
                && bases[view.storage].is_none()
            {
                let mut tensor = view_bytes(dtype, view.numel as usize, storage.offset)?;
                if shape.len()? != 1 {
                    tensor = view_as(&tensor, shape)?;
                }
                out.append(tensor)?;
                continue;
            }
            if let (Some(previous), Some(base)) = (previous, &bases[view.storage]) {
                if view.flags == VIEW_WHOLE_STORAGE && storage.users == 1 {
                    let alias = alias_of_previous(
                        api,
                        previous,
                        index,
                        base,
                        dtype,
                        shape,
                        self.strides[index].bind(py),
                    )?;
                    if let Some(alias) = alias {
                        out.append(alias)?;
                        continue;
                    }
                }
            }
            let base = match &bases[view.storage] {
                Some(base) => base.clone(),
                None => {
                    let bytes = if storage.nbytes > 0 {
                        view_bytes(uint8, storage.nbytes, storage.offset)?
                    } else {
                        empty_of(uint8)?
                    };
                    let base = bytes.call_method0(intern!(py, "untyped_storage"))?;
                    bases[view.storage] = Some(base.clone());
                    base
                }
            };
            let mut tensor = empty_of(dtype)?.call_method1(
                intern!(py, "set_"),
                (
                    base,
                    view.storage_offset,
                    shape,
                    self.strides[index].bind(py),
                ),
            )?;
            if view.flags & VIEW_CONJ != 0 {
                tensor = tensor.call_method0(intern!(py, "conj"))?;
            }
            if view.flags & VIEW_NEG != 0 {
                tensor = tensor.call_method0(intern!(py, "_neg_view"))?;
            }
            out.append(tensor)?;
        }
        Ok(out)
    }
}

/// `previous[index].detach()` when that is a plain tensor over the first byte of storage `base`
/// with this `dtype`, `shape` and `stride` (an earlier result's tensor, its metadata unchanged);
/// else None.
fn alias_of_previous<'py>(
    api: &Torch,
    previous: &Bound<'py, PyList>,
    index: usize,
    base: &Bound<'py, PyAny>,
    dtype: &Bound<'py, PyAny>,
    shape: &Bound<'py, PyAny>,
    stride: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = previous.py();
    let Ok(earlier) = previous.get_item(index) else {
        return Ok(None);
    };
    if !earlier.get_type().is(api.tensor_type.bind(py))
        || !earlier.getattr(intern!(py, "dtype"))?.is(dtype)
    {
        return Ok(None);
    }
    let address: usize = earlier.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let base_address: usize = base.call_method0(intern!(py, "data_ptr"))?.extract()?;
    if address != base_address
        || !earlier.getattr(intern!(py, "shape"))?.eq(shape)?
        || !earlier.call_method0(intern!(py, "stride"))?.eq(stride)?
    {
        return Ok(None);
    }
    Ok(Some(earlier.call_method0(intern!(py, "detach"))?))
}

/// `tensor.view(*shape)`: torch parses a call with the sizes as separate ints about twice as fast
/// as one with a `torch.Size` (1.5 against 3.7 us on a busy 2-core VM), which was most of the
/// per-tensor cost of materializing N-d tensors. A 0-d shape (or one that is not a tuple) takes
/// the one-argument form: `view()` with no sizes is an error.
fn view_as<'py>(
    tensor: &Bound<'py, PyAny>,
    shape: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = tensor.py();
    match shape.cast::<PyTuple>() {
        Ok(dims) if !dims.is_empty() => {
            tensor.call_method1(intern!(py, "view"), PyTuple::new(py, dims.iter())?)
        }
        _ => tensor.call_method1(intern!(py, "view"), (shape,)),
    }
}

/// The address of `tensor`'s first byte when it is a contiguous CPU tensor whose elements take
/// exactly `nbytes` bytes (a target a reader may fill in one piece); else why not.
pub(crate) fn contiguous_cpu_bytes(
    tensor: &Bound<'_, PyAny>,
    nbytes: usize,
) -> Result<usize, String> {
    let py = tensor.py();
    let attempt = || -> PyResult<Result<usize, String>> {
        if !tensor.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
            return Ok(Err("not a CPU tensor".into()));
        }
        if !tensor
            .call_method0(intern!(py, "is_contiguous"))?
            .is_truthy()?
        {
            return Ok(Err("not contiguous".into()));
        }
        let numel: usize = tensor.call_method0(intern!(py, "numel"))?.extract()?;
        let itemsize: usize = tensor
            .call_method0(intern!(py, "element_size"))?
            .extract()?;
        if numel.checked_mul(itemsize) != Some(nbytes) {
            return Ok(Err(format!(
                "holds {} bytes, not {nbytes}",
                numel.saturating_mul(itemsize)
            )));
        }
        Ok(Ok(tensor
            .call_method0(intern!(py, "data_ptr"))?
            .extract()?))
    };
    attempt().unwrap_or_else(|err| Err(format!("not a tensor ({err})")))
}

/// The crc32c of every byte of a CPU `torch.UntypedStorage` (GIL released while reading).
#[pyfunction]
fn storage_crc32c(py: Python<'_>, storage: &Bound<'_, PyAny>) -> PyResult<u32> {
    let device = storage.getattr(intern!(py, "device"))?;
    let kind: String = device.getattr(intern!(py, "type"))?.extract()?;
    if kind != "cpu" {
        return Err(invalid(format!(
            "storage_crc32c reads host memory only, not {kind}"
        )));
    }
    let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
    let address: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
    if nbytes == 0 {
        return Ok(0);
    }
    // SAFETY: a live CPU storage (`storage` is held for the whole call) owns `nbytes` readable
    // bytes at `address`; this only reads them.
    let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, nbytes) };
    Ok(py.detach(|| crc32c::crc32c(bytes)))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(storage_crc32c, m)?)?;
    // torch dtype attribute name → safetensors dtype name, for Python's view of the same map.
    let safetensors_dtypes: Vec<(&str, &str)> = Dtype::all()
        .filter(|dtype| dtype.names_file_entries())
        .filter_map(|dtype| Some((dtype.torch_name(), dtype.safetensors_name()?)))
        .collect();
    m.add("SAFETENSORS_DTYPES", safetensors_dtypes)?;
    m.add_class::<PyTensorTable>()?;
    m.add_function(wrap_pyfunction!(describe_tensors, m)?)?;
    Ok(())
}
