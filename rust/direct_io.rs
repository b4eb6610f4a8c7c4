//! Direct I/O: how the writer and the reader reach the device without the page cache.
//!
//! Checkpoint files are written once and read once; routing them through the page cache costs a
//! copy per byte, dirty-page throttling and write-back storms on the way out, and an unpredictable
//! mix of cached and uncached pages on the way in. Where the filesystem supports it, stager moves
//! the bytes with `O_DIRECT` between its page-aligned host buffers and the device, several
//! requests in flight.
//!
//! - [`probe`] decides, per open file, between [`IoMode::Direct`] (with the filesystem's memory
//!   and offset alignment, from `statx(STATX_DIOALIGN)`) and [`IoMode::Buffered`]: filesystems
//!   that report no direct-I/O support (tmpfs, many network and FUSE filesystems) and memory
//!   filesystems get buffered writes followed by `fdatasync`. Where the kernel predates
//!   `STATX_DIOALIGN` (Linux < 6.1) direct I/O is tried with 4 KiB alignment, and a write or read
//!   the filesystem rejects with `EINVAL` switches that file to buffered I/O and is retried
//!   ([`fall_back_to_buffered`]), so a wrong guess costs one retried request, never an error.
//!   `STAGER_DIRECT_IO=0` in the environment forces buffered I/O everywhere.
//! - [`AlignedBuf`] is page-aligned scratch memory (bounce chunks for sources that are not
//!   aligned, the header, the file's last partial block), recycled through a small process-wide
//!   free list so a save maps nothing new after the first.
//! - [`pwrite_all`] / [`pread_full`] are the positional primitives, retrying on `EINTR`.
//! - [`for_each_piece`] is the one parallel-I/O loop (claim the next piece, first error wins,
//!   one result per piece) and [`combine_crc32c`] joins the per-piece checksums it returns.
//!
//! # Several requests in flight: a few `pwrite` threads, not `io_uring`
//! Both were measured on this machine's disk (virtio ext4; 512 MiB from a huge-page buffer,
//! O_DIRECT, 8 MiB requests, 10 interleaved rounds; the same rows are `benches/writer.rs`'s
//! `device_*`): writes 2.92 GB/s median (2.69–3.54) from 4 threads against 2.84 (2.02–3.62)
//! with `io_uring` 4 in flight (1 thread: 2.61); reads 3.28 (1.53–3.68) from 4 threads against
//! 3.00 (2.45–3.59); CPU about 0.01 s per 512 MiB either way. With no difference in throughput
//! or CPU, threads win on what remains: they work where `io_uring` is disabled
//! (`kernel.io_uring_disabled`, Docker's default seccomp profile), so there is one code path and
//! no fallback to test, and they need no dependency. The writer and reader use [`IO_DEPTH`]
//! threads with [`IO_CHUNK`] requests.
//!
//! # Huge pages
//! The same reads into a 4 KiB-page buffer ran at 1.05 GB/s against 2.5 from the pool's
//! huge-page buffers: a direct request is split at every physically discontiguous page, so the
//! device gets small requests. Bounce chunks ([`AlignedBuf`]) are huge-page backed like the pool.
//!
//! # Thread Safety
//! Everything here is `Send + Sync`; [`AlignedBuf`] is owned by one thread at a time.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bytes per read or write request.
pub const IO_CHUNK: usize = 8 << 20;
/// Requests in flight per file (threads issuing them).
pub const IO_DEPTH: usize = 4;
/// The block every direct transfer is aligned to when the filesystem does not say (and the
/// largest alignment stager accepts): the data section of a stager file starts on one.
pub const BLOCK: usize = 4096;

/// How a file's bytes move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: memory addresses must be multiples of `mem_align`, file offsets and lengths
    /// multiples of `offset_align`.
    Direct {
        /// Alignment of memory addresses.
        mem_align: usize,
        /// Alignment of file offsets and lengths.
        offset_align: usize,
    },
    /// Through the page cache (then `fdatasync` for writes).
    Buffered,
}

impl IoMode {
    /// Whether this is [`IoMode::Direct`].
    pub fn is_direct(self) -> bool {
        matches!(self, IoMode::Direct { .. })
    }

    /// `(memory alignment, offset alignment)`; 1 for buffered I/O.
    pub fn alignment(self) -> (usize, usize) {
        match self {
            IoMode::Direct {
                mem_align,
                offset_align,
            } => (mem_align, offset_align),
            IoMode::Buffered => (1, 1),
        }
    }

    /// `"direct"` or `"buffered"`.
    pub fn name(self) -> &'static str {
        if self.is_direct() {
            "direct"
        } else {
            "buffered"
        }
    }
}

