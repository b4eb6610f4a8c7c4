//! Completion: "request i of this batch is done", shared by everything that produces or consumes
//! staged bytes.
//!
//! A stage is one [`Completion`] with one request per storage (request i is storage i). The copy
//! engine completes the host copies, the CUDA copier the device copies, a network receive the
//! storages it filled; the durable writer waits for request i before writing storage i, a sender
//! before sending it. Producers and consumers only share this type, never each other's.
//!
//! Features:
//! - completion per request, lock-free on the producer side (one atomic swap, one decrement, and
//!   a lock only when someone is waiting);
//! - waits for one request, for all, or for whichever completes next ([`Completion::next_completed`]),
//!   each with an optional deadline, so callers can wake up to check for Ctrl-C or a timeout;
//! - failure: [`Completion::fail`] ends the batch; every waiter, present and future, gets the error.
//!
//! # Example
//! ```
//! use stager::completion::{Completion, Next};
//! let done = Completion::new(3);
//! let producer = done.clone();
//! std::thread::spawn(move || for i in [2, 0, 1] { producer.mark_complete(i); });
//! done.wait(1, None).unwrap();
//! assert!(done.wait_all(None).unwrap());
//! let mut order = Vec::new();
//! while let Next::Ready(i) = done.next_completed(None).unwrap() { order.push(i); }
//! order.sort();
//! assert_eq!(order, [0, 1, 2]);
//! ```
//!
//! # Thread Safety
//! `Send + Sync` and cheap to clone (an `Arc`). Any thread may complete requests or wait.
//! [`Completion::next_completed`] hands each index out once, across all its callers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crossbeam_queue::SegQueue;

use crate::error::{Result, StagerError};

/// What [`Completion::next_completed`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Request `i` has completed and no one had taken it yet.
    Ready(usize),
    /// Every request has been handed out.
    Exhausted,
    /// The deadline passed first.
    TimedOut,
}

struct Inner {
    done: Vec<AtomicBool>,
    left: AtomicUsize,
    failure: Mutex<Option<StagerError>>,
    failed: AtomicBool,
    // Completion order, kept only once someone asks for it (most batches never do).
    ordered: AtomicBool,
    order: SegQueue<usize>,
    taken: Vec<AtomicBool>,
    taken_count: AtomicUsize,
    // Sleeping waiters.
    waiters: AtomicUsize,
    signal: Mutex<()>,
    changed: Condvar,
}

