//! The durable writer and the reader against the raw device, and the header parser. Run with
//! `cargo bench --bench writer`; files go to `$STAGER_BENCH_DIR`, else cargo's target temp
//! directory (on the disk the build is on: put it on the disk you want to measure; on tmpfs the
//! rows measure stager's overhead over the page cache).
//!
//! - `write_256MiB`: the device's limit (`device_*`: one page-aligned buffer written with
//!   `O_DIRECT` requests of 8 MiB, then `fsync`; from 1 thread, from [`IO_DEPTH`] threads, and
//!   with `io_uring` [`IO_DEPTH`] in flight — the measurement behind `direct_io`'s choice of
//!   threads), against `writer::write_file` (temp file, fallocate, data, header, fsync, rename,
//!   directory fsync) of 400 storages from one staged buffer (`writer_staged_buffer`: one
//!   direct run) and from separate unaligned allocations (`writer_unaligned_sources`: bounced);
//! - `write_small`: 20,000 small storages (the cost per storage);
//! - `read_256MiB`: the device's limit for reads (`O_DIRECT` from [`IO_DEPTH`] threads, and
//!   with `io_uring`) against `CheckpointFile::read_into` (verify=true) and `verify`, each with
//!   the file dropped from the page cache first;
//! - `header`: `format::build_header` and `format::parse_header` + `format::stager_layout` of a
//!   20,000-entry header, the work `stager.load` does before reading any data.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stager::direct_io::{AlignedBuf, IO_CHUNK, IO_DEPTH};
use stager::format::{self, EntrySpec};
use stager::reader::CheckpointFile;
use stager::writer::{write_file, Source, StagedBuffer};

const LARGE: usize = 256 << 20;

fn bench_dir() -> tempfile::TempDir {
    let root = std::env::var_os("STAGER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

fn metadata() -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    meta.insert(format::KEY_FORMAT.into(), "stager".into());
    meta.insert(format::KEY_VERSION.into(), format::VERSION.into());
    meta.insert(format::KEY_TREE.into(), "{}".into());
    meta
}

fn specs(sizes: &[usize]) -> Vec<EntrySpec> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| EntrySpec {
            name: format!("layers.{}.param{}", i / 8, i % 8),
            dtype: stager::format::Dtype::UInt8,
            shape: vec![n as u64],
            nbytes: n as u64,
        })
        .collect()
}

/// 400 storages of a transformer-like mix (large matrices, small vectors) adding up to LARGE.
fn storage_sizes() -> Vec<usize> {
    let mut sizes: Vec<usize> = (0..400)
        .map(|i| if i % 4 == 0 { 4 + i % 7 } else { 800 << 10 })
        .collect();
    let used: usize = sizes.iter().map(|n| n.div_ceil(64) * 64).sum();
    sizes[1] += LARGE - used;
    sizes
}

/// A page-aligned buffer of `len` bytes, every page touched.
fn touched(len: usize) -> AlignedBuf {
    let mut buffer = AlignedBuf::take(len).unwrap();
    for (i, byte) in buffer.slice_mut(len).iter_mut().enumerate() {
        *byte = (i % 253) as u8;
    }
    buffer
}

fn open_direct(path: &Path, write: bool) -> File {
    let mut options = std::fs::OpenOptions::new();
    if write {
        options.write(true).create(true).truncate(true);
    } else {
        options.read(true);
    }
    options.custom_flags(libc::O_DIRECT).open(path).unwrap()
}

fn drop_cache(path: &Path) {
    let file = File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: advice on our own descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// `len` bytes from `buffer` to (`write`) or from the file, IO_CHUNK per request, from `threads`
/// threads, like the writer and the reader.
fn threads_io(file: &File, buffer: &AlignedBuf, len: usize, threads: usize, write: bool) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (fd, base) = (file.as_raw_fd(), buffer.as_ptr() as usize);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * IO_CHUNK;
                if at >= len {
                    break;
                }
                let n = IO_CHUNK.min(len - at);
                // SAFETY: `[base + at, base + at + n)` lies in the buffer; requests are disjoint.
                let done = unsafe {
                    if write {
                        libc::pwrite(fd, (base + at) as *const _, n, at as libc::off_t)
                    } else {
                        libc::pread(fd, (base + at) as *mut _, n, at as libc::off_t)
                    }
                };
                assert_eq!(done, n as isize, "{}", std::io::Error::last_os_error());
            });
        }
    });
}

