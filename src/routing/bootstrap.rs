//! Bootstrap: where a node finds its first peers, and when it looks again.
//!
//! Two sources, both optional: a DNS name (`host:port`, normally a headless Kubernetes Service
//! whose A/AAAA records are the pods of the DaemonSet) and a static list of multiaddrs, with or
//! without `/p2p/<peer id>`. Both are turned into [`Target`]s with a literal IP, so every
//! connection's remote address names an IP (the router maps peers to registry endpoints by
//! IP). [`Schedule`] decides when to try again: exponential backoff while no peer is
//! connected, a fixed re-bootstrap interval afterwards (which also heals a cluster that
//! started as two halves). Dialling the targets is the Kademlia router's job.

use std::net::IpAddr;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// The `routing.bootstrap` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootstrapConfig {
    /// `host:port` whose A/AAAA records are nodes to dial, e.g.
    /// `speculum-bootstrap.speculum.svc.cluster.local:5082`.
    pub dns: Option<String>,
    /// Multiaddrs to dial, e.g. `/ip4/10.0.0.5/tcp/5082` or `/dns4/node-a/tcp/5082/p2p/12D3…`.
    pub peers: Vec<String>,
    /// Time between bootstrap rounds once at least one peer is connected.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// First retry delay while no peer is connected; doubles up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            dns: None,
            peers: Vec::new(),
            interval: Duration::from_secs(60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl BootstrapConfig {
    /// Every problem with this section, each naming its field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(dns) = &self.dns
            && let Err(e) = parse_dns(dns)
        {
            errors.push(format!("routing.bootstrap.dns: {e}"));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if let Err(e) = StaticPeer::parse(p) {
                errors.push(format!("routing.bootstrap.peers[{i}]: {e}"));
            }
        }
        for (name, d) in [
            ("interval", self.interval),
            ("initial_backoff", self.initial_backoff),
            ("max_backoff", self.max_backoff),
        ] {
            if d.is_zero() {
                errors.push(format!(
                    "routing.bootstrap.{name}: must be greater than zero"
                ));
            }
        }
        if self.initial_backoff > self.max_backoff {
            errors.push("routing.bootstrap.initial_backoff: must not exceed max_backoff".into());
        }
        errors
    }
}

/// Why a bootstrap source could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("invalid peer address {input:?}: {reason}")]
    InvalidPeer { input: String, reason: &'static str },
    #[error("invalid dns name {0:?}: want host:port with a non-zero port")]
    InvalidDns(String),
    #[error("resolving {name} failed")]
    Resolve {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// A node to dial: an IP address with a TCP port, and its peer id when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `/ip4/…/tcp/…` or `/ip6/…/tcp/…`, without `/p2p/`.
    pub addr: Multiaddr,
    pub peer: Option<PeerId>,
}

impl Target {
    fn new(ip: IpAddr, port: u16, peer: Option<PeerId>) -> Target {
        Target {
            addr: Multiaddr::empty().with(ip.into()).with(Protocol::Tcp(port)),
            peer,
        }
    }
}

/// One entry of `bootstrap.peers`, parsed but not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StaticPeer {
    host: Host,
    port: u16,
    peer: Option<PeerId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    /// A `/dns`, `/dns4` or `/dns6` name, resolved at bootstrap time.
    Name(String),
}

