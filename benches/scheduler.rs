//! Criterion: the scheduler's decision time with 10,000 waiting and 1,000 running jobs.

use criterion::{criterion_group, criterion_main, Criterion};
use kiln_benches::SchedulerFixture;

fn decisions(c: &mut Criterion) {
    let mut fixture = SchedulerFixture::new(10_000, 1_000);
    c.bench_function("scheduler_decision_10k_waiting_1k_running", |b| {
        b.iter(|| fixture.decide())
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
