//! Copy engine: host-to-host copies split into chunks and run on a fixed set of worker threads.
//!
//! A stage submits one batch of [`HostCopy`]s, one per host storage, each completing one request
//! of the stage's [`Completion`] (request i is storage i). Large copies are cut into chunks and
//! small ones packed together, so both a 2 GB tensor and 20,000 tiny ones keep every worker busy.
//! Workers take batches from a lock-free channel and claim chunks with an atomic counter, so no
//! lock is taken per chunk. Batches whose bytes would not pay for waking a thread run inline in
//! the submitting thread.
//!
//! The engine only copies and reports: waiting is the [`Completion`]'s business, so writers and
//! senders wait on the same object whoever filled the bytes (this engine, the CUDA copier, a
//! network receive).
//!
//! # Example
//! ```
//! use stager::completion::Completion;
//! use stager::copy_engine::{CopyEngine, HostCopy};
//! let engine = CopyEngine::new(2).unwrap();
//! let src = vec![7u8; 1 << 20];
//! let mut dst = vec![0u8; 1 << 20];
//! let done = Completion::new(1);
//! let copy = HostCopy { request: 0, src: src.as_ptr(), dst: dst.as_mut_ptr(), len: src.len() };
//! // SAFETY: both vectors outlive the batch, which we wait for before touching them.
//! unsafe { engine.submit(&done, vec![copy], None) }.unwrap();
//! done.wait_all(None).unwrap();
//! assert_eq!(src, dst);
//! ```
//!
//! # Thread Safety
//! [`CopyEngine`] is `Send + Sync`; any thread may submit. Worker threads do not survive `fork()`:
//! in a forked child, [`CopyEngine::submit`] fails at once with [`StagerError::Forked`] instead of
//! queueing work nobody will run.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::completion::Completion;
use crate::error::{Result, StagerError};

/// Bytes per chunk: large enough that claiming it is noise, small enough to balance threads.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Batches smaller than this run in the submitting thread: a thread wake-up costs more than the copy.
pub const INLINE_BYTES: usize = 1 << 20;
/// Most worker threads an engine may start (far above any core count; a guard against typos).
pub const MAX_THREADS: usize = 1024;

/// One contiguous copy of `len` bytes that completes request `request` of its batch's completion.
#[derive(Clone, Copy, Debug)]
pub struct HostCopy {
    /// The completion request this copy completes.
    pub request: usize,
    /// Source address.
    pub src: *const u8,
    /// Destination address.
    pub dst: *mut u8,
    /// Bytes to copy.
    pub len: usize,
}

// SAFETY: a copy is plain addresses; `CopyEngine::submit`'s contract makes them valid on any thread.
unsafe impl Send for HostCopy {}
// SAFETY: as above; nothing in a HostCopy is mutated through a shared reference.
unsafe impl Sync for HostCopy {}

/// Whatever owns the memory a batch reads and writes (the source tensors, the target buffer):
/// kept alive by the batch until its last copy has finished, then dropped by the worker.
pub type MemoryOwner = Box<dyn Send + Sync>;

/// A slice of one copy: chunks are made of pieces.
#[derive(Clone, Copy)]
struct Piece {
    copy: u32,
    offset: usize,
    len: usize,
}

/// One submitted batch, shared by the workers that run it.
struct Batch {
    copies: Vec<HostCopy>,
    pieces: Vec<Piece>,
    /// Chunk `i` is `pieces[chunk_bounds[i]..chunk_bounds[i + 1]]`.
    chunk_bounds: Vec<usize>,
    /// The chunks split into one contiguous range per worker: `(next chunk to claim, end)`.
    /// Each worker streams through its own range (long sequential runs are what the memory
    /// system is fastest at) and then helps finish the others.
    partitions: Vec<(AtomicUsize, usize)>,
    next_worker: AtomicUsize,
    pieces_left: Vec<AtomicU32>,
    completion: Completion,
    _owner: Option<MemoryOwner>,
}

