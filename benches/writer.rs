//! The durable writer and the header parser. Run with `cargo bench --bench writer`.
//!
//! - `write/*`: `writer::write_file` (temp file, pwritev, crc32c, fsync, rename, directory fsync)
//!   of one 64 MiB buffer and of 20,000 small ones, in the system temp directory (set TMPDIR to
//!   a real disk to measure it; on tmpfs this measures the writer's own overhead);
//! - `header/*`: `format::build_header` and `format::parse_header` + `format::stager_layout` of a
//!   20,000-entry header, the work `stager.load` does before reading any data.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stager::format::{self, EntrySpec};
use stager::writer::{write_file, Source};

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
            dtype: "F32".into(),
            shape: vec![(n / 4) as u64],
            nbytes: n as u64,
        })
        .collect()
}

fn bench_writer(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.safetensors");
    let mut group = c.benchmark_group("write");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    let large = vec![7u8; 64 << 20];
    let large_specs = specs(&[large.len()]);
    let large_sources = [Source {
        ptr: large.as_ptr(),
        request: None,
    }];
    group.throughput(Throughput::Bytes(large.len() as u64));
    group.bench_function("one_64MiB_buffer", |b| {
        b.iter(|| {
            // SAFETY: `large` outlives the call.
            unsafe { write_file(&path, &large_specs, &large_sources, metadata(), None) }.unwrap()
        })
    });

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
    group.throughput(Throughput::Elements(small.len() as u64));
    group.bench_function("20000_small_buffers", |b| {
        b.iter(|| {
            // SAFETY: `small` outlives the call.
            unsafe { write_file(&path, &small_specs, &small_sources, metadata(), None) }.unwrap()
        })
    });
    group.finish();
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

criterion_group!(benches, bench_writer, bench_header);
criterion_main!(benches);
