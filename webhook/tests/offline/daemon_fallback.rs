//! Registry down → the tag is resolved through a speculum daemon's mirror endpoint: the
//! daemon's own registry code (`speculum::registry::app`, the code `speculum registry`
//! serves) over a real socket, backed by the store twin holding what a node pulled. The
//! upstream is a real distribution registry that the test stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use speculum::readiness::Readiness;
use speculum::registry::{Handler, RegistryState, app};
use speculum::store::memory::MemoryStore;
use speculum_webhook::credentials::Keychain;
use speculum_webhook::metrics::Metrics;
use speculum_webhook::resolve::{RegistryOptions, ResolveError, Resolver, ResolverConfig, Source};
use testkit::registries::{Auth, Registry};

/// Fetches a manifest's bytes from the (still running) upstream, as a node's pull would have.
async fn manifest_bytes(host: &str, repo: &str, digest: &str) -> Vec<u8> {
    reqwest::Client::new()
        .get(format!("http://{host}/v2/{repo}/manifests/{digest}"))
        .header(
            "accept",
            format!(
                "{},{}",
                testkit::registries::OCI_MANIFEST,
                testkit::registries::OCI_INDEX
            ),
        )
        .send()
        .await
        .expect("get manifest")
        .bytes()
        .await
        .expect("body")
        .to_vec()
}

#[tokio::test]
async fn registry_down_resolves_through_a_speculum_daemon() {
    let mut upstream = Registry::start(Auth::None);
    let host = upstream.host();
    let single = upstream.push_image("team/app", "v1", "amd64", "n").await;
    let (index, _) = upstream.push_index("team/multi", "v1", "n").await;

    // The node holds both images, as containerd would after pulling them.
    let store = Arc::new(MemoryStore::new());
    for (repo, digest) in [("team/app", &single), ("team/multi", &index)] {
        let bytes = manifest_bytes(&host, repo, digest).await;
        assert_eq!(store.add_blob(bytes).to_string(), *digest);
        store.set_image(
            &format!("{host}/{repo}:v1"),
            digest.parse().expect("digest"),
        );
    }
    let state = RegistryState {
        store,
        mirror: None,
        cache: None,
        metrics: Default::default(),
        readiness: Readiness::new(),
        handler: Handler::Mirror,
        serving: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let daemon = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let resolver = Resolver::new(
        ResolverConfig {
            timeout: Duration::from_secs(3),
            registries: [(
                host.clone(),
                RegistryOptions {
                    insecure: true,
                    ..Default::default()
                },
            )]
            .into(),
            cluster_endpoints: vec![daemon],
            ..ResolverConfig::default()
        },
        Arc::new(Metrics::new()),
    );
    let none = Keychain::default();
    upstream.stop();

    let got = resolver
        .resolve(&format!("{host}/team/app:v1"), &none)
        .await
        .expect("through the daemon");
    assert_eq!(
        (got.digest.as_str(), got.source),
        (single.as_str(), Source::Cluster)
    );
    let got = resolver
        .resolve(&format!("{host}/team/multi:v1"), &none)
        .await
        .expect("index through the daemon");
    assert_eq!(
        (got.digest.as_str(), got.source),
        (index.as_str(), Source::Cluster)
    );

    // A tag no node holds: the daemon says 404, the registry's outage is what gets reported.
    let missing = resolver
        .resolve(&format!("{host}/team/app:v9"), &none)
        .await;
    assert!(
        matches!(missing, Err(ResolveError::Unreachable { .. })),
        "{missing:?}"
    );
}
