//! The Kademlia router on real sockets: nodes on loopback addresses with port 0, bootstrapped
//! by static peers (or by `localhost:PORT` for the DNS path). Runs the shared Router
//! conformance suite, then what only a real network has: the IP a peer is reported at, a
//! node dying abruptly (task aborted; process frozen with SIGSTOP, which keeps its sockets
//! open and is the worst case loopback can show), graceful shutdown, identity persistence and
//! bootstrap retries. Every wait is a bounded poll; measured times are printed
//! (`cargo test --test loopback routing_kademlia:: -- --nocapture`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use speculum::routing::conformance::{self, Cluster, Node, Timing};
use speculum::routing::kademlia::{self, KademliaConfig, KademliaError, KademliaRouter};
use speculum::routing::{Peer, PeerLoad, Router, RouterError, ServingLoad};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use testkit::dht::{lookup_all, poll};
use tokio::time::Instant;

/// The registry port every test node reports; nothing listens there, lookups only name it.
const REGISTRY_PORT: u16 = 5999;
/// The seam's promise: a dead node stops being returned within this.
const DEAD_NODE_BOUND: Duration = Duration::from_secs(60);

struct TestNode {
    router: KademliaRouter,
    task: JoinHandle<Result<(), RouterError>>,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    fn id(&self) -> String {
        self.router.peer_id().to_string()
    }

    /// `/ip4/…/tcp/…/p2p/…` of this node, for others to bootstrap from.
    fn bootstrap_addr(&self) -> String {
        let Some(addr) = self.router.listen_addrs().into_iter().next() else {
            panic!("node {} has no listen address", self.id());
        };
        format!("{addr}/p2p/{}", self.router.peer_id())
    }

    /// Graceful shutdown; waits (bounded) for the task to end.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("router task did not end cleanly: {other:?}"),
        }
    }
}

fn config(ip: &str, dir: &Path, peers: Vec<String>) -> KademliaConfig {
    let mut c = KademliaConfig {
        listen: format!("/ip4/{ip}/tcp/0"),
        registry_port: REGISTRY_PORT,
        data_dir: dir.to_owned(),
        ..KademliaConfig::default()
    };
    c.bootstrap.peers = peers;
    // Quick retries keep tests short; liveness settings stay at their defaults, so the
    // dead-node measurements are the production numbers.
    c.bootstrap.initial_backoff = Duration::from_millis(100);
    c.bootstrap.max_backoff = Duration::from_secs(1);
    c
}

async fn spawn_with(config: KademliaConfig, dir: tempfile::TempDir) -> TestNode {
    spawn_loaded(config, dir, ServingLoad::new(0)).await
}

async fn spawn_loaded(
    config: KademliaConfig,
    dir: tempfile::TempDir,
    load: ServingLoad,
) -> TestNode {
    // Logs on demand: RUST_LOG=speculum=debug cargo test --test loopback routing_kademlia::.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    match kademlia::start_with(
        config,
        kademlia::Wiring {
            load,
            ..Default::default()
        },
        shutdown,
    )
    .await
    {
        Ok((router, task)) => TestNode {
            router,
            task,
            stop: Some(stop),
            _dir: dir,
        },
        Err(e) => panic!("starting router failed: {e}"),
    }
}

fn tempdir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    }
}

async fn spawn(ip: &str, peers: Vec<String>) -> TestNode {
    let dir = tempdir();
    let c = config(ip, dir.path(), peers);
    spawn_with(c, dir).await
}

/// A, then the others bootstrapped from A only, on the given loopback IPs; returns once
/// everyone is connected to everyone (the others find each other through the DHT).
async fn cluster(ips: &[&str]) -> Vec<TestNode> {
    let a = spawn(ips[0], vec![]).await;
    let mut nodes = Vec::new();
    for ip in &ips[1..] {
        nodes.push(spawn(ip, vec![a.bootstrap_addr()]).await);
    }
    nodes.insert(0, a);
    await_full_mesh(&nodes).await;
    nodes
}

