//! Host memory pool: page-aligned buffers that live across checkpoints.
//!
//! A checkpoint is staged into one [`HostBuffer`] taken from a [`HostPool`]. When every user of the
//! buffer is gone (in Python: every staged tensor that points into it), the buffer's memory goes back
//! to the pool's free list with its pages still faulted in (and still pinned, when a
//! [`MemoryPinner`] is installed), so the next stage of the same size costs neither `mmap` nor a
//! page fault. A buffer that is still referenced is never handed out again: results of earlier stages
//! can't be overwritten, however stages overlap.
//!
//! Features:
//! - private anonymous memory, or shared memory (`memfd`, one descriptor per buffer, never one per
//!   tensor), for handing staged data to another process;
//! - an optional byte budget, checked before anything is copied;
//! - [`HostPool::reserve`] pre-faults (and pins) memory in the background, so the first checkpoint
//!   runs at the speed of the later ones.
//!
//! # Example
//! ```
//! use stager::pool::{HostPool, PoolOptions};
//! let pool = HostPool::new(PoolOptions::default());
//! let buffer = pool.acquire(1 << 20).unwrap();
//! assert!(buffer.len() >= 1 << 20);
//! drop(buffer); // back to the pool, pages kept
//! assert_eq!(pool.stats().free_bytes, pool.stats().allocated_bytes);
//! ```
//!
//! # Thread Safety
//! [`HostPool`] is `Send + Sync` and cheap to clone (an `Arc`); any thread may acquire. A
//! [`HostBuffer`] is `Send + Sync`: it hands out raw pointers, and whoever writes through them (the
//! copy engine) is responsible for not racing with readers, which the stagers guarantee by
//! publishing a buffer only after its copies completed.
//!
//! After `fork()` the child keeps using the pool safely: memory mapped by the parent is never
//! handed out again in the child (a shared-memory buffer would still be the parent's bytes), a
//! reservation thread that did not survive the fork is not waited for, and the child neither
//! pins nor unpins (CUDA does not work in a forked child).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Result, StagerError};

/// Page-locks host memory so a DMA engine can read or write it directly (CUDA's
/// `cuMemHostRegister`). Installed into a pool when CUDA is present.
pub trait MemoryPinner: Send + Sync {
    /// Page-locks `[ptr, ptr + len)`. Called once per buffer lifetime.
    fn pin(&self, ptr: *mut u8, len: usize) -> Result<()>;
    /// Undoes [`MemoryPinner::pin`] before the memory is unmapped.
    fn unpin(&self, ptr: *mut u8);
}

/// How a pool allocates its buffers.
#[derive(Clone, Default)]
pub struct PoolOptions {
    /// Back buffers with a shared-memory file (`memfd`) instead of private anonymous memory.
    pub shared: bool,
    /// Upper bound on the bytes the pool holds (in use + free); `None` means unbounded.
    pub budget_bytes: Option<usize>,
    /// Page-locks every new buffer once, for fast device-to-host copies.
    pub pinner: Option<Arc<dyn MemoryPinner>>,
}

/// Counters describing what the pool holds, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of every buffer the pool has mapped and not yet released (in use + free).
    pub allocated_bytes: usize,
    /// Bytes of buffers waiting in the free list.
    pub free_bytes: usize,
    /// Number of buffers currently handed out.
    pub buffers_in_use: usize,
    /// How many times the pool had to map new memory.
    pub allocations: u64,
    /// How many acquisitions were served from the free list.
    pub reuses: u64,
    /// The most bytes the pool held mapped at once (`allocated_bytes`' high-water mark) since it
    /// was made or since [`HostPool::reset_peak`]: the host memory of a checkpoint, when reset
    /// at its start.
    pub peak_bytes: usize,
}

/// One mapping of host memory. Owns the mapping, the memfd and the pinning.
struct Slab {
    ptr: NonNull<u8>,
    capacity: usize,
    shared_fd: Option<OwnedFd>,
    pinner: Option<Arc<dyn MemoryPinner>>,
    /// The process that mapped it: a forked child must not reuse or unpin it.
    owner_pid: u32,
    /// What must live exactly as long as the mapping (a named segment's lock, see `shm.rs`).
    _keep_alive: Option<Arc<dyn Send + Sync>>,
}

