//! Measurements, not assertions: `cargo test -p speculum-webhook --test offline measure:: -- --ignored
//! --nocapture`. Bounded loops against a local registry on 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use speculum_webhook::admit::{Admitter, FailurePolicy};
use speculum_webhook::audit::MemoryAudit;
use speculum_webhook::certs::{self, TlsState};
use speculum_webhook::credentials::{Keychain, MemoryCredentials};
use speculum_webhook::metrics::Metrics;
use speculum_webhook::policy::{Input, Policy, RegoPolicy, StaticPolicy};
use speculum_webhook::resolve::{RegistryOptions, Resolver, ResolverConfig};
use speculum_webhook::server::{self, Readiness};
use testkit::registries::{Auth, Registry};

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

// --- A 5-container pod through the HTTPS `/mutate` handler -----------------------------------

/// The webhook as the binary runs it (`server::router` behind `server::serve_tls`, started the
/// way `tests/offline/server.rs` starts it), in front of one open registry; `cache_ttl` as configured.
struct Webhook {
    base: String,
    ca_pem: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Webhook {
    async fn start(registry: &str, cache_ttl: Duration) -> Webhook {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let metrics = Arc::new(Metrics::new());
        let resolver = Resolver::new(
            ResolverConfig {
                timeout: Duration::from_secs(2),
                cache_ttl,
                registries: [(
                    registry.to_owned(),
                    RegistryOptions {
                        insecure: true,
                        ..Default::default()
                    },
                )]
                .into(),
                ..ResolverConfig::default()
            },
            metrics.clone(),
        );
        let admitter = Arc::new(Admitter {
            resolver: Arc::new(resolver),
            policy: Arc::new(StaticPolicy {
                skip_prefixes: vec![],
                strict_namespaces: vec![],
            }),
            credentials: Some(Arc::new(MemoryCredentials::default())),
            offline_keychain: Keychain::default(),
            audit: Arc::new(MemoryAudit::default()),
            metrics,
            grants: None,
            failure_policy: FailurePolicy::Ignore,
            deadline: Duration::from_secs(5),
        });
        let bundle =
            certs::generate(&["localhost".into()], Duration::from_secs(3600)).expect("certs");
        let tls = TlsState::new(
            certs::server_config(bundle.cert_pem.as_bytes(), bundle.key_pem.as_bytes())
                .expect("tls"),
        );
        let ready = Readiness::default();
        ready.set(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::serve_tls(
            listener,
            tls,
            server::router(admitter, ready, 64 * 1024),
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(2),
        ));
        Webhook {
            base: format!("https://localhost:{port}"),
            ca_pem: bundle.ca_pem,
            stop: Some(stop_tx),
            server,
        }
    }

    /// A client of its own: one keep-alive TLS connection when used sequentially, as the API
    /// server keeps one.
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("ca")])
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

fn pod_review(uid: &str, images: &[String]) -> String {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, img)| json!({"name": format!("c{i}"), "image": img}))
        .collect();
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": "team", "userInfo": {"username": "alice"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "namespace": "team"},
                "spec": {"containers": containers}}
        }
    })
    .to_string()
}