impl Batch {
    fn plan(copies: Vec<HostCopy>, completion: Completion, owner: Option<MemoryOwner>) -> Batch {
        let mut pieces = Vec::new();
        let mut chunk_bounds = vec![0];
        let mut chunk_fill = 0usize;
        let mut pieces_per_copy = vec![0u32; copies.len()];
        for (index, copy) in copies.iter().enumerate() {
            let mut offset = 0;
            while offset < copy.len {
                let len = (copy.len - offset).min(CHUNK_BYTES - chunk_fill);
                pieces.push(Piece {
                    copy: index as u32,
                    offset,
                    len,
                });
                pieces_per_copy[index] += 1;
                offset += len;
                chunk_fill += len;
                if chunk_fill == CHUNK_BYTES {
                    chunk_bounds.push(pieces.len());
                    chunk_fill = 0;
                }
            }
        }
        if *chunk_bounds.last().unwrap() != pieces.len() {
            chunk_bounds.push(pieces.len());
        }
        for (copy, pieces) in copies.iter().zip(&pieces_per_copy) {
            if *pieces == 0 {
                completion.mark_complete(copy.request);
            }
        }
        Batch {
            pieces_left: pieces_per_copy.into_iter().map(AtomicU32::new).collect(),
            copies,
            pieces,
            chunk_bounds,
            partitions: Vec::new(),
            next_worker: AtomicUsize::new(0),
            completion,
            _owner: owner,
        }
    }

    fn chunk_count(&self) -> usize {
        self.chunk_bounds.len() - 1
    }

    /// Splits the chunks into `workers` contiguous ranges, one per worker that will run the batch.
    fn partition(&mut self, workers: usize) {
        let chunks = self.chunk_count();
        let workers = workers.clamp(1, chunks.max(1));
        self.partitions = (0..workers)
            .map(|k| {
                (
                    AtomicUsize::new(k * chunks / workers),
                    (k + 1) * chunks / workers,
                )
            })
            .collect();
    }

    /// Copies the chunks of this worker's range, then claims what is left of the others'.
    fn run(&self) {
        let count = self.partitions.len();
        let home = self.next_worker.fetch_add(1, Ordering::Relaxed);
        for step in 0..count {
            let (cursor, end) = &self.partitions[(home + step) % count];
            loop {
                let chunk = cursor.fetch_add(1, Ordering::Relaxed);
                if chunk >= *end {
                    break;
                }
                self.copy_chunk(chunk);
            }
        }
    }

    fn copy_chunk(&self, chunk: usize) {
        for piece in &self.pieces[self.chunk_bounds[chunk]..self.chunk_bounds[chunk + 1]] {
            let copy = &self.copies[piece.copy as usize];
            // SAFETY: `submit`'s caller guarantees both ranges are valid and disjoint until the
            // request completes (the owner keeps them alive); each chunk is claimed by exactly
            // one thread through its range's cursor.
            unsafe {
                copy_bytes(
                    copy.src.add(piece.offset),
                    copy.dst.add(piece.offset),
                    piece.len,
                );
            }
            if self.pieces_left[piece.copy as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
                self.completion.mark_complete(copy.request);
            }
        }
    }
}

/// A fixed set of worker threads that run copy batches. See the module docs.
///
/// # Thread Safety
/// `Send + Sync`. Dropping the engine lets the workers finish the batches already queued and exit.
pub struct CopyEngine {
    sender: Option<Sender<Arc<Batch>>>,
    workers: Vec<JoinHandle<()>>,
    creator: u32,
}

impl CopyEngine {
    /// Starts `num_threads` workers (1 to [`MAX_THREADS`]).
    pub fn new(num_threads: usize) -> Result<CopyEngine> {
        CopyEngine::with_niceness(num_threads, 0)
    }

    /// Starts `num_threads` workers (1 to [`MAX_THREADS`]) whose scheduling priority is lowered
    /// by `niceness` (Linux `nice`, 0-19). Background staging uses this so that copies take the
    /// cores the training thread leaves idle instead of competing with it; with idle cores they
    /// run as fast.
    pub fn with_niceness(num_threads: usize, niceness: i32) -> Result<CopyEngine> {
        if !(1..=MAX_THREADS).contains(&num_threads) {
            return Err(StagerError::invalid(format!(
                "the copy engine needs 1 to {MAX_THREADS} threads, got {num_threads}"
            )));
        }
        if !(0..=19).contains(&niceness) {
            return Err(StagerError::invalid(format!(
                "copy worker niceness must be 0 to 19, got {niceness}"
            )));
        }
        let (sender, receiver) = crossbeam_channel::unbounded::<Arc<Batch>>();
        let mut workers = Vec::with_capacity(num_threads);
        for index in 0..num_threads {
            let receiver: Receiver<Arc<Batch>> = receiver.clone();
            let worker = std::thread::Builder::new()
                .name(format!("stager-copy-{index}"))
                .spawn(move || {
                    if niceness > 0 {
                        lower_this_threads_priority(niceness);
                    }
                    while let Ok(batch) = receiver.recv() {
                        batch.run();
                    }
                })
                .map_err(|source| StagerError::Allocation { bytes: 0, source })?;
            workers.push(worker);
        }
        Ok(CopyEngine {
            sender: Some(sender),
            workers,
            creator: std::process::id(),
        })
    }

