//! The `routing` configuration section ([`KademliaConfig`]) and its validation, the error
//! `start` returns ([`KademliaError`]), and [`record_key`], the DHT key of a routing key.

use std::path::PathBuf;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::kad;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::routing::bootstrap::BootstrapConfig;
use crate::routing::psk::{self, PreSharedKey, PskError};

/// The `routing` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KademliaConfig {
    /// Multiaddr the DHT listens on (`/ip4|ip6/<ip>/tcp/<port>`; port 0 picks one).
    pub listen: String,
    /// Cluster-wide port of the peer registry endpoint: a found peer is `<its IP>:registry_port`.
    pub registry_port: u16,
    /// Where `identity.key` lives.
    pub data_dir: PathBuf,
    pub bootstrap: BootstrapConfig,
    /// How long other nodes keep a provider record of ours without a republish.
    #[serde(with = "humantime_serde")]
    pub provider_ttl: Duration,
    /// How often every advertised key is announced again.
    #[serde(with = "humantime_serde")]
    pub republish_interval: Duration,
    /// Time between pings on every connection.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A ping unanswered this long closes the connection.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Bound for establishing a connection (TCP + noise + yamux).
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Bound for a provider to answer "do you still hold this key?".
    #[serde(with = "humantime_serde")]
    pub verify_timeout: Duration,
    /// Bound for a whole lookup; its channel closes by then.
    #[serde(with = "humantime_serde")]
    pub lookup_timeout: Duration,
    /// Most distinct keys the local record store holds (ours and other nodes').
    pub max_keys: usize,
    /// A connected provider heard from this recently (a pong, a `has` answer) is handed out
    /// at once, its `has` check sent alongside instead of waited for (docs/routing.md,
    /// "Fast lookups"). Also the bound on handing out a holder that just died or was cut off.
    /// `0s`: always wait for the `has` answer.
    #[serde(with = "humantime_serde")]
    pub liveness_window: Duration,
    /// Provider announcements in flight at once.
    pub publish_concurrency: usize,
    /// Announcements per second of the backlog (digests other than manifests), so a node
    /// starting with tens of thousands of blobs does not swamp the cluster; tags and
    /// manifests are announced first and are never paced. `0`: no pacing beyond
    /// `publish_concurrency`.
    pub publish_rate: u32,
    /// The private network's pre-shared key (go-libp2p `swarm.key` format, or one line of 64
    /// hex digits). Empty: a public DHT that anyone who reaches `listen` can join.
    pub psk_file: PathBuf,
}

impl Default for KademliaConfig {
    fn default() -> Self {
        KademliaConfig {
            listen: "/ip4/0.0.0.0/tcp/5082".to_owned(),
            registry_port: 5081,
            data_dir: PathBuf::from("/var/lib/speculum"),
            bootstrap: BootstrapConfig::default(),
            provider_ttl: Duration::from_secs(2 * 3600),
            republish_interval: Duration::from_secs(30 * 60),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(5),
            verify_timeout: Duration::from_secs(2),
            lookup_timeout: Duration::from_secs(10),
            max_keys: 1_000_000,
            liveness_window: Duration::from_secs(2),
            publish_concurrency: 32,
            publish_rate: 0,
            psk_file: PathBuf::new(),
        }
    }
}

impl KademliaConfig {
    /// Every problem with this section, each naming its field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = listen_addr(&self.listen) {
            errors.push(format!("routing.listen: {e}"));
        }
        if self.registry_port == 0 {
            errors.push("routing.registry_port: must not be 0".to_owned());
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("routing.data_dir: must not be empty".to_owned());
        }
        errors.extend(self.bootstrap.validate());
        for (name, d) in [
            ("provider_ttl", self.provider_ttl),
            ("republish_interval", self.republish_interval),
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("dial_timeout", self.dial_timeout),
            ("verify_timeout", self.verify_timeout),
            ("lookup_timeout", self.lookup_timeout),
        ] {
            if d.is_zero() {
                errors.push(format!("routing.{name}: must be greater than zero"));
            }
        }
        if self.republish_interval >= self.provider_ttl {
            errors.push(
                "routing.republish_interval: must be shorter than provider_ttl, or records \
                 expire before they are renewed"
                    .to_owned(),
            );
        }
        // A connection to a dead peer must close well inside the 60 s promise of the seam.
        if self.ping_interval + self.ping_timeout > Duration::from_secs(30) {
            errors.push("routing.ping_interval + ping_timeout: must not exceed 30s".to_owned());
        }
        if self.verify_timeout >= self.lookup_timeout {
            errors.push("routing.verify_timeout: must be shorter than lookup_timeout".to_owned());
        }
        if self.max_keys == 0 {
            errors.push("routing.max_keys: must be greater than zero".to_owned());
        }
        // Past the ping bound a silent peer's connection is closed anyway; a longer window
        // would only widen the time a cut-off holder may still be handed out.
        if self.liveness_window > self.ping_interval + self.ping_timeout {
            errors.push(
                "routing.liveness_window: must not exceed ping_interval + ping_timeout".to_owned(),
            );
        }
        if !(1..=1024).contains(&self.publish_concurrency) {
            errors.push("routing.publish_concurrency: must be 1..=1024".to_owned());
        }
        // The key file itself is read when the router starts (`start` refuses a bad one before
        // the node joins anything): `configure`, `cleanup` and `config` run where the Secret
        // may not be mounted, and must not fail on it.
        errors
    }

    /// The pre-shared key `psk_file` names, if any.
    pub fn psk(&self) -> Result<Option<PreSharedKey>, PskError> {
        if self.psk_file.as_os_str().is_empty() {
            return Ok(None);
        }
        psk::load(&self.psk_file).map(Some)
    }

    /// Connections close after this long without traffic. Longer than the republish interval,
    /// so a provider's connections to the nodes storing its records never idle out while it
    /// lives (republishing is traffic), and a closed connection means a gone peer.
    pub(super) fn idle_timeout(&self) -> Duration {
        self.republish_interval * 2 + Duration::from_secs(60)
    }
}

