//! Resolution against real `docker-registry` processes on 127.0.0.1: public repositories,
//! multi-arch indexes, htpasswd-protected repositories with pull secrets, a tag that moves
//! under a cached credential, failures that must not be cached, and the cluster fallback
//! when the registry is down.

use std::sync::Arc;
use std::time::Duration;

use speculum_webhook::credentials::{Keychain, MemoryCredentials, keychain_for};
use speculum_webhook::metrics::Metrics;
use speculum_webhook::resolve::{RegistryOptions, ResolveError, Resolver, ResolverConfig, Source};
use testkit::registries::{Auth, Registry};

fn resolver(insecure: &[&str], cluster: &[String]) -> (Resolver, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let cfg = ResolverConfig {
        timeout: Duration::from_secs(3),
        cache_ttl: Duration::from_secs(300),
        registries: insecure
            .iter()
            .map(|h| {
                (
                    h.to_string(),
                    RegistryOptions {
                        insecure: true,
                        ..Default::default()
                    },
                )
            })
            .collect(),
        cluster_endpoints: cluster.to_vec(),
        ..ResolverConfig::default()
    };
    (Resolver::new(cfg, metrics.clone()), metrics)
}

async fn keychain(users: &[(&str, &str, &str)]) -> Keychain {
    let mut src = MemoryCredentials::default();
    let mut names = Vec::new();
    for (i, (registry, u, p)) in users.iter().enumerate() {
        let name = format!("secret-{i}");
        src.add_docker_config("ns", &name, registry, u, p);
        names.push(name);
    }
    keychain_for(&src, "ns", &names, None)
        .await
        .expect("keychain")
}