/// The same with `io_uring`, `depth` requests in flight.
fn uring_io(file: &File, buffer: &AlignedBuf, len: usize, depth: usize, write: bool) {
    use io_uring::{opcode, types, IoUring};
    let mut ring = IoUring::new(depth as u32 * 2).unwrap();
    let fd = types::Fd(file.as_raw_fd());
    let total = len.div_ceil(IO_CHUNK);
    let (mut submitted, mut completed) = (0, 0);
    while completed < total {
        while submitted - completed < depth && submitted < total {
            let at = submitted * IO_CHUNK;
            let n = IO_CHUNK.min(len - at) as u32;
            let ptr = buffer.as_ptr().wrapping_add(at);
            let entry = if write {
                opcode::Write::new(fd, ptr, n).offset(at as u64).build()
            } else {
                opcode::Read::new(fd, ptr, n).offset(at as u64).build()
            };
            // SAFETY: the buffer outlives the ring's use of it (we wait for every completion).
            unsafe { ring.submission().push(&entry.user_data(n as u64)) }.unwrap();
            submitted += 1;
        }
        ring.submit_and_wait(1).unwrap();
        for done in ring.completion() {
            assert_eq!(done.result() as u64, done.user_data());
            completed += 1;
        }
    }
}

fn bench_write(c: &mut Criterion) {
    let dir = bench_dir();
    let limit_path = dir.path().join("limit.bin");
    let path = dir.path().join("bench.safetensors");
    let buffer = touched(LARGE);
    let mut group = c.benchmark_group("write_256MiB");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(LARGE as u64));
    let raw = |name: &str, group: &mut criterion::BenchmarkGroup<_>, run: &dyn Fn(&File)| {
        group.bench_function(name, |b| {
            b.iter(|| {
                let _ = std::fs::remove_file(&limit_path);
                let file = open_direct(&limit_path, true);
                run(&file);
                file.sync_all().unwrap();
            })
        });
    };
    raw("device_direct_1_thread", &mut group, &|f| {
        threads_io(f, &buffer, LARGE, 1, true)
    });
    raw(
        &format!("device_direct_{IO_DEPTH}_threads"),
        &mut group,
        &|f| threads_io(f, &buffer, LARGE, IO_DEPTH, true),
    );
    raw(
        &format!("device_direct_io_uring_{IO_DEPTH}_in_flight"),
        &mut group,
        &|f| uring_io(f, &buffer, LARGE, IO_DEPTH, true),
    );
    let _ = std::fs::remove_file(&limit_path);

    let sizes = storage_sizes();
    let all_specs = specs(&sizes);
    let mut offsets = Vec::new();
    let mut at = 0;
    for &n in &sizes {
        offsets.push(at);
        at += n.div_ceil(64) * 64;
    }
    let staged_sources: Vec<Source> = offsets
        .iter()
        .map(|&o| Source {
            ptr: buffer.as_ptr().wrapping_add(o),
            request: None,
        })
        .collect();
    let staged = StagedBuffer {
        ptr: buffer.as_ptr(),
        len: buffer.capacity(),
    };
    group.bench_function("writer_staged_buffer", |b| {
        b.iter(|| {
            // SAFETY: the buffer outlives the call; its padding is nobody's.
            unsafe {
                write_file(
                    &path,
                    &all_specs,
                    &staged_sources,
                    metadata(),
                    None,
                    Some(staged),
                )
            }
            .unwrap()
        })
    });
    // Tensors' own memory: separate allocations, 16 bytes off any alignment.
    let owned: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![5u8; n + 16]).collect();
    let owned_sources: Vec<Source> = owned
        .iter()
        .map(|v| Source {
            ptr: v[16..].as_ptr(),
            request: None,
        })
        .collect();
    group.bench_function("writer_unaligned_sources", |b| {
        b.iter(|| {
            // SAFETY: `owned` outlives the call.
            unsafe { write_file(&path, &all_specs, &owned_sources, metadata(), None, None) }
                .unwrap()
        })
    });
    group.finish();

    let small: Vec<Vec<u8>> = (0..20_000)
        .map(|i| vec![i as u8; 16 + 4 * (i % 29)])
        .collect();
    let small_specs = specs(&small.iter().map(Vec::len).collect::<Vec<_>>());
    let small_sources: Vec<Source> = small
        .iter()
        .map(|b| Source {
            ptr: b.as_ptr(),
            request: None,
        })
        .collect();
    let mut group = c.benchmark_group("write_small");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(small.len() as u64));
    group.bench_function("writer_20000_small_buffers", |b| {
        b.iter(|| {
            // SAFETY: `small` outlives the call.
            unsafe { write_file(&path, &small_specs, &small_sources, metadata(), None, None) }
                .unwrap()
        })
    });
    group.finish();
    buffer.recycle();
}

