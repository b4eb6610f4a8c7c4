//! CUDA through cudarc's driver API, loaded at run time: detection, pinning, device-to-host copies.
//!
//! The crate builds without a CUDA toolkit and runs without a driver: `cudarc` is used with
//! dynamic loading, and the driver library is looked for *before* the first driver call (cudarc
//! panics when a call finds no library). Without CUDA, [`is_available`] is false, [`CudaPinner`]
//! and [`DeviceCopier`] refuse to be built with a [`StagerError::Cuda`], and nothing panics.
//!
//! Features:
//! - [`CudaPinner`]: a [`MemoryPinner`] for the host pool. `cuMemHostRegister` on the pool's own
//!   (normal, cached, not write-combined) memory, once per buffer lifetime, portable to every
//!   context; unregistered when the pool unmaps the buffer.
//! - [`DeviceCopier`]: device-to-host copies of memory PyTorch owns, on streams the copier owns
//!   (per device). A submission first makes those streams wait for a [`StreamMark`]: an event
//!   recorded on the caller's current stream, so kernels already queued there finish before their
//!   output is copied. Each copy is cut into chunks spread over the device's streams; events
//!   recorded behind the chunks are waited for by one completion thread, which marks the copy's
//!   request of the stage's [`Completion`] complete as soon as its last chunk has landed (or
//!   fails the completion with the driver's error).
//!
//! Driver calls go through cudarc's `result` layer where it has them (init, devices, primary
//! contexts, streams, events, copies) and through raw `sys` calls only where it does not (context
//! push/pop, host registration, combined event flags), each turned into [`StagerError::Cuda`]
//! with its `CUresult` by one function. Device pointers and streams PyTorch owns are only passed to
//! these low layers: nothing here wraps them in a cudarc type that would free them.
//!
//! # Example
//! ```
//! use stager::cuda;
//! if !cuda::is_available() {
//!     // CPU-only machine: every GPU-only feature is a no-op.
//!     assert!(cuda::CudaPinner::new().is_err());
//! }
//! ```
//!
//! # Thread Safety
//! Everything here is `Send + Sync`. Driver calls push the context they need onto the calling
//! thread's context stack and pop it afterwards, so the caller's (PyTorch's) current device is
//! never changed.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use cudarc::driver::result::{self as driver_api, DriverError};
use cudarc::driver::sys;

use crate::completion::Completion;
use crate::copy_engine::MemoryOwner;
use crate::error::{Result, StagerError};
use crate::pool::MemoryPinner;

/// Bytes per `cuMemcpyDtoHAsync` call: large copies are cut so a device's streams share them,
/// and at most 32 MiB so that the training step's own device-to-host copies on the copy engine
/// never queue behind one bulk copy of ours (torchrec#4303; DESIGN.md, "Bounded host memory").
pub const DEVICE_CHUNK_BYTES: usize = 32 << 20;
/// A completion event is recorded on a stream once this many bytes were queued behind the last.
pub const EVENT_BYTES: usize = 32 << 20;
/// Streams the copier creates per device unless told otherwise.
pub const DEFAULT_STREAMS_PER_DEVICE: usize = 2;
/// Set to `1` to make stager behave as if CUDA were absent (for tests on GPU machines).
pub const DISABLE_ENV: &str = "STAGER_DISABLE_CUDA";

struct Driver {
    device_count: usize,
}

static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// Loads and initialises the driver once; the error says why CUDA can't be used.
fn driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_init(load_driver)
        .as_ref()
        .map_err(|message| StagerError::Cuda {
            call: "cuInit",
            code: None,
            message: message.clone(),
        })
}