#[tokio::test]
async fn public_single_and_multi_arch() {
    let reg = Registry::start(Auth::None);
    let host = reg.host();
    let single = reg.push_image("team/app", "v1", "amd64", "a").await;
    let (index, children) = reg.push_index("team/multi", "v1", "m").await;
    let (r, metrics) = resolver(&[&host], &[]);
    let none = Keychain::default();

    let got = r
        .resolve(&format!("{host}/team/app:v1"), &none)
        .await
        .expect("single");
    assert_eq!(got.digest, single);
    assert_eq!(got.source, Source::Registry);

    let got = r
        .resolve(&format!("{host}/team/multi:v1"), &none)
        .await
        .expect("multi");
    assert_eq!(
        got.digest, index,
        "the index is pinned, not a platform manifest"
    );
    assert!(!children.contains(&got.digest));

    let again = r
        .resolve(&format!("{host}/team/app:v1"), &none)
        .await
        .expect("cached");
    assert_eq!(
        (again.digest.as_str(), again.source),
        (single.as_str(), Source::Cache)
    );

    let missing = r.resolve(&format!("{host}/team/app:nope"), &none).await;
    assert!(
        matches!(missing, Err(ResolveError::NotFound { .. })),
        "{missing:?}"
    );
    let missing_repo = r.resolve(&format!("{host}/team/none:v1"), &none).await;
    assert!(
        matches!(missing_repo, Err(ResolveError::NotFound { .. })),
        "{missing_repo:?}"
    );

    let text = metrics.encode();
    assert!(
        text.contains("speculum_webhook_cache_lookups_total{result=\"hit\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "speculum_webhook_resolution_errors_total{{registry=\"{host}\",reason=\"not_found\"}} 2"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn failures_are_not_cached() {
    let reg = Registry::start(Auth::None);
    let host = reg.host();
    let (r, _) = resolver(&[&host], &[]);
    let image = format!("{host}/late/app:v1");
    assert!(matches!(
        r.resolve(&image, &Keychain::default()).await,
        Err(ResolveError::NotFound { .. })
    ));
    let d = reg.push_image("late/app", "v1", "amd64", "x").await;
    let got = r
        .resolve(&image, &Keychain::default())
        .await
        .expect("resolves once pushed");
    assert_eq!((got.digest, got.source), (d, Source::Registry));
}

#[tokio::test]
async fn plain_http_only_for_insecure_registries() {
    let reg = Registry::start(Auth::None);
    let host = reg.host();
    reg.push_image("a/b", "v1", "amd64", "x").await;
    // Not listed as insecure: the resolver speaks TLS to a plain HTTP port and must fail.
    let (r, _) = resolver(&[], &[]);
    let got = r
        .resolve(&format!("{host}/a/b:v1"), &Keychain::default())
        .await;
    assert!(
        matches!(got, Err(ResolveError::Unreachable { .. })),
        "{got:?}"
    );
}

#[tokio::test]
async fn private_repo_with_pull_secret() {
    let reg = Registry::start(Auth::Htpasswd(vec![
        ("alice".into(), "a-pass".into()),
        ("bob".into(), "b-pass".into()),
    ]));
    let host = reg.host();
    let d = reg.push_image("private/app", "v1", "amd64", "p").await;
    let (r, _) = resolver(&[&host], &[]);
    let image = format!("{host}/private/app:v1");

    let anon = r.resolve(&image, &Keychain::default()).await;
    assert!(
        matches!(anon, Err(ResolveError::Unauthorized { .. })),
        "{anon:?}"
    );

    let wrong = r
        .resolve(&image, &keychain(&[(&host, "alice", "wrong")]).await)
        .await;
    assert!(
        matches!(wrong, Err(ResolveError::Unauthorized { .. })),
        "{wrong:?}"
    );

    // A wrong credential first, a right one second: the kubelet tries both, so do we.
    let chain = keychain(&[(&host, "mallory", "x"), (&host, "alice", "a-pass")]).await;
    let got = r.resolve(&image, &chain).await.expect("alice can read");
    assert_eq!((got.digest, got.source), (d, Source::Registry));

    // Credentials for another registry do not help.
    let other = r
        .resolve(
            &image,
            &keychain(&[("127.0.0.1:1", "alice", "a-pass")]).await,
        )
        .await;
    assert!(
        matches!(other, Err(ResolveError::Unauthorized { .. })),
        "{other:?}"
    );
}

#[tokio::test]
async fn moved_tag_is_never_served_from_another_credentials_cache() {
    let reg = Registry::start(Auth::Htpasswd(vec![
        ("alice".into(), "a-pass".into()),
        ("bob".into(), "b-pass".into()),
    ]));
    let host = reg.host();
    let old = reg.push_image("private/moving", "v1", "amd64", "old").await;
    let (r, _) = resolver(&[&host], &[]);
    let image = format!("{host}/private/moving:v1");
    let alice = keychain(&[(&host, "alice", "a-pass")]).await;
    let bob = keychain(&[(&host, "bob", "b-pass")]).await;

    assert_eq!(r.resolve(&image, &alice).await.expect("alice").digest, old);
    let new = reg.push_image("private/moving", "v1", "amd64", "new").await;
    assert_ne!(old, new);

    // Alice's answer is cached for its TTL (that is what the cache is for)...
    let a = r.resolve(&image, &alice).await.expect("alice again");
    assert_eq!((a.digest.as_str(), a.source), (old.as_str(), Source::Cache));
    // ...but bob holds another credential: he must get a fresh answer, the new digest.
    let b = r.resolve(&image, &bob).await.expect("bob");
    assert_eq!(
        (b.digest.as_str(), b.source),
        (new.as_str(), Source::Registry)
    );
    // And nobody without credentials gets alice's entry either.
    assert!(r.resolve(&image, &Keychain::default()).await.is_err());
}

#[tokio::test]
async fn registry_down_resolves_through_the_cluster() {
    // The cluster endpoint speaks the registry API (`HEAD /v2/<repo>/manifests/<tag>?ns=…`);
    // here a second distribution registry holding the same image plays it, to test caching and
    // recovery. `daemon_fallback.rs` asks the daemon's own registry code.
    let mut upstream = Registry::start(Auth::None);
    let node = Registry::start(Auth::None);
    let host = upstream.host();
    let d = upstream.push_image("team/app", "v1", "amd64", "same").await;
    assert_eq!(node.push_image("team/app", "v1", "amd64", "same").await, d);
    let (r, metrics) = resolver(&[&host], &[node.host()]);
    let image = format!("{host}/team/app:v1");

    upstream.stop();
    let got = r
        .resolve(&image, &Keychain::default())
        .await
        .expect("cluster answers");
    assert_eq!(
        (got.digest.as_str(), got.source),
        (d.as_str(), Source::Cluster)
    );
    // Cluster answers are not cached: the next call tries the registry again.
    let missing = r
        .resolve(&format!("{host}/team/other:v1"), &Keychain::default())
        .await;
    assert!(
        matches!(missing, Err(ResolveError::Unreachable { .. })),
        "{missing:?}"
    );

    upstream.restart();
    let got = r
        .resolve(&image, &Keychain::default())
        .await
        .expect("registry back");
    assert_eq!(got.source, Source::Registry);
    let text = metrics.encode();
    assert!(
        text.contains("speculum_webhook_resolutions_total{source=\"cluster\"} 1"),
        "{text}"
    );
}
