//! The one conformance suite every [`Router`] must pass: the twin in a unit test, the libp2p
//! Kademlia router in `tests/loopback/routing_kademlia.rs`.
//!
//! The caller says how to build a cluster of `n` connected routers ([`run`]'s `build`); the
//! suite asks for a three-node cluster and for a lone node and checks the seam's contract:
//! what A advertises B finds (with A's id), a node never finds itself, `limit` is respected,
//! withdrawn keys stop being found, a lookup of an unknown key ends with no peer, and a lone
//! node is ready. Propagation is awaited by polling with a bound ([`Timing`]), never by
//! sleeping a fixed time. Failures panic with the name of the broken rule: this is test code.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{Claim, Peer, Router};

/// One router of a test cluster and the id its peers know it by (`Peer::id`).
pub struct Node<R> {
    pub id: String,
    pub router: R,
}

/// The routers of a test cluster. `guard` is whatever keeps them running (shutdown senders,
/// temporary directories); dropping the cluster drops it.
pub struct Cluster<R> {
    pub nodes: Vec<Node<R>>,
    _guard: Box<dyn Send>,
}

impl<R> Cluster<R> {
    pub fn new(nodes: Vec<Node<R>>, guard: impl Send + 'static) -> Cluster<R> {
        Cluster {
            nodes,
            _guard: Box::new(guard),
        }
    }
}

/// How long the suite waits for things that take time in a real network.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Bound for an advertise or withdraw to become visible on another node.
    pub settle: Duration,
    /// Bound for one lookup's channel to close.
    pub lookup: Duration,
    /// Pause between two polls.
    pub poll: Duration,
}

impl Timing {
    /// For in-memory routers: everything is immediate.
    pub fn fast() -> Timing {
        Timing {
            settle: Duration::from_secs(1),
            lookup: Duration::from_secs(1),
            poll: Duration::from_millis(5),
        }
    }

    /// For routers talking over real sockets on loopback.
    pub fn network() -> Timing {
        Timing {
            settle: Duration::from_secs(20),
            lookup: Duration::from_secs(15),
            poll: Duration::from_millis(50),
        }
    }
}

/// Runs every check. `build(n)` returns `n` routers that can reach each other (for `n == 1`,
/// a lone node with no peers). Each check uses its own keys, so one cluster serves them all.
pub async fn run<R, F, Fut>(timing: Timing, mut build: F)
where
    R: Router,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Cluster<R>>,
{
    let lone = build(1).await;
    lone_node_is_ready(&timing, &lone).await;
    lone_node_wins_its_claims(&lone).await;
    drop(lone);

    let cluster = build(3).await;
    assert_eq!(cluster.nodes.len(), 3, "build(3) must return three routers");
    unknown_key_finds_nobody(&timing, &cluster).await;
    advertise_is_found_elsewhere(&timing, &cluster).await;
    lookup_excludes_self(&timing, &cluster).await;
    limit_is_respected(&timing, &cluster).await;
    withdraw_is_no_longer_found(&timing, &cluster).await;
    one_claimant_wins_the_others_follow(&timing, &cluster).await;
    a_claim_expires_after_its_ttl(&timing, &cluster).await;
}

/// A key unique to one check, shaped like real keys (digest or tag key).
fn key(check: u8, n: u8) -> String {
    if n.is_multiple_of(2) {
        format!("sha256:{:064x}", u32::from(check) << 8 | u32::from(n))
    } else {
        format!("127.0.0.1:5000/conformance/check{check}:v{n}")
    }
}

/// Reads a lookup to its end. Panics when the channel does not close within the bound, since
/// a lookup that never ends would hang the mirror.
async fn lookup_all<R: Router>(timing: &Timing, router: &R, key: &str, limit: usize) -> Vec<Peer> {
    let mut rx = match router.lookup(key, limit).await {
        Ok(rx) => rx,
        Err(e) => panic!("lookup({key}, {limit}) failed: {e}"),
    };
    let deadline = Instant::now() + timing.lookup;
    let mut peers = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(peer)) => peers.push(peer),
            Ok(None) => return peers,
            Err(_) => panic!(
                "lookup({key}, {limit}) did not end within {:?} (got {peers:?})",
                timing.lookup
            ),
        }
    }
}

fn ids(peers: &[Peer]) -> BTreeSet<String> {
    peers.iter().map(|p| p.id.clone()).collect()
}

