//! Copy engine: host-to-host copies split into chunks and run on a fixed set of worker threads.
//!
//! A stage submits one [`CopyJob`] holding one [`CopyRequest`] per storage. Large requests are cut
//! into chunks and small ones packed together, so both a 2 GB tensor and 20,000 tiny ones keep
//! every worker busy. Workers take jobs from a lock-free channel and claim chunks with an atomic
//! counter, so no lock is taken per chunk. Jobs whose bytes would not pay for waking a thread run
//! inline in the submitting thread.
//!
//! Completion is reported per request: [`CopyJob::next_completed`] yields request indices in the
//! order they finished (a lock-free queue), [`CopyJob::wait_request`] waits for one, so a writer or
//! a sender can start on the first storage while the rest are still being copied.
//!
//! Requests created with [`CopyRequest::deferred`] are not copied by the engine: another agent (the
//! CUDA stream, a network receive) fills the bytes and calls [`CopyJob::mark_complete`]. Consumers
//! wait on one job either way.
//!
//! # Example
//! ```
//! use stager::copy_engine::{CopyEngine, CopyRequest};
//! let engine = CopyEngine::new(2);
//! let src = vec![7u8; 1 << 20];
//! let mut dst = vec![0u8; 1 << 20];
//! // SAFETY: both vectors outlive the job, which we wait for before touching them.
//! let job = unsafe { engine.submit(vec![CopyRequest::host(src.as_ptr(), dst.as_mut_ptr(), src.len())]) };
//! job.wait();
//! assert_eq!(src, dst);
//! ```
//!
//! # Thread Safety
//! [`CopyEngine`] and [`CopyJob`] are `Send + Sync`. Any thread may submit; any number of threads
//! may wait on a job. [`CopyJob::next_completed`] hands each index out exactly once, so only one
//! consumer should drain it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use crossbeam_queue::SegQueue;

/// Bytes per chunk: large enough that claiming it is noise, small enough to balance threads.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Jobs smaller than this run in the submitting thread: a thread wake-up costs more than the copy.
pub const INLINE_BYTES: usize = 1 << 20;

/// One contiguous copy of `len` bytes, or a placeholder completed by someone else.
#[derive(Clone, Copy, Debug)]
pub struct CopyRequest {
    src: *const u8,
    dst: *mut u8,
    len: usize,
    deferred: bool,
}

// SAFETY: a request is plain addresses; `CopyEngine::submit`'s contract makes them valid on any thread.
unsafe impl Send for CopyRequest {}
unsafe impl Sync for CopyRequest {}

impl CopyRequest {
    /// A host-to-host copy of `len` bytes from `src` to `dst`.
    pub fn host(src: *const u8, dst: *mut u8, len: usize) -> CopyRequest {
        CopyRequest {
            src,
            dst,
            len,
            deferred: false,
        }
    }

    /// A request the engine does not copy; completed by [`CopyJob::mark_complete`].
    pub fn deferred(len: usize) -> CopyRequest {
        CopyRequest {
            src: std::ptr::null(),
            dst: std::ptr::null_mut(),
            len,
            deferred: true,
        }
    }

