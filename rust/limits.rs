//! The machine's copy limits: what a plain parallel `memcpy` of one big buffer achieves, as the
//! yardstick `stager bench` holds the stagers against.
//!
//! Deliberately independent of the staging engine: no pool, no copy engine, no chunking, no
//! queues. One source buffer is split into `threads` equal contiguous parts and each part is copied
//! by its own scoped thread with `copy_nonoverlapping`, into one of three kinds of destination:
//!
//! - [`Target::Touched`]: memory that was written once before timing, so no page faults remain
//!   (the limit for repeat calls, whose pool memory is already faulted in);
//! - [`Target::FreshPrivate`]: a new private anonymous `mmap` per sample (the limit for a first
//!   call: every page is faulted in by the copy itself);
//! - [`Target::FreshShared`]: a new `memfd` mapped shared per sample (the first-call limit for
//!   `use_shared_memory=True`).
//!
//! Fresh mappings get `MADV_HUGEPAGE`, the cheapest way the kernel offers to fault in memory
//! (advice only: where transparent huge pages are off it changes nothing). Mapping and unmapping
//! are not timed; only the copy (with its page faults) is.
//!
//! # Example
//! ```
//! use stager::limits::{copy_limit, Target};
//! let seconds = copy_limit(4 << 20, 2, Target::Touched, 3).unwrap();
//! assert_eq!(seconds.len(), 3);
//! assert!(seconds.iter().all(|&s| s > 0.0));
//! ```
//!
//! # Thread Safety
//! Every call owns its buffers; calls may run concurrently (they then share the memory bus, which
//! is rarely what a measurement wants).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use crate::copy_engine::copy_bytes;
use crate::error::{Result, StagerError};

/// Where the copy lands. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Memory written once before the timed copies.
    Touched,
    /// A fresh private anonymous mapping per sample.
    FreshPrivate,
    /// A fresh shared-memory (`memfd`) mapping per sample.
    FreshShared,
}

impl Target {
    /// Parses `"touched"`, `"private"` or `"shared"`.
    pub fn parse(name: &str) -> Option<Target> {
        match name {
            "touched" => Some(Target::Touched),
            "private" | "fresh" | "fresh_private" => Some(Target::FreshPrivate),
            "shared" | "fresh_shared" => Some(Target::FreshShared),
            _ => None,
        }
    }
}

/// One read-write mapping, unmapped (and its memfd closed) on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    _fd: Option<OwnedFd>,
}

impl Mapping {
    fn new(len: usize, shared: bool) -> Result<Mapping> {
        let len = len.max(1);
        let alloc_err = |source| StagerError::Allocation { bytes: len, source };
        let (flags, fd) = if shared {
            // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd or -1.
            let raw = unsafe { libc::memfd_create(c"stager-limit".as_ptr(), libc::MFD_CLOEXEC) };
            if raw < 0 {
                return Err(alloc_err(std::io::Error::last_os_error()));
            }
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate(owned.as_raw_fd(), len as libc::off_t) } != 0 {
                return Err(alloc_err(std::io::Error::last_os_error()));
            }
            (libc::MAP_SHARED, Some(owned))
        } else {
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
        };
        let raw_fd = fd.as_ref().map_or(-1, |fd| fd.as_raw_fd());
        // SAFETY: a fresh mapping placed by the kernel; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(alloc_err(std::io::Error::last_os_error()));
        }
        // SAFETY: advice on the mapping made just above; failure only means no huge pages.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            _fd: fd,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Copies `len` bytes from `src` to `dst` with `threads` scoped threads, each taking one equal
/// contiguous part, with the fastest plain copy routine we have ([`copy_bytes`]: non-temporal
/// stores for large copies; on the machines we measured glibc's `memcpy` is slower, so a limit
/// measured with it would flatter the engine).
///
/// # Safety
/// `src` and `dst` must be valid for `len` bytes for the duration of the call and not overlap.
unsafe fn parallel_copy(src: *const u8, dst: *mut u8, len: usize, threads: usize) {
    let threads = threads.max(1);
    let part = len.div_ceil(threads);
    let (src, dst) = (src as usize, dst as usize);
    std::thread::scope(|scope| {
        for start in (0..len).step_by(part.max(1)) {
            let n = part.min(len - start);
            scope.spawn(move || {
                // SAFETY: [start, start + n) lies inside both buffers (the caller's contract), and
                // the parts given to different threads are disjoint.
                unsafe { copy_bytes((src + start) as *const u8, (dst + start) as *mut u8, n) };
            });
        }
    });
}