fn load_driver() -> std::result::Result<Driver, String> {
    if std::env::var(DISABLE_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
        return Err(format!("CUDA disabled by {DISABLE_ENV}"));
    }
    // SAFETY: is_culib_present only dlopens candidate library names and drops the handles; it
    // makes no driver call. Catching a panic keeps an unexpected loader failure out of Python.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err("the CUDA driver library (libcuda.so) was not found".into());
    }
    // A driver too old to export a symbol cudarc looks up makes cudarc panic: catch it here, at
    // the first calls, so the only outcome is "CUDA unavailable".
    catch_unwind(|| {
        driver_api::init().map_err(|e| cuda_error("cuInit", e).to_string())?;
        let count = driver_api::device::get_count()
            .map_err(|e| cuda_error("cuDeviceGetCount", e).to_string())?;
        Ok(Driver {
            device_count: count.max(0) as usize,
        })
    })
    .unwrap_or_else(|_| Err("loading the CUDA driver failed (a driver symbol is missing)".into()))
}

/// Whether a CUDA driver with at least one device can be used. Never panics.
pub fn is_available() -> bool {
    device_count() > 0
}

/// Number of CUDA devices; 0 without a usable driver.
pub fn device_count() -> usize {
    driver().map(|d| d.device_count).unwrap_or(0)
}

/// Why CUDA can't be used here, or `None` when it can.
pub fn unavailable_reason() -> Option<String> {
    match DRIVER.get_or_init(load_driver) {
        Err(message) => Some(message.clone()),
        Ok(d) if d.device_count == 0 => Some("no CUDA device found".into()),
        Ok(_) => None,
    }
}

/// A driver error as a crate error naming the call, keeping the `CUresult`.
fn cuda_error(call: &'static str, err: DriverError) -> StagerError {
    let code = err.0 as i32;
    // Asking the driver for the name needs a loaded driver (cudarc panics without one).
    let name = if driver().is_ok() {
        err.error_name().ok()
    } else {
        None
    };
    let message = match name {
        Some(name) => format!("{} ({code})", name.to_string_lossy()),
        None => format!("{:?} ({code})", err.0),
    };
    StagerError::Cuda {
        call,
        code: Some(code),
        message,
    }
}

/// A raw driver status (for the calls cudarc's `result` layer lacks) as a crate result.
fn check(call: &'static str, status: sys::CUresult) -> Result<()> {
    status.result().map_err(|err| cuda_error(call, err))
}

fn check_device(device: i32) -> Result<()> {
    let count = driver()?.device_count;
    if device < 0 || device as usize >= count {
        return Err(StagerError::Cuda {
            call: "cuDeviceGet",
            code: None,
            message: format!("device {device} does not exist ({count} CUDA devices)"),
        });
    }
    Ok(())
}

/// Primary contexts (the ones PyTorch's runtime uses), retained once and kept for the process.
static CONTEXTS: Mutex<Vec<(i32, usize)>> = Mutex::new(Vec::new());

/// The primary context of `device`, retained on first use and never released: the handle stays
/// valid for the life of the process, so pinned memory and streams can always be cleaned up.
fn primary_context(device: i32) -> Result<sys::CUcontext> {
    check_device(device)?;
    let mut contexts = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, ctx)) = contexts.iter().find(|(d, _)| *d == device) {
        return Ok(ctx as sys::CUcontext);
    }
    let dev = driver_api::device::get(device).map_err(|e| cuda_error("cuDeviceGet", e))?;
    // SAFETY: `dev` came from cuDeviceGet for a checked ordinal; the context is retained for the
    // life of the process (never released), so handles derived from it stay valid.
    let ctx = unsafe { driver_api::primary_ctx::retain(dev) }
        .map_err(|e| cuda_error("cuDevicePrimaryCtxRetain", e))?;
    contexts.push((device, ctx as usize));
    Ok(ctx)
}

/// Devices whose primary context is already active: where PyTorch (or anyone) has created
/// tensors or streams. Empty without CUDA. Never creates a context.
pub fn active_devices() -> Vec<i32> {
    let Ok(driver) = driver() else {
        return Vec::new();
    };
    (0..driver.device_count as c_int)
        .filter(|&ordinal| {
            let mut dev: sys::CUdevice = 0;
            let (mut flags, mut active): (c_uint, c_int) = (0, 0);
            // SAFETY: both calls only write through pointers to locals; the ordinal is in range.
            unsafe {
                sys::cuDeviceGet(&mut dev, ordinal) == sys::CUresult::CUDA_SUCCESS
                    && sys::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active)
                        == sys::CUresult::CUDA_SUCCESS
                    && active != 0
            }
        })
        .collect()
}