/// Polls until every node is connected to every other one.
async fn await_full_mesh(nodes: &[TestNode]) {
    let want = nodes.len() - 1;
    poll(Duration::from_secs(20), "full mesh", || async {
        nodes.iter().all(|n| n.router.peer_count() >= want)
    })
    .await;
}

/// Reads a lookup to its end (bounded).
async fn lookup(router: &KademliaRouter, key: &str) -> Vec<Peer> {
    lookup_all(router, key, Duration::from_secs(20)).await
}

async fn finds(router: &KademliaRouter, key: &str, id: &str) -> bool {
    lookup(router, key).await.iter().any(|p| p.id == id)
}

#[tokio::test]
async fn conformance() {
    conformance::run(Timing::network(), |n| async move {
        let nodes = match n {
            1 => vec![spawn("127.0.0.1", vec![]).await],
            3 => cluster(&["127.0.0.1"; 3]).await,
            _ => panic!("unexpected cluster size {n}"),
        };
        let mut routers = Vec::new();
        let mut guard = Vec::new();
        for node in nodes {
            routers.push(Node {
                id: node.id(),
                router: node.router.clone(),
            });
            guard.push(node);
        }
        Cluster::new(routers, guard)
    })
    .await;
}

#[tokio::test]
async fn peers_are_reported_at_their_ip_and_the_registry_port() {
    // Three loopback IPs: the kernel picks 127.0.0.1 as source for all of them, so this also
    // checks that an inbound connection's source IP does not mislabel a peer.
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let nodes = cluster(&ips).await;
    for (i, n) in nodes.iter().enumerate() {
        let key = format!("sha256:{:064x}", 0xadd0 + i);
        if let Err(e) = n.router.advertise(vec![key]).await {
            panic!("advertise: {e}");
        }
    }
    for (p, provider) in nodes.iter().enumerate() {
        let key = format!("sha256:{:064x}", 0xadd0 + p);
        let want_ip: IpAddr = match ips[p].parse() {
            Ok(ip) => ip,
            Err(e) => panic!("{e}"),
        };
        let want = SocketAddr::new(want_ip, REGISTRY_PORT);
        for (l, looker) in nodes.iter().enumerate() {
            if l == p {
                continue;
            }
            let name = format!("node {l} looking up node {p}");
            poll(Duration::from_secs(20), &name, || async {
                let found = lookup(&looker.router, &key).await;
                match found.iter().find(|f| f.id == provider.id()) {
                    Some(f) => {
                        assert_eq!(f.addr, want, "{name}");
                        true
                    }
                    None => false,
                }
            })
            .await;
        }
    }
}

/// What `measure_death` saw after taking C down.
struct Death {
    /// Start of the first lookup on A that no longer returned C, counted from the kill.
    gone: Duration,
    /// How long that lookup ran until its channel closed.
    gone_lookup: Duration,
    /// When A's connection to C closed (and A dropped C's records).
    closed: Duration,
    /// How long a lookup on A runs once that happened.
    lookup_after: Duration,
}

impl Death {
    fn print(&self, what: &str) {
        println!(
            "measured: {what}: lookups started {} ms after the kill no longer return it (that \
             lookup ended after {} ms); connection closed after {} ms; a lookup then takes {} ms",
            self.gone.as_millis(),
            self.gone_lookup.as_millis(),
            self.closed.as_millis(),
            self.lookup_after.as_millis()
        );
    }
}

