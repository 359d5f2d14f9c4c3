//! Measurements, not assertions: `cargo test -p speculum-webhook --test measure -- --ignored
//! --nocapture`. Bounded loops against a local registry on 127.0.0.1.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Auth, Registry};
use speculum_webhook::credentials::Keychain;
use speculum_webhook::metrics::Metrics;
use speculum_webhook::policy::{Input, Policy, RegoPolicy};
use speculum_webhook::resolve::{RegistryOptions, Resolver, ResolverConfig};

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

#[tokio::test]
#[ignore = "measurement"]
async fn resolution_latency() {
    let reg = Registry::start(Auth::None);
    let host = reg.host();
    reg.push_image("m/app", "v1", "amd64", "m").await;
    let cfg = |ttl| ResolverConfig {
        cache_ttl: ttl,
        registries: [(
            host.clone(),
            RegistryOptions {
                insecure: true,
                ..Default::default()
            },
        )]
        .into(),
        ..ResolverConfig::default()
    };
    let image = format!("{host}/m/app:v1");
    for (label, ttl) in [
        ("uncached (HEAD to the registry)", Duration::ZERO),
        ("cached", Duration::from_secs(600)),
    ] {
        let r = Resolver::new(cfg(ttl), Arc::new(Metrics::new()));
        r.resolve(&image, &Keychain::default())
            .await
            .expect("warm up");
        let mut times = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            r.resolve(&image, &Keychain::default())
                .await
                .expect("resolve");
            times.push(t.elapsed());
        }
        println!(
            "{label}: p50 {:?} p99 {:?}",
            percentile(times.clone(), 0.5),
            percentile(times, 0.99)
        );
    }

    let rego = RegoPolicy::from_source(
        vec![],
        "m.rego",
        "package speculum.admission\ndefault decision := {\"action\": \"pin\"}\ndecision := {\"action\": \"pin\", \"onFailure\": \"deny\"} if { startswith(input.namespace, \"prod-\") }\n",
    )
    .expect("policy");
    let input = Input {
        namespace: "prod-a".into(),
        kind: "Pod".into(),
        name: "p".into(),
        operation: "CREATE".into(),
        image: image.clone(),
        reference: image.clone(),
        registry: host.clone(),
        container: "a".into(),
        role: "container".into(),
        username: "u".into(),
    };
    let t = Instant::now();
    for _ in 0..2000 {
        rego.decide(&input).expect("decide");
    }
    println!("rego decision: {:?} each", t.elapsed() / 2000);
}