/// A context pushed onto the calling thread's stack; popped on drop, restoring the caller's.
struct ContextGuard;

impl ContextGuard {
    fn push(ctx: sys::CUcontext) -> Result<ContextGuard> {
        // SAFETY: `ctx` is a retained primary context (see `primary_context`), valid for the
        // process; pushing it doesn't disturb the contexts below it on this thread's stack.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(ctx) })?;
        Ok(ContextGuard)
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops exactly the context this guard pushed on this thread (guards are neither
        // Send nor reordered: they drop in reverse order on the thread that made them).
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// The context to pin host memory in: the primary context of the calling thread's current device,
/// else of a device already in use, else device 0's. Registration is portable, so any will do;
/// this choice avoids creating a context on a GPU the process doesn't use. Only primary contexts
/// (retained for the process) are used, so unregistering can always push the same one.
fn pinning_context() -> Result<sys::CUcontext> {
    if let Ok(Some(_current)) = driver_api::ctx::get_current() {
        let mut device: sys::CUdevice = 0;
        // SAFETY: asks the current (live) context for its device, written to a local.
        if unsafe { sys::cuCtxGetDevice(&mut device) } == sys::CUresult::CUDA_SUCCESS {
            return primary_context(device);
        }
    }
    let device = active_devices().first().copied().unwrap_or(0);
    primary_context(device)
}

/// Page-locks pool buffers with `cuMemHostRegister` (see the module docs).
///
/// # Thread Safety
/// `Send + Sync`; pools pin from acquiring threads and from background reserve threads.
pub struct CudaPinner {
    /// Registered address → context (as usize) it was registered in.
    registered: Mutex<HashMap<usize, usize>>,
}

impl CudaPinner {
    /// A pinner, or [`StagerError::Cuda`] when no CUDA device can be used.
    pub fn new() -> Result<CudaPinner> {
        if let Some(reason) = unavailable_reason() {
            return Err(StagerError::Cuda {
                call: "cuInit",
                code: None,
                message: reason,
            });
        }
        Ok(CudaPinner {
            registered: Mutex::new(HashMap::new()),
        })
    }

    /// Number of buffers currently registered by this pinner.
    pub fn registered_buffers(&self) -> usize {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl MemoryPinner for CudaPinner {
    fn pin(&self, ptr: *mut u8, len: usize) -> Result<()> {
        let ctx = pinning_context()?;
        let _guard = ContextGuard::push(ctx)?;
        // SAFETY: `[ptr, ptr + len)` is a live mapping the pool owns (the MemoryPinner contract),
        // registered once; PORTABLE without DEVICEMAP/IOMEMORY keeps it ordinary cached memory.
        check("cuMemHostRegister", unsafe {
            sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE)
        })?;
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ptr as usize, ctx as usize);
        Ok(())
    }

    fn unpin(&self, ptr: *mut u8) {
        let ctx = self
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ptr as usize));
        let Some(ctx) = ctx else { return };
        // Errors are ignored: at process exit the driver may already be shut down, and then the
        // registration is gone with it.
        if let Ok(_guard) = ContextGuard::push(ctx as sys::CUcontext) {
            // SAFETY: `ptr` was registered by `pin` above and the pool unmaps it only after this.
            unsafe { sys::cuMemHostUnregister(ptr.cast()) };
        }
    }
}

/// An event recorded on a caller's stream: "everything queued there so far". Copies submitted
/// with it start only after that point. The caller's stream itself is never retained.
///
/// # Thread Safety
/// `Send + Sync`: a mark recorded in the training thread may be used by a staging thread.
pub struct StreamMark {
    device: i32,
    ctx: usize,
    event: usize,
}

impl StreamMark {
    /// The device whose stream was marked.
    pub fn device(&self) -> i32 {
        self.device
    }