/// Completion of a batch of requests. See the module docs.
#[derive(Clone)]
pub struct Completion {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("len", &self.len())
            .field("left", &self.inner.left.load(Ordering::Relaxed))
            .field("failed", &self.inner.failed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Completion {
    /// A batch of `len` requests, none complete.
    pub fn new(len: usize) -> Completion {
        Completion {
            inner: Arc::new(Inner {
                done: (0..len).map(|_| AtomicBool::new(false)).collect(),
                left: AtomicUsize::new(len),
                failure: Mutex::new(None),
                failed: AtomicBool::new(false),
                ordered: AtomicBool::new(false),
                order: SegQueue::new(),
                taken: (0..len).map(|_| AtomicBool::new(false)).collect(),
                taken_count: AtomicUsize::new(0),
                waiters: AtomicUsize::new(0),
                signal: Mutex::new(()),
                changed: Condvar::new(),
            }),
        }
    }

    /// Number of requests.
    pub fn len(&self) -> usize {
        self.inner.done.len()
    }

    /// Whether the batch has no requests (it is complete from the start).
    pub fn is_empty(&self) -> bool {
        self.inner.done.is_empty()
    }

    /// Marks request `index` complete; returns whether this call completed it (false when it
    /// already was, or when `index` is out of range).
    pub fn mark_complete(&self, index: usize) -> bool {
        let inner = &*self.inner;
        let Some(flag) = inner.done.get(index) else {
            return false;
        };
        // SeqCst pairs with `next_completed`'s store of `ordered` and scan of `done`: either the
        // scan sees this request, or this call sees `ordered` and queues it (or both; `taken`
        // removes the duplicate).
        if flag.swap(true, Ordering::SeqCst) {
            return false;
        }
        if inner.ordered.load(Ordering::SeqCst) {
            inner.order.push(index);
        }
        inner.left.fetch_sub(1, Ordering::AcqRel);
        self.notify();
        true
    }

    /// Marks every request in `indices` complete.
    pub fn mark_all<I: IntoIterator<Item = usize>>(&self, indices: I) {
        for index in indices {
            self.mark_complete(index);
        }
    }

    /// Ends the batch with `error`: waiters see it (the first failure wins) and every request
    /// still outstanding is marked complete so nobody sleeps on it. Producers still running may
    /// keep writing into their targets until they notice; a failed batch's bytes are not to be used.
    pub fn fail(&self, error: StagerError) {
        {
            let mut failure = self.lock_failure();
            if failure.is_none() {
                *failure = Some(error);
            }
        }
        self.inner.failed.store(true, Ordering::Release);
        for index in 0..self.len() {
            self.mark_complete(index);
        }
        self.notify();
    }

    /// The failure that ended the batch, if any.
    pub fn failure(&self) -> Option<StagerError> {
        if !self.inner.failed.load(Ordering::Acquire) {
            return None;
        }
        self.lock_failure().as_ref().map(StagerError::duplicate)
    }

    /// Whether request `index` has completed (false when out of range).
    pub fn is_done(&self, index: usize) -> bool {
        self.inner
            .done
            .get(index)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    /// Whether every request has completed.
    pub fn all_done(&self) -> bool {
        self.inner.left.load(Ordering::Acquire) == 0
    }

    /// Number of requests not yet complete.
    pub fn outstanding(&self) -> usize {
        self.inner.left.load(Ordering::Acquire)
    }

    /// Waits until request `index` completes (`Ok(true)`) or `deadline` passes (`Ok(false)`);
    /// the batch's failure if it failed. An out-of-range index is an error.
    pub fn wait(&self, index: usize, deadline: Option<Instant>) -> Result<bool> {
        if index >= self.len() {
            return Err(StagerError::invalid(format!(
                "request {index} is out of range: the batch has {} requests",
                self.len()
            )));
        }
        let reached = self.sleep_until(|| self.is_done(index), deadline);
        self.outcome(reached)
    }

    /// Waits until every request completes (`Ok(true)`) or `deadline` passes (`Ok(false)`);
    /// the batch's failure if it failed.
    pub fn wait_all(&self, deadline: Option<Instant>) -> Result<bool> {
        let reached = self.sleep_until(|| self.all_done(), deadline);
        self.outcome(reached)
    }

    /// The next completed request nobody has taken yet, waiting for one until `deadline`.
    pub fn next_completed(&self, deadline: Option<Instant>) -> Result<Next> {
        let inner = &*self.inner;
        if !inner.ordered.swap(true, Ordering::SeqCst) {
            // First consumer: requests completed before now were not queued; queue them.
            for (index, flag) in inner.done.iter().enumerate() {
                if flag.load(Ordering::SeqCst) {
                    inner.order.push(index);
                }
            }
        }
        loop {
            while let Some(index) = inner.order.pop() {
                if !inner.taken[index].swap(true, Ordering::AcqRel) {
                    inner.taken_count.fetch_add(1, Ordering::AcqRel);
                    return self.outcome(true).map(|_| Next::Ready(index));
                }
            }
            if inner.taken_count.load(Ordering::Acquire) == self.len() {
                return self.outcome(true).map(|_| Next::Exhausted);
            }
            let arrived = self.sleep_until(
                || {
                    !inner.order.is_empty()
                        || inner.taken_count.load(Ordering::Acquire) == self.len()
                },
                deadline,
            );
            if !arrived {
                return self.outcome(false).map(|_| Next::TimedOut);
            }
        }
    }

    fn outcome(&self, reached: bool) -> Result<bool> {
        match self.failure() {
            Some(error) => Err(error),
            None => Ok(reached),
        }
    }

    fn lock_failure(&self) -> MutexGuard<'_, Option<StagerError>> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn notify(&self) {
        let inner = &*self.inner;
        if inner.waiters.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this notification after a waiter's check-then-sleep.
            let _guard = inner.signal.lock().unwrap_or_else(|p| p.into_inner());
            inner.changed.notify_all();
        }
    }

    /// Sleeps until `ready()` or the deadline; returns `ready()`.
    fn sleep_until(&self, ready: impl Fn() -> bool, deadline: Option<Instant>) -> bool {
        if ready() {
            return true;
        }
        let inner = &*self.inner;
        inner.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = inner.signal.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            if ready() {
                break true;
            }
            match deadline {
                None => guard = inner.changed.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break false;
                    }
                    guard = inner
                        .changed
                        .wait_timeout(guard, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        };
        drop(guard);
        inner.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waits_see_every_completion_from_other_threads() {
        let done = Completion::new(1000);
        std::thread::scope(|scope| {
            for part in 0..4 {
                let done = done.clone();
                scope.spawn(move || {
                    for index in (part..1000).step_by(4) {
                        assert!(done.mark_complete(index));
                    }
                });
            }
            assert!(done.wait(999, None).unwrap());
            assert!(done.wait_all(None).unwrap());
        });
        assert!(done.all_done() && !done.mark_complete(3));
    }

    #[test]
    fn next_completed_hands_out_each_index_once_even_when_asked_late() {
        let done = Completion::new(50);
        for index in 0..20 {
            done.mark_complete(index);
        }
        let mut seen = Vec::new();
        std::thread::scope(|scope| {
            let producer = done.clone();
            scope.spawn(move || {
                for index in 20..50 {
                    producer.mark_complete(index);
                }
            });
            loop {
                match done
                    .next_completed(Some(Instant::now() + Duration::from_secs(10)))
                    .unwrap()
                {
                    Next::Ready(index) => seen.push(index),
                    Next::Exhausted => break,
                    Next::TimedOut => panic!("timed out"),
                }
            }
        });
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn deadline_expires_without_completion() {
        let done = Completion::new(2);
        done.mark_complete(0);
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!done.wait(1, Some(soon)).unwrap());
        assert!(!done.wait_all(Some(soon)).unwrap());
        assert!(done.wait(0, Some(soon)).unwrap());
        assert!(done.wait(7, None).is_err());
    }

    #[test]
    fn failure_wakes_waiters_and_reaches_late_ones() {
        let done = Completion::new(3);
        std::thread::scope(|scope| {
            let failer = done.clone();
            scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                failer.fail(StagerError::Failed("copy failed: device lost".into()));
            });
            let err = done.wait(2, None).unwrap_err();
            assert!(err.to_string().contains("device lost"), "{err}");
        });
        assert!(done.wait_all(None).is_err());
        assert!(done.next_completed(None).is_err());
        assert!(done.all_done());
    }

    #[test]
    fn empty_batch_is_complete() {
        let done = Completion::new(0);
        assert!(done.is_empty() && done.all_done());
        assert!(done.wait_all(None).unwrap());
        assert_eq!(done.next_completed(None).unwrap(), Next::Exhausted);
    }
}
