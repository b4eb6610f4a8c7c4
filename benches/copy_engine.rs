//! Copy engine vs a single `copy_from_slice`, on one large buffer and on 20,000 tiny ones, the
//! copy kernel (`copy_bytes`: non-temporal stores from `STREAMING_BYTES` up) against `memcpy`
//! (`copy_nonoverlapping`) per piece size on one thread, and the machine's limits
//! (`stager::limits`: a plain parallel memcpy into touched and fresh memory) that `stager bench`
//! compares the stagers with. Run with `cargo bench --bench copy_engine`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stager::completion::Completion;
use stager::copy_engine::{copy_bytes, CopyEngine, HostCopy};
use stager::limits::{copy_limit_from, Target};
use stager::pool::{HostPool, PoolOptions};

fn large_copy(c: &mut Criterion) {
    let len = 256 << 20;
    let source = vec![3u8; len];
    let pool = HostPool::new(PoolOptions::default());
    let mut target = pool.acquire(len).unwrap();
    target.as_mut_slice().fill(1); // touched memory: measure the copy, not page faults
    let mut group = c.benchmark_group("large_256MiB");
    group.throughput(Throughput::Bytes(len as u64));
    group.sample_size(20);
    group.bench_function("copy_from_slice", |b| {
        b.iter(|| target.as_mut_slice().copy_from_slice(&source))
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for threads in [1, threads] {
        let engine = CopyEngine::new(threads).unwrap();
        group.bench_with_input(BenchmarkId::new("engine", threads), &threads, |b, _| {
            b.iter(|| {
                let done = Completion::new(1);
                let copy = HostCopy {
                    request: 0,
                    src: source.as_ptr(),
                    dst: target.as_ptr(),
                    len,
                };
                // SAFETY: source and target outlive the batch, which is waited for.
                unsafe { engine.submit(&done, vec![copy], None) }.unwrap();
                done.wait_all(None).unwrap();
            })
        });
    }
    group.finish();
}

fn tiny_copies(c: &mut Criterion) {
    let count = 20_000;
    let sources: Vec<Vec<u8>> = (0..count).map(|i| vec![i as u8; 16 + i % 48]).collect();
    let total: usize = sources.iter().map(|s| s.len().next_multiple_of(64)).sum();
    let pool = HostPool::new(PoolOptions::default());
    let target = pool.acquire(total).unwrap();
    let mut offsets = Vec::with_capacity(count);
    let mut offset = 0;
    for source in &sources {
        offsets.push(offset);
        offset += source.len().next_multiple_of(64);
    }
    let mut group = c.benchmark_group("tiny_20000");
    group.throughput(Throughput::Elements(count as u64));
    group.bench_function("copy_from_slice_loop", |b| {
        b.iter(|| {
            for (source, &offset) in sources.iter().zip(&offsets) {
                // SAFETY: each destination range lies inside `target` and ranges are disjoint.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        source.as_ptr(),
                        target.as_ptr().add(offset),
                        source.len(),
                    )
                };
            }
        })
    });
    let engine = CopyEngine::new(2).unwrap();
    group.bench_function("engine", |b| {
        b.iter(|| {
            let copies = sources
                .iter()
                .zip(&offsets)
                .enumerate()
                .map(|(request, (s, &o))| HostCopy {
                    request,
                    src: s.as_ptr(),
                    dst: target.as_ptr().wrapping_add(o),
                    len: s.len(),
                })
                .collect();
            let done = Completion::new(count);
            // SAFETY: sources and target outlive the batch, which is waited for; the
            // destinations are disjoint ranges inside `target`.
            unsafe { engine.submit(&done, copies, None) }.unwrap();
            done.wait_all(None).unwrap();
        })
    });
    group.finish();
}

/// The copy kernel against memcpy, one thread, touched memory larger than the caches: each
/// iteration copies the whole 256 MiB in pieces of the given size.
fn kernels(c: &mut Criterion) {
    let len = 256 << 20;
    let source = vec![3u8; len];
    let mut target = vec![1u8; len];
    let mut group = c.benchmark_group("kernel_256MiB");
    group.throughput(Throughput::Bytes(len as u64));
    group.sample_size(10);
    for piece in [64 << 10, 256 << 10, 4 << 20, 64 << 20] {
        group.bench_with_input(BenchmarkId::new("memcpy", piece), &piece, |b, &piece| {
            b.iter(|| {
                for offset in (0..len).step_by(piece) {
                    // SAFETY: both ranges lie inside their vectors, which do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            source.as_ptr().add(offset),
                            target.as_mut_ptr().add(offset),
                            piece.min(len - offset),
                        )
                    };
                }
            })
        });
        group.bench_with_input(
            BenchmarkId::new("copy_bytes", piece),
            &piece,
            |b, &piece| {
                b.iter(|| {
                    for offset in (0..len).step_by(piece) {
                        // SAFETY: both ranges lie inside their vectors, which do not overlap.
                        unsafe {
                            copy_bytes(
                                source.as_ptr().add(offset),
                                target.as_mut_ptr().add(offset),
                                piece.min(len - offset),
                            )
                        };
                    }
                })
            },
        );
    }
    group.finish();
}

/// The limits, timed by `copy_limit_from` itself so mapping and unmapping fresh memory stay out.
fn limits(c: &mut Criterion) {
    let len = 256 << 20;
    let source = vec![3u8; len];
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut group = c.benchmark_group("limit_256MiB");
    group.throughput(Throughput::Bytes(len as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for (name, target) in [
        ("touched", Target::Touched),
        ("fresh_private", Target::FreshPrivate),
        ("fresh_shared", Target::FreshShared),
    ] {
        group.bench_with_input(BenchmarkId::new(name, threads), &target, |b, &target| {
            b.iter_custom(|iters| {
                let seconds = copy_limit_from(&source, threads, target, iters as usize).unwrap();
                Duration::from_secs_f64(seconds.iter().sum())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, large_copy, tiny_copies, kernels, limits);
criterion_main!(benches);