    /// Whether the marked point has been reached on the GPU (for tests).
    pub fn is_reached(&self) -> Result<bool> {
        let _guard = ContextGuard::push(self.ctx as sys::CUcontext)?;
        // SAFETY: the event was created by `DeviceCopier::mark` and is destroyed only on drop.
        match unsafe { driver_api::event::query(self.event as sys::CUevent) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(err) => Err(cuda_error("cuEventQuery", err)),
        }
    }
}

impl Drop for StreamMark {
    fn drop(&mut self) {
        if let Ok(_guard) = ContextGuard::push(self.ctx as sys::CUcontext) {
            // SAFETY: destroys the event this mark created; streams that wait on it captured its
            // state when they were told to wait, and the driver frees it once it has completed.
            let _ = unsafe { driver_api::event::destroy(self.event as sys::CUevent) };
        }
    }
}

/// One device-to-host copy: `len` bytes from device address `src` on `device` to host `dst`;
/// completes request `request` of the completion it is submitted with.
#[derive(Clone, Copy, Debug)]
pub struct DeviceCopy {
    /// The completion request this copy completes.
    pub request: usize,
    /// The CUDA device ordinal the source lives on.
    pub device: i32,
    /// Device address of the source.
    pub src: u64,
    /// Host destination.
    pub dst: *mut u8,
    /// Bytes to copy.
    pub len: usize,
}

// SAFETY: plain addresses; `DeviceCopier::submit`'s contract makes them valid until completion.
unsafe impl Send for DeviceCopy {}
// SAFETY: as above; nothing in a DeviceCopy is mutated through a shared reference.
unsafe impl Sync for DeviceCopy {}

/// Streams owned by the copier on one device.
struct DeviceStreams {
    ctx: usize,
    streams: Vec<usize>,
}

/// State shared by a submission's landing events.
struct BatchState {
    completion: Completion,
    /// Per request of the completion: chunks of this submission not yet landed.
    chunks_left: Vec<AtomicU32>,
    /// The owner of the memory the copies read and write, released with the last event.
    _owner: Option<MemoryOwner>,
}

impl BatchState {
    fn fail(&self, error: StagerError) {
        // Wakes every waiter: the batch is over, with an error they will see.
        self.completion.fail(error);
    }

    fn landed(&self, request: usize) {
        let left = &self.chunks_left[request];
        let previous = left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        if previous == 1 {
            self.completion.mark_complete(request);
        }
    }
}

/// An event behind some chunks, for the completion thread.
struct LandingEvent {
    ctx: usize,
    event: usize,
    /// One request index per chunk the event covers.
    requests: Vec<u32>,
    batch: Arc<BatchState>,
}

/// Device-to-host copies on dedicated streams. See the module docs.
///
/// # Example
/// ```no_run
/// # use stager::cuda::{DeviceCopier, DeviceCopy};
/// # use stager::completion::Completion;
/// # fn f(device_ptr: u64, torch_stream: usize, host: &mut [u8]) -> stager::Result<()> {
/// let copier = DeviceCopier::new(2)?;
/// let done = Completion::new(1);
/// let mark = copier.mark(0, torch_stream)?; // in the training thread, at stage() time
/// let copy = DeviceCopy { request: 0, device: 0, src: device_ptr, dst: host.as_mut_ptr(), len: host.len() };
/// // SAFETY: the device memory and `host` stay alive and untouched until the request completes.
/// unsafe { copier.submit(&done, &[copy], &[&mark], None)? };
/// done.wait_all(None)?;
/// # Ok(()) }
/// ```
///
/// # Thread Safety
/// `Send + Sync`; several threads may submit at once (each submission's copies are queued on the
/// device's streams in the order its calls are made). Dropping the copier waits for every copy
/// still in flight, then destroys its streams.
pub struct DeviceCopier {
    streams_per_device: usize,
    devices: Mutex<HashMap<i32, Arc<DeviceStreams>>>,
    landings: Option<Sender<LandingEvent>>,
    thread: Option<JoinHandle<()>>,
    creator: u32,
}

/// Most streams per device a copier may create.
pub const MAX_STREAMS_PER_DEVICE: usize = 64;

impl DeviceCopier {
    /// A copier with `streams_per_device` streams (at least one) on each device it copies from;
    /// streams are created on first use. [`StagerError::Cuda`] when CUDA can't be used.
    pub fn new(streams_per_device: usize) -> Result<DeviceCopier> {
        if !(1..=MAX_STREAMS_PER_DEVICE).contains(&streams_per_device) {
            return Err(StagerError::invalid(format!(
                "streams_per_device must be 1 to {MAX_STREAMS_PER_DEVICE}, got {streams_per_device}"
            )));
        }
        if let Some(reason) = unavailable_reason() {
            return Err(StagerError::Cuda {
                call: "cuInit",
                code: None,
                message: reason,
            });
        }
        let (sender, receiver) = crossbeam_channel::unbounded::<LandingEvent>();
        let thread = std::thread::Builder::new()
            .name("stager-cuda-done".into())
            .spawn(move || {
                while let Ok(item) = receiver.recv() {
                    land(item);
                }
            })
            .map_err(|source| StagerError::Cuda {
                call: "spawning the completion thread",
                code: None,
                message: source.to_string(),
            })?;
        Ok(DeviceCopier {
            streams_per_device,
            devices: Mutex::new(HashMap::new()),
            landings: Some(sender),
            thread: Some(thread),
            creator: std::process::id(),
        })
    }