/// Posts one review and checks that every image came back pinned (one patch op per image).
async fn admit(client: &reqwest::Client, base: &str, body: &str, images: usize) -> Duration {
    let t = Instant::now();
    let resp = client
        .post(format!("{base}/mutate"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.expect("json");
    let elapsed = t.elapsed();
    let patch = v["response"]["patch"].as_str().expect("patched");
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("base64"),
    )
    .expect("patch json");
    assert_eq!(ops.len(), images, "every image pinned: {v}");
    elapsed
}

async fn livez(client: &reqwest::Client, base: &str) -> Duration {
    let t = Instant::now();
    let resp = client
        .get(format!("{base}/livez"))
        .send()
        .await
        .expect("livez");
    assert_eq!(resp.status().as_u16(), 200);
    let _ = resp.bytes().await.expect("body");
    t.elapsed()
}

fn p50_p99(v: &[Duration]) -> (Duration, Duration) {
    (percentile(v.to_vec(), 0.5), percentile(v.to_vec(), 0.99))
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// Admission latency and throughput for a 5-container pod through the real HTTPS handler.
/// Two worker threads: the server, the client and the registry share the machine's 2 vCPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn five_container_pod_admission() {
    const COLD_PODS: usize = 30;
    const WARM_REQUESTS: usize = 2_000;
    const LOAD_REQUESTS: usize = 5_000;
    const LOAD_CONNECTIONS: usize = 8;
    const PHASE_LIMIT: Duration = Duration::from_secs(60);

    let reg = Registry::start(Auth::None);
    let host = reg.host();
    // Five repositories, one image each; every cold pod gets five tags nobody resolved yet
    // (tag `p{i}`), every one-image cold pod one (`s{i}`), so the resolver cache cannot answer.
    let repos: Vec<String> = (0..5).map(|k| format!("m/svc{k}")).collect();
    for (k, repo) in repos.iter().enumerate() {
        reg.push_image(repo, "warm", "amd64", &format!("salt{k}"))
            .await;
        for i in 0..COLD_PODS {
            reg.push_image(repo, &format!("p{i}"), "amd64", &format!("salt{k}"))
                .await;
        }
    }
    for i in 0..COLD_PODS {
        reg.push_image(&repos[0], &format!("s{i}"), "amd64", "salt0")
            .await;
    }

    let hook = Webhook::start(&host, Duration::from_secs(600)).await;
    let base = hook.base.clone();
    let client = hook.client();
    // Open the TLS connection and the resolver's registry connection before timing anything.
    for _ in 0..20 {
        livez(&client, &base).await;
    }
    let proto = client
        .get(format!("{base}/livez"))
        .send()
        .await
        .expect("livez")
        .version();
    admit(
        &client,
        &base,
        &pod_review("prime", &[format!("{host}/{}:warm", repos[0])]),
        1,
    )
    .await;

    // (1) Cold: 5 distinct unresolved images vs 1, interleaved so drift hits both alike.
    let (mut cold5, mut cold1) = (Vec::new(), Vec::new());
    let phase = Instant::now();
    for i in 0..COLD_PODS {
        if phase.elapsed() > PHASE_LIMIT {
            break;
        }
        let five: Vec<String> = repos.iter().map(|r| format!("{host}/{r}:p{i}")).collect();
        cold5.push(admit(&client, &base, &pod_review(&format!("c5-{i}"), &five), 5).await);
        let one = [format!("{host}/{}:s{i}", repos[0])];
        cold1.push(admit(&client, &base, &pod_review(&format!("c1-{i}"), &one), 1).await);
    }

    // (1b) The same question without the webhook around it: one resolver, no cache, five
    // resolutions with `join_all` (what `Admitter::pin_object` does) against the same five one
    // after another, so the 5/1 ratio above can be told apart from what 2 vCPUs shared with
    // the registry allow.
    let direct = Resolver::new(
        ResolverConfig {
            cache_ttl: Duration::ZERO,
            registries: [(
                host.clone(),
                RegistryOptions {
                    insecure: true,
                    ..Default::default()
                },
            )]
            .into(),
            ..ResolverConfig::default()
        },
        Arc::new(Metrics::new()),
    );
    let keys = Keychain::default();
    let warm_images: Vec<String> = repos.iter().map(|r| format!("{host}/{r}:warm")).collect();
    for img in &warm_images {
        direct.resolve(img, &keys).await.expect("prime");
    }
    let (mut joined, mut serial, mut single) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..COLD_PODS {
        let t = Instant::now();
        for r in
            futures::future::join_all(warm_images.iter().map(|i| direct.resolve(i, &keys))).await
        {
            r.expect("resolve");
        }
        joined.push(t.elapsed());
        let t = Instant::now();
        for img in &warm_images {
            direct.resolve(img, &keys).await.expect("resolve");
        }
        serial.push(t.elapsed());
        let t = Instant::now();
        direct
            .resolve(&warm_images[0], &keys)
            .await
            .expect("resolve");
        single.push(t.elapsed());
    }

    // (2) Warm: the same pod again and again; references over the same connection.
    let warm5_body = pod_review("w5", &warm_images);
    let warm1_body = pod_review("w1", &warm_images[..1]);
    admit(&client, &base, &warm5_body, 5).await;
    let (mut warm5, mut warm1, mut live) = (Vec::new(), Vec::new(), Vec::new());
    let phase = Instant::now();
    for _ in 0..WARM_REQUESTS {
        if phase.elapsed() > PHASE_LIMIT {
            break;
        }
        live.push(livez(&client, &base).await);
        warm1.push(admit(&client, &base, &warm1_body, 1).await);
        warm5.push(admit(&client, &base, &warm5_body, 5).await);
    }

    // (3) Throughput: LOAD_CONNECTIONS clients (one connection each) share a request budget.
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(LOAD_REQUESTS));
    let load_started = Instant::now();
    let deadline = load_started + PHASE_LIMIT;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..LOAD_CONNECTIONS {
        let (budget, client, base, body) = (
            budget.clone(),
            hook.client(),
            base.clone(),
            warm5_body.clone(),
        );
        tasks.spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < deadline
                && budget
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
            {
                times.push(admit(&client, &base, &body, 5).await);
            }
            times
        });
    }
    let mut loaded = Vec::new();
    while let Some(t) = tasks.join_next().await {
        loaded.extend(t.expect("load task"));
    }
    let load_elapsed = load_started.elapsed();
    hook.stop().await;

    let (c5, c5_99) = p50_p99(&cold5);
    let (c1, c1_99) = p50_p99(&cold1);
    let (w5, w5_99) = p50_p99(&warm5);
    let (w1, w1_99) = p50_p99(&warm1);
    let (lz, lz_99) = p50_p99(&live);
    let (l5, l5_99) = p50_p99(&loaded);
    println!("five_container: webhook over {proto:?}, registry {host}");
    println!(
        "cold 5-image pod ({} pods): p50 {c5:?} p99 {c5_99:?}",
        cold5.len()
    );
    println!(
        "cold 1-image pod ({} pods): p50 {c1:?} p99 {c1_99:?}",
        cold1.len()
    );
    println!(
        "cold ratio 5/1: p50 {:.2}x p99 {:.2}x (1.0 = fully concurrent, 5.0 = one after another)",
        ratio(c5, c1),
        ratio(c5_99, c1_99)
    );
    let (j, j99) = p50_p99(&joined);
    let (s5, s5_99) = p50_p99(&serial);
    let (s1, s1_99) = p50_p99(&single);
    println!(
        "resolver alone, no cache ({} rounds): 5 joined p50 {j:?} p99 {j99:?}; 5 one after another p50 {s5:?} p99 {s5_99:?}; 1 p50 {s1:?} p99 {s1_99:?}",
        joined.len()
    );
    println!(
        "resolver alone ratios: joined/one p50 {:.2}x; one-after-another/one p50 {:.2}x",
        ratio(j, s1),
        ratio(s5, s1)
    );
    println!(
        "warm 5-image pod ({} reqs): p50 {w5:?} p99 {w5_99:?}",
        warm5.len()
    );
    println!(
        "warm 1-image pod ({} reqs): p50 {w1:?} p99 {w1_99:?}",
        warm1.len()
    );
    println!("/livez ({} reqs): p50 {lz:?} p99 {lz_99:?}", live.len());
    println!(
        "warm ratios: 5-image/livez p50 {:.2}x p99 {:.2}x; 5-image/1-image p50 {:.2}x p99 {:.2}x",
        ratio(w5, lz),
        ratio(w5_99, lz_99),
        ratio(w5, w1),
        ratio(w5_99, w1_99)
    );
    println!(
        "throughput: {} warm 5-image reqs over {LOAD_CONNECTIONS} connections in {load_elapsed:?} = {:.0} req/s; latency under load p50 {l5:?} p99 {l5_99:?}",
        loaded.len(),
        loaded.len() as f64 / load_elapsed.as_secs_f64()
    );
}
