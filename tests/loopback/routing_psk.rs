//! The private DHT on real sockets (loopback, port 0): two routers holding the same
//! pre-shared key find each other's provider records; an outsider with no key and one with
//! another key cannot connect, never appear as an insider's peer and never find (or get
//! found as) a provider. Plus the key file parser as the config sees it, and
//! `speculum psk generate`. Every wait is a bounded poll on an observable event.

use std::path::{Path, PathBuf};
use std::time::Duration;

use speculum::routing::Router;
use speculum::routing::kademlia::{self, KademliaConfig, KademliaRouter};
use speculum::routing::psk;
use tokio::sync::oneshot;

use testkit::dht::{lookup_all, poll};

const REGISTRY_PORT: u16 = 5999;
const KEY_A: &str = "4f0a8c3e2b1d5f6a7e9c0b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a";
const KEY_B: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

struct Node {
    router: KademliaRouter,
    stop: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn bootstrap_addr(&self) -> String {
        let Some(addr) = self.router.listen_addrs().into_iter().next() else {
            panic!("no listen address");
        };
        format!("{addr}/p2p/{}", self.router.peer_id())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn key_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

fn swarm_key(hex: &str) -> String {
    format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n")
}

fn config(dir: &Path, psk_file: Option<PathBuf>, peers: Vec<String>) -> KademliaConfig {
    let mut c = KademliaConfig {
        listen: "/ip4/127.0.0.1/tcp/0".to_owned(),
        registry_port: REGISTRY_PORT,
        data_dir: dir.to_owned(),
        psk_file: psk_file.unwrap_or_default(),
        lookup_timeout: Duration::from_secs(3),
        verify_timeout: Duration::from_secs(1),
        dial_timeout: Duration::from_secs(2),
        ..KademliaConfig::default()
    };
    c.bootstrap.peers = peers;
    c.bootstrap.initial_backoff = Duration::from_millis(100);
    c.bootstrap.max_backoff = Duration::from_millis(500);
    c
}

/// Starts a router; `key` is the swarm key file's hex, `None` for a public node.
async fn spawn(key: Option<&str>, peers: Vec<String>) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempdir();
    let psk_file = key.map(|hex| key_file(dir.path(), "swarm.key", &swarm_key(hex)));
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    match kademlia::start(config(dir.path(), psk_file, peers), shutdown).await {
        Ok((router, _task)) => Node {
            router,
            stop: Some(stop),
            _dir: dir,
        },
        Err(e) => panic!("starting router failed: {e}"),
    }
}

/// Every peer id one lookup returns (it ends by `lookup_timeout`, 3 s).
async fn lookup_ids(router: &KademliaRouter, key: &str) -> Vec<String> {
    lookup_all(router, key, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|p| p.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_with_the_key_join_the_private_dht() {
    let a = spawn(Some(KEY_A), vec![]).await;
    let b = spawn(Some(KEY_A), vec![a.bootstrap_addr()]).await;
    let joined = poll(Duration::from_secs(20), "insiders connected", || async {
        a.router.peer_count() == 1 && b.router.peer_count() == 1
    })
    .await;
    println!("insiders connected after {joined:?}");

    let key_b = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let b_id = b.router.peer_id().to_string();
    if let Err(e) = b.router.advertise(vec![key_b.to_owned()]).await {
        panic!("advertise: {e}");
    }
    let found = poll(Duration::from_secs(20), "a finds b's record", || async {
        lookup_ids(&a.router, key_b).await.contains(&b_id)
    })
    .await;
    println!("insider record found after {found:?}");

    // Outsiders bootstrap from both insiders and advertise a key of their own.
    let key_out = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let public = spawn(None, vec![a.bootstrap_addr(), b.bootstrap_addr()]).await;
    let other = spawn(Some(KEY_B), vec![a.bootstrap_addr(), b.bootstrap_addr()]).await;
    for o in [&public, &other] {
        if let Err(e) = o.router.advertise(vec![key_out.to_owned()]).await {
            panic!("advertise: {e}");
        }
    }
    let failures_before = a.router.handshake_failures() + b.router.handshake_failures();
    // Wait until the insiders have refused several attempts (both outsiders, retrying on
    // their bootstrap backoff): the observable sign that they really tried.
    let refused = poll(Duration::from_secs(20), "outsiders refused", || async {
        a.router.handshake_failures() + b.router.handshake_failures() >= failures_before + 4
    })
    .await;
    println!(
        "{} handshake failures after {refused:?}",
        a.router.handshake_failures() + b.router.handshake_failures()
    );

    let outsider_ids = [
        public.router.peer_id().to_string(),
        other.router.peer_id().to_string(),
    ];
    for (name, o) in [("no key", &public), ("other key", &other)] {
        assert_eq!(
            o.router.peer_count(),
            0,
            "{name}: outsider got a connection"
        );
        assert!(
            lookup_ids(&o.router, key_b).await.is_empty(),
            "{name}: outsider learnt who holds the insiders' key"
        );
    }
    for (name, n) in [("a", &a), ("b", &b)] {
        assert_eq!(
            n.router.peer_count(),
            1,
            "{name}: an insider lists a peer besides the other insider"
        );
        let got = lookup_ids(&n.router, key_out).await;
        assert!(
            got.iter().all(|id| !outsider_ids.contains(id)),
            "{name}: an outsider was returned as a provider: {got:?}"
        );
    }
    // And the insiders still work together.
    assert!(lookup_ids(&a.router, key_b).await.contains(&b_id));
}

#[tokio::test]
async fn key_file_formats_and_errors() {
    let dir = tempdir();
    let d = dir.path();
    type Case = (&'static str, Option<String>, Result<(), &'static str>);
    let cases: Vec<Case> = vec![
        ("swarm.key format", Some(swarm_key(KEY_A)), Ok(())),
        ("bare hex", Some(format!("{KEY_A}\n")), Ok(())),
        (
            "bad length",
            Some(swarm_key(&KEY_A[..60])),
            Err("must be 64 hex digits"),
        ),
        (
            "bad hex",
            Some(format!("{}zzzz", &KEY_A[..60])),
            Err("not a hex digit"),
        ),
        (
            "bad header",
            Some(format!("/key/swarm/psk/9/\n/base16/\n{KEY_A}")),
            Err("first line must be"),
        ),
        ("missing file", None, Err("cannot read psk file")),
    ];
    for (name, content, want) in cases {
        let path = match &content {
            Some(text) => key_file(d, &format!("{}.key", name.replace(' ', "-")), text),
            None => d.join("does-not-exist.key"),
        };
        let c = config(d, Some(path.clone()), vec![]);
        // `validate()` does not read the file (configure/cleanup run where the Secret is not
        // mounted); the router reads it when it starts.
        assert!(c.validate().is_empty(), "{name}: {:?}", c.validate());
        match want {
            Ok(()) => {
                assert!(c.psk().is_ok_and(|k| k.is_some()), "{name}");
            }
            Err(text) => {
                let e = match c.psk() {
                    Err(e) => format!(
                        "{e}: {}",
                        std::error::Error::source(&e)
                            .map(|s| s.to_string())
                            .unwrap_or_default()
                    ),
                    Ok(_) => panic!("{name}: a bad key file was accepted"),
                };
                assert!(
                    e.contains(&path.display().to_string()),
                    "{name}: no file name in {e}"
                );
                assert!(e.contains(text), "{name}: want {text:?} in {e}");
                // No run of key digits, in either case, ever reaches an error.
                for piece in [&KEY_A[..12], &KEY_A[20..32], &KEY_A[48..60]] {
                    assert!(
                        !e.to_lowercase().contains(piece),
                        "{name}: key bytes in {e}"
                    );
                }
                // The router refuses to start with it, before binding anything.
                let (_tx, rx) = oneshot::channel::<()>();
                let started = kademlia::start(c, async move {
                    let _ = rx.await;
                })
                .await;
                match started {
                    Err(e) => assert!(!e.to_string().contains(&KEY_A[..12]), "{name}: {e}"),
                    Ok(_) => panic!("{name}: router started with a bad key file"),
                }
            }
        }
    }
    // Both formats are the same key.
    let one = psk::parse(&swarm_key(KEY_A)).map(|k| k.fingerprint().to_string());
    let two = psk::parse(KEY_A).map(|k| k.fingerprint().to_string());
    assert!(one.is_ok() && one == two);
}

#[test]
fn psk_generate_prints_a_usable_key_file() {
    let run = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_speculum"))
            .args(["psk", "generate"])
            .output()
            .unwrap_or_else(|e| panic!("running speculum psk generate: {e}"));
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (stdout, stderr)
    };
    let (first, note) = run();
    let key = psk::parse(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(
        first.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
        "{first}"
    );
    assert!(
        note.contains(&key.fingerprint().to_string()),
        "fingerprint on stderr: {note}"
    );
    let (second, _) = run();
    assert_ne!(first, second, "two runs printed the same key");
}