/// Waits until A finds C's key, lets `kill` take C down, then measures how long A still
/// returns C and how long until A's connection to C closes.
async fn measure_death<K, KF>(a: &TestNode, c_id: &str, key: &str, kill: K) -> Death
where
    K: FnOnce() -> KF,
    KF: std::future::Future<Output = ()>,
{
    poll(Duration::from_secs(20), "A finds C", || {
        finds(&a.router, key, c_id)
    })
    .await;
    let peers_before = a.router.peer_count();
    kill().await;
    let start = Instant::now();
    let (gone, gone_lookup) = loop {
        let began = start.elapsed();
        let found = lookup(&a.router, key).await;
        if !found.iter().any(|p| p.id == c_id) {
            break (began, start.elapsed() - began);
        }
        assert!(
            start.elapsed() < DEAD_NODE_BOUND,
            "A still returns dead C after {DEAD_NODE_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    poll(
        DEAD_NODE_BOUND,
        "A's connection to dead C closes",
        || async { a.router.peer_count() < peers_before },
    )
    .await;
    let closed = start.elapsed();
    let began = Instant::now();
    let found = lookup(&a.router, key).await;
    assert!(
        found.iter().all(|p| p.id != c_id),
        "dead C is back: {found:?}"
    );
    Death {
        gone,
        gone_lookup,
        closed,
        lookup_after: began.elapsed(),
    }
}

#[tokio::test]
async fn aborted_node_stops_being_returned() {
    let mut nodes = cluster(&["127.0.0.1"; 3]).await;
    let Some(c) = nodes.pop() else { unreachable!() };
    let key = "127.0.0.1:5000/dead/abort:v1";
    if let Err(e) = c.router.advertise(vec![key.to_owned()]).await {
        panic!("advertise: {e}");
    }
    let c_id = c.id();
    let task = c.task;
    // No graceful withdraw: the task is dropped mid-flight, its sockets close with it.
    let death = measure_death(&nodes[0], &c_id, key, || async move {
        task.abort();
        let _ = task.await;
    })
    .await;
    death.print("aborted node");
}

#[tokio::test]
async fn frozen_node_stops_being_returned() {
    let nodes = cluster(&["127.0.0.1"; 2]).await;
    let key = "sha256:00000000000000000000000000000000000000000000000000000000000f4023";
    let child = ChildNode::spawn(&nodes[0].bootstrap_addr(), key).await;
    let c_id = child.id.clone();
    // Wait until A and B are connected to the child too: frozen connections are what they
    // hold when it stops.
    poll(
        Duration::from_secs(20),
        "A and B connect to the child",
        || async { nodes.iter().all(|n| n.router.peer_count() >= 2) },
    )
    .await;
    let pid = child.pid;
    let death = measure_death(&nodes[0], &c_id, key, || async move {
        // SIGSTOP: the process keeps its sockets and the kernel keeps ACKing, but nothing
        // answers: a hung or partitioned node, not a clean crash.
        signal(pid, "STOP");
    })
    .await;
    death.print("frozen node");
    // ping_interval + ping_timeout (10 s by default) plus slack for a loaded machine.
    assert!(
        death.closed < Duration::from_secs(20),
        "took {:?}",
        death.closed
    );
    child.kill().await;
}

#[tokio::test]
async fn gracefully_stopped_node_is_gone_quickly() {
    let mut nodes = cluster(&["127.0.0.1"; 3]).await;
    let Some(c) = nodes.pop() else { unreachable!() };
    let key = "sha256:000000000000000000000000000000000000000000000000000000000000900d";
    if let Err(e) = c.router.advertise(vec![key.to_owned()]).await {
        panic!("advertise: {e}");
    }
    let c_id = c.id();
    let death = measure_death(&nodes[0], &c_id, key, || c.stop()).await;
    death.print("gracefully stopped node");
    assert!(
        death.closed < Duration::from_secs(5),
        "took {:?}",
        death.closed
    );
}

/// Time to the first peer of a lookup, and time until a lookup of an unknown key ends: the
/// mirror waits only a few milliseconds for a first peer.
#[tokio::test]
async fn first_peer_latency() {
    let nodes = cluster(&["127.0.0.1"; 3]).await;
    let key = "sha256:00000000000000000000000000000000000000000000000000000000000f1a57";
    if let Err(e) = nodes[2].router.advertise(vec![key.to_owned()]).await {
        panic!("advertise: {e}");
    }
    let c_id = nodes[2].id();
    poll(Duration::from_secs(20), "A finds C", || {
        finds(&nodes[0].router, key, &c_id)
    })
    .await;
    let mut first = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        let mut rx = match nodes[0].router.lookup(key, 1).await {
            Ok(rx) => rx,
            Err(e) => panic!("{e}"),
        };
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(p)) => assert_eq!(p.id, c_id),
            other => panic!("lookup {i}: no first peer: {other:?}"),
        }
        first.push(start.elapsed());
        let start = Instant::now();
        let found = lookup(&nodes[0].router, &format!("sha256:{i:064x}")).await;
        assert!(found.is_empty());
        unknown.push(start.elapsed());
    }
    first.sort();
    unknown.sort();
    println!(
        "measured: first peer after p50 {} us / max {} us; unknown key ends after p50 {} us / max {} us (20 lookups, 3 nodes, debug build)",
        first[10].as_micros(),
        first[19].as_micros(),
        unknown[10].as_micros(),
        unknown[19].as_micros()
    );
    // Loose: a loaded 2-core machine, a debug build. Loopback round trips are ~0.1 ms.
    assert!(
        first[10] < Duration::from_millis(50),
        "median first peer {:?}",
        first[10]
    );
}