/// Whether `STAGER_DIRECT_IO=0` (or `false`, `off`, `no`) asks for buffered I/O everywhere.
fn direct_io_disabled() -> bool {
    std::env::var("STAGER_DIRECT_IO").is_ok_and(|value| {
        matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    })
}

/// Memory filesystems: direct I/O there is at best a copy with extra rules.
fn is_memory_filesystem(fd: i32) -> bool {
    // SAFETY: fstatfs fills the struct we own on success.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out pointer.
    if unsafe { libc::fstatfs(fd, &mut stat) } != 0 {
        return false;
    }
    // ramfs has no constant in libc; compared as the kernel's 32-bit magic.
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    let kind = stat.f_type;
    kind == libc::TMPFS_MAGIC || kind == libc::HUGETLBFS_MAGIC || kind as u32 == RAMFS_MAGIC
}

/// Chooses direct or buffered I/O for the regular file `file` (see the module docs).
pub fn probe(file: &File) -> IoMode {
    if direct_io_disabled() {
        return IoMode::Buffered;
    }
    let fd = file.as_raw_fd();
    // SAFETY: statx fills the struct we own; AT_EMPTY_PATH with "" describes `fd` itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated empty path, valid out pointer.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        let (mem, offset) = (
            stx.stx_dio_mem_align as usize,
            stx.stx_dio_offset_align as usize,
        );
        // Zero: no direct I/O on this file. Alignments above a block (or not powers of two)
        // would need a different file layout: use the page cache.
        let usable = mem > 0
            && offset > 0
            && mem <= BLOCK
            && offset <= BLOCK
            && mem.is_power_of_two()
            && offset.is_power_of_two();
        return if usable {
            IoMode::Direct {
                mem_align: mem,
                offset_align: offset,
            }
        } else {
            IoMode::Buffered
        };
    }
    if is_memory_filesystem(fd) {
        return IoMode::Buffered;
    }
    // A kernel that does not report the alignment: assume a block; EINVAL falls back.
    IoMode::Direct {
        mem_align: BLOCK,
        offset_align: BLOCK,
    }
}

/// Turns `O_DIRECT` on or off on `file`'s open file description.
pub fn set_direct(file: &File, direct: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let wanted = if direct {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above; only the status flags change.
    if wanted != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, wanted) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `work` on `threads` threads, the calling one included, and returns once every one has
/// returned.
fn run_on_threads(threads: usize, work: impl Fn() + Sync) {
    if threads <= 1 {
        work();
        return;
    }
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(&work);
        }
        work();
    });
}

/// The one parallel-I/O loop: runs `work(piece, &mut state)` for every piece in `0..pieces` on
/// up to `threads` threads (the calling one included), and returns each piece's result in piece
/// order.
///
/// Each thread claims the next unclaimed piece from a shared cursor until none is left, so a
/// slow request never holds up the others' share. `state` is one per thread (a
/// [`ThreadChunk`], say), made with `Default` when the thread starts and dropped when it ends.
/// The first error wins: once a piece fails no thread claims another, and that error is
/// returned once the pieces in flight are done.
///
/// The writer's requests, the reader's pieces (whole files, chosen storages, byte ranges,
/// checksums only) and the record parser all run through here; per-piece checksums come back
/// as results and are joined with [`combine_crc32c`].
pub fn for_each_piece<S, T, E>(
    pieces: usize,
    threads: usize,
    work: impl Fn(usize, &mut S) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E>
where
    S: Default,
    T: Send,
    E: Send,
{
    if pieces == 0 {
        return Ok(Vec::new());
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    let results: Vec<Mutex<Option<T>>> = (0..pieces).map(|_| Mutex::new(None)).collect();
    run_on_threads(threads.clamp(1, pieces), || {
        let mut state = S::default();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= pieces || failed.load(Ordering::Relaxed) {
                return;
            }
            match work(index, &mut state) {
                Ok(result) => *lock(&results[index]) = Some(result),
                Err(err) => {
                    failed.store(true, Ordering::Relaxed);
                    lock(&first_error).get_or_insert(err);
                    return;
                }
            }
        }
    });
    if let Some(err) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    Ok(results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("with no error, every piece ran")
        })
        .collect())
}

/// A mutex's value, also after a thread panicked holding it (the values here stay consistent).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Joins per-piece crc32c checksums into one per slot (a storage, a target).
///
/// `parts` are `(slot, crc32c of the piece, piece length)`, each slot's pieces in the order of
/// its bytes (pieces of different slots may interleave). A slot with no piece gets 0, the
/// crc32c of no bytes.
pub fn combine_crc32c(
    slots: usize,
    parts: impl IntoIterator<Item = (usize, u32, usize)>,
) -> Vec<u32> {
    let mut crcs: Vec<Option<u32>> = vec![None; slots];
    for (slot, crc, len) in parts {
        let joined = &mut crcs[slot];
        *joined = Some(match *joined {
            None => crc,
            Some(before) => crc32c::crc32c_combine(before, crc, len),
        });
    }
    crcs.into_iter().map(|crc| crc.unwrap_or(0)).collect()
}