/// Polls `lookup(key)` on `router` until the set of peer ids is `want`, within `settle`.
async fn await_ids<R: Router>(
    timing: &Timing,
    rule: &str,
    router: &R,
    key: &str,
    limit: usize,
    want: &[&str],
) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let deadline = Instant::now() + timing.settle;
    loop {
        let got = lookup_all(timing, router, key, limit).await;
        assert_eq!(
            got.len(),
            ids(&got).len(),
            "{rule}: a lookup returned the same peer twice: {got:?}"
        );
        if ids(&got) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rule}: lookup({key}) still returns {:?}, want {want:?} after {:?}",
            ids(&got),
            timing.settle
        );
        tokio::time::sleep(timing.poll).await;
    }
}

async fn advertise<R: Router>(router: &R, keys: &[String]) {
    if let Err(e) = router.advertise(keys.to_vec()).await {
        panic!("advertise({keys:?}) failed: {e}");
    }
}

async fn withdraw<R: Router>(router: &R, keys: &[String]) {
    if let Err(e) = router.withdraw(keys.to_vec()).await {
        panic!("withdraw({keys:?}) failed: {e}");
    }
}

async fn lone_node_is_ready<R: Router>(timing: &Timing, lone: &Cluster<R>) {
    let Some(node) = lone.nodes.first() else {
        panic!("build(1) returned no router");
    };
    let deadline = Instant::now() + timing.settle;
    while !node.router.ready() {
        assert!(
            Instant::now() < deadline,
            "lone node is not ready after {:?}",
            timing.settle
        );
        tokio::time::sleep(timing.poll).await;
    }
    // It serves its own content, and its lookups end with nobody, even for keys it holds.
    let k = key(1, 0);
    advertise(&node.router, std::slice::from_ref(&k)).await;
    let got = lookup_all(timing, &node.router, &k, 5).await;
    assert!(got.is_empty(), "lone node found peers: {got:?}");
}

async fn unknown_key_finds_nobody<R: Router>(timing: &Timing, c: &Cluster<R>) {
    for node in &c.nodes {
        for k in [key(2, 0), key(2, 1)] {
            let got = lookup_all(timing, &node.router, &k, 5).await;
            assert!(got.is_empty(), "unknown key {k} found {got:?}");
        }
    }
}

async fn advertise_is_found_elsewhere<R: Router>(timing: &Timing, c: &Cluster<R>) {
    let [a, b, cc] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    let keys = vec![key(3, 0), key(3, 1)];
    advertise(&a.router, &keys).await;
    // Advertising again changes nothing.
    advertise(&a.router, &keys).await;
    for k in &keys {
        for other in [b, cc] {
            await_ids(
                timing,
                "advertise on A is found on B and C",
                &other.router,
                k,
                5,
                &[&a.id],
            )
            .await;
        }
    }
}

async fn lookup_excludes_self<R: Router>(timing: &Timing, c: &Cluster<R>) {
    let [a, b] = [&c.nodes[0], &c.nodes[1]];
    let k = key(4, 0);
    advertise(&a.router, std::slice::from_ref(&k)).await;
    advertise(&b.router, std::slice::from_ref(&k)).await;
    // Wait until the record is visible somewhere, so "A does not find A" is not vacuous.
    await_ids(timing, "B finds A", &b.router, &k, 5, &[&a.id]).await;
    await_ids(timing, "A finds B but not A", &a.router, &k, 5, &[&b.id]).await;
}

async fn limit_is_respected<R: Router>(timing: &Timing, c: &Cluster<R>) {
    let [a, b, cc] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    let k = key(5, 0);
    for n in [a, b, cc] {
        advertise(&n.router, std::slice::from_ref(&k)).await;
    }
    await_ids(
        timing,
        "A finds B and C",
        &a.router,
        &k,
        5,
        &[&b.id, &cc.id],
    )
    .await;
    let cases: &[(&str, usize, usize)] = &[("limit 0", 0, 0), ("limit 1", 1, 1), ("limit 2", 2, 2)];
    for (name, limit, want) in cases {
        let got = lookup_all(timing, &a.router, &k, *limit).await;
        assert_eq!(got.len(), *want, "{name}: got {got:?}");
        assert!(
            ids(&got).is_subset(&[b.id.clone(), cc.id.clone()].into()),
            "{name}: unexpected peers {got:?}"
        );
    }
}