// SAFETY: a slab is a plain owned memory mapping; the pointer is not tied to any thread.
unsafe impl Send for Slab {}
// SAFETY: as above; shared access only reads the pointer and sizes.
unsafe impl Sync for Slab {}

impl Slab {
    /// Maps `capacity` bytes; pins them unless this process is a fork of `creator` (the pool's).
    fn map(capacity: usize, options: &PoolOptions, creator: u32) -> Result<Slab> {
        let alloc_err = |source| StagerError::Allocation {
            bytes: capacity,
            source,
        };
        let mut shared_fd = None;
        let (flags, fd) = if options.shared {
            // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
            let raw = unsafe { libc::memfd_create(c"stager-pool".as_ptr(), libc::MFD_CLOEXEC) };
            if raw < 0 {
                return Err(alloc_err(std::io::Error::last_os_error()));
            }
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate(owned.as_raw_fd(), capacity as libc::off_t) } != 0 {
                return Err(alloc_err(std::io::Error::last_os_error()));
            }
            let fd = owned.as_raw_fd();
            shared_fd = Some(owned);
            (libc::MAP_SHARED, fd)
        } else {
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
        };
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(alloc_err(std::io::Error::last_os_error()));
        }
        if capacity >= HUGE_PAGE {
            // Fewer, larger page faults on first touch. Advice only: failure changes nothing.
            // SAFETY: advises on the mapping made just above.
            unsafe { libc::madvise(ptr, capacity, libc::MADV_HUGEPAGE) };
        }
        let mut slab = Slab {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            capacity,
            shared_fd,
            pinner: None,
            owner_pid: std::process::id(),
            _keep_alive: None,
        };
        if let Some(pinner) = options.pinner.as_ref().filter(|_| !forked_from(creator)) {
            pinner.pin(slab.ptr.as_ptr(), capacity)?;
            slab.pinner = Some(pinner.clone());
        }
        Ok(slab)
    }

    /// Touches every page from `threads` threads so later copies find them mapped.
    fn prefault(&self, threads: usize) {
        let base = self.ptr.as_ptr() as usize;
        let pages = self.capacity / page_size();
        let per_thread = pages.div_ceil(threads.max(1));
        std::thread::scope(|scope| {
            for first in (0..pages).step_by(per_thread.max(1)) {
                let last = (first + per_thread).min(pages);
                scope.spawn(move || {
                    for page in first..last {
                        // SAFETY: the page lies inside this slab's mapping, which outlives the scope;
                        // nobody else holds the slab while it is being reserved.
                        unsafe {
                            std::ptr::write_volatile((base + page * page_size()) as *mut u8, 0)
                        };
                    }
                });
            }
        });
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        if let Some(pinner) = self
            .pinner
            .as_ref()
            .filter(|_| !forked_from(self.owner_pid))
        {
            pinner.unpin(self.ptr.as_ptr());
        }
        // SAFETY: unmaps exactly the mapping this slab created; no HostBuffer refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.capacity) };
    }
}

const HUGE_PAGE: usize = 2 << 20;

