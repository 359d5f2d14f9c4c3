//! One policy decision, end to end: input → regorus (cloned engine) → decision, through the
//! shipped default bundle and the namespace-isolation example; the static twin for scale.
//! Results are recorded in BENCHMARKS.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use speculum::policy::conformance::input;
use speculum::policy::{Gate, Policy, PolicyMetrics, RegoPolicy, StaticPolicy, Switches};

fn bundle(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(name)
}

fn decisions(c: &mut Criterion) {
    let req = input("127.0.0.1:5000", "rig/small", Some("v1"), None);
    for name in [
        "default",
        "registry-allowlist",
        "namespace-isolation",
        "private-grant",
    ] {
        let Ok(policy) = RegoPolicy::load(&bundle(name), Duration::from_millis(50)) else {
            eprintln!("bundle {name} did not load; skipped");
            continue;
        };
        c.bench_function(&format!("rego-uncached/{name}"), |b| {
            b.iter(|| std::hint::black_box(policy.evaluate(std::hint::black_box(&req))))
        });
        c.bench_function(&format!("rego-cached/{name}"), |b| {
            b.iter(|| std::hint::black_box(policy.decide(std::hint::black_box(&req))))
        });
        let gate = Gate::new(
            Arc::new(policy),
            Switches::default(),
            PolicyMetrics::unregistered(),
        );
        // Through the gate (metrics, switches) and the cache, as the registry calls it.
        c.bench_function(&format!("gate-cached/{name}"), |b| {
            b.iter(|| std::hint::black_box(gate.decide(std::hint::black_box(&req))))
        });
    }
    // The input conversion every uncached decision pays (serde → JSON text → regorus value).
    c.bench_function("parts/input-to-regorus", |b| {
        b.iter(|| {
            let json = serde_json::to_string(std::hint::black_box(&req)).unwrap_or_default();
            std::hint::black_box(regorus::Value::from_json_str(&json).ok())
        })
    });
    let twin = StaticPolicy::default();
    c.bench_function("static/default", |b| {
        b.iter(|| std::hint::black_box(twin.decide(std::hint::black_box(&req))))
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