    /// Number of worker threads.
    pub fn num_threads(&self) -> usize {
        self.workers.len()
    }

    /// Fails with [`StagerError::Forked`] in a process forked after this engine was made.
    pub fn check_process(&self) -> Result<()> {
        let current = std::process::id();
        if current != self.creator {
            return Err(StagerError::Forked {
                what: "the copy engine",
                parent: self.creator,
                child: current,
            });
        }
        Ok(())
    }

    /// Starts `copies`, each completing its request of `completion` once its bytes are in place;
    /// returns at once unless the batch is small enough to run inline. `owner` is kept alive
    /// until the last copy has finished.
    ///
    /// Checks before copying anything: every request exists and is named by one copy only, no
    /// address is null, no destination range wraps around or overlaps another.
    ///
    /// # Safety
    /// For every copy, `src..src+len` must be readable and `dst..dst+len` writable, must not
    /// overlap any source, and both must stay valid and untouched by anyone else until its
    /// request completes (`owner` may be what guarantees it).
    pub unsafe fn submit(
        &self,
        completion: &Completion,
        copies: Vec<HostCopy>,
        owner: Option<MemoryOwner>,
    ) -> Result<()> {
        self.check_process()?;
        check_copies(completion, &copies)?;
        let mut batch = Batch::plan(copies, completion.clone(), owner);
        let total: usize = batch.pieces.iter().map(|piece| piece.len).sum();
        let chunks = batch.chunk_count();
        let inline = total < INLINE_BYTES || chunks <= 1;
        let workers = if inline {
            1
        } else {
            self.workers.len().min(chunks)
        };
        batch.partition(workers);
        let batch = Arc::new(batch);
        if inline {
            batch.run();
            return Ok(());
        }
        let sender = self.sender.as_ref().expect("the sender lives until drop");
        for _ in 0..workers {
            sender
                .send(batch.clone())
                .map_err(|_| StagerError::Failed("the copy engine's workers have exited".into()))?;
        }
        Ok(())
    }
}

/// The checks of [`CopyEngine::submit`] that need no memory access.
fn check_copies(completion: &Completion, copies: &[HostCopy]) -> Result<()> {
    let mut seen = vec![false; completion.len()];
    let mut spans = Vec::with_capacity(copies.len());
    for copy in copies {
        let Some(slot) = seen.get_mut(copy.request) else {
            return Err(StagerError::invalid(format!(
                "copy completes request {} of a batch of {}",
                copy.request,
                completion.len()
            )));
        };
        if std::mem::replace(slot, true) {
            return Err(StagerError::invalid(format!(
                "request {} is completed by two copies",
                copy.request
            )));
        }
        if copy.len == 0 {
            continue;
        }
        if copy.src.is_null() || copy.dst.is_null() {
            return Err(StagerError::invalid(format!(
                "copy for request {} has a null address",
                copy.request
            )));
        }
        let start = copy.dst as usize;
        let end = start.checked_add(copy.len).ok_or_else(|| {
            StagerError::invalid(format!(
                "copy for request {} wraps around the address space",
                copy.request
            ))
        })?;
        spans.push((start, end));
    }
    spans.sort_unstable();
    if let Some(pair) = spans.windows(2).find(|pair| pair[0].1 > pair[1].0) {
        return Err(StagerError::invalid(format!(
            "copy destinations overlap: [{:#x}, {:#x}) and [{:#x}, {:#x})",
            pair[0].0, pair[0].1, pair[1].0, pair[1].1
        )));
    }
    Ok(())
}

/// Pieces at least this large are copied with non-temporal (cache-bypassing) stores.
pub const STREAMING_BYTES: usize = 256 << 10;