impl StaticPeer {
    /// Accepts `/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>[/p2p/<id>]` and nothing else.
    pub fn parse(input: &str) -> Result<StaticPeer, BootstrapError> {
        let bad = |reason| BootstrapError::InvalidPeer {
            input: input.to_owned(),
            reason,
        };
        let addr: Multiaddr = input.parse().map_err(|_| bad("not a multiaddr"))?;
        let mut parts = addr.iter();
        let host = match parts.next() {
            Some(Protocol::Ip4(ip)) => Host::Ip(ip.into()),
            Some(Protocol::Ip6(ip)) => Host::Ip(ip.into()),
            Some(Protocol::Dns(n) | Protocol::Dns4(n) | Protocol::Dns6(n)) => {
                Host::Name(n.into_owned())
            }
            _ => return Err(bad("must start with /ip4, /ip6, /dns, /dns4 or /dns6")),
        };
        let port = match parts.next() {
            Some(Protocol::Tcp(p)) if p != 0 => p,
            _ => return Err(bad("the host must be followed by /tcp/<non-zero port>")),
        };
        let peer = match parts.next() {
            None => None,
            Some(Protocol::P2p(id)) => Some(id),
            Some(_) => return Err(bad("only /p2p/<peer id> may follow the port")),
        };
        if parts.next().is_some() {
            return Err(bad("nothing may follow /p2p/<peer id>"));
        }
        Ok(StaticPeer { host, port, peer })
    }

    /// The addresses to dial; a name may resolve to several.
    pub async fn resolve(&self) -> Result<Vec<Target>, BootstrapError> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![Target::new(*ip, self.port, self.peer)]),
            Host::Name(name) => {
                let addrs = tokio::net::lookup_host((name.as_str(), self.port))
                    .await
                    .map_err(|source| BootstrapError::Resolve {
                        name: name.clone(),
                        source,
                    })?;
                Ok(addrs
                    .map(|a| Target::new(a.ip(), a.port(), self.peer))
                    .collect())
            }
        }
    }
}

/// Checks the `host:port` shape of `bootstrap.dns` without resolving it.
pub(crate) fn parse_dns(dns: &str) -> Result<(), BootstrapError> {
    let bad = || BootstrapError::InvalidDns(dns.to_owned());
    let (host, port) = dns.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains('/') {
        return Err(bad());
    }
    Ok(())
}

/// Resolves every configured source. Sources that fail are reported and skipped, so one bad
/// name does not keep a node from reaching the others.
pub async fn resolve(config: &BootstrapConfig) -> (Vec<Target>, Vec<BootstrapError>) {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    if let Some(dns) = &config.dns {
        // Every A/AAAA record of a headless Service is one node; the port comes from the name.
        match tokio::net::lookup_host(dns.as_str()).await {
            Ok(addrs) => targets.extend(addrs.map(|a| Target::new(a.ip(), a.port(), None))),
            Err(source) => errors.push(BootstrapError::Resolve {
                name: dns.clone(),
                source,
            }),
        }
    }
    for p in &config.peers {
        match StaticPeer::parse(p) {
            Ok(sp) => match sp.resolve().await {
                Ok(t) => targets.extend(t),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(e),
        }
    }
    // A name listed twice, or a static peer that is also in DNS, is dialled once.
    let mut seen = std::collections::HashSet::new();
    targets.retain(|t| seen.insert(t.addr.clone()));
    (targets, errors)
}

/// When to bootstrap next: exponential backoff while alone, a steady interval once connected.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    initial: Duration,
    max: Duration,
    interval: Duration,
    backoff: Duration,
}

impl Schedule {
    pub fn new(config: &BootstrapConfig) -> Schedule {
        Schedule {
            initial: config.initial_backoff,
            max: config.max_backoff,
            interval: config.interval,
            backoff: config.initial_backoff,
        }
    }