/// Whether this process is not `pid` (a child forked from it).
fn forked_from(pid: u32) -> bool {
    std::process::id() != pid
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// A free buffer up to this many bytes larger than a request is always good enough for it (see
/// `HostPool::would_waste`).
const WASTE_SLACK: usize = 4 << 20;

/// Most threads [`HostPool::reserve`] pre-faults with (more would only contend for the same pages).
pub const MAX_PREFAULT_THREADS: usize = 64;

/// The mapping size for `nbytes`: whole pages (huge pages from 2 MiB); an error when that does
/// not fit the address space.
fn round_capacity(nbytes: usize) -> Result<usize> {
    let unit = if nbytes >= HUGE_PAGE {
        HUGE_PAGE
    } else {
        page_size()
    };
    nbytes
        .max(1)
        .div_ceil(unit)
        .checked_mul(unit)
        .filter(|&capacity| capacity <= isize::MAX as usize)
        .ok_or_else(|| {
            StagerError::invalid(format!(
                "cannot map {nbytes} bytes: more than the address space holds"
            ))
        })
}

struct PoolState {
    free: Vec<Slab>,
    stats: PoolStats,
    reserving: Vec<JoinHandle<Result<()>>>,
}

struct PoolShared {
    options: PoolOptions,
    state: Mutex<PoolState>,
    /// The process that made the pool.
    creator: u32,
}

/// A pool of reusable page-aligned host buffers. See the module docs.
#[derive(Clone)]
pub struct HostPool {
    shared: Arc<PoolShared>,
}

impl HostPool {
    /// Creates an empty pool; nothing is mapped until the first acquire or reserve.
    pub fn new(options: PoolOptions) -> HostPool {
        HostPool {
            shared: Arc::new(PoolShared {
                options,
                state: Mutex::new(PoolState {
                    free: Vec::new(),
                    stats: PoolStats::default(),
                    reserving: Vec::new(),
                }),
                creator: std::process::id(),
            }),
        }
    }

    /// Whether buffers are backed by shared memory.
    pub fn is_shared(&self) -> bool {
        self.shared.options.shared
    }

    /// Whether buffers are page-locked for device copies.
    pub fn is_pinned(&self) -> bool {
        self.shared.options.pinner.is_some()
    }

    /// Hands out a buffer of at least `nbytes`, reusing the smallest free buffer that fits, or
    /// mapping a new one. Fails with [`StagerError::BudgetExceeded`] when the budget can't hold it
    /// even after releasing every free buffer; nothing is copied before this check.
    pub fn acquire(&self, nbytes: usize) -> Result<HostBuffer> {
        self.finish_reservations()?;
        let capacity = round_capacity(nbytes)?;
        let mut state = self.lock();
        let inherited = self.forget_inherited(&mut state);
        let best_fit = state
            .free
            .iter()
            .enumerate()
            .filter(|(_, slab)| slab.capacity >= nbytes.max(1))
            .min_by_key(|(_, slab)| slab.capacity)
            .map(|(index, slab)| (index, slab.capacity))
            .filter(|&(_, fit)| !self.would_waste(&state, fit, capacity))
            .map(|(index, _)| index);
        if let Some(index) = best_fit {
            let slab = state.free.swap_remove(index);
            state.stats.free_bytes -= slab.capacity;
            state.stats.buffers_in_use += 1;
            state.stats.reuses += 1;
            return Ok(HostBuffer::new(slab, nbytes, self.shared.clone()));
        }
        let released = self.make_room(&mut state, capacity)?;
        drop(state);
        drop((released, inherited)); // unmap outside the lock
        let slab = Slab::map(capacity, &self.shared.options, self.shared.creator)?;
        let mut state = self.lock();
        state.stats.allocated_bytes += capacity;
        state.stats.peak_bytes = state.stats.peak_bytes.max(state.stats.allocated_bytes);
        state.stats.allocations += 1;
        state.stats.buffers_in_use += 1;
        Ok(HostBuffer::new(slab, nbytes, self.shared.clone()))
    }

    /// Maps, pre-faults (and pins) a free buffer of `nbytes` in a background thread using
    /// `threads` threads, so a following stage of that size takes it without any page fault.
    /// The next [`HostPool::acquire`] waits for it. Budget errors are reported right away.
    pub fn reserve(&self, nbytes: usize, threads: usize) -> Result<()> {
        let capacity = round_capacity(nbytes)?;
        let threads = threads.clamp(1, MAX_PREFAULT_THREADS);
        self.finish_reservations_if_forked();
        let mut state = self.lock();
        let inherited = self.forget_inherited(&mut state);
        let fits = |slab: &Slab| {
            slab.capacity >= nbytes && !self.would_waste(&state, slab.capacity, capacity)
        };
        if state.free.iter().any(fits) {
            drop(state);
            drop(inherited);
            return Ok(());
        }
        let released = self.make_room(&mut state, capacity)?;
        drop(inherited);
        // Count it now so concurrent acquisitions see the budget it will take.
        state.stats.allocated_bytes += capacity;
        state.stats.peak_bytes = state.stats.peak_bytes.max(state.stats.allocated_bytes);
        drop(released);
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("stager-reserve".into())
            .spawn(move || {
                let slab = match Slab::map(capacity, &shared.options, shared.creator) {
                    Ok(slab) => slab,
                    Err(err) => {
                        shared.state.lock().unwrap().stats.allocated_bytes -= capacity;
                        return Err(err);
                    }
                };
                slab.prefault(threads);
                let mut state = shared.state.lock().unwrap();
                state.stats.allocations += 1;
                state.stats.free_bytes += slab.capacity;
                state.free.push(slab);
                Ok(())
            })
            .map_err(|source| StagerError::Allocation {
                bytes: capacity,
                source,
            })?;
        state.reserving.push(handle);
        Ok(())
    }

    /// Waits until `deadline` for the reservations still running: `Ok(true)` once none is left
    /// (the first error of one that failed), `Ok(false)` if some still run at the deadline.
    pub fn wait_reservations(&self, deadline: Option<Instant>) -> Result<bool> {
        loop {
            let pending = std::mem::take(&mut self.lock().reserving);
            if pending.is_empty() {
                return Ok(true);
            }
            if forked_from(self.shared.creator) {
                std::mem::forget(pending);
                return Ok(true);
            }
            let (finished, running): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|handle| handle.is_finished());
            self.lock().reserving.extend(running);
            for handle in finished {
                handle
                    .join()
                    .map_err(|_| StagerError::Failed("a reservation thread panicked".into()))??;
            }
            if self.lock().reserving.is_empty() {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for every [`HostPool::reserve`] still running.
    pub fn finish_reservations(&self) -> Result<()> {
        let pending = std::mem::take(&mut self.lock().reserving);
        if forked_from(self.shared.creator) {
            // The reservation threads stayed in the parent; joining them here would never return.
            std::mem::forget(pending);
            return Ok(());
        }
        for handle in pending {
            handle
                .join()
                .map_err(|_| StagerError::Failed("a reservation thread panicked".into()))??;
        }
        Ok(())
    }

    /// Unmaps every free buffer, returning the memory to the operating system.
    pub fn trim(&self) {
        let _ = self.finish_reservations();
        let mut state = self.lock();
        let free = std::mem::take(&mut state.free);
        state.stats.allocated_bytes -= state.stats.free_bytes;
        state.stats.free_bytes = 0;
        drop(state);
        drop(free);
    }

    /// Starts a new high-water mark ([`PoolStats::peak_bytes`]) at what the pool holds now.
    pub fn reset_peak(&self) {
        let mut state = self.lock();
        state.stats.peak_bytes = state.stats.allocated_bytes;
    }

    /// A snapshot of the pool's counters.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A poisoned lock only means another thread panicked while holding plain counters.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn finish_reservations_if_forked(&self) {
        if forked_from(self.shared.creator) {
            let _ = self.finish_reservations();
        }
    }

    /// Whether handing a free buffer of `fit` bytes to a request of `capacity` would waste it:
    /// most of it unused, while a buffer of the right size can be mapped without giving anything
    /// back (the budget has room). A small receive must not take the large buffer the next full
    /// stage needs, or that stage faults in fresh memory.
    fn would_waste(&self, state: &PoolState, fit: usize, capacity: usize) -> bool {
        let generous = capacity
            .saturating_mul(2)
            .max(capacity.saturating_add(WASTE_SLACK));
        if fit <= generous {
            return false;
        }
        match self.shared.options.budget_bytes {
            None => true,
            Some(budget) => state.stats.allocated_bytes.saturating_add(capacity) <= budget,
        }
    }

    /// In a forked child: takes the free buffers the parent mapped out of the free list (they are
    /// unmapped, in this process only, by the caller), so they are never handed out here.
    fn forget_inherited(&self, state: &mut PoolState) -> Vec<Slab> {
        if !forked_from(self.shared.creator) {
            return Vec::new();
        }
        let current = std::process::id();
        let (inherited, own): (Vec<Slab>, Vec<Slab>) = std::mem::take(&mut state.free)
            .into_iter()
            .partition(|slab| slab.owner_pid != current);
        state.free = own;
        for slab in &inherited {
            state.stats.free_bytes -= slab.capacity;
            state.stats.allocated_bytes -= slab.capacity;
        }
        inherited
    }

    /// Releases free buffers (largest first) until `capacity` more bytes fit the budget.
    /// Returns the released slabs so the caller unmaps them after dropping the lock.
    fn make_room(&self, state: &mut PoolState, capacity: usize) -> Result<Vec<Slab>> {
        let Some(budget) = self.shared.options.budget_bytes else {
            return Ok(Vec::new());
        };
        let in_use = state.stats.allocated_bytes - state.stats.free_bytes;
        if in_use + capacity > budget {
            return Err(StagerError::BudgetExceeded {
                needed: capacity,
                budget,
                in_use,
            });
        }
        let mut released = Vec::new();
        state.free.sort_by_key(|slab| slab.capacity);
        while state.stats.allocated_bytes + capacity > budget {
            let slab = state.free.pop().expect("free bytes cover the overshoot");
            state.stats.free_bytes -= slab.capacity;
            state.stats.allocated_bytes -= slab.capacity;
            released.push(slab);
        }
        Ok(released)
    }
}

/// A buffer handed out by a [`HostPool`]; goes back to the pool's free list when dropped.
///
/// # Thread Safety
/// `Send + Sync`. The buffer hands out raw pointers to its bytes; writers and readers must be
/// ordered by the caller (the copy engine's completion does that).
pub struct HostBuffer {
    slab: Option<Slab>,
    len: usize,
    /// The pool it returns to; None for a mapping of a named segment (unmapped on drop).
    pool: Option<Arc<PoolShared>>,
}

impl HostBuffer {
    fn new(slab: Slab, len: usize, pool: Arc<PoolShared>) -> HostBuffer {
        HostBuffer {
            slab: Some(slab),
            len,
            pool: Some(pool),
        }
    }

    /// A buffer over a mapping made elsewhere (a named shared-memory segment, `shm.rs`):
    /// `[ptr, ptr + capacity)` is unpinned and unmapped when the buffer is dropped, and
    /// `keep_alive` is dropped after that. `pinner` page-locks it first (a failure is returned
    /// and the mapping is unmapped).
    ///
    /// # Safety
    /// `ptr` must be a page-aligned mapping of `capacity` bytes made by `mmap` that nothing
    /// else unmaps, with `len <= capacity`.
    pub(crate) unsafe fn from_mapping(
        ptr: NonNull<u8>,
        capacity: usize,
        len: usize,
        keep_alive: Arc<dyn Send + Sync>,
        pinner: Option<Arc<dyn MemoryPinner>>,
    ) -> Result<HostBuffer> {
        let mut slab = Slab {
            ptr,
            capacity,
            shared_fd: None,
            pinner: None,
            owner_pid: std::process::id(),
            _keep_alive: Some(keep_alive),
        };
        if let Some(pinner) = pinner {
            pinner.pin(ptr.as_ptr(), capacity)?;
            slab.pinner = Some(pinner);
        }
        Ok(HostBuffer {
            slab: Some(slab),
            len,
            pool: None,
        })
    }

    fn slab(&self) -> &Slab {
        self.slab.as_ref().expect("slab present until drop")
    }

    /// The bytes requested at acquire time.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped size, a multiple of the page size, at least `len()`.
    pub fn capacity(&self) -> usize {
        self.slab().capacity
    }

    /// Start of the buffer; page-aligned.
    pub fn as_ptr(&self) -> *mut u8 {
        self.slab().ptr.as_ptr()
    }

    /// The memfd backing a shared-memory buffer.
    pub fn shared_fd(&self) -> Option<i32> {
        self.slab().shared_fd.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Whether the buffer is page-locked for device copies.
    pub fn is_pinned(&self) -> bool {
        self.slab().pinner.is_some()
    }

    /// Reads the buffer. The caller must know that no copy into it is still running.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slab maps at least `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// Writes the buffer through a unique reference.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` rules out other safe access.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        let Some(slab) = self.slab.take() else { return };
        let Some(pool) = self.pool.as_ref() else {
            drop(slab); // a segment's mapping: unmapped, then its lock released
            return;
        };
        let mut state = pool
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        state.stats.buffers_in_use -= 1;
        if forked_from(slab.owner_pid) {
            // Mapped by the parent: not ours to hand out again (see the module docs).
            state.stats.allocated_bytes -= slab.capacity;
            drop(state);
            drop(slab);
            return;
        }
        state.stats.free_bytes += slab.capacity;
        state.free.push(slab);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffer_is_reused_without_new_mapping() {
        let pool = HostPool::new(PoolOptions::default());
        let first = pool.acquire(3 << 20).unwrap();
        let address = first.as_ptr();
        drop(first);
        let second = pool.acquire(3 << 20).unwrap();
        assert_eq!(second.as_ptr(), address);
        let stats = pool.stats();
        assert_eq!((stats.allocations, stats.reuses), (1, 1));
    }

    #[test]
    fn live_buffers_are_never_handed_out_twice() {
        let pool = HostPool::new(PoolOptions::default());
        let a = pool.acquire(4096).unwrap();
        let b = pool.acquire(4096).unwrap();
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(pool.stats().buffers_in_use, 2);
    }

    #[test]
    fn best_fit_prefers_the_smallest_free_buffer() {
        let pool = HostPool::new(PoolOptions::default());
        let big = pool.acquire(8 << 20).unwrap();
        let small = pool.acquire(1 << 20).unwrap();
        let small_address = small.as_ptr();
        drop(big);
        drop(small);
        assert_eq!(pool.acquire(1 << 20).unwrap().as_ptr(), small_address);
    }

    #[test]
    fn a_small_request_does_not_take_a_much_larger_free_buffer() {
        let pool = HostPool::new(PoolOptions::default());
        let big = pool.acquire(64 << 20).unwrap();
        let big_address = big.as_ptr();
        drop(big);
        let small = pool.acquire(1 << 20).unwrap();
        assert_ne!(
            small.as_ptr(),
            big_address,
            "the 64 MiB buffer stays for the next large request"
        );
        let again = pool.acquire(64 << 20).unwrap();
        assert_eq!(again.as_ptr(), big_address);
        // Close enough in size (or no budget left for a new one): reused.
        drop(again);
        assert_eq!(pool.acquire(40 << 20).unwrap().as_ptr(), big_address);
        let tight = HostPool::new(PoolOptions {
            budget_bytes: Some(64 << 20),
            ..Default::default()
        });
        let big = tight.acquire(64 << 20).unwrap();
        let big_address = big.as_ptr();
        drop(big);
        assert_eq!(tight.acquire(1 << 20).unwrap().as_ptr(), big_address);
    }

    #[test]
    fn budget_rejects_before_mapping_and_reclaims_free_buffers() {
        let pool = HostPool::new(PoolOptions {
            budget_bytes: Some(8 << 20),
            ..Default::default()
        });
        let held = pool.acquire(6 << 20).unwrap();
        let err = pool.acquire(4 << 20).err().expect("over budget");
        assert!(matches!(err, StagerError::BudgetExceeded { .. }), "{err}");
        assert!(err.to_string().contains("budget"));
        drop(held);
        // The free 6 MiB buffer is unmapped to make room for a larger one.
        let bigger = pool.acquire(8 << 20).unwrap();
        assert_eq!(pool.stats().allocated_bytes, bigger.capacity());
    }

    #[test]
    fn shared_buffers_use_one_descriptor_each() {
        let pool = HostPool::new(PoolOptions {
            shared: true,
            ..Default::default()
        });
        let mut buffer = pool.acquire(10_000).unwrap();
        let fd = buffer.shared_fd().expect("memfd");
        buffer.as_mut_slice()[9_999] = 7;
        // The memfd sees the same bytes as the mapping.
        let mut byte = [0u8; 1];
        // SAFETY: pread into a local array from a descriptor the buffer keeps open.
        let read = unsafe { libc::pread(fd, byte.as_mut_ptr().cast(), 1, 9_999) };
        assert_eq!((read, byte[0]), (1, 7));
    }

    #[test]
    fn reserve_prefaults_a_buffer_that_acquire_reuses() {
        let pool = HostPool::new(PoolOptions::default());
        pool.reserve(5 << 20, 2).unwrap();
        let buffer = pool.acquire(5 << 20).unwrap();
        let stats = pool.stats();
        assert_eq!((stats.allocations, stats.reuses), (1, 1));
        assert!(buffer.capacity() >= 5 << 20);
    }

    #[test]
    fn concurrent_acquire_and_release_keep_counters_consistent() {
        let pool = HostPool::new(PoolOptions::default());
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let pool = pool.clone();
                scope.spawn(move || {
                    for round in 0..50 {
                        let mut buffer = pool.acquire(4096 * (1 + round % 3)).unwrap();
                        buffer.as_mut_slice()[0] = round as u8;
                    }
                });
            }
        });
        let stats = pool.stats();
        assert_eq!(stats.buffers_in_use, 0);
        assert_eq!(stats.free_bytes, stats.allocated_bytes);
        assert!(stats.allocations <= 12, "{stats:?}");
    }
}
