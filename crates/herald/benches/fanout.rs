//! Fan-out inside the process: one publication delivered by the hub to N subscribers' queues,
//! then taken by their writers, without sockets. This is Herald's own share of a delivery's
//! cost (the rest is the kernel's `writev`, see docs/benchmarks.md).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::FutureExt;
use herald::doors::raw::RAW;
use herald::doors::session::NATIVE;
use herald::engine::{PublicationRecord, StreamPosition};
use herald::hub::{Encoder, Hub, Subscriber};
use herald::ws::{Outbox, SendMode};

/// Publications per measured iteration: a writer finds this many frames at each wake-up.
const BURST: u64 = 4;

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let data = Bytes::from(format!("{{\"seq\":1,\"pad\":\"{}\"}}", "x".repeat(80)));
    let encoders: [(usize, &'static dyn Encoder, &str); 4] =
        [(100, &NATIVE, "Native"), (1000, &NATIVE, "Native"), (10_000, &NATIVE, "Native"), (1000, &RAW, "Raw")];
    for (subscribers, encoder, format) in encoders {
        let hub = Hub::new();
        let channel: Arc<str> = Arc::from("bench:fanout");
        let outboxes: Vec<Outbox> = (0..subscribers).map(|_| Outbox::new(1 << 20, SendMode::PLAIN)).collect();
        for (id, outbox) in outboxes.iter().enumerate() {
            let sub = Subscriber { id: id as u64, outbox: outbox.clone(), encoder };
            hub.subscribe(&channel, sub).expect("subscribe");
            hub.activate(&channel, id as u64, None, 0).expect("activate");
        }
        let position = StreamPosition { epoch: Arc::from("e"), offset: 0 };
        let mut offset = 0u64;
        let mut batch = VecDeque::new();
        g.throughput(Throughput::Elements(subscribers as u64 * BURST));
        g.bench_function(format!("{subscribers} subscribers, {format}, {BURST} publications"), |b| {
            b.iter(|| {
                for _ in 0..BURST {
                    offset += 1;
                    let record = PublicationRecord { offset, data: data.clone(), ..Default::default() };
                    hub.deliver(&channel, &position, &record);
                }
                // What each connection's writer does when it wakes: take the queued frames.
                for outbox in &outboxes {
                    let taken = outbox.next_batch(&mut batch).now_or_never();
                    assert_eq!(taken, Some(true));
                    assert_eq!(batch.len() as u64, BURST);
                    batch.clear();
                }
            })
        });
        assert_eq!(hub.subscription_count(), subscribers, "nobody was cut off");
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