/// A bounce chunk that one thread of [`for_each_piece`] reuses for every piece it claims; it
/// goes back to the free list ([`AlignedBuf::recycle`]) when the thread is done.
#[derive(Default)]
pub struct ThreadChunk(Option<AlignedBuf>);

impl ThreadChunk {
    /// The chunk, holding at least `len` bytes: the one held when it is large enough, else a
    /// fresh one of `len.max(fresh_len)` bytes (the smaller one goes back to the free list).
    pub fn at_least(&mut self, len: usize, fresh_len: usize) -> io::Result<&mut AlignedBuf> {
        if !matches!(&self.0, Some(chunk) if chunk.capacity() >= len) {
            if let Some(old) = self.0.take() {
                old.recycle();
            }
            self.0 = Some(AlignedBuf::take(len.max(fresh_len))?);
        }
        Ok(self.0.as_mut().expect("just set"))
    }
}

impl Drop for ThreadChunk {
    fn drop(&mut self) {
        if let Some(chunk) = self.0.take() {
            chunk.recycle();
        }
    }
}

/// Whether `err` is how a filesystem refuses a direct transfer it does not support.
pub fn is_direct_refusal(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EINVAL)
}

/// Switches `file` to buffered I/O after a refused direct transfer; `Ok(())` means: retry.
pub fn fall_back_to_buffered(file: &File) -> io::Result<()> {
    set_direct(file, false)
}

/// Runs a positional read or write until it transfers something, retrying when a signal
/// interrupted it. `Ok(0)` means end of file (reads) or no progress (writes).
pub fn retry_interrupted(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes `len` bytes from `ptr` at `offset`, all of them.
///
/// # Safety
/// `ptr` must point to `len` readable bytes that stay valid during the call.
pub unsafe fn pwrite_all(file: &File, ptr: *const u8, len: usize, offset: u64) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let mut done = 0;
    while done < len {
        // SAFETY: `[ptr + done, ptr + len)` is readable (function contract).
        let n = retry_interrupted(|| unsafe {
            libc::pwrite(
                fd,
                ptr.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwrite wrote nothing",
            ));
        }
        done += n;
    }
    Ok(())
}