pub(super) fn listen_addr(s: &str) -> Result<Multiaddr, &'static str> {
    let addr: Multiaddr = s.parse().map_err(|_| "not a multiaddr")?;
    let mut parts = addr.iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Protocol::Ip4(_) | Protocol::Ip6(_)), Some(Protocol::Tcp(_)), None) => Ok(addr),
        _ => Err("want /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port>"),
    }
}

/// Why the Kademlia router could not start.
#[derive(Debug, thiserror::Error)]
pub enum KademliaError {
    #[error("invalid routing configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("reading or writing identity key {path} failed")]
    IdentityIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity key {path} is corrupt ({reason}); remove it to start with a new peer id")]
    IdentityCorrupt { path: PathBuf, reason: String },
    #[error("building the libp2p stack failed: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error(transparent)]
    Psk(#[from] PskError),
}

/// The DHT key of a routing key: sha256 of the string, so keys are uniform and 32 bytes long
/// whatever the tag or digest looks like.
pub fn record_key(key: &str) -> kad::RecordKey {
    kad::RecordKey::new(&Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_valid_and_yaml_overrides_them() {
        assert_eq!(KademliaConfig::default().validate(), Vec::<String>::new());
        let yaml = "
listen: /ip4/10.0.0.5/tcp/6000
registry_port: 6001
data_dir: /data
bootstrap:
  dns: speculum-bootstrap.speculum.svc.cluster.local:6000
  peers: [/ip4/10.0.0.6/tcp/6000]
  interval: 2m
provider_ttl: 3h
ping_interval: 2s
";
        let c: KademliaConfig = match yaml_serde::from_str(yaml) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.listen, "/ip4/10.0.0.5/tcp/6000");
        assert_eq!(c.registry_port, 6001);
        assert_eq!(c.bootstrap.interval, Duration::from_secs(120));
        assert_eq!(
            c.bootstrap.initial_backoff,
            Duration::from_secs(1),
            "default kept"
        );
        assert_eq!(c.provider_ttl, Duration::from_secs(3 * 3600));
        assert_eq!(c.ping_interval, Duration::from_secs(2));
        assert_eq!(c.verify_timeout, Duration::from_secs(2), "default kept");
        assert!(c.validate().is_empty(), "{:?}", c.validate());

        // What is printed as the effective configuration reads back the same.
        let printed = match yaml_serde::to_string(&c) {
            Ok(y) => y,
            Err(e) => panic!("{e}"),
        };
        let reread: Result<KademliaConfig, _> = yaml_serde::from_str(&printed);
        assert_eq!(reread.ok(), Some(c.clone()), "{printed}");

        let unknown: Result<KademliaConfig, _> = yaml_serde::from_str("listne: /ip4/1.2.3.4/tcp/1");
        assert!(unknown.is_err(), "a misspelt key must be refused");
    }

    #[test]
    fn config_validation_reports_every_problem() {
        type Case = (&'static str, fn(&mut KademliaConfig), &'static str);
        let cases: &[Case] = &[
            (
                "listen not a multiaddr",
                |c| c.listen = "0.0.0.0:5082".into(),
                "routing.listen",
            ),
            (
                "listen on udp",
                |c| c.listen = "/ip4/0.0.0.0/udp/5082".into(),
                "routing.listen",
            ),
            (
                "registry port 0",
                |c| c.registry_port = 0,
                "routing.registry_port",
            ),
            (
                "empty data dir",
                |c| c.data_dir = PathBuf::new(),
                "routing.data_dir",
            ),
            (
                "bad bootstrap dns",
                |c| c.bootstrap.dns = Some("x".into()),
                "routing.bootstrap.dns",
            ),
            (
                "zero dial timeout",
                |c| c.dial_timeout = Duration::ZERO,
                "routing.dial_timeout",
            ),
            (
                "republish not below ttl",
                |c| c.republish_interval = c.provider_ttl,
                "routing.republish_interval",
            ),
            (
                "slow ping",
                |c| c.ping_timeout = Duration::from_secs(40),
                "routing.ping_interval + ping_timeout",
            ),
            (
                "verify as long as lookup",
                |c| c.verify_timeout = c.lookup_timeout,
                "routing.verify_timeout",
            ),
            ("no keys", |c| c.max_keys = 0, "routing.max_keys"),
            (
                "liveness window past the ping bound",
                |c| c.liveness_window = Duration::from_secs(11),
                "routing.liveness_window",
            ),
            (
                "no announcements at once",
                |c| c.publish_concurrency = 0,
                "routing.publish_concurrency",
            ),
        ];
        for (name, break_it, field) in cases {
            let mut c = KademliaConfig::default();
            break_it(&mut c);
            let errors = c.validate();
            assert_eq!(errors.len(), 1, "{name}: {errors:?}");
            assert!(errors[0].starts_with(field), "{name}: {errors:?}");
        }
    }

    #[test]
    fn record_keys_are_sha256_of_the_string() {
        let cases = [
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "registry.example:5000/a/very/long/repository/name:tag",
            "",
        ];
        for key in cases {
            let k = record_key(key);
            assert_eq!(k.as_ref().len(), 32, "{key:?}");
            assert_eq!(k, record_key(key), "{key:?}: not stable");
        }
        assert_ne!(record_key("a"), record_key("b"));
    }
}