    /// Bytes this request moves.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the request moves no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A slice of one request: chunks are made of pieces.
#[derive(Clone, Copy)]
struct Piece {
    request: u32,
    offset: usize,
    len: usize,
}

/// The state of one submitted job, shared by its workers and its waiters.
struct JobState {
    requests: Vec<CopyRequest>,
    pieces: Vec<Piece>,
    /// Chunk `i` is `pieces[chunk_bounds[i]..chunk_bounds[i + 1]]`.
    chunk_bounds: Vec<usize>,
    /// The chunks split into one contiguous range per worker: `(next chunk to claim, end)`.
    /// Each worker streams through its own range (long sequential runs are what the memory
    /// system is fastest at) and then helps finish the others.
    partitions: Vec<(AtomicUsize, usize)>,
    next_worker: AtomicUsize,
    pieces_left: Vec<AtomicU32>,
    request_done: Vec<AtomicBool>,
    requests_left: AtomicUsize,
    completed: SegQueue<usize>,
    waiters: AtomicUsize,
    signal: Mutex<()>,
    changed: Condvar,
}

impl JobState {
    fn plan(requests: Vec<CopyRequest>) -> JobState {
        let mut pieces = Vec::new();
        let mut chunk_bounds = vec![0];
        let mut chunk_fill = 0usize;
        let mut pieces_per_request = vec![0u32; requests.len()];
        for (index, request) in requests.iter().enumerate() {
            if request.deferred || request.len == 0 {
                continue;
            }
            let mut offset = 0;
            while offset < request.len {
                let len = (request.len - offset).min(CHUNK_BYTES - chunk_fill);
                pieces.push(Piece {
                    request: index as u32,
                    offset,
                    len,
                });
                pieces_per_request[index] += 1;
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
        let state = JobState {
            pieces_left: pieces_per_request.into_iter().map(AtomicU32::new).collect(),
            request_done: requests.iter().map(|_| AtomicBool::new(false)).collect(),
            requests_left: AtomicUsize::new(requests.len()),
            requests,
            pieces,
            chunk_bounds,
            partitions: Vec::new(),
            next_worker: AtomicUsize::new(0),
            completed: SegQueue::new(),
            waiters: AtomicUsize::new(0),
            signal: Mutex::new(()),
            changed: Condvar::new(),
        };
        // Requests with nothing for the engine to copy are complete at once (unless deferred).
        for (index, request) in state.requests.iter().enumerate() {
            if request.len == 0 && !request.deferred {
                state.finish_request(index);
            }
        }
        state
    }

    fn chunk_count(&self) -> usize {
        self.chunk_bounds.len() - 1
    }

    /// Splits the chunks into `workers` contiguous ranges, one per worker that will run the job.
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
            let request = &self.requests[piece.request as usize];
            // SAFETY: `submit`'s caller guarantees both ranges are valid and disjoint until the
            // job completes; each chunk is claimed by exactly one thread through its range's
            // cursor.
            unsafe {
                copy_bytes(
                    request.src.add(piece.offset),
                    request.dst.add(piece.offset),
                    piece.len,
                );
            }
            if self.pieces_left[piece.request as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
                self.finish_request(piece.request as usize);
            }
        }
    }

    fn finish_request(&self, index: usize) {
        if self.request_done[index].swap(true, Ordering::AcqRel) {
            return;
        }
        self.completed.push(index);
        self.requests_left.fetch_sub(1, Ordering::AcqRel);
        if self.waiters.load(Ordering::Acquire) > 0 {
            // Taking the lock orders this notification after a waiter's check-then-sleep.
            let _guard = self.signal.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }

    /// Sleeps until `ready()` or the deadline; returns `ready()`.
    fn wait_until(&self, ready: impl Fn() -> bool, deadline: Option<Instant>) -> bool {
        if ready() {
            return true;
        }
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.signal.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            if ready() {
                break true;
            }
            match deadline {
                None => guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break false;
                    }
                    guard = self
                        .changed
                        .wait_timeout(guard, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        };
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::AcqRel);
        result
    }
}

/// A submitted job: wait for it whole or per request.
///
/// # Thread Safety
/// `Send + Sync`; clone it to wait from several threads.
#[derive(Clone)]
pub struct CopyJob {
    state: Arc<JobState>,
}

impl CopyJob {
    /// Number of requests in the job.
    pub fn len(&self) -> usize {
        self.state.requests.len()
    }

    /// Whether the job has no requests.
    pub fn is_empty(&self) -> bool {
        self.state.requests.is_empty()
    }

    /// Whether every request has completed.
    pub fn is_done(&self) -> bool {
        self.state.requests_left.load(Ordering::Acquire) == 0
    }