/// A node holds tens of thousands of blobs: advertising a large batch must not block the
/// caller, and every key must become findable (the publish queue drains in order).
#[tokio::test]
async fn advertising_many_keys() {
    const KEYS: usize = 5_000;
    let nodes = cluster(&["127.0.0.1"; 3]).await;
    let keys: Vec<String> = (0..KEYS)
        .map(|i| format!("sha256:{:064x}", 1_000_000 + i))
        .collect();
    let start = Instant::now();
    if let Err(e) = nodes[2].router.advertise(keys.clone()).await {
        panic!("advertise: {e}");
    }
    let queued = start.elapsed();
    poll(Duration::from_secs(5), "advertised_count", || async {
        nodes[2].router.advertised_count() == KEYS
    })
    .await;
    let c_id = nodes[2].id();
    // FIFO queue: once the last key is found, the batch went out.
    let last = &keys[KEYS - 1];
    poll(Duration::from_secs(120), "last key found", || {
        finds(&nodes[0].router, last, &c_id)
    })
    .await;
    let published = start.elapsed();
    for k in keys.iter().step_by(KEYS / 10) {
        assert!(finds(&nodes[1].router, k, &c_id).await, "{k} not found");
    }
    println!(
        "measured: advertise({KEYS} keys) returned after {} ms; all findable after {} ms ({:.0} keys/s, 3 nodes, debug build)",
        queued.as_millis(),
        published.as_millis(),
        KEYS as f64 / published.as_secs_f64()
    );
    assert!(
        queued < Duration::from_millis(500),
        "advertise blocked {queued:?}"
    );
}

#[tokio::test]
async fn identity_persists_across_restarts() {
    let dir = tempdir();
    let path = dir.path().to_owned();
    let first = spawn_with(config("127.0.0.1", &path, vec![]), tempdir()).await;
    let id = first.id();
    first.stop().await;

    let key_file = path.join(kademlia::IDENTITY_FILE);
    let mode = match std::fs::metadata(&key_file) {
        Ok(m) => std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
        Err(e) => panic!("identity file: {e}"),
    };
    assert_eq!(mode, 0o600, "identity key must be private");

    let second = spawn_with(config("127.0.0.1", &path, vec![]), tempdir()).await;
    assert_eq!(
        second.id(),
        id,
        "restart from the same data dir changed the peer id"
    );
    second.stop().await;

    // A corrupt key is an error, not a silent new identity.
    if let Err(e) = std::fs::write(&key_file, b"not a key") {
        panic!("{e}");
    }
    let result = kademlia::start(config("127.0.0.1", &path, vec![]), std::future::pending()).await;
    match result {
        Err(KademliaError::IdentityCorrupt { .. }) => {}
        Err(e) => panic!("want IdentityCorrupt, got {e}"),
        Ok(_) => panic!("started with a corrupt identity key"),
    }
    drop(dir);
}

