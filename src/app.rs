//! The composition root: builds the seams from their config sections, binds every listener
//! before joining the cluster, runs the tasks, and shuts down in order.
//!
//! Shutdown on SIGTERM (linkerd2-proxy's order): readiness fails → this node's DHT records
//! are withdrawn and the router stops (peers drop our records as the connections close) →
//! listeners stop accepting → in-flight responses drain within `registry.drain_grace`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::advertise::Advertiser;
use crate::audit::recent::{RecentRequests, Tee};
use crate::audit::{AuditSink, JsonlSink};
use crate::cache::Cache;
use crate::cache::coalesce::Coalescer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::policy::reload as policy_reload;
use crate::readiness::{Part, Readiness};
use crate::registry::peers::CacheTee;
use crate::registry::tags::TagResolver;
use crate::registry::{self, Guard, Handler, Mirror, RegistryState};
use crate::routing::kademlia::{self, KademliaRouter};
use crate::routing::{Router, ServingLoad};
use crate::server::{self, ServeOptions};
use crate::shutdown::{self, Shutdown};
use crate::status;
use crate::store::Store;
use crate::store::containerd::ContainerdStore;
use crate::store::introspect::{self, Finding};
use crate::tenancy::Tenancy;
use crate::wire::PeerClient;

/// How often health gauges (peers, containerd reachability, routing readiness) refresh.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the daemon until `stop` fires, then shuts down in order.
pub async fn run(config: Config, stop: Shutdown) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    readiness.block(Part::Listeners, "binding");

    // Bind first: a port conflict must fail the start before this node joins the cluster.
    let mirror_listener = bind(config.registry.mirror_listen, "registry.mirror_listen").await?;
    let peer_listener = bind(config.registry.peer_listen, "registry.peer_listen").await?;
    let metrics_listener = bind(config.metrics.listen, "metrics.listen").await?;

    // Policy and audit before anything serves: the first request is already decided and
    // audited. A bad audit file path fails the start (an audit trail that silently is not
    // written is worse than a daemon that says so).
    let (gate, bundle_fingerprint) =
        policy_reload::initial(&config.policy, metrics.policy.clone(), &readiness);
    let trail: Arc<dyn AuditSink> = Arc::new(
        JsonlSink::start(&config.audit, metrics.audit.clone()).context("starting the audit log")?,
    );
    // The status page's recent requests: a bounded ring fed beside the trail (only when on).
    let recent = config
        .status
        .enabled
        .then(|| RecentRequests::new(config.status.recent));
    let audit: Arc<dyn AuditSink> = match &recent {
        Some(ring) => Arc::new(Tee {
            first: trail,
            second: Arc::new(ring.clone()),
        }),
        None => trail,
    };
    // Tenancy before anything serves: a private object is never served before the pod index,
    // the grant keys and the peer verifier are in place. A bad key file fails the start.
    let (tenancy_stop, tenancy_shutdown) = shutdown::channel();
    let tenancy = Tenancy::build(&config.tenancy, &config.node.name, tenancy_shutdown)
        .await
        .context("starting tenancy (pod index, peer authentication)")?;
    tracing::info!(?tenancy, "tenancy");
    let guard = Guard {
        gate: gate.clone(),
        audit,
        node: config.node.name.clone(),
        tenancy,
    };
    let (policy_stop, policy_shutdown) = shutdown::channel();
    let policy_task = tokio::spawn(policy_reload::watch(
        config.policy.clone(),
        gate.clone(),
        readiness.clone(),
        bundle_fingerprint,
        policy_shutdown,
    ));

    // Without containerd (a CRI-O node) the store is empty: the node serves peers from its
    // cache only, and containerd holds no part of readiness.
    let containerd = match config.containerd.enabled {
        true => Some(Arc::new(
            ContainerdStore::new(config.containerd.clone()).context("containerd store")?,
        )),
        false => None,
    };
    let store: Arc<dyn Store> = match &containerd {
        Some(c) => c.clone(),
        None => Arc::new(crate::store::memory::MemoryStore::new()),
    };

    // The cap on blob streams the peer endpoint serves (`registry.peer_serving_limit`); the
    // router reports the same count in its `has` answers.
    let serving = ServingLoad::new(config.registry.peer_serving_limit);
    let (router_stop, router_shutdown) = shutdown::channel();
    let (router, mut router_task) = kademlia::start_with(
        config.routing.clone(),
        kademlia::Wiring {
            load: serving.clone(),
            metrics: metrics.routing.clone(),
        },
        router_shutdown.wait(),
    )
    .await
    .context("starting the DHT router")?;
    let router_dyn: Arc<dyn Router> = Arc::new(router.clone());
    tracing::info!(
        peer.id = %router.peer_id(),
        node = %config.node.name,
        mirror = %config.registry.mirror_listen,
        peer_endpoint = %config.registry.peer_listen,
        "speculum starting"
    );

    // Upstream over http where the operator said so: the cache's list, and the mirrored
    // registries configured as `http://` (hosts.toml's `server` is http for those).
    let mut plain_http = config.cache.plain_http.clone();
    plain_http.extend(config.hosts.plain_http_registries());
    let tags = TagResolver::new(
        config.mirror.tag_resolution,
        config.mirror.tag_upstream_timeout,
        plain_http,
        metrics.registry.clone(),
    )
    .context("building the upstream HTTP client for tags")?
    .only_for(config.hosts.mirrored_dirs());
    tracing::info!(
        tag_resolution = config.mirror.tag_resolution.as_str(),
        "tag resolution"
    );
    // The daemon→daemon client (`wire::peer_client`, `mirror.*` timeouts).
    let peer_client = PeerClient::new(config.mirror.connect_timeout, config.mirror.read_timeout)
        .context("building the peer HTTP client")?;
    let mirror = Mirror::with_client(
        router_dyn.clone(),
        config.mirror.clone(),
        metrics.registry.clone(),
        peer_client,
    )
    .with_tags(tags);
    let coalescer = if config.cache.enabled {
        let cache = Cache::open(&config.cache.dir, config.cache.max_bytes)
            .context("opening the blob cache")?;
        Some(
            Coalescer::new(
                cache,
                router_dyn.clone(),
                config.cache.clone(),
                metrics.cache.clone(),
                // The same client definition; a follower reads a winner's growing file, which
                // can pause as long as the winner's upstream may (`cache.upstream_read_timeout`).
                PeerClient::new(
                    config.mirror.connect_timeout,
                    config
                        .mirror
                        .read_timeout
                        .max(config.cache.upstream_read_timeout),
                )
                .context("building the peer HTTP client")?,
            )
            .context("building the upstream HTTP client")?,
        )
    } else {
        None
    };
    // Whole peer blobs are teed into the cache (`mirror.tee`): this node serves them at once.
    let mirror = match &coalescer {
        Some(c) => mirror.with_tee(CacheTee {
            cache: c.cache().clone(),
            allow: {
                let gate = gate.clone();
                let node = config.node.name.clone();
                Arc::new(move |image| gate.advert(image, &node))
            },
        }),
        None => mirror,
    };
    let state = |handler, mirror: Option<Arc<Mirror>>| RegistryState {
        store: store.clone(),
        mirror,
        cache: coalescer.clone(),
        metrics: metrics.registry.clone(),
        readiness: readiness.clone(),
        handler,
        serving: serving.clone(),
    };

    let (sync_stop, sync_shutdown) = shutdown::channel();
    let advertiser = Advertiser::new(
        store.clone(),
        router_dyn.clone(),
        config.sync.clone(),
        metrics.routing.clone(),
        readiness.clone(),
    )
    .with_advert_filter({
        let gate = gate.clone();
        let node = config.node.name.clone();
        Arc::new(move |image| gate.advert(image, &node))
    })
    .with_cache(coalescer.as_ref().map(|c| c.cache().clone()));
    let mut sync_task = tokio::spawn(advertiser.run(sync_shutdown));

    let (http_stop, http_shutdown) = shutdown::channel();
    let serve_options = config.registry.serve_options();
    let mut servers = vec![
        serve(
            mirror_listener,
            registry::app_with(
                state(Handler::Mirror, Some(Arc::new(mirror))),
                guard.clone(),
            ),
            serve_options,
            http_shutdown.clone(),
        ),
        serve(
            peer_listener,
            registry::app_with(state(Handler::Peer, None), guard.clone()),
            serve_options,
            http_shutdown.clone(),
        ),
        serve(
            metrics_listener,
            match recent {
                Some(ring) => {
                    metrics_app(metrics.clone(), readiness.clone()).merge(status::router(
                        status_sources(&config, &router, &gate, &metrics, &readiness, ring),
                    ))
                }
                None => metrics_app(metrics.clone(), readiness.clone()),
            },
            serve_options,
            http_shutdown,
        ),
    ];
    readiness.release(Part::Listeners);
    let health = tokio::spawn(health(
        containerd,
        config.hosts.certs_dir.clone(),
        router.clone(),
        metrics.clone(),
        readiness.clone(),
    ));

    // Run until asked to stop, or until a part dies (then stop the rest and report it).
    let failure: Option<anyhow::Error> = tokio::select! {
        _ = stop.wait() => None,
        r = &mut router_task => Some(anyhow::anyhow!("router task ended: {r:?}")),
        r = &mut sync_task => Some(anyhow::anyhow!("advertiser task ended: {r:?}")),
        (r, i, _) = futures::future::select_all(servers.iter_mut()) => {
            Some(anyhow::anyhow!("listener {i} ended: {r:?}"))
        }
    };
    if let Some(e) = &failure {
        tracing::error!(error = %e, "a daemon task failed; shutting down");
    }

    tracing::info!("shutdown: not ready, withdrawing advertisements");
    readiness.block(Part::Shutdown, "shutting down");
    metrics.set_ready(false);
    health.abort();
    policy_stop.fire();
    policy_task.abort();
    tenancy_stop.fire();
    sync_stop.fire();
    if tokio::time::timeout(Duration::from_secs(5), &mut sync_task)
        .await
        .is_err()
    {
        tracing::warn!("advertiser did not stop within 5s");
    }
    router_stop.fire();
    if tokio::time::timeout(Duration::from_secs(5), &mut router_task)
        .await
        .is_err()
    {
        tracing::warn!("router did not stop within 5s");
    }
    tracing::info!(
        grace_ms = config.registry.drain_grace.as_millis() as u64,
        "draining in-flight responses"
    );
    http_stop.fire();
    let drained = tokio::time::timeout(
        config.registry.drain_grace,
        futures::future::join_all(servers),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("drain grace expired; closing the remaining connections");
    }
    tracing::info!("speculum stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {setting} ({addr})"))
}