    /// Whether request `index` has completed.
    pub fn is_request_done(&self, index: usize) -> bool {
        self.state.request_done[index].load(Ordering::Acquire)
    }

    /// Blocks until every request has completed.
    pub fn wait(&self) {
        self.state.wait_until(|| self.is_done(), None);
    }

    /// Blocks until every request has completed or `timeout` passes; returns whether it completed.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.state
            .wait_until(|| self.is_done(), Some(Instant::now() + timeout))
    }

    /// Blocks until request `index` has completed.
    pub fn wait_request(&self, index: usize) {
        self.state.wait_until(|| self.is_request_done(index), None);
    }

    /// The next request to complete that no one has taken yet, waiting up to `timeout` for one;
    /// `None` once all have been taken or on timeout.
    pub fn next_completed(&self, timeout: Option<Duration>) -> Option<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(index) = self.state.completed.pop() {
                return Some(index);
            }
            if self.is_done() && self.state.completed.is_empty() {
                return None;
            }
            let arrived = self.state.wait_until(
                || !self.state.completed.is_empty() || self.is_done(),
                deadline,
            );
            if !arrived {
                return None;
            }
        }
    }

    /// Completes a deferred request once its bytes are in place.
    pub fn mark_complete(&self, index: usize) {
        self.state.finish_request(index);
    }
}

/// A fixed set of worker threads that run copy jobs. See the module docs.
///
/// # Thread Safety
/// `Send + Sync`. Dropping the engine lets the workers finish the jobs already queued and exit.
pub struct CopyEngine {
    sender: Option<Sender<Arc<JobState>>>,
    workers: Vec<JoinHandle<()>>,
}

impl CopyEngine {
    /// Starts `num_threads` workers (at least one).
    pub fn new(num_threads: usize) -> CopyEngine {
        CopyEngine::with_niceness(num_threads, 0)
    }

