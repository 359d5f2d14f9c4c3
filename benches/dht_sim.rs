//! DHT simulation: many real `KademliaRouter`s in one process, on loopback, in bounded time.
//!
//! One job: measure what the Router seam costs as a cluster grows — lookup latency (time until
//! a lookup hands out its first verified provider, which is what the mirror waits for), the
//! answer for a key nobody has, and what advertising 10 k digests costs a node (wall time until
//! they are findable, CPU-seconds, bytes on the wire), and how many peers a lookup's kad walk
//! contacts (kad's `QueryStats`, through `KademliaRouter::take_lookup_costs`) at several cluster
//! sizes, to check the log₂ N growth the scale model assumes. Every node is the production router
//! (TCP + noise + yamux, kad, identify, ping, the `has` check); only the network is loopback.
//! The reference measured in the same run is a loopback TCP request/response round trip.
//!
//! Run: `bench/dht.sh` (a network namespace of its own, so the byte count is ours alone), or
//! `cargo bench --bench dht_sim`. Knobs (environment): `SIM_NODES` (100), `SIM_SMALL` (5, the
//! peer-lookup cluster), `SIM_KEYS` (10000 per advertising node), `SIM_ADVERTISERS` (2),
//! `SIM_LOOKUPS` (300), `SIM_HOPS` (cluster sizes for the hop count, "25 50 100"; empty: skip),
//! `SIM_REPUBLISH` (0; 1: in the hop clusters, once every key is findable, withdraw and
//! advertise every key again before timing — what the republish interval does in a running
//! cluster, once the routing tables have settled), `SIM_DEADLINE_S` (300, the whole run),
//! `BENCH_OUT` (writes
//! `dht_sim.json` there). Every wait is a bounded poll; the run ends at the deadline whatever
//! is left, saying so.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom;
use speculum::routing::Router;
use speculum::routing::kademlia::{self, KademliaConfig, KademliaRouter, LookupCost};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Every node reports this registry port; nothing listens there, lookups only name it.
const REGISTRY_PORT: u16 = 5999;

struct SimNode {
    router: KademliaRouter,
    task: JoinHandle<Result<(), speculum::routing::RouterError>>,
    stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Node `i`'s loopback address: one IP per node, as on a real network (127.0.0.0/8 is all
/// loopback on Linux).
fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 77, (i / 250) as u8, (i % 250 + 1) as u8))
}

async fn spawn(i: usize, bootstrap: Vec<String>) -> anyhow::Result<SimNode> {
    let dir = tempfile::tempdir()?;
    let mut c = KademliaConfig {
        listen: format!("/ip4/{}/tcp/0", node_ip(i)),
        registry_port: REGISTRY_PORT,
        data_dir: dir.path().to_owned(),
        ..KademliaConfig::default()
    };
    c.bootstrap.peers = bootstrap;
    c.bootstrap.initial_backoff = Duration::from_millis(200);
    c.bootstrap.max_backoff = Duration::from_secs(2);
    let (stop, stopped) = oneshot::channel::<()>();
    let (router, task) = kademlia::start(c, async move {
        let _ = stopped.await;
    })
    .await?;
    Ok(SimNode {
        router,
        task,
        stop,
        _dir: dir,
    })
}

fn bootstrap_addr(n: &SimNode) -> anyhow::Result<String> {
    let addr = n
        .router
        .listen_addrs()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("node has no listen address"))?;
    Ok(format!("{addr}/p2p/{}", n.router.peer_id()))
}