    /// Fails with [`StagerError::Forked`] in a process forked after this copier was made (CUDA
    /// does not survive `fork()`, and neither does the completion thread).
    fn check_process(&self) -> Result<()> {
        let current = std::process::id();
        if current != self.creator {
            return Err(StagerError::Forked {
                what: "the CUDA copier",
                parent: self.creator,
                child: current,
            });
        }
        Ok(())
    }

    /// Records "everything queued so far" on `stream` (a raw `CUstream` of `device`, e.g.
    /// PyTorch's `torch.cuda.current_stream(device).cuda_stream`; 0 is the legacy default stream).
    /// Call it in the thread and at the moment the copy must be ordered after.
    pub fn mark(&self, device: i32, stream: usize) -> Result<StreamMark> {
        self.check_process()?;
        let ctx = primary_context(device)?;
        let _guard = ContextGuard::push(ctx)?;
        let event = driver_api::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_error("cuEventCreate", e))?;
        let mark = StreamMark {
            device,
            ctx: ctx as usize,
            event: event as usize,
        };
        // SAFETY: the event is ours; `stream` is the caller's live stream on `device` (PyTorch
        // keeps its streams for the process), only recorded on, never retained or destroyed.
        unsafe { driver_api::event::record(event, stream as sys::CUstream) }
            .map_err(|e| cuda_error("cuEventRecord", e))?;
        Ok(mark)
    }

    /// Streams of `device`, created on first use.
    fn streams(&self, device: i32) -> Result<Arc<DeviceStreams>> {
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(streams) = devices.get(&device) {
            return Ok(streams.clone());
        }
        let ctx = primary_context(device)?;
        let _guard = ContextGuard::push(ctx)?;
        let mut created = DeviceStreams {
            ctx: ctx as usize,
            streams: Vec::new(),
        };
        for _ in 0..self.streams_per_device {
            // NON_BLOCKING: no implicit sync with the legacy default stream; ordering is explicit.
            match driver_api::stream::create(driver_api::stream::StreamKind::NonBlocking) {
                Ok(stream) => created.streams.push(stream as usize),
                Err(err) => {
                    destroy_streams(&created);
                    return Err(cuda_error("cuStreamCreate", err));
                }
            }
        }
        let created = Arc::new(created);
        devices.insert(device, created.clone());
        Ok(created)
    }