/// Serves `app` until `shutdown`; then stops accepting and waits for open connections.
fn serve(
    listener: TcpListener,
    app: axum::Router,
    options: ServeOptions,
    shutdown: Shutdown,
) -> JoinHandle<std::io::Result<()>> {
    tokio::spawn(server::serve(listener, app, options, shutdown.wait()))
}

/// `/metrics`, `/readyz` and `/livez` on the metrics listener.
pub fn metrics_app(metrics: Metrics, readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [("content-type", crate::metrics::text::CONTENT_TYPE)],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { registry::readiness_response(&readiness) }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
}

/// What the status page (`src/status/`) reads: numbers from the metrics registry, the policy's
/// description (never its contents), and the recent-requests ring.
fn status_sources(
    config: &Config,
    router: &KademliaRouter,
    gate: &crate::policy::Gate,
    metrics: &Metrics,
    readiness: &Readiness,
    recent: RecentRequests,
) -> status::StatusSources {
    let metrics = metrics.clone();
    let gate = gate.clone();
    status::StatusSources {
        node: config.node.name.clone(),
        peer_id: router.peer_id().to_string(),
        listen_addrs: router
            .listen_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect(),
        cache_enabled: config.cache.enabled,
        cache_max_bytes: config.cache.max_bytes,
        metrics: Arc::new(move || metrics.encode()),
        policy: Arc::new(move || crate::policy::Policy::describe(gate.active().as_ref())),
        readiness: readiness.clone(),
        recent,
    }
}