    /// The delay before the next round, given whether any peer is connected now.
    pub fn next(&mut self, connected: bool) -> Duration {
        if connected {
            // Losing every peer later starts the backoff from the beginning again.
            self.backoff = self.initial;
            return self.interval;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    #[test]
    fn static_peers_parse() {
        let id: PeerId = match ID.parse() {
            Ok(id) => id,
            Err(e) => panic!("test peer id: {e}"),
        };
        let ip = |s: &str| Host::Ip(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")));
        let cases: Vec<(&str, String, Option<StaticPeer>)> = vec![
            (
                "ip4 without id",
                "/ip4/10.0.0.5/tcp/5082".into(),
                Some(StaticPeer {
                    host: ip("10.0.0.5"),
                    port: 5082,
                    peer: None,
                }),
            ),
            (
                "ip6 with id",
                format!("/ip6/::1/tcp/5082/p2p/{ID}"),
                Some(StaticPeer {
                    host: ip("::1"),
                    port: 5082,
                    peer: Some(id),
                }),
            ),
            (
                "dns4 name",
                "/dns4/node-a.example/tcp/7".into(),
                Some(StaticPeer {
                    host: Host::Name("node-a.example".into()),
                    port: 7,
                    peer: None,
                }),
            ),
            ("no port", "/ip4/10.0.0.5".into(), None),
            ("port zero", "/ip4/10.0.0.5/tcp/0".into(), None),
            ("udp", "/ip4/10.0.0.5/udp/5082".into(), None),
            ("trailing protocol", "/ip4/10.0.0.5/tcp/1/ws".into(), None),
            ("p2p only", format!("/p2p/{ID}"), None),
            ("not a multiaddr", "10.0.0.5:5082".into(), None),
            ("empty", String::new(), None),
        ];
        for (name, input, want) in cases {
            assert_eq!(StaticPeer::parse(&input).ok(), want, "{name}");
        }
    }

    #[test]
    fn dns_names_parse() {
        let cases = [
            (
                "service",
                "speculum-bootstrap.speculum.svc.cluster.local:5082",
                true,
            ),
            ("localhost", "localhost:1", true),
            ("ipv6 literal", "[::1]:5082", true),
            ("no port", "speculum-bootstrap", false),
            ("port zero", "host:0", false),
            ("port too big", "host:70000", false),
            ("no host", ":5082", false),
            ("a url", "http://host:5082", false),
        ];
        for (name, input, ok) in cases {
            assert_eq!(parse_dns(input).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn schedule_backs_off_while_alone() {
        let config = BootstrapConfig {
            interval: Duration::from_secs(60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            ..BootstrapConfig::default()
        };
        let mut s = Schedule::new(&config);
        let steps = [
            (false, 1),
            (false, 2),
            (false, 4),
            (false, 5),
            (false, 5),
            (true, 60),
            (false, 1),
            (false, 2),
        ];
        for (i, (connected, want)) in steps.into_iter().enumerate() {
            assert_eq!(s.next(connected), Duration::from_secs(want), "step {i}");
        }
    }

    #[test]
    fn config_validation_names_every_field() {
        let config = BootstrapConfig {
            dns: Some("nope".into()),
            peers: vec!["/ip4/1.2.3.4/tcp/1".into(), "garbage".into()],
            interval: Duration::ZERO,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(1),
        };
        let errors = config.validate();
        for want in [
            "routing.bootstrap.dns",
            "routing.bootstrap.peers[1]",
            "routing.bootstrap.interval",
            "routing.bootstrap.initial_backoff",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "no error for {want}: {errors:?}"
            );
        }
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(BootstrapConfig::default().validate().is_empty());
    }

    #[tokio::test]
    async fn resolve_turns_names_into_ips_and_dedups() {
        let config = BootstrapConfig {
            // `localhost` comes from /etc/hosts: no outside DNS is asked.
            dns: Some("localhost:5082".into()),
            peers: vec![
                "/ip4/127.0.0.1/tcp/5082".into(),
                format!("/ip4/127.0.0.2/tcp/5083/p2p/{ID}"),
            ],
            ..BootstrapConfig::default()
        };
        let (targets, errors) = resolve(&config).await;
        assert!(errors.is_empty(), "{errors:?}");
        let v4: Vec<String> = targets
            .iter()
            .filter(|t| matches!(t.addr.iter().next(), Some(Protocol::Ip4(_))))
            .map(|t| t.addr.to_string())
            .collect();
        assert_eq!(v4, ["/ip4/127.0.0.1/tcp/5082", "/ip4/127.0.0.2/tcp/5083"]);
        assert_eq!(
            targets.iter().filter(|t| t.peer.is_some()).count(),
            1,
            "{targets:?}"
        );
    }
}