async fn withdraw_is_no_longer_found<R: Router>(timing: &Timing, c: &Cluster<R>) {
    let [a, b, cc] = [&c.nodes[0], &c.nodes[1], &c.nodes[2]];
    let keys = vec![key(6, 0), key(6, 1)];
    advertise(&a.router, &keys).await;
    advertise(&cc.router, &keys[..1]).await;
    await_ids(
        timing,
        "B finds A and C",
        &b.router,
        &keys[0],
        5,
        &[&a.id, &cc.id],
    )
    .await;
    await_ids(timing, "B finds A", &b.router, &keys[1], 5, &[&a.id]).await;
    withdraw(&a.router, &keys).await;
    // Withdrawing again changes nothing.
    withdraw(&a.router, &keys).await;
    await_ids(
        timing,
        "withdrawn A is gone, C stays",
        &b.router,
        &keys[0],
        5,
        &[&cc.id],
    )
    .await;
    await_ids(timing, "withdrawn A is gone", &b.router, &keys[1], 5, &[]).await;
    // Advertising again brings it back.
    advertise(&a.router, &keys[1..]).await;
    await_ids(
        timing,
        "re-advertised A is found",
        &b.router,
        &keys[1],
        5,
        &[&a.id],
    )
    .await;
}

async fn claim<R: Router>(router: &R, key: &str, ttl: Duration) -> Claim {
    match router.claim(key, ttl).await {
        Ok(c) => c,
        Err(e) => panic!("claim({key}) failed: {e}"),
    }
}

async fn lone_node_wins_its_claims<R: Router>(lone: &Cluster<R>) {
    let Some(node) = lone.nodes.first() else {
        panic!("build(1) returned no router");
    };
    let k = key(20, 0);
    for round in 0..2 {
        assert_eq!(
            claim(&node.router, &k, Duration::from_secs(60)).await,
            Claim::Won,
            "a lone node coordinates and wins its own claims (round {round})"
        );
    }
}

/// Three nodes claim one key at the same moment: exactly one wins, the others are told to
/// follow it (by its id), and asking again changes nothing. Views of the cluster may still be
/// converging right after start, so fresh keys are tried until the answer is consistent,
/// within `settle`.
async fn one_claimant_wins_the_others_follow<R: Router>(timing: &Timing, c: &Cluster<R>) {
    let deadline = Instant::now() + timing.settle;
    let ttl = Duration::from_secs(60);
    for attempt in 0u8.. {
        let k = key(21, attempt.wrapping_mul(2));
        let claims =
            futures::future::join_all(c.nodes.iter().map(|n| claim(&n.router, &k, ttl))).await;
        let winners: Vec<usize> = (0..claims.len())
            .filter(|i| claims[*i] == Claim::Won)
            .collect();
        let consistent = winners.len() == 1
            && claims.iter().all(|cl| match cl {
                Claim::Won => true,
                Claim::Follow(p) => p.id == c.nodes[winners[0]].id,
            });
        if consistent {
            let w = winners[0];
            for (i, n) in c.nodes.iter().enumerate() {
                let again = claim(&n.router, &k, ttl).await;
                let want_won = i == w;
                assert_eq!(
                    again == Claim::Won,
                    want_won,
                    "claims must be stable: node {i} got {again:?} on asking again, winner {w}"
                );
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "claims never converged to one winner within {:?}: last {claims:?}",
            timing.settle
        );
        tokio::time::sleep(timing.poll).await;
    }
}

/// A claim held for a short TTL lets another node win once it has expired.
async fn a_claim_expires_after_its_ttl<R: Router>(timing: &Timing, c: &Cluster<R>) {
    let [a, b] = [&c.nodes[0], &c.nodes[1]];
    let k = key(22, 0);
    let short = Duration::from_millis(300);
    assert_eq!(
        claim(&a.router, &k, short).await,
        Claim::Won,
        "first claim wins"
    );
    let deadline = Instant::now() + timing.settle;
    loop {
        match claim(&b.router, &k, Duration::from_secs(60)).await {
            Claim::Won => return,
            Claim::Follow(p) => assert_eq!(p.id, a.id, "b must follow a while a's claim holds"),
        }
        assert!(
            Instant::now() < deadline,
            "a's claim with a {short:?} ttl still holds after {:?}",
            timing.settle
        );
        tokio::time::sleep(timing.poll.max(Duration::from_millis(50))).await;
    }
}
