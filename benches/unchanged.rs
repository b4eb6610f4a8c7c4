//! Incremental staging's reuse decision (`stager::unchanged`) at 1k, 20k and 1M storages: the
//! table grouping and the candidate match of one stage against the previous one's records, the
//! part of `skip_unchanged` that grows with the number of tensors. Run with
//! `cargo bench --bench unchanged`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stager::table::{Device, TableBuilder, TensorTable, ViewFacts};
use stager::unchanged::{StageRecords, StorageViews};

/// `count` storages of 64 bytes, one view each, as a state_dict of tiny tensors describes them.
fn table(count: usize) -> (TensorTable, Vec<usize>, Vec<Option<i64>>) {
    let mut builder = TableBuilder::with_capacity(count);
    let mut keys = Vec::with_capacity(count);
    for i in 0..count {
        let key = 0x10_0000 + i * 0x100;
        let storage = builder.add_storage(key, 0x1000_0000 + i * 64, 64, Device::Host);
        builder.add_view(
            storage,
            ViewFacts {
                itemsize: 4,
                storage_offset: 0,
                numel: 16,
                contiguous: true,
                conj: false,
                neg: false,
            },
        );
        keys.push(key);
    }
    (builder.finish().unwrap(), keys, vec![Some(1); count])
}

fn reuse_decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("reuse_decision");
    for count in [1_000, 20_000, 1_000_000] {
        let (table, keys, mut versions) = table(count);
        let views = StorageViews::of(&table);
        let (records, _) = StageRecords::record(&table, &views, &keys, &versions, |_| true);
        versions[count / 2] = Some(2); // one storage changed
        group.throughput(Throughput::Elements(count as u64));
        if count >= 1_000_000 {
            group.sample_size(10);
        }
        group.bench_with_input(
            BenchmarkId::new("group_and_match", count),
            &count,
            |b, _| {
                b.iter(|| {
                    let views = StorageViews::of(&table);
                    records.candidates(&table, &views, &keys, &versions).len()
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("record", count), &count, |b, _| {
            b.iter(|| {
                StageRecords::record(&table, &views, &keys, &versions, |_| true)
                    .1
                    .len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, reuse_decision);
criterion_main!(benches);