/// Refreshes the peers gauge and the routing and containerd parts of readiness (`None`:
/// `containerd.enabled: false`, nothing to ask).
async fn health(
    containerd: Option<Arc<ContainerdStore>>,
    certs_dir: std::path::PathBuf,
    router: KademliaRouter,
    metrics: Metrics,
    readiness: Readiness,
) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    // Asked again after containerd was unreachable: it may have restarted with another config.
    let mut inspected = false;
    let mut last_findings: Option<Vec<Finding>> = None;
    loop {
        tick.tick().await;
        if router.ready() {
            readiness.release(Part::Routing);
        } else {
            readiness.block(Part::Routing, "listener not bound yet");
        }
        let Some(containerd) = &containerd else {
            metrics.set_ready(readiness.is_ready());
            continue;
        };
        match containerd.ping().await {
            Ok(()) => {
                readiness.release(Part::Containerd);
                if !inspected {
                    inspected = check_containerd_config(
                        containerd,
                        &certs_dir,
                        &metrics,
                        &readiness,
                        &mut last_findings,
                    )
                    .await;
                }
            }
            Err(e) => {
                readiness.block(Part::Containerd, format!("unreachable: {e}"));
                inspected = false;
            }
        }
        metrics.set_ready(readiness.is_ready());
    }
}

