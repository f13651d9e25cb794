//! Micro-benchmarks of the frame codec: decoding masked client frames, and preparing one
//! publication for many connections (plain and compressed).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use herald::ws::frame::{self, OpCode};
use herald::ws::{Decoder, Limits, Prepared, Role, SendMode};

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for size in [100usize, 4096] {
        let payload = "x".repeat(size);
        let one = frame::encode(true, false, OpCode::Text, payload.as_bytes(), Some([9, 8, 7, 6]));
        let wire: Vec<u8> = one.iter().copied().cycle().take(one.len() * 64).collect();
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("64 text frames of {size} B"), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut d = Decoder::new(Role::Server, Limits::default(), None);
                    let mut n = 0;
                    while let Ok(Some(_)) = d.decode(&mut buf) {
                        n += 1;
                    }
                    assert_eq!(n, 64);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn prepare(c: &mut Criterion) {
    let mut g = c.benchmark_group("prepare");
    let payload = Bytes::from(format!("{{\"channel\":\"prices\",\"data\":{}}}", "1234.5,".repeat(60)));
    let deflate = SendMode { deflate_bits: Some(15), threshold: 128, level: 6 };
    g.bench_function("frame once, 1000 plain sends", |b| {
        b.iter(|| {
            let p = Prepared::text(payload.clone());
            for _ in 0..1000 {
                std::hint::black_box(p.frame_for(&SendMode::PLAIN));
            }
        })
    });
    g.bench_function("compress once, 1000 deflate sends", |b| {
        b.iter(|| {
            let p = Prepared::text(payload.clone());
            for _ in 0..1000 {
                std::hint::black_box(p.frame_for(&deflate));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, decode, prepare);
criterion_main!(benches);