    /// Starts `num_threads` workers whose scheduling priority is lowered by `niceness` (Linux
    /// `nice`, 0-19). Background staging uses this so that copies take the cores the training
    /// thread leaves idle instead of competing with it; with idle cores they run as fast.
    pub fn with_niceness(num_threads: usize, niceness: i32) -> CopyEngine {
        let (sender, receiver) = crossbeam_channel::unbounded::<Arc<JobState>>();
        let workers = (0..num_threads.max(1))
            .map(|index| {
                let receiver: Receiver<Arc<JobState>> = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("stager-copy-{index}"))
                    .spawn(move || {
                        if niceness > 0 {
                            lower_this_threads_priority(niceness);
                        }
                        while let Ok(job) = receiver.recv() {
                            job.run();
                        }
                    })
                    .expect("spawning a copy worker")
            })
            .collect();
        CopyEngine {
            sender: Some(sender),
            workers,
        }
    }

    /// Number of worker threads.
    pub fn num_threads(&self) -> usize {
        self.workers.len()
    }

    /// Starts copying `requests`; returns at once unless the job is small enough to run inline.
    ///
    /// # Safety
    /// For every host request, `src..src+len` must be readable and `dst..dst+len` writable and
    /// not overlap any other request's destination or any source, and both must stay valid and
    /// untouched by anyone else until the job reports that request complete.
    pub unsafe fn submit(&self, requests: Vec<CopyRequest>) -> CopyJob {
        let mut state = JobState::plan(requests);
        let total: usize = state.pieces.iter().map(|piece| piece.len).sum();
        let chunks = state.chunk_count();
        let inline = total < INLINE_BYTES || chunks <= 1;
        let workers = if inline {
            1
        } else {
            self.workers.len().min(chunks)
        };
        state.partition(workers);
        let state = Arc::new(state);
        if inline {
            state.run();
        } else {
            let sender = self.sender.as_ref().expect("engine is running");
            for _ in 0..workers {
                sender.send(state.clone()).expect("copy workers are alive");
            }
        }
        CopyJob { state }
    }
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
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn copy_all(engine: &CopyEngine, sources: &[Vec<u8>]) -> (Vec<Vec<u8>>, CopyJob) {
        let mut targets: Vec<Vec<u8>> = sources.iter().map(|s| vec![0; s.len()]).collect();
        let requests = sources
            .iter()
            .zip(targets.iter_mut())
            .map(|(s, t)| CopyRequest::host(s.as_ptr(), t.as_mut_ptr(), s.len()))
            .collect();
        // SAFETY: sources and targets outlive the job; the caller waits before reading.
        let job = unsafe { engine.submit(requests) };
        job.wait();
        (targets, job)
    }

    #[test]
    fn large_request_is_split_and_copied_exactly() {
        let engine = CopyEngine::new(3);
        let sources = vec![pattern(3 * CHUNK_BYTES + 12_345, 1)];
        let (targets, job) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
        assert!(job.is_done() && job.is_request_done(0));
    }

    #[test]
    fn many_tiny_requests_including_empty_ones() {
        let engine = CopyEngine::new(2);
        let sources: Vec<Vec<u8>> = (0..20_000).map(|i| pattern(i % 97, i as u8)).collect();
        let (targets, job) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
        assert_eq!(job.len(), 20_000);
    }

    #[test]
    fn mixed_sizes_spanning_chunk_boundaries() {
        let engine = CopyEngine::new(4);
        let sources: Vec<Vec<u8>> = (0..64)
            .map(|i| pattern((i * 977_123) % (2 * CHUNK_BYTES) + 1, i as u8))
            .collect();
        let (targets, _) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
    }

    #[test]
    fn completion_queue_yields_every_request_once() {
        let engine = CopyEngine::new(2);
        let sources: Vec<Vec<u8>> = (0..40).map(|i| pattern(CHUNK_BYTES / 3, i)).collect();
        let (_, job) = copy_all(&engine, &sources);
        let mut seen: Vec<usize> = std::iter::from_fn(|| job.next_completed(None)).collect();
        seen.sort();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn concurrent_submitters_share_the_workers() {
        let engine = CopyEngine::new(2);
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
    fn deferred_requests_complete_when_marked() {
        let engine = CopyEngine::new(1);
        // SAFETY: deferred requests carry no pointers.
        let job =
            unsafe { engine.submit(vec![CopyRequest::deferred(10), CopyRequest::deferred(0)]) };
        assert!(!job.is_done());
        assert!(!job.wait_timeout(Duration::from_millis(10)));
        let marker = job.clone();
        let thread = std::thread::spawn(move || {
            marker.mark_complete(1);
            marker.mark_complete(0);
        });
        assert_eq!(job.next_completed(Some(Duration::from_secs(5))), Some(1));
        job.wait_request(0);
        job.wait();
        thread.join().unwrap();
        assert_eq!(job.next_completed(None), Some(0));
        assert_eq!(job.next_completed(None), None);
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
        let engine = CopyEngine::with_niceness(2, 10);
        let sources = vec![pattern(3 * CHUNK_BYTES + 5, 9), pattern(100, 1)];
        let (targets, _) = copy_all(&engine, &sources);
        assert_eq!(targets, sources);
    }

    #[test]
    fn wait_timeout_reports_completion() {
        let engine = CopyEngine::new(2);
        let sources = vec![pattern(8 * CHUNK_BYTES, 3)];
        let mut target = vec![0u8; sources[0].len()];
        // SAFETY: both buffers outlive the wait below.
        let job = unsafe {
            engine.submit(vec![CopyRequest::host(
                sources[0].as_ptr(),
                target.as_mut_ptr(),
                target.len(),
            )])
        };
        assert!(job.wait_timeout(Duration::from_secs(30)));
        assert_eq!(target, sources[0]);
    }
}