    /// Queues every copy after the marks of its device and returns at once; request
    /// `copy.request` of `completion` completes when that copy has landed, and a driver error
    /// fails the completion. Zero-length copies complete at once. `owner` (what owns the device
    /// and host memory) is kept alive until the last copy has landed.
    ///
    /// Every device a copy reads from needs a mark in `marks`. Checks before queueing anything:
    /// requests exist and are named once, addresses are not null, destinations don't overlap,
    /// devices exist.
    ///
    /// # Safety
    /// For each copy, `src..src+len` must be device memory of `device` and `dst..dst+len`
    /// writable host memory (pinned for asynchrony, else the call blocks per copy); both must stay
    /// allocated, and the destination unread and unwritten by anyone else, until the request
    /// completes or the completion fails (`owner` may be what guarantees it).
    pub unsafe fn submit(
        &self,
        completion: &Completion,
        copies: &[DeviceCopy],
        marks: &[&StreamMark],
        owner: Option<MemoryOwner>,
    ) -> Result<()> {
        self.check_process()?;
        let mut chunks = vec![0u32; completion.len()];
        let mut spans = Vec::with_capacity(copies.len());
        let mut seen = vec![false; completion.len()];
        for copy in copies {
            let Some(slot) = seen.get_mut(copy.request) else {
                return Err(StagerError::invalid(format!(
                    "device copy completes request {} of a batch of {}",
                    copy.request,
                    completion.len()
                )));
            };
            if std::mem::replace(slot, true) {
                return Err(StagerError::invalid(format!(
                    "request {} is completed by two device copies",
                    copy.request
                )));
            }
            if copy.len > 0 && (copy.src == 0 || copy.dst.is_null()) {
                return Err(StagerError::invalid(format!(
                    "device copy for request {} has a null address",
                    copy.request
                )));
            }
            check_device(copy.device)?;
            if !marks.iter().any(|m| m.device == copy.device) {
                return Err(StagerError::invalid(format!(
                    "no stream mark for device {}: copies must be ordered after the caller's stream",
                    copy.device
                )));
            }
            if copy.len > 0 {
                let start = copy.dst as usize;
                let end = start.checked_add(copy.len).ok_or_else(|| {
                    StagerError::invalid(format!(
                        "device copy for request {} wraps around the address space",
                        copy.request
                    ))
                })?;
                spans.push((start, end));
            }
            chunks[copy.request] += copy.len.div_ceil(DEVICE_CHUNK_BYTES) as u32;
        }
        spans.sort_unstable();
        if spans.windows(2).any(|pair| pair[0].1 > pair[1].0) {
            return Err(StagerError::invalid(
                "device copy destinations overlap".to_string(),
            ));
        }
        let state = Arc::new(BatchState {
            completion: completion.clone(),
            chunks_left: chunks.iter().map(|&n| AtomicU32::new(n)).collect(),
            _owner: owner,
        });
        for copy in copies {
            if copy.len == 0 {
                completion.mark_complete(copy.request);
            }
        }
        let mut devices: Vec<i32> = copies.iter().map(|c| c.device).collect();
        devices.sort_unstable();
        devices.dedup();
        let mut issued: Vec<Arc<DeviceStreams>> = Vec::new();
        for device in devices {
            let result = self.streams(device).and_then(|streams| {
                issued.push(streams.clone());
                // SAFETY: forwarded from this function's contract.
                unsafe { self.issue(&streams, device, copies, marks, &state) }
            });
            if let Err(err) = result {
                // Copies already queued may still write into the destinations: wait for them
                // before the caller gets the error (and frees its buffers).
                for streams in &issued {
                    synchronize_streams(streams);
                }
                state.fail(err.duplicate());
                return Err(err);
            }
        }
        Ok(())
    }