/// Fills `len` bytes at `ptr` with a non-zero pattern, `threads` parts in parallel, so every page
/// is faulted in and backed by its own memory (not the shared zero page).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
unsafe fn touch(ptr: *mut u8, len: usize, threads: usize) {
    let threads = threads.max(1);
    let part = len.div_ceil(threads);
    let base = ptr as usize;
    std::thread::scope(|scope| {
        for start in (0..len).step_by(part.max(1)) {
            let n = part.min(len - start);
            scope.spawn(move || {
                // SAFETY: [start, start + n) is inside the buffer and disjoint from other parts.
                unsafe { std::ptr::write_bytes((base + start) as *mut u8, 0x5a, n) };
            });
        }
    });
}

/// Seconds taken by each of `samples` parallel copies of `nbytes` bytes, made with `threads`
/// threads from an already-touched source of its own into `target`. See the module docs.
///
/// The source is mapped and touched once before the first sample and is not timed.
pub fn copy_limit(
    nbytes: usize,
    threads: usize,
    target: Target,
    samples: usize,
) -> Result<Vec<f64>> {
    let source = Mapping::new(nbytes, false)?;
    // SAFETY: `source` maps at least `nbytes` writable bytes and lives until the end of the call.
    unsafe { touch(source.ptr, nbytes, threads) };
    // SAFETY: as above; nothing writes the source while this shared view lives.
    let source = unsafe { std::slice::from_raw_parts(source.ptr, nbytes) };
    copy_limit_from(source, threads, target, samples)
}

/// Like [`copy_limit`], copying the caller's `source` (which should be touched already: a
/// measurement wants its pages present). Keeping one source across calls keeps the calls from
/// taking memory the operating system has just freed, so fresh-memory samples stay comparable.
///
/// For [`Target::Touched`] the destination is mapped and touched once before the first sample.
pub fn copy_limit_from(
    source: &[u8],
    threads: usize,
    target: Target,
    samples: usize,
) -> Result<Vec<f64>> {
    let nbytes = source.len();
    let touched = if target == Target::Touched {
        let dst = Mapping::new(nbytes, false)?;
        // SAFETY: `dst` maps at least `nbytes` writable bytes and lives until the end of the call.
        unsafe { touch(dst.ptr, nbytes, threads) };
        Some(dst)
    } else {
        None
    };
    let mut seconds = Vec::with_capacity(samples);
    for _ in 0..samples {
        let fresh = match target {
            Target::Touched => None,
            Target::FreshPrivate => Some(Mapping::new(nbytes, false)?),
            Target::FreshShared => Some(Mapping::new(nbytes, true)?),
        };
        let dst = touched.as_ref().or(fresh.as_ref()).expect("a destination");
        let start = Instant::now();
        // SAFETY: the source slice and the mapping (our own, so disjoint from it) both hold at
        // least `nbytes` bytes and live past the call.
        unsafe { parallel_copy(source.as_ptr(), dst.ptr, nbytes, threads) };
        seconds.push(start.elapsed().as_secs_f64());
        drop(fresh); // unmapped outside the timed region
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copy_copies_every_byte_with_uneven_parts() {
        let len = (1 << 20) + 4093; // not a multiple of the thread count or the page size
        let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        for threads in [1, 2, 3, 7] {
            let mut dst = vec![0u8; len];
            // SAFETY: two distinct vectors of `len` bytes that outlive the call.
            unsafe { parallel_copy(src.as_ptr(), dst.as_mut_ptr(), len, threads) };
            assert!(src == dst, "threads={threads}");
        }
    }

    #[test]
    fn every_target_returns_one_positive_time_per_sample() {
        for target in [Target::Touched, Target::FreshPrivate, Target::FreshShared] {
            let seconds = copy_limit(3 << 20, 2, target, 3).unwrap();
            assert_eq!(seconds.len(), 3, "{target:?}");
            assert!(seconds.iter().all(|&s| s > 0.0), "{target:?}: {seconds:?}");
        }
    }

    #[test]
    fn a_callers_source_is_copied_from() {
        let source = vec![9u8; 1 << 20];
        for target in [Target::Touched, Target::FreshShared] {
            let seconds = copy_limit_from(&source, 2, target, 2).unwrap();
            assert_eq!(seconds.len(), 2, "{target:?}");
        }
    }

    #[test]
    fn zero_bytes_and_more_threads_than_bytes_are_fine() {
        assert_eq!(copy_limit(0, 4, Target::FreshPrivate, 2).unwrap().len(), 2);
        assert_eq!(copy_limit(3, 8, Target::Touched, 1).unwrap().len(), 1);
    }

    #[test]
    fn targets_parse_from_their_names() {
        assert_eq!(Target::parse("touched"), Some(Target::Touched));
        assert_eq!(Target::parse("private"), Some(Target::FreshPrivate));
        assert_eq!(Target::parse("shared"), Some(Target::FreshShared));
        assert_eq!(Target::parse("gpu"), None);
    }
}