/// Copies `len` bytes. Large copies bypass the caches: a checkpoint is far larger than any cache
/// and is not read back soon, so ordinary stores would first read every destination line
/// (read-for-ownership) and evict the training job's working set. glibc's memcpy only does this
/// above a size threshold (hundreds of MiB here) that our chunks never reach.
///
/// # Safety
/// `src..src+len` readable, `dst..dst+len` writable, the two disjoint.
#[inline]
pub unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= STREAMING_BYTES {
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_streaming(src, dst, len) };
        return;
    }
    // SAFETY: forwarded from this function's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// SSE2 copy with non-temporal stores (SSE2 is part of every x86_64 CPU).
///
/// # Safety
/// As [`copy_bytes`].
#[cfg(target_arch = "x86_64")]
unsafe fn copy_streaming(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    // Head: ordinary copy up to the first 16-byte aligned destination address.
    let head = dst.align_offset(16).min(len);
    // SAFETY: within the ranges of this function's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut offset = head;
    while offset + 64 <= len {
        // SAFETY: offset + 64 <= len keeps every access in range; `dst + offset` is 16-byte
        // aligned (head made it so, and we advance by 64); loads are unaligned-safe.
        unsafe {
            let s = src.add(offset) as *const __m128i;
            let d = dst.add(offset) as *mut __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        offset += 64;
    }
    // SAFETY: the tail lies within the ranges; the fence orders the streaming stores before
    // the completion that publishes these bytes to other threads.
    unsafe {
        std::ptr::copy_nonoverlapping(src.add(offset), dst.add(offset), len - offset);
        _mm_sfence();
    }
}

/// Applies `nice` to the calling thread only (Linux schedules threads individually).
fn lower_this_threads_priority(niceness: i32) {
    // SAFETY: gettid and setpriority take plain integers and affect only this thread; failure
    // (e.g. a sandbox forbidding it) just leaves the default priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, niceness.clamp(0, 19));
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        drop(self.sender.take());
        if self.check_process().is_err() {
            // A forked child has no worker threads to join; its copies of the handles mean nothing.
            std::mem::forget(std::mem::take(&mut self.workers));
            return;
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn copy_all(engine: &CopyEngine, sources: &[Vec<u8>]) -> (Vec<Vec<u8>>, Completion) {
        let mut targets: Vec<Vec<u8>> = sources.iter().map(|s| vec![0; s.len()]).collect();
        let copies = sources
            .iter()
            .zip(targets.iter_mut())
            .enumerate()
            .map(|(request, (s, t))| HostCopy {
                request,
                src: s.as_ptr(),
                dst: t.as_mut_ptr(),
                len: s.len(),
            })
            .collect();
        let done = Completion::new(sources.len());
        // SAFETY: sources and targets outlive the batch; we wait before reading.
        unsafe { engine.submit(&done, copies, None) }.unwrap();
        done.wait_all(None).unwrap();
        (targets, done)
    }

    #[test]
    fn large_copy_is_split_and_copied_exactly() {
        let engine = CopyEngine::new(3).unwrap();
        let sources = vec![pattern(3 * CHUNK_BYTES + 12_345, 1)];
        let (targets, done) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
        assert!(done.all_done() && done.is_done(0));
    }

    #[test]
    fn many_tiny_copies_including_empty_ones() {
        let engine = CopyEngine::new(2).unwrap();
        let sources: Vec<Vec<u8>> = (0..20_000).map(|i| pattern(i % 97, i as u8)).collect();
        let (targets, done) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
        assert_eq!(done.len(), 20_000);
    }

    #[test]
    fn mixed_sizes_spanning_chunk_boundaries() {
        let engine = CopyEngine::new(4).unwrap();
        let sources: Vec<Vec<u8>> = (0..64)
            .map(|i| pattern((i * 977_123) % (2 * CHUNK_BYTES) + 1, i as u8))
            .collect();
        let (targets, _) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
    }

    #[test]
    fn concurrent_submitters_share_the_workers() {
        let engine = CopyEngine::new(2).unwrap();
        std::thread::scope(|scope| {
            for seed in 0..4u8 {
                let engine = &engine;
                scope.spawn(move || {
                    let sources: Vec<Vec<u8>> = (0..8)
                        .map(|i| pattern(CHUNK_BYTES + i * 1000, seed + i as u8))
                        .collect();
                    let (targets, _) = copy_all(engine, &sources);
                    assert_eq!(targets, sources);
                });
            }
        });
    }

    #[test]
    fn requests_left_to_others_stay_open() {
        // A batch may complete only some requests; the rest belong to another producer.
        let engine = CopyEngine::new(1).unwrap();
        let src = pattern(100, 3);
        let mut dst = vec![0u8; 100];
        let done = Completion::new(2);
        let copy = HostCopy {
            request: 1,
            src: src.as_ptr(),
            dst: dst.as_mut_ptr(),
            len: 100,
        };
        // SAFETY: both vectors outlive the wait below.
        unsafe { engine.submit(&done, vec![copy], None) }.unwrap();
        assert!(done.wait(1, None).unwrap());
        let soon = Instant::now() + Duration::from_millis(10);
        assert!(!done.wait(0, Some(soon)).unwrap());
        assert_eq!(dst, src);
    }

    #[test]
    fn bad_batches_are_refused_before_copying() {
        let engine = CopyEngine::new(1).unwrap();
        let src = [1u8; 64];
        let mut dst = [0u8; 64];
        let base = dst.as_mut_ptr();
        let done = Completion::new(2);
        let at = |request, offset: usize, len| HostCopy {
            request,
            src: src.as_ptr(),
            dst: base.wrapping_add(offset),
            len,
        };
        let cases = [
            (vec![at(2, 0, 8)], "request 2 of a batch of 2"),
            (vec![at(0, 0, 8), at(0, 8, 8)], "two copies"),
            (vec![at(0, 0, 16), at(1, 8, 8)], "overlap"),
        ];
        for (copies, expected) in cases {
            // SAFETY: every case is rejected before any memory is touched.
            let err = unsafe { engine.submit(&done, copies, None) }.unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        let null = HostCopy {
            request: 0,
            src: std::ptr::null(),
            dst: base,
            len: 4,
        };
        // SAFETY: rejected before any memory is touched.
        assert!(unsafe { engine.submit(&done, vec![null], None) }.is_err());
        assert_eq!(dst, [0u8; 64]);
        assert!(CopyEngine::new(0).is_err());
        assert!(CopyEngine::new(MAX_THREADS + 1).is_err());
        assert!(CopyEngine::with_niceness(1, 40).is_err());
    }

    #[test]
    fn owner_lives_until_the_last_copy_finished() {
        let engine = CopyEngine::new(2).unwrap();
        let source = Arc::new(pattern(3 * CHUNK_BYTES, 7));
        let mut target = vec![0u8; source.len()];
        let done = Completion::new(1);
        let copy = HostCopy {
            request: 0,
            src: source.as_ptr(),
            dst: target.as_mut_ptr(),
            len: source.len(),
        };
        let owner: MemoryOwner = Box::new(source.clone());
        // SAFETY: `owner` keeps the source alive; `target` outlives the wait below.
        unsafe { engine.submit(&done, vec![copy], Some(owner)) }.unwrap();
        done.wait_all(None).unwrap();
        assert_eq!(&target, &*source);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&source) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            Arc::strong_count(&source),
            1,
            "the batch released its owner"
        );
    }

    #[test]
    fn streaming_copy_handles_every_alignment_and_tail() {
        let source = pattern(STREAMING_BYTES + 300, 5);
        for src_shift in [0, 1, 7, 16] {
            for dst_shift in [0, 3, 15, 64] {
                let len = STREAMING_BYTES + 200 - src_shift;
                let mut target = vec![0u8; len + dst_shift + 8];
                // SAFETY: both ranges lie inside their vectors.
                unsafe {
                    copy_bytes(
                        source.as_ptr().add(src_shift),
                        target.as_mut_ptr().add(dst_shift),
                        len,
                    )
                };
                assert_eq!(
                    &target[dst_shift..dst_shift + len],
                    &source[src_shift..src_shift + len]
                );
                assert!(target[..dst_shift].iter().all(|&b| b == 0));
                assert!(target[dst_shift + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn background_engine_copies_the_same_bytes() {
        let engine = CopyEngine::with_niceness(2, 10).unwrap();
        let sources = vec![pattern(3 * CHUNK_BYTES + 5, 9), pattern(100, 1)];
        let (targets, _) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
    }
}
