//! Lookup cost: hash the key, then binary-search the points. One lookup per iteration, cycling
//! through pre-generated keys so neither the key nor the search path is predictable.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use shardlite_ring::{DEFAULT_VNODES, Member, Ring, hash_key};

const KEYS: usize = 1 << 14;

fn ring_of(n: usize) -> Ring {
    Ring::new(
        (0..n).map(|j| Member::new(format!("node-{j}"), 1)),
        DEFAULT_VNODES,
    )
    .unwrap()
}

fn lookup(c: &mut Criterion) {
    let keys: Vec<String> = (1..=KEYS).map(|i| format!("user:{i}")).collect();
    let hashes: Vec<u32> = keys.iter().map(|k| hash_key(k)).collect();
    for n in [3, 10, 50] {
        let ring = ring_of(n);
        let mut k = 0;
        c.bench_function(&format!("lookup/N={n},V=256"), |b| {
            b.iter(|| {
                k = (k + 1) & (KEYS - 1);
                black_box(ring.lookup(black_box(&keys[k])))
            })
        });
        let mut k = 0;
        c.bench_function(&format!("owner_of/N={n},V=256"), |b| {
            b.iter(|| {
                k = (k + 1) & (KEYS - 1);
                black_box(ring.owner_of(black_box(hashes[k])))
            })
        });
    }
    let mut k = 0;
    c.bench_function("hash_key", |b| {
        b.iter(|| {
            k = (k + 1) & (KEYS - 1);
            black_box(hash_key(black_box(&keys[k])))
        })
    });
    c.bench_function("build/N=50,V=256", |b| b.iter(|| ring_of(black_box(50))));
}

criterion_group!(benches, lookup);
criterion_main!(benches);