fn bench_read(c: &mut Criterion) {
    let dir = bench_dir();
    let path = dir.path().join("read.safetensors");
    let mut buffer = touched(LARGE + (1 << 20));
    let sizes = storage_sizes();
    let sources: Vec<Source> = {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                let source = Source {
                    ptr: buffer.as_ptr().wrapping_add(at),
                    request: None,
                };
                at += n.div_ceil(64) * 64;
                source
            })
            .collect()
    };
    let staged = StagedBuffer {
        ptr: buffer.as_ptr(),
        len: buffer.capacity(),
    };
    // SAFETY: the buffer outlives the call; its padding is nobody's.
    unsafe {
        write_file(
            &path,
            &specs(&sizes),
            &sources,
            metadata(),
            None,
            Some(staged),
        )
    }
    .unwrap();
    let file = CheckpointFile::open(&path).unwrap();
    let layout = file.layout().unwrap();
    let data_start = file.header().data_start;
    let offsets: Vec<usize> = layout
        .storages
        .iter()
        .map(|s| (s.offset - data_start) as usize)
        .collect();
    let data_len = file.header().data_len as usize;
    let mut group = c.benchmark_group("read_256MiB");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(data_len as u64));
    let direct = open_direct(&path, false);
    let aligned_len = data_len / 4096 * 4096;
    group.bench_function(format!("device_direct_{IO_DEPTH}_threads"), |b| {
        b.iter(|| threads_io(&direct, &buffer, aligned_len, IO_DEPTH, false))
    });
    group.bench_function(
        format!("device_direct_io_uring_{IO_DEPTH}_in_flight"),
        |b| b.iter(|| uring_io(&direct, &buffer, aligned_len, IO_DEPTH, false)),
    );
    let capacity = buffer.capacity();
    let dst = buffer.slice_mut(capacity).as_mut_ptr();
    group.bench_function("reader_read_into_cold", |b| {
        b.iter_batched(
            || drop_cache(&path),
            // SAFETY: the buffer holds every range and nothing else uses it meanwhile.
            |()| unsafe { file.read_into(dst, data_len, capacity, &offsets, true) }.unwrap(),
            criterion::BatchSize::PerIteration,
        )
    });
    group.bench_function("reader_verify_cold", |b| {
        b.iter_batched(
            || drop_cache(&path),
            |()| assert!(file.verify().unwrap().is_empty()),
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
    buffer.recycle();
}

fn bench_header(c: &mut Criterion) {
    let sizes: Vec<usize> = (0..20_000).map(|i| 16 + 4 * (i % 29)).collect();
    let specs = specs(&sizes);
    let entries = format::layout_entries(&specs).unwrap();
    let mut meta = metadata();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    meta.insert(
        format::KEY_STORAGES.into(),
        serde_json::to_string(&names).unwrap(),
    );
    meta.insert(
        format::KEY_CRC.into(),
        format::format_crcs(&vec![0xabcdef01; specs.len()]),
    );
    let header = format::build_header(&entries, &meta).unwrap();
    let file_len = header.len() as u64 + entries.last().unwrap().end;

    let mut group = c.benchmark_group("header");
    group.throughput(Throughput::Elements(specs.len() as u64));
    group.sample_size(20);
    group.bench_function("build_20000_entries", |b| {
        b.iter(|| format::build_header(&entries, &meta).unwrap())
    });
    group.bench_function("parse_and_check_20000_entries", |b| {
        b.iter(|| {
            let parsed = format::parse_header(&header[8..], file_len).unwrap();
            format::stager_layout(&parsed).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_write, bench_read, bench_header);
criterion_main!(benches);