/// Asks containerd about its configuration (`store::introspect`) and says what keeps this node
/// from serving: a log line per finding (only when they change), a `/readyz` note that does
/// not hold readiness back, and `speculum_containerd_config_problem`. Never blocks a pull.
/// `false` when containerd did not answer (asked again on the next health tick).
async fn check_containerd_config(
    containerd: &ContainerdStore,
    certs_dir: &std::path::Path,
    metrics: &Metrics,
    readiness: &Readiness,
    last: &mut Option<Vec<Finding>>,
) -> bool {
    let facts = match containerd.introspect().await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "containerd introspection failed; retrying");
            return false;
        }
    };
    // 1.7 creates the content directory with the first blob: its parent (containerd's root)
    // being there is enough to tell "mounted" from "not mounted".
    let visible = containerd
        .content_dir()
        .is_some_and(|d| d.is_dir() || d.parent().is_some_and(std::path::Path::is_dir));
    let findings = introspect::findings(&facts, certs_dir, visible);
    let version = facts.config_version();
    for label in Finding::LABELS {
        let on = findings.iter().any(|f| f.label() == label);
        metrics.containerd_problem(label, on);
    }
    let messages: Vec<String> = findings
        .iter()
        .map(|f| f.message(version, certs_dir))
        .collect();
    if last.as_ref() != Some(&findings) {
        tracing::info!(
            containerd.version = %facts.version,
            containerd.config_version = version,
            content_root = ?facts.content_root,
            content_dir = ?containerd.content_dir(),
            registry_config_path = ?facts.registry_config_path,
            discard_unpacked_layers = ?facts.discard_unpacked_layers,
            source = ?facts.cri_source,
            "containerd configuration"
        );
        for (finding, message) in findings.iter().zip(&messages) {
            if matches!(finding, Finding::HostsDirUnknown) {
                tracing::info!(problem = finding.label(), "{message}");
            } else {
                tracing::warn!(problem = finding.label(), "{message}");
            }
        }
        *last = Some(findings);
    }
    readiness.note(
        Part::ContainerdConfig,
        (!messages.is_empty()).then(|| messages.join("; ")),
    );
    true
}