/// Starts `count` nodes, each bootstrapped from the first two; returns once every node has at
/// least `min_peers` connections, or at `deadline` (saying how far it got).
async fn cluster(
    count: usize,
    min_peers: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<SimNode>> {
    let mut nodes: Vec<SimNode> = Vec::with_capacity(count);
    for i in 0..count {
        let boot = nodes
            .iter()
            .take(2)
            .map(bootstrap_addr)
            .collect::<anyhow::Result<Vec<_>>>()?;
        nodes.push(spawn(i, boot).await?);
    }
    let want = min_peers.min(count - 1);
    loop {
        let ready = nodes
            .iter()
            .filter(|n| n.router.peer_count() >= want)
            .count();
        if ready == count {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("dht_sim: only {ready}/{count} nodes reached {want} peers by the deadline");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(nodes)
}

async fn shutdown(nodes: Vec<SimNode>) {
    let mut tasks = Vec::new();
    for n in nodes {
        let _ = n.stop.send(());
        tasks.push(n.task);
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
}

/// Time until `from`'s lookup of `key` yields its first provider; `None` when it yields none.
async fn lookup_first(from: &KademliaRouter, key: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut rx = from.lookup(key, 1).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
        Ok(Some(_)) => Some(t.elapsed()),
        _ => None,
    }
}

/// Time until a lookup of a key nobody holds is over (its channel closes).
async fn lookup_miss(from: &KademliaRouter, key: &str) -> Option<Duration> {
    let t = Instant::now();
    let mut rx = from.lookup(key, 1).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
        Ok(None) => Some(t.elapsed()),
        _ => None,
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = (((v.len() - 1) as f64) * p).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
}

fn summary(name: &str, v: &mut [Duration], failed: usize) -> serde_json::Value {
    let s = serde_json::json!({
        "n": v.len(), "failed": failed,
        "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "max_ms": pct(v, 1.0),
    });
    println!("{name}: {s}");
    s
}

/// CPU-seconds this process has used (utime + stime from /proc/self/stat).
/// p50 / p99 / max of a count.
fn count_summary(v: &mut [u32]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::json!({"n": 0});
    }
    v.sort_unstable();
    let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    serde_json::json!({"n": v.len(), "mean": mean, "p50": at(0.5), "p99": at(0.99), "max": at(1.0)})
}

/// Lookup latency and kad walk cost in a cluster of `size`: 10 nodes advertise 5 keys each,
/// then `lookups` lookups from random other nodes (one at a time, so the walk is not slowed
/// by its neighbours), and 50 of keys nobody has. Costs come from every node's
/// `take_lookup_costs` (drained before the timed lookups so only those are counted).
async fn hop_cluster(
    size: usize,
    lookups: usize,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    let t = Instant::now();
    let nodes = cluster(size, 8.min(size - 1), deadline).await?;
    let startup = t.elapsed();
    let owners = 10.min(size - 1);
    for (n, node) in nodes.iter().enumerate().take(owners) {
        node.router
            .advertise((0..5).map(|i| key(n, i)).collect())
            .await?;
    }
    // Findable from a non-owner before timing (bounded: a key still missing after a minute
    // shows up as a failed lookup below instead of eating the run).
    let findable = |nodes: &[SimNode]| {
        let ready_by = deadline.min(Instant::now() + Duration::from_secs(60));
        let from = nodes[size - 1].router.clone();
        async move {
            for n in 0..owners {
                for i in 0..5 {
                    while Instant::now() < ready_by
                        && tokio::time::timeout(
                            Duration::from_secs(3),
                            lookup_first(&from, &key(n, i)),
                        )
                        .await
                        .ok()
                        .flatten()
                        .is_none()
                    {}
                }
            }
        }
    };
    findable(&nodes).await;
    // The records went to the closest nodes each owner knew right after start-up; a second
    // publication, with the routing tables settled, places them as a republish would.
    let republished = std::env::var("SIM_REPUBLISH").is_ok_and(|v| v == "1");
    if republished {
        for (n, node) in nodes.iter().enumerate().take(owners) {
            let keys: Vec<String> = (0..5).map(|i| key(n, i)).collect();
            node.router.withdraw(keys.clone()).await?;
            node.router.advertise(keys).await?;
        }
        findable(&nodes).await;
    }
    let drain = |nodes: &[SimNode]| -> Vec<LookupCost> {
        nodes
            .iter()
            .flat_map(|n| n.router.take_lookup_costs())
            .collect()
    };
    drain(&nodes);
    let unreachable =
        |nodes: &[SimNode]| -> u64 { nodes.iter().map(|n| n.router.declared_unreachable()).sum() };
    let unreachable_before = unreachable(&nodes);
    let mut rng = rand::rng();
    let (mut hit, mut failed) = (Vec::new(), 0);
    // Why a lookup failed: its walk ended without a verified provider, or the 3 s bound hit.
    let (mut ended_empty, mut timed_out) = (0, 0);
    for _ in 0..lookups {
        if Instant::now() > deadline {
            break;
        }
        let from = rng.random_range(owners..size);
        let k = key(rng.random_range(0..owners), rng.random_range(0..5));
        match tokio::time::timeout(
            Duration::from_secs(3),
            lookup_first(&nodes[from].router, &k),
        )
        .await
        {
            Ok(Some(d)) => hit.push(d),
            Ok(None) => {
                failed += 1;
                ended_empty += 1;
            }
            Err(_) => {
                failed += 1;
                timed_out += 1;
            }
        }
    }
    // Peers some node gave up on (ping silence, no `has` answer) while the lookups ran.
    let unreachable_during = unreachable(&nodes) - unreachable_before;
    // A lookup ends (and stops its walk) once it has verified a provider; its final kad event
    // follows a moment later: poll (bounded) until every lookup's cost is in.
    let wanted = hit.len() + failed;
    let mut costs = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while costs.len() < wanted && Instant::now() < until {
        costs.extend(drain(&nodes));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut first: Vec<u32> = costs
        .iter()
        .filter_map(|c| c.requests_to_first_provider)
        .collect();
    let local = first.iter().filter(|&&r| r == 0).count();
    let mut total: Vec<u32> = costs.iter().map(|c| c.requests).collect();
    let mut miss = Vec::new();
    for i in 0..lookups.min(50) {
        if Instant::now() > deadline {
            break;
        }
        let from = rng.random_range(0..size);
        if let Some(d) = lookup_miss(&nodes[from].router, &key(77_777, i)).await {
            miss.push(d);
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    let mut miss_costs = Vec::new();
    while miss_costs.len() < miss.len() && Instant::now() < until {
        miss_costs.extend(drain(&nodes));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut miss_requests: Vec<u32> = miss_costs.iter().map(|c| c.requests).collect();
    let out = serde_json::json!({
        "nodes": size,
        "startup_s": startup.as_secs_f64(),
        "lookup_hit": summary(&format!("hops, {size} nodes: lookup, first provider"), &mut hit, failed),
        "requests_to_first_provider": count_summary(&mut first),
        "answered_from_own_store": local,
        "failed_walk_ended_empty": ended_empty,
        "failed_timed_out": timed_out,
        "republished_before_lookups": republished,
        "peers_marked_unreachable_during_lookups": unreachable_during,
        "peers_marked_unreachable_total": unreachable(&nodes),
        "requests_whole_walk": count_summary(&mut total),
        "lookup_miss": summary(&format!("hops, {size} nodes: lookup of a key nobody has"), &mut miss, 0),
        "requests_miss_walk": count_summary(&mut miss_requests),
        "log2_n": (size as f64).log2(),
    });
    println!("hops, {size} nodes: {out}");
    shutdown(nodes).await;
    Ok(out)
}

fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes received on `lo` in this network namespace (/proc/net/dev is per namespace).
fn lo_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split_once(':'))
                .and_then(|(_, r)| r.split_whitespace().next().and_then(|b| b.parse().ok()))
        })
        .unwrap_or(0)
}

/// The reference: a 64-byte request/response on a kept-alive loopback TCP connection.
async fn tcp_round_trip(count: usize) -> anyhow::Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind((node_ip(0), 0)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut out = Vec::with_capacity(count);
    let mut buf = [7u8; 64];
    for _ in 0..count {
        let t = Instant::now();
        c.write_all(&buf).await?;
        c.read_exact(&mut buf).await?;
        out.push(t.elapsed());
    }
    drop(c);
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(out)
}

fn key(node: usize, i: usize) -> String {
    // Digest-shaped keys, distinct per node and index.
    let mut h = format!("{node:08x}{i:08x}");
    while h.len() < 64 {
        h.push('0');
    }
    format!("sha256:{h}")
}

/// Peer lookups in a small cluster (the 3-5 node case): every node advertises a few keys,
/// then random nodes look up keys others hold.
async fn small_cluster(
    size: usize,
    lookups: usize,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    let nodes = cluster(size, size - 1, deadline).await?;
    for (n, node) in nodes.iter().enumerate() {
        node.router
            .advertise((0..50).map(|i| key(n, i)).collect())
            .await?;
    }
    // Findable everywhere before timing (bounded).
    for (n, _) in nodes.iter().enumerate() {
        let from = &nodes[(n + 1) % size].router;
        while lookup_first(from, &key(n, 49)).await.is_none() && Instant::now() < deadline {}
    }
    let mut rng = rand::rng();
    let (mut hit, mut miss) = (Vec::new(), Vec::new());
    let mut failed = 0;
    for _ in 0..lookups {
        if Instant::now() > deadline {
            break;
        }
        let from = rng.random_range(0..size);
        let mut owner = rng.random_range(0..size);
        if owner == from {
            owner = (owner + 1) % size;
        }
        match lookup_first(&nodes[from].router, &key(owner, rng.random_range(0..50))).await {
            Some(d) => hit.push(d),
            None => failed += 1,
        }
    }
    for i in 0..lookups.min(50) {
        if let Some(d) = lookup_miss(&nodes[i % size].router, &key(9999, i)).await {
            miss.push(d);
        }
    }
    let out = serde_json::json!({
        "nodes": size,
        "lookup_hit": summary(&format!("{size} nodes: lookup, first provider"), &mut hit, failed),
        "lookup_miss": summary(&format!("{size} nodes: lookup of a key nobody has"), &mut miss, 0),
    });
    shutdown(nodes).await;
    Ok(out)
}

async fn large_cluster(
    size: usize,
    keys: usize,
    advertisers: usize,
    lookups: usize,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    let t = Instant::now();
    let nodes = cluster(size, 8, deadline).await?;
    let startup = t.elapsed();
    let peers: Vec<usize> = nodes.iter().map(|n| n.router.peer_count()).collect();
    let mean_peers = peers.iter().sum::<usize>() as f64 / size as f64;
    println!("{size} nodes up in {startup:?}, mean {mean_peers:.1} connections per node");

    // Advertisement cost: `advertisers` nodes announce `keys` digests each at once; done when a
    // random sample of them is findable from nodes that do not hold them.
    let advertisers = advertisers.min(size - 1).max(1);
    let (cpu0, bytes0, t0) = (cpu_seconds(), lo_bytes(), Instant::now());
    for (a, node) in nodes.iter().enumerate().take(advertisers) {
        node.router
            .advertise((0..keys).map(|i| key(a, i)).collect())
            .await?;
    }
    let mut rng = rand::rng();
    let sample: Vec<(usize, usize)> = (0..50)
        .map(|_| (rng.random_range(0..advertisers), rng.random_range(0..keys)))
        .collect();
    // The advertising phase may use the time up to a minute (or a third of what is left, if
    // less) before the deadline; the lookups after it need the rest. Sample lookups run concurrently, each bounded, so one pass never
    // outlasts the phase.
    let left = deadline.saturating_duration_since(Instant::now());
    let phase_end = deadline - Duration::from_secs(60).min(left / 3);
    let mut pending = sample.clone();
    while !pending.is_empty() && Instant::now() < phase_end {
        let checks = pending.iter().map(|&(a, i)| {
            let from = nodes[advertisers + rng.random_range(0..size - advertisers)]
                .router
                .clone();
            async move {
                let found =
                    tokio::time::timeout(Duration::from_secs(3), lookup_first(&from, &key(a, i)))
                        .await
                        .ok()
                        .flatten()
                        .is_some();
                (!found).then_some((a, i))
            }
        });
        pending = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect();
        println!(
            "advertise: {}/{} sampled keys findable after {:?}",
            sample.len() - pending.len(),
            sample.len(),
            t0.elapsed()
        );
    }
    let advertise_wall = t0.elapsed();
    let (cpu, bytes) = (cpu_seconds() - cpu0, lo_bytes().saturating_sub(bytes0));
    let total_keys = (advertisers * keys) as f64;
    let adv = serde_json::json!({
        "advertisers": advertisers, "keys_per_node": keys,
        "sample_findable": sample.len() - pending.len(), "sample": sample.len(),
        "wall_s": advertise_wall.as_secs_f64(),
        "cpu_s_all_nodes": cpu, "cpu_ms_per_key": cpu * 1000.0 / total_keys,
        "lo_bytes": bytes, "bytes_per_key": bytes as f64 / total_keys,
    });
    println!("advertise: {adv}");

    let mut hit = Vec::new();
    let mut failed = 0;
    for _ in 0..lookups {
        if Instant::now() > deadline {
            break;
        }
        let (a, i) = (rng.random_range(0..advertisers), rng.random_range(0..keys));
        let from = advertisers + rng.random_range(0..size - advertisers);
        match tokio::time::timeout(
            Duration::from_secs(3),
            lookup_first(&nodes[from].router, &key(a, i)),
        )
        .await
        .ok()
        .flatten()
        {
            Some(d) => hit.push(d),
            None => failed += 1,
        }
    }
    let mut miss = Vec::new();
    let choices: Vec<usize> = (0..size).collect();
    for i in 0..lookups.min(50) {
        if Instant::now() > deadline {
            break;
        }
        let from = *choices.choose(&mut rng).unwrap_or(&0);
        if let Some(d) = lookup_miss(&nodes[from].router, &key(99_999, i)).await {
            miss.push(d);
        }
    }
    let out = serde_json::json!({
        "nodes": size, "startup_s": startup.as_secs_f64(), "mean_connections": mean_peers,
        "advertise": adv,
        "lookup_hit": summary(&format!("{size} nodes: lookup, first provider"), &mut hit, failed),
        "lookup_miss": summary(&format!("{size} nodes: lookup of a key nobody has"), &mut miss, 0),
    });
    shutdown(nodes).await;
    Ok(out)
}

async fn run() -> anyhow::Result<()> {
    let size = env_usize("SIM_NODES", 100).max(2);
    let small = env_usize("SIM_SMALL", 5).clamp(2, 50);
    let keys = env_usize("SIM_KEYS", 10_000).max(1);
    let advertisers = env_usize("SIM_ADVERTISERS", 2);
    let lookups = env_usize("SIM_LOOKUPS", 300);
    let deadline = Instant::now() + Duration::from_secs(env_usize("SIM_DEADLINE_S", 300) as u64);
    let started = Instant::now();

    let mut rt = tcp_round_trip(2000).await?;
    let reference = summary("reference: loopback TCP round trip", &mut rt, 0);
    let small_out = small_cluster(small, lookups, deadline).await?;
    let mut hops = Vec::new();
    for n in std::env::var("SIM_HOPS")
        .unwrap_or_else(|_| "25 50 100".into())
        .split_whitespace()
        .filter_map(|v| v.parse::<usize>().ok())
    {
        if Instant::now() > deadline {
            eprintln!("dht_sim: no time left for the {n}-node hop count");
            break;
        }
        hops.push(hop_cluster(n.max(12), lookups.min(200), deadline).await?);
    }
    let large_out = large_cluster(size, keys, advertisers, lookups, deadline).await?;
    let out = serde_json::json!({
        "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "reference_tcp_round_trip": reference,
        "small": small_out,
        "hops": hops,
        "large": large_out,
    });
    println!("{out}");
    if let Ok(dir) = std::env::var("BENCH_OUT") {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            format!("{dir}/dht_sim.json"),
            serde_json::to_vec_pretty(&out)?,
        )?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: both run the whole
    // (bounded) simulation only when asked, so `cargo test` stays fast.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if !std::env::args().any(|a| a == "--bench") && std::env::var_os("SIM_FORCE").is_none() {
        println!("dht_sim: pass --bench (cargo bench --bench dht_sim) to run the simulation");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