#[tokio::test]
async fn bootstraps_from_a_dns_name() {
    let a = spawn("127.0.0.1", vec![]).await;
    let Some(port) = a.router.listen_addrs().iter().find_map(|addr| {
        addr.iter().find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
    }) else {
        panic!("no port");
    };
    let dir = tempdir();
    let mut c = config("127.0.0.1", dir.path(), vec![]);
    // `localhost` resolves from /etc/hosts (127.0.0.1, maybe ::1): no outside DNS.
    c.bootstrap.dns = Some(format!("localhost:{port}"));
    let b = spawn_with(c, dir).await;
    let key = "127.0.0.1:5000/dns/bootstrap:v1";
    if let Err(e) = a.router.advertise(vec![key.to_owned()]).await {
        panic!("advertise: {e}");
    }
    let a_id = a.id();
    let took = poll(
        Duration::from_secs(20),
        "B finds A via DNS bootstrap",
        || finds(&b.router, key, &a_id),
    )
    .await;
    println!(
        "measured: DNS-bootstrapped node found its peer's key after {} ms",
        took.as_millis()
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn keeps_retrying_bootstrap_until_a_peer_appears() {
    // Reserve a port, release it, and let B bootstrap towards it before anyone listens there.
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("{e}"),
    };
    let b = spawn("127.0.0.1", vec![format!("/ip4/127.0.0.1/tcp/{port}")]).await;
    assert!(b.router.ready(), "a lone node is ready");
    // Let B fail a few rounds.
    poll(Duration::from_secs(5), "B is alone", || async {
        b.router.peer_count() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let some dials fail: not a sync
    let dir = tempdir();
    let mut ca = config("127.0.0.1", dir.path(), vec![]);
    ca.listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let a = spawn_with(ca, dir).await;
    let took = poll(
        Duration::from_secs(10),
        "B connects once A listens",
        || async { b.router.peer_count() == 1 },
    )
    .await;
    println!(
        "measured: bootstrap retry connected {} ms after the peer came up",
        took.as_millis()
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn invalid_config_is_refused_before_binding() {
    let dir = tempdir();
    let mut c = config("127.0.0.1", dir.path(), vec!["nonsense".into()]);
    c.registry_port = 0;
    c.listen = "/ip4/127.0.0.1/udp/1".into();
    match kademlia::start(c, std::future::pending()).await {
        Err(KademliaError::Config(errors)) => assert_eq!(errors.len(), 3, "{errors:?}"),
        Err(e) => panic!("want Config, got {e}"),
        Ok(_) => panic!("started with an invalid config"),
    }
}

/// Start-up advertising: a paced backlog of digests does not hold back what gates a pull. A
/// tag (`advertise`) and a manifest (`advertise_first`) sent after 3,000 paced digests are
/// findable while the backlog's tail cannot be yet (50 keys/s: a minute for the whole batch).
#[tokio::test]
async fn tags_and_manifests_overtake_a_paced_backlog() {
    const KEYS: usize = 3_000;
    let a = spawn("127.0.0.1", vec![]).await;
    let dir = tempdir();
    let mut c = config("127.0.0.1", dir.path(), vec![a.bootstrap_addr()]);
    c.publish_rate = 50;
    let c = spawn_with(c, dir).await;
    let nodes = [a, c];
    await_full_mesh(&nodes).await;
    let [a, c] = nodes;
    let backlog: Vec<String> = (0..KEYS)
        .map(|i| format!("sha256:{:064x}", 2_000_000 + i))
        .collect();
    if let Err(e) = c.router.advertise(backlog.clone()).await {
        panic!("advertise: {e}");
    }
    let tag = "127.0.0.1:5000/rig/urgent:v1";
    let manifest = "sha256:00000000000000000000000000000000000000000000000000000000000f1257";
    let sent = Instant::now();
    let urgent = async {
        c.router.advertise(vec![tag.to_owned()]).await?;
        c.router.advertise_first(vec![manifest.to_owned()]).await
    };
    if let Err(e) = urgent.await {
        panic!("advertise: {e}");
    }
    let c_id = c.id();
    for key in [tag, manifest] {
        poll(Duration::from_secs(20), key, || {
            finds(&a.router, key, &c_id)
        })
        .await;
    }
    let urgent_after = sent.elapsed();
    let last = &backlog[KEYS - 1];
    assert!(
        !finds(&a.router, last, &c_id).await,
        "the backlog's last key is findable {urgent_after:?} after the urgent keys were sent: \
         not paced, or the urgent keys waited behind it"
    );
    // The backlog still drains, in order.
    poll(Duration::from_secs(20), "the backlog's first key", || {
        finds(&a.router, &backlog[0], &c_id)
    })
    .await;
    println!(
        "measured: tag and manifest findable {} ms after being sent behind {KEYS} paced digests",
        urgent_after.as_millis()
    );
    c.stop().await;
    a.stop().await;
}

/// A holder's `has` answer carries its serving load, and the lookup hands it out in
/// `Peer::load`; a later answer (the check sent with a fast-path hand-out) updates it.
#[tokio::test]
async fn lookups_report_the_holders_serving_load() {
    let a = spawn("127.0.0.1", vec![]).await;
    let dir = tempdir();
    let load = ServingLoad::new(4);
    let c = spawn_loaded(
        config("127.0.0.1", dir.path(), vec![a.bootstrap_addr()]),
        dir,
        load.clone(),
    )
    .await;
    let key = "sha256:000000000000000000000000000000000000000000000000000000000000104d";
    if let Err(e) = c.router.advertise(vec![key.to_owned()]).await {
        panic!("advertise: {e}");
    }
    let c_id = c.id();
    let first = load.try_enter();
    let second = load.try_enter();
    assert!(first.is_some() && second.is_some(), "slots under the cap");
    let want = |serving| Some(PeerLoad { serving, limit: 4 });
    let loaded = |serving| {
        let (a, c_id) = (&a, &c_id);
        async move {
            lookup(&a.router, key)
                .await
                .iter()
                .any(|p| p.id == *c_id && p.load == want(serving))
        }
    };
    poll(Duration::from_secs(20), "A sees C serving 2 of 4", || {
        loaded(2)
    })
    .await;
    drop(first);
    poll(Duration::from_secs(20), "A sees C serving 1 of 4", || {
        loaded(1)
    })
    .await;
    drop(second);
    c.stop().await;
    a.stop().await;
}

/// The fast path: a connected holder heard from within `liveness_window` is handed out
/// without waiting for its `has` answer — so a holder frozen just now (SIGSTOP: sockets open,
/// nothing answers, like a partition) is still handed out at first. It stops being handed out
/// once its unanswered check fails (`verify_timeout`) or the window passes, whichever is first.
#[tokio::test]
async fn a_cut_off_holder_is_handed_out_only_within_the_liveness_window() {
    const WINDOW: Duration = Duration::from_secs(6);
    let dir = tempdir();
    let mut c = config("127.0.0.1", dir.path(), vec![]);
    c.liveness_window = WINDOW;
    let verify = c.verify_timeout;
    let a = spawn_with(c, dir).await;
    let key = "sha256:0000000000000000000000000000000000000000000000000000000000c07055";
    let child = ChildNode::spawn(&a.bootstrap_addr(), key).await;
    let c_id = child.id.clone();
    poll(Duration::from_secs(20), "A finds the child", || {
        finds(&a.router, key, &c_id)
    })
    .await;
    signal(child.pid, "STOP");
    let frozen = Instant::now();
    // Only the fast path can hand out a node that answers nothing. What the mirror waits for
    // is the first peer (a lookup's channel stays open while kad still asks the frozen node).
    let first_peer = || async {
        let mut rx = match a.router.lookup(key, 1).await {
            Ok(rx) => rx,
            Err(e) => panic!("{e}"),
        };
        let wait = verify + Duration::from_secs(1);
        matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(p)) if p.id == c_id)
    };
    let handed_out = first_peer().await;
    let looked = frozen.elapsed();
    if looked < WINDOW {
        assert!(
            handed_out,
            "a holder heard from {looked:?} ago was not handed out at once"
        );
    }
    let gone = loop {
        let began = frozen.elapsed();
        if !first_peer().await {
            break began;
        }
        assert!(
            frozen.elapsed() < DEAD_NODE_BOUND,
            "frozen holder still handed out after {DEAD_NODE_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "measured: frozen holder handed out to lookups started up to {} ms after the freeze \
         (verify_timeout {} ms, liveness_window {} ms)",
        gone.as_millis(),
        verify.as_millis(),
        WINDOW.as_millis()
    );
    // The bound is the window (a lookup started later waits for an answer that never comes),
    // and sooner the failed check sent with the first hand-out; slack for a loaded machine.
    assert!(
        gone <= WINDOW + Duration::from_secs(2),
        "handed out for {gone:?}"
    );
    // And it stays out: later lookups wait for `has`, which a frozen node never answers.
    for _ in 0..3 {
        assert!(!first_peer().await, "the frozen holder is back");
    }
    child.kill().await;
    a.stop().await;
}

// ----- a router in a child process, to freeze it with SIGSTOP -----

const CHILD_BOOTSTRAP: &str = "SPECULUM_TEST_CHILD_BOOTSTRAP";
const CHILD_KEY: &str = "SPECULUM_TEST_CHILD_KEY";
const CHILD_READY: &str = "CHILD-READY ";

struct ChildNode {
    child: tokio::process::Child,
    pid: u32,
    id: String,
}

impl ChildNode {
    /// Re-runs this test binary with only `child_node` selected; that test starts a router
    /// that bootstraps from `bootstrap`, advertises `key` and prints its peer id.
    async fn spawn(bootstrap: &str, key: &str) -> ChildNode {
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        // libtest names a test by its path inside the harness (`routing_kademlia::child_node`):
        // the module path without the crate's name.
        let name = match module_path!().split_once("::") {
            Some((_, module)) => format!("{module}::child_node"),
            None => "child_node".to_owned(),
        };
        let mut child = match tokio::process::Command::new(exe)
            .args([
                "--exact",
                name.as_str(),
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_BOOTSTRAP, bootstrap)
            .env(CHILD_KEY, key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("spawning child node: {e}"),
        };
        let Some(pid) = child.id() else {
            panic!("child has no pid");
        };
        let Some(stdout) = child.stdout.take() else {
            panic!("no child stdout");
        };
        let mut lines = BufReader::new(stdout).lines();
        let id = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                // libtest may print "test child_node ... " on the same line first.
                if let Some((_, id)) = line.split_once(CHILD_READY) {
                    return Some(id.trim().to_owned());
                }
            }
            None
        })
        .await;
        // Keep draining its stdout (logs, with RUST_LOG set): a closed pipe would kill it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        match id {
            Ok(Some(id)) => ChildNode { child, pid, id },
            _ => panic!("child node did not report ready within 30s"),
        }
    }

    async fn kill(mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn signal(pid: u32, sig: &str) {
    match std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
    {
        Ok(s) if s.success() => {}
        other => panic!("kill -{sig} {pid}: {other:?}"),
    }
}

/// Not a test on its own: the body of the child process of `frozen_node_stops_being_returned`.
#[tokio::test]
#[ignore = "runs only as the child process of frozen_node_stops_being_returned"]
async fn child_node() {
    let (Ok(bootstrap), Ok(key)) = (std::env::var(CHILD_BOOTSTRAP), std::env::var(CHILD_KEY))
    else {
        return;
    };
    let node = spawn("127.0.0.1", vec![bootstrap]).await;
    if let Err(e) = node.router.advertise(vec![key]).await {
        panic!("advertise: {e}");
    }
    println!("{CHILD_READY}{}", node.id());
    // Runs until the parent closes stdin (or dies), at most two minutes.
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let _ = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(_)) = stdin.next_line().await {}
    })
    .await;
    node.stop().await;
}