    /// Queues `device`'s share of `copies` on its streams, behind the marks.
    ///
    /// # Safety
    /// See [`DeviceCopier::submit`].
    unsafe fn issue(
        &self,
        streams: &DeviceStreams,
        device: i32,
        copies: &[DeviceCopy],
        marks: &[&StreamMark],
        state: &Arc<BatchState>,
    ) -> Result<()> {
        let _guard = ContextGuard::push(streams.ctx as sys::CUcontext)?;
        for mark in marks.iter().filter(|m| m.device == device) {
            for &stream in &streams.streams {
                // SAFETY: our stream and the mark's event both live in this device's context.
                unsafe {
                    driver_api::stream::wait_event(
                        stream as sys::CUstream,
                        mark.event as sys::CUevent,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .map_err(|e| cuda_error("cuStreamWaitEvent", e))?;
            }
        }
        let count = streams.streams.len();
        let mut queued = vec![0usize; count]; // bytes queued per stream in this submission
        let mut since_event = vec![0usize; count];
        let mut pending: Vec<Vec<u32>> = vec![Vec::new(); count];
        for copy in copies.iter().filter(|c| c.device == device && c.len > 0) {
            let mut offset = 0;
            while offset < copy.len {
                let len = (copy.len - offset).min(DEVICE_CHUNK_BYTES);
                let lane = (0..count).min_by_key(|&i| queued[i]).unwrap_or(0);
                // SAFETY: the caller guarantees both ranges (see `submit`); offset + len <= len,
                // so the slice lies inside the destination, which nobody else touches until the
                // request completes.
                unsafe {
                    let dst = std::slice::from_raw_parts_mut(copy.dst.add(offset), len);
                    driver_api::memcpy_dtoh_async(
                        dst,
                        copy.src + offset as u64,
                        streams.streams[lane] as sys::CUstream,
                    )
                }
                .map_err(|e| cuda_error("cuMemcpyDtoHAsync", e))?;
                queued[lane] += len;
                since_event[lane] += len;
                pending[lane].push(copy.request as u32);
                offset += len;
                if since_event[lane] >= EVENT_BYTES {
                    since_event[lane] = 0;
                    let requests = std::mem::take(&mut pending[lane]);
                    self.record_completion(streams, lane, requests, state)?;
                }
            }
        }
        for (lane, requests) in pending.into_iter().enumerate() {
            if !requests.is_empty() {
                self.record_completion(streams, lane, requests, state)?;
            }
        }
        Ok(())
    }

    /// Records an event behind the chunks of `requests` on stream `lane` and hands it to the
    /// completion thread. Runs with the device's context pushed.
    fn record_completion(
        &self,
        streams: &DeviceStreams,
        lane: usize,
        requests: Vec<u32>,
        state: &Arc<BatchState>,
    ) -> Result<()> {
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: creates an event in the current (pushed) context through a pointer to a local.
        // BLOCKING_SYNC: the completion thread sleeps in cuEventSynchronize instead of spinning.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(
                &mut event,
                (sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint)
                    | (sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as c_uint),
            )
        })?;
        // SAFETY: our event on our stream, both in the pushed context.
        let recorded = check("cuEventRecord", unsafe {
            sys::cuEventRecord(event, streams.streams[lane] as sys::CUstream)
        });
        if let Err(err) = recorded {
            // SAFETY: the event was created just above and is referenced nowhere else.
            unsafe { sys::cuEventDestroy_v2(event) };
            return Err(err);
        }
        let item = LandingEvent {
            ctx: streams.ctx,
            event: event as usize,
            requests,
            batch: state.clone(),
        };
        self.landings
            .as_ref()
            .expect("copier is running")
            .send(item)
            .map_err(|_| StagerError::Cuda {
                call: "completion thread",
                code: None,
                message: "the completion thread has exited".into(),
            })
    }
}

/// Waits for one landing event, then reports its chunks (completion thread).
fn land(item: LandingEvent) {
    let result = ContextGuard::push(item.ctx as sys::CUcontext).and_then(|guard| {
        // SAFETY: the event was created and recorded by `record_completion` and is destroyed
        // only here, after the wait.
        let waited = unsafe { driver_api::event::synchronize(item.event as sys::CUevent) };
        // SAFETY: as above; nothing refers to the event after this.
        let _ = unsafe { driver_api::event::destroy(item.event as sys::CUevent) };
        drop(guard);
        waited.map_err(|e| cuda_error("cuEventSynchronize", e))
    });
    match result {
        Ok(()) => {
            for &request in &item.requests {
                item.batch.landed(request as usize);
            }
        }
        Err(err) => item.batch.fail(err),
    }
}

fn synchronize_streams(streams: &DeviceStreams) {
    if let Ok(_guard) = ContextGuard::push(streams.ctx as sys::CUcontext) {
        for &stream in &streams.streams {
            // SAFETY: our own live stream, in the pushed context.
            let _ = unsafe { driver_api::stream::synchronize(stream as sys::CUstream) };
        }
    }
}