/// Reads up to `len` bytes at `offset` into `ptr`, stopping early only at end of file; returns
/// how many it read.
///
/// # Safety
/// `ptr` must point to `len` writable bytes that nothing else accesses during the call.
pub unsafe fn pread_full(file: &File, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    let mut done = 0;
    while done < len {
        // SAFETY: `[ptr + done, ptr + len)` is writable (function contract).
        let n = retry_interrupted(|| unsafe {
            libc::pread(
                fd,
                ptr.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Page-aligned scratch memory from the process-wide free list (see [`AlignedBuf::take`]).
pub struct AlignedBuf {
    ptr: *mut u8,
    capacity: usize,
}

// SAFETY: an owned private mapping; the pointer is not tied to a thread.
unsafe impl Send for AlignedBuf {}

/// Free bounce chunks, largest first served; at most [`MAX_FREE_CHUNKS`] kept.
static FREE_CHUNKS: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
const MAX_FREE_CHUNKS: usize = 2 * IO_DEPTH;
const HUGE_PAGE: usize = 2 << 20;

impl AlignedBuf {
    /// A buffer of at least `len` bytes (rounded up to a block) whose contents are unspecified
    /// (the caller zeroes what it does not fill), reused from the free list when one fits.
    pub fn take(len: usize) -> io::Result<AlignedBuf> {
        let capacity = len.max(1).div_ceil(BLOCK) * BLOCK;
        {
            let mut free = FREE_CHUNKS.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(index) = free.iter().position(|b| b.capacity >= capacity) {
                return Ok(free.swap_remove(index));
            }
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if capacity >= HUGE_PAGE {
            // Huge pages, as the host pool uses: a direct request from them is a few physically
            // contiguous segments, not one per 4 KiB page, so the device gets larger requests.
            // Advice only: failure changes nothing.
            // SAFETY: advises on the mapping made just above.
            unsafe { libc::madvise(ptr, capacity, libc::MADV_HUGEPAGE) };
        }
        Ok(AlignedBuf {
            ptr: ptr.cast(),
            capacity,
        })
    }

    /// Start of the buffer (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes of the buffer.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The first `len` bytes (`len <= capacity`).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity);
        // SAFETY: within the mapping, which this value owns exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    /// Returns the buffer to the free list; when the list is full it replaces the smallest
    /// buffer there if it is larger (large bounce chunks are the ones worth keeping), else it
    /// is unmapped.
    pub fn recycle(self) {
        let mut free = FREE_CHUNKS.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < MAX_FREE_CHUNKS {
            free.push(self);
            return;
        }
        let smallest = free
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.capacity)
            .map(|(index, b)| (index, b.capacity));
        if let Some((index, capacity)) = smallest {
            if capacity < self.capacity {
                let evicted = std::mem::replace(&mut free[index], self);
                drop(free);
                drop(evicted); // unmapped outside the lock
            }
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `take`; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.capacity) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_filesystem_is_buffered() {
        let dir = std::path::Path::new("/dev/shm");
        if !dir.is_dir() {
            return;
        }
        let file = tempfile::tempfile_in(dir).unwrap();
        assert_eq!(probe(&file), IoMode::Buffered);
    }

    #[test]
    fn every_piece_runs_once_and_results_come_back_in_piece_order() {
        let calls = AtomicUsize::new(0);
        let results = for_each_piece(100, 4, |index, seen: &mut Vec<usize>| {
            calls.fetch_add(1, Ordering::Relaxed);
            seen.push(index);
            // Each thread claims pieces in increasing order from the shared cursor.
            assert!(seen.windows(2).all(|pair| pair[0] < pair[1]));
            Ok::<_, String>(index * 2)
        })
        .unwrap();
        assert_eq!(results, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(calls.load(Ordering::Relaxed), 100);
        let none = for_each_piece(0, 4, |_, _: &mut ()| Err::<(), _>("never called"));
        assert_eq!(none, Ok(Vec::new()));
    }

    #[test]
    fn the_first_error_wins_and_stops_the_claiming() {
        let calls = AtomicUsize::new(0);
        let result = for_each_piece(10_000, 4, |index, _: &mut ()| {
            calls.fetch_add(1, Ordering::Relaxed);
            if index == 3 {
                return Err(format!("piece {index} failed"));
            }
            if index > 3 {
                // Slow enough that the failure is seen long before the pieces run out.
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            Ok(())
        });
        assert_eq!(result, Err("piece 3 failed".to_string()));
        assert!(calls.load(Ordering::Relaxed) < 10_000);
    }

    #[test]
    fn per_piece_checksums_join_into_the_checksum_of_the_whole() {
        let a: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..300u32).map(|i| (i % 7) as u8).collect();
        let parts = [
            (0, crc32c::crc32c(&a[..100]), 100),
            (1, crc32c::crc32c(&b[..1]), 1),
            (0, crc32c::crc32c(&a[100..999]), 899),
            (1, crc32c::crc32c(&b[1..]), 299),
            (0, crc32c::crc32c(&a[999..]), 1),
        ];
        assert_eq!(
            combine_crc32c(3, parts),
            [crc32c::crc32c(&a), crc32c::crc32c(&b), 0]
        );
    }

    #[test]
    fn a_thread_chunk_grows_and_keeps_what_fits() {
        let mut chunk = ThreadChunk::default();
        let first = chunk.at_least(100, BLOCK).unwrap().as_ptr();
        assert!(chunk.at_least(BLOCK, BLOCK).unwrap().capacity() >= BLOCK);
        assert_eq!(chunk.at_least(10, BLOCK).unwrap().as_ptr(), first);
        assert!(chunk.at_least(3 * BLOCK, BLOCK).unwrap().capacity() >= 3 * BLOCK);
    }

    #[test]
    fn direct_mode_round_trips_aligned_transfers() {
        let file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let mode = probe(&file);
        let (mem, offset) = mode.alignment();
        assert!(mem.is_power_of_two() && offset.is_power_of_two());
        if mode.is_direct() {
            set_direct(&file, true).unwrap();
        }
        let mut buf = AlignedBuf::take(3 * BLOCK).unwrap();
        for (i, byte) in buf.slice_mut(3 * BLOCK).iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        // SAFETY: the buffer holds 3 blocks.
        unsafe { pwrite_all(&file, buf.as_ptr(), 3 * BLOCK, BLOCK as u64) }.unwrap();
        let mut back = AlignedBuf::take(4 * BLOCK).unwrap();
        // SAFETY: the buffer holds 4 blocks; the file ends after 4.
        let n = unsafe { pread_full(&file, back.as_ptr(), 4 * BLOCK, 0) }.unwrap();
        assert_eq!(n, 4 * BLOCK);
        let back_bytes = back.slice_mut(4 * BLOCK);
        assert!(back_bytes[..BLOCK].iter().all(|&b| b == 0));
        for (i, &byte) in back_bytes[BLOCK..].iter().enumerate() {
            assert_eq!(byte, (i % 251) as u8);
        }
        buf.recycle();
        back.recycle();
    }
}