fn destroy_streams(streams: &DeviceStreams) {
    if let Ok(_guard) = ContextGuard::push(streams.ctx as sys::CUcontext) {
        for &stream in &streams.streams {
            // SAFETY: our own stream; every copy on it has completed (the caller waited) and no
            // one else holds it.
            let _ = unsafe { driver_api::stream::destroy(stream as sys::CUstream) };
        }
    }
}

impl Drop for DeviceCopier {
    fn drop(&mut self) {
        // The completion thread drains what is queued (every copy in flight), then exits.
        drop(self.landings.take());
        if self.check_process().is_err() {
            // A forked child has neither the completion thread nor usable CUDA streams.
            std::mem::forget(self.thread.take());
            std::mem::forget(std::mem::take(
                &mut *self.devices.lock().unwrap_or_else(|p| p.into_inner()),
            ));
            return;
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let devices = std::mem::take(&mut *self.devices.lock().unwrap_or_else(|p| p.into_inner()));
        for streams in devices.values() {
            synchronize_streams(streams);
            destroy_streams(streams);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{HostPool, PoolOptions};

    #[test]
    fn detection_never_panics_and_agrees_with_itself() {
        let available = is_available();
        assert_eq!(available, device_count() > 0);
        assert_eq!(available, unavailable_reason().is_none());
        if !available {
            assert!(active_devices().is_empty());
            let reason = unavailable_reason().unwrap();
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn without_cuda_pinner_and_copier_refuse_with_a_cuda_error() {
        if is_available() {
            return;
        }
        let err = CudaPinner::new().err().expect("no CUDA here");
        assert!(matches!(err, StagerError::Cuda { .. }), "{err}");
        assert!(err.to_string().contains("CUDA"), "{err}");
        let err = DeviceCopier::new(2).err().expect("no CUDA here");
        assert!(matches!(err, StagerError::Cuda { .. }), "{err}");
        assert!(primary_context(0).is_err());
    }

    #[test]
    fn pool_without_pinner_is_unpinned() {
        // What the bindings do when CUDA is absent: no pinner, a working pool.
        let pinner = CudaPinner::new()
            .ok()
            .map(|p| Arc::new(p) as Arc<dyn MemoryPinner>);
        let pool = HostPool::new(PoolOptions {
            pinner: pinner.clone(),
            ..Default::default()
        });
        pool.reserve(3 << 20, 1).unwrap();
        let buffer = pool.acquire(3 << 20).unwrap();
        assert_eq!(buffer.is_pinned(), pinner.is_some());
        assert_eq!(pool.stats().reuses, 1);
    }

    #[test]
    fn batch_accounting_completes_requests_after_their_last_chunk() {
        let completion = Completion::new(3);
        let state = BatchState {
            completion: completion.clone(),
            chunks_left: [2u32, 1, 0].iter().map(|&n| AtomicU32::new(n)).collect(),
            _owner: None,
        };
        completion.mark_complete(2);
        state.landed(0);
        assert!(!completion.is_done(0));
        state.landed(1);
        assert!(completion.is_done(1));
        state.landed(0);
        assert!(completion.wait_all(None).unwrap());
    }

    #[test]
    fn a_failed_batch_wakes_waiters_with_the_error() {
        let completion = Completion::new(2);
        let state = Arc::new(BatchState {
            completion: completion.clone(),
            chunks_left: vec![AtomicU32::new(3), AtomicU32::new(1)],
            _owner: None,
        });
        let waiter = {
            let completion = completion.clone();
            std::thread::spawn(move || completion.wait(0, None))
        };
        state.fail(cuda_error(
            "cuEventSynchronize",
            DriverError(sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
        ));
        let err = waiter.join().unwrap().expect_err("failed batch");
        assert!(err.to_string().contains("cuEventSynchronize"), "{err}");
        assert_eq!(err.cuda_code(), Some(700));
        assert!(completion.all_done());
        assert!(completion
            .wait_all(Some(
                std::time::Instant::now() + std::time::Duration::from_secs(1)
            ))
            .is_err());
    }
}
