//! The HTTP side of the daemon: the OCI distribution *pull* API, served on two listeners.
//!
//! - The **mirror endpoint** (containerd-facing, loopback by default) serves from the node's
//!   store and, on a miss, from peers ([`mirror`]); when nobody has the content it answers 404
//!   so containerd falls back to the next host in `hosts.toml` and finally upstream.
//! - The **peer endpoint** serves other daemons from this node's store only, never from
//!   further peers, so a request can never loop around the cluster.
//!
//! Requests are parsed into a [`PullRequest`] up front (bad input is a 4xx before anything is
//! looked up); [`serve`] writes successful responses; [`error`] is the only place errors
//! become responses (also the transport's refusals, [`refusal`]); the transport that serves
//! the app (`crate::server`: header limits, our `GET`/`HEAD` writer with `sendfile(2)`) knows
//! nothing of the registry; `crate::wire::resume` continues a peer's blob stream elsewhere when it breaks;
//! [`metrics`] holds the families the listeners record into.
//! Every request is counted and audited once, with the bytes really sent.
//!
//! Before anything is looked up, the policy [`Guard`] decides (source `local` on the mirror
//! endpoint, `peer` on the peer endpoint or for a hop): a deny, a tag the switches or the
//! policy will not resolve, or a failed evaluation is a plain 404 — containerd goes upstream.
//! A tag allowed on the mirror endpoint is then resolved by [`tags`] (upstream first, or the
//! cluster), and from there on served like a request for the digest it names.

pub mod cached;
pub mod error;
pub mod metrics;
pub mod mirror;
pub mod serve;
pub mod tags;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router as HttpRouter;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use self::metrics::{Handler, Outcome, RegistryMetrics, Source};
use crate::audit::{AuditSink, NullSink};
use crate::oci::path::{PathError, parse_ns, parse_v2_path};
use crate::oci::range::parse_range;
use crate::oci::{Digest, Kind, Reference, Target, V2Path};
use crate::policy::{self, Gate};
use crate::readiness::Readiness;
use crate::store::Store;
use crate::tenancy::grants::{GrantChecker, Presented, Refusal};
use crate::tenancy::peer_auth::{PeerIdentity, PeerTokens, PeerVerifier};
use crate::tenancy::pods::Pods;
use crate::tenancy::{GRANT_HEADER, MAX_GRANTS_PER_REQUEST};
pub use error::{RegistryError, refusal};
pub use mirror::{Mirror, MirrorConfig};

pub use crate::wire::HOP_HEADER;

/// A parsed, validated pull request.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub head: bool,
    pub path: V2Path,
    /// The upstream registry (`ns` query parameter containerd adds for mirrors).
    pub ns: Option<String>,
    /// The raw `Range` header, syntax already checked.
    pub range: Option<String>,
    /// True when another daemon sent this request.
    pub hop: bool,
    pub client: SocketAddr,
    /// Grants presented in `x-speculum-grant` headers (peer endpoint; `Err` for a malformed
    /// one). Bounded to [`MAX_GRANTS_PER_REQUEST`].
    pub presented: Vec<Result<Presented, ()>>,
    /// Peer endpoint: who sent the request, once its token verified.
    pub requester: Option<PeerIdentity>,
    /// Mirror endpoint: headers to send with this request to peers (peer token, grants).
    pub peer_headers: HeaderMap,
    /// The client's `Accept` header: what an upstream tag `HEAD` asks for ([`tags`]).
    pub accept: Option<String>,
}

impl PullRequest {
    /// Parses method, URI and headers. Errors are the client's fault and become 4xx.
    pub fn parse(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        client: SocketAddr,
    ) -> Result<PullRequest, RegistryError> {
        let head = match *method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(RegistryError::MethodNotAllowed),
        };
        let path = parse_v2_path(uri.path())?;
        let ns = query_ns(uri.query())?;
        let range = match headers.get(http::header::RANGE) {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| RegistryError::Range {
                    source: crate::oci::range::RangeError::Malformed,
                    size: 0,
                })?;
                // Syntax is checked now; satisfiability once the size is known.
                if let Err(
                    e @ (crate::oci::range::RangeError::Malformed
                    | crate::oci::range::RangeError::MultipleRanges),
                ) = parse_range(v, u64::MAX)
                {
                    return Err(RegistryError::Range { source: e, size: 0 });
                }
                Some(v.to_owned())
            }
        };
        let presented = headers
            .get_all(GRANT_HEADER)
            .iter()
            .take(MAX_GRANTS_PER_REQUEST)
            .map(|v| v.to_str().ok().and_then(Presented::parse).ok_or(()))
            .collect();
        Ok(PullRequest {
            head,
            path,
            ns,
            range,
            hop: headers.contains_key(HOP_HEADER),
            client,
            presented,
            requester: None,
            peer_headers: HeaderMap::new(),
            accept: headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        })
    }

    /// The routing key: the digest, or `registry/repository:tag` for a tag (which needs `ns`).
    pub fn key(&self) -> Option<String> {
        match &self.path.target {
            Target::Digest(d) => Some(d.to_string()),
            Target::Tag(t) => self
                .ns
                .as_deref()
                .map(|ns| Reference::tag_key(ns, &self.path.name, t)),
        }
    }

    /// The path and query to send to a peer for the same object.
    pub fn peer_path(&self) -> String {
        let kind = match self.path.kind {
            Kind::Manifest => "manifests",
            Kind::Blob => "blobs",
        };
        let mut p = format!("/v2/{}/{kind}/{}", self.path.name, self.path.target);
        if let Some(ns) = &self.ns {
            // `ns` was validated as host[:port] or [v6]:port, so only these need escaping.
            let enc = ns
                .replace(':', "%3A")
                .replace('[', "%5B")
                .replace(']', "%5D");
            p.push_str("?ns=");
            p.push_str(&enc);
        }
        p
    }

    fn not_found(&self) -> RegistryError {
        match self.path.kind {
            Kind::Manifest => RegistryError::ManifestUnknown,
            Kind::Blob => RegistryError::BlobUnknown,
        }
    }
}

/// Extracts and validates the single `ns` parameter. Other parameters are ignored.
fn query_ns(query: Option<&str>) -> Result<Option<String>, RegistryError> {
    let mut ns = None;
    for pair in query.unwrap_or("").split('&') {
        let Some(value) = pair.strip_prefix("ns=") else {
            continue;
        };
        if ns.is_some() {
            return Err(PathError::NsInvalid.into());
        }
        let decoded = percent_decode(value).ok_or(PathError::NsInvalid)?;
        parse_ns(&decoded)?;
        ns = Some(decoded);
    }
    Ok(ns)
}

/// Decodes `%XX` escapes; `None` for a broken escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// How the registry's listeners are served by default: the transport's defaults, with every
/// refusal answered with an OCI error body ([`refusal`]). Tests serve the app with these
/// through `crate::server::serve`, the production transport.
pub fn serve_options() -> crate::server::ServeOptions {
    crate::server::ServeOptions {
        refuse: refusal,
        ..crate::server::ServeOptions::default()
    }
}

/// What one listener needs to answer requests.
#[derive(Clone)]
pub struct RegistryState {
    pub store: Arc<dyn Store>,
    /// `Some` on the mirror endpoint, `None` on the peer endpoint (local content only).
    pub mirror: Option<Arc<Mirror>>,
    /// The blob cache (`cache.enabled`): served on both endpoints, complete or in flight;
    /// on the mirror endpoint also the coalesced cold path.
    pub cache: Option<crate::cache::coalesce::Coalescer>,
    pub metrics: RegistryMetrics,
    pub readiness: Readiness,
    pub handler: Handler,
}

/// The policy side of a listener: the decision gate, where audit records go, and this node's
/// name for both.
#[derive(Clone)]
pub struct Guard {
    pub gate: Gate,
    pub audit: Arc<dyn AuditSink>,
    pub node: String,
    pub tenancy: TenancyGuard,
}

/// The multi-tenant parts of a listener (`docs/tenancy.md`); all off by default.
#[derive(Clone, Default)]
pub struct TenancyGuard {
    /// The node pod index: fills the policy input `namespaces` on the mirror endpoint.
    pub pods: Option<Arc<dyn Pods>>,
    /// Grant checks. `None`: no keys, so objects the policy marks `require_grant` are never
    /// served peer to peer (or from this node to its containerd through the mirror).
    pub grants: Option<Arc<GrantChecker>>,
    /// Mirror endpoint: the proof sent to peers.
    pub tokens: Option<Arc<dyn PeerTokens>>,
    /// Peer endpoint: the proof required from peers; `None` accepts anyone.
    pub verifier: Option<Arc<dyn PeerVerifier>>,
}

impl Guard {
    /// Allow everything, resolve every tag, audit nothing: the behaviour before policies.
    pub fn open() -> Guard {
        Guard {
            gate: Gate::allow_all(),
            audit: Arc::new(NullSink),
            node: String::new(),
            tenancy: TenancyGuard::default(),
        }
    }

    /// The policy input for a request on `handler`.
    pub fn input(&self, req: &PullRequest, handler: Handler) -> policy::Input {
        let (tag, digest, is_tag) = match &req.path.target {
            Target::Tag(t) => (Some(t.clone()), None, true),
            Target::Digest(d) => (None, Some(d.to_string()), false),
        };
        let from_peer = handler == Handler::Peer || req.hop;
        policy::Input {
            request: policy::RequestInput {
                action: policy::Action::Serve,
                kind: req.path.kind.as_str().to_owned(),
                method: if req.head { "HEAD" } else { "GET" }.to_owned(),
                source: if from_peer {
                    policy::Source::Peer
                } else {
                    policy::Source::Local
                },
                reference: req.path.target.to_string(),
                is_tag,
            },
            image: policy::ImageInput {
                registry: req.ns.clone().unwrap_or_default(),
                repository: req.path.name.clone(),
                tag,
                digest,
            },
            node: policy::NodeInput {
                name: self.node.clone(),
            },
            namespaces: Vec::new(),
            peer: from_peer.then(|| policy::PeerInput {
                id: None,
                addr: Some(req.client.to_string()),
                node: req.requester.as_ref().map(|r| r.node.clone()),
            }),
            grant: None,
        }
    }
}

/// What the HTTP handlers share: the listener's state and its guard.
#[derive(Clone)]
struct Served {
    state: RegistryState,
    guard: Guard,
}

/// The containerd-facing or peer-facing app (which one is decided by `state.mirror` and
/// `state.handler`), with no policy (everything allowed) and no audit trail. Serve it with
/// `crate::server::serve` and [`serve_options`] (it needs `ConnectInfo<SocketAddr>`).
pub fn app(state: RegistryState) -> HttpRouter {
    app_with(state, Guard::open())
}

/// [`app`] with a policy gate and an audit sink.
pub fn app_with(state: RegistryState, guard: Guard) -> HttpRouter {
    HttpRouter::new()
        .route("/v2", get(v2_root))
        .route("/v2/", get(v2_root))
        .route("/readyz", get(readyz))
        .route("/livez", get(|| async { "ok\n" }))
        .fallback(pull)
        .with_state(Served { state, guard })
}

/// `GET /v2/`: the API version check (distribution spec, "Determining support").
async fn v2_root() -> impl IntoResponse {
    (
        [
            ("content-type", "application/json"),
            ("docker-distribution-api-version", "registry/2.0"),
        ],
        "{}",
    )
}

async fn readyz(State(served): State<Served>) -> Response {
    readiness_response(&served.state.readiness)
}

/// `/readyz` body and status for a readiness latch.
pub fn readiness_response(readiness: &Readiness) -> Response {
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, readiness.detail()).into_response()
}

async fn pull(
    State(Served { state, guard }): State<Served>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let method_label = if method == Method::HEAD {
        "HEAD"
    } else {
        "GET"
    };
    let (response, kind, outcome) = match PullRequest::parse(&method, &uri, &headers, client) {
        Err(e) => {
            tracing::debug!(client.addr = %client, path = uri.path(), error = %e, "bad request");
            (e.into_response(), "invalid", None)
        }
        Ok(mut req) => {
            let kind = req.path.kind.as_str();
            match state
                .authenticate(&guard, &headers, &mut req, started)
                .await
            {
                Err(response) => (response, kind, Some(Outcome::Miss)),
                Ok(()) => {
                    let (response, outcome) = state.answer(&guard, req, started).await;
                    (response, kind, Some(outcome))
                }
            }
        }
    };
    state.metrics.request(
        state.handler,
        kind,
        method_label,
        response.status().as_u16(),
        started.elapsed(),
    );
    if let Some(outcome) = outcome
        && state.handler == Handler::Mirror
    {
        state.metrics.mirror_outcome(kind, outcome);
    }
    response
}

/// The bearer token of an `Authorization` header, if that is what it holds.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl RegistryState {
    /// Peer endpoint with a verifier: the request must carry a token proving a daemon of this
    /// cluster sent it; otherwise 401 and an audit line. Everything else passes untouched.
    async fn authenticate(
        &self,
        guard: &Guard,
        headers: &HeaderMap,
        req: &mut PullRequest,
        started: Instant,
    ) -> Result<(), Response> {
        let (Handler::Peer, Some(verifier)) = (self.handler, &guard.tenancy.verifier) else {
            return Ok(());
        };
        let result = match bearer(headers) {
            None => Err(crate::tenancy::peer_auth::PeerAuthError::Missing),
            Some(token) => verifier.verify(token).await,
        };
        match result {
            Ok(identity) => {
                req.requester = Some(identity);
                Ok(())
            }
            Err(e) => {
                let reason = e.reason();
                tracing::info!(client.addr = %req.client, reason, "peer request refused: not authenticated");
                let log = serve::AccessLog::new(req, self.handler, started, guard);
                log.decided(false, &format!("peer auth: {reason}"));
                let err = RegistryError::Unauthorized(reason);
                log.finish(err.status(), 0, "none");
                Err(err.into_response())
            }
        }
    }

    /// Answers a valid request: local store first, then peers (mirror endpoint only, and never
    /// for a request that already came from a peer), else 404.
    async fn answer(
        &self,
        guard: &Guard,
        mut req: PullRequest,
        started: Instant,
    ) -> (Response, Outcome) {
        let log = serve::AccessLog::new(&req, self.handler, started, guard);
        if let Some(who) = &req.requester {
            log.set_requester(who.node.clone());
        }
        let mut input = guard.input(&req, self.handler);
        input.namespaces = self.namespaces(guard, &req);
        log.set_namespaces(input.namespaces.clone());
        let mut decision = guard.gate.decide(&input);
        // The object's digest, resolved at most once: the peer side needs it before deciding
        // (a grant covers a manifest's closure), everyone else after.
        let mut digest: Option<Option<Digest>> = None;
        if decision.require_grant {
            let granted = match self.handler {
                Handler::Mirror => self.grants_to_send(guard, &mut req).await,
                Handler::Peer => {
                    let d = self.resolve(&req).await;
                    let result = self.grant_presented(guard, &req, d.as_ref()).await;
                    digest = Some(d);
                    result
                }
            };
            match granted {
                Ok((grant, label)) => {
                    input.grant = Some(grant);
                    log.set_grant(label);
                    decision = guard.gate.decide(&input);
                }
                Err(refusal) => {
                    let reason = refusal.reason();
                    log.decided(false, &reason);
                    tracing::debug!(
                        registry = req.ns.as_deref().unwrap_or(""),
                        reference = %req.path.target,
                        decision = "deny",
                        reason = %reason,
                        "private object refused"
                    );
                    // On the peer endpoint an authenticated daemon learns why (403); containerd
                    // only ever sees 404 and goes upstream with its own credentials.
                    let e = match self.handler {
                        Handler::Peer => RegistryError::Denied(reason),
                        Handler::Mirror => req.not_found(),
                    };
                    log.finish(e.status(), 0, "none");
                    return (e.into_response(), Outcome::Miss);
                }
            }
        }
        let permitted = Gate::permits(&decision, &input);
        log.decided(permitted, &decision.reason);
        if !permitted {
            // Not from us: containerd goes to the next host and finally upstream.
            tracing::debug!(
                registry = req.ns.as_deref().unwrap_or(""),
                reference = %req.path.target,
                decision = "deny",
                reason = %decision.reason,
                "policy denied"
            );
            let e = req.not_found();
            log.finish(e.status(), 0, "none");
            return (e.into_response(), Outcome::Miss);
        }
        if let Some(response) = self.resolve_tag(&decision, &mut req, &log).await {
            return (response, Outcome::Miss);
        }
        let digest = match digest {
            Some(d) => d,
            None => self.resolve(&req).await,
        };
        if let Some(digest) = digest {
            log.set_digest(digest.to_string());
            match serve::local(self, &req, &digest, log.clone()).await {
                Ok(Some(response)) => return (response, Outcome::Local),
                Ok(None) => {}
                Err(e) => {
                    log.finish(e.status(), 0, "local");
                    return (e.into_response(), Outcome::Miss);
                }
            }
            match cached::from_cache(self, &req, &digest, &log).await {
                Ok(Some(response)) => return (response, Outcome::Local),
                Ok(None) => {}
                Err(e) => {
                    log.finish(e.status(), 0, "cache");
                    return (e.into_response(), Outcome::Miss);
                }
            }
        }
        if let (Some(mirror), false) = (&self.mirror, req.hop)
            && let Some(key) = req.key()
        {
            self.add_peer_token(guard, &mut req).await;
            match mirror.fetch(&key, &req, self, log.clone()).await {
                Ok(Some(response)) => return (response, Outcome::Peer),
                Ok(None) => {}
                Err(e) => {
                    log.finish(e.status(), 0, "peer");
                    return (e.into_response(), Outcome::Miss);
                }
            }
            // Nobody holds it: fetch it once for the cluster, or follow who does. Public
            // images only: a blob that needs a grant is never fetched on anyone's behalf.
            if !decision.require_grant
                && let Target::Digest(digest) = &req.path.target
                && let Some(response) = cached::coalesce(self, &req, digest, &log).await
            {
                return (response, Outcome::Peer);
            }
        }
        let e = req.not_found();
        log.finish(e.status(), 0, "none");
        (e.into_response(), Outcome::Miss)
    }

    /// Mirror endpoint, a manifest by tag from this node's containerd: who names its digest
    /// ([`tags`]). When upstream does, the request becomes one for that digest (served from
    /// this node or peers like any digest); a tag upstream does not have is answered here
    /// (`Some`: a 404, containerd goes upstream); otherwise the cluster resolves the tag.
    async fn resolve_tag(
        &self,
        decision: &policy::Decision,
        req: &mut PullRequest,
        log: &serve::AccessLog,
    ) -> Option<Response> {
        let (Some(resolver), false, Kind::Manifest, Some(ns), Target::Tag(tag)) = (
            self.mirror.as_ref().and_then(|m| m.tags()),
            req.hop,
            req.path.kind,
            &req.ns,
            &req.path.target,
        ) else {
            return None;
        };
        let mode = decision.tag_resolution.unwrap_or(resolver.mode());
        let resolution = resolver
            .resolve(mode, ns, &req.path.name, tag, req.accept.as_deref())
            .await;
        log.set_tag(resolution.source.as_str(), resolution.upstream);
        match resolution.plan {
            tags::Plan::Serve(digest) => {
                req.path.target = Target::Digest(digest);
                None
            }
            tags::Plan::Cluster => None,
            tags::Plan::NotFound => {
                let e = req.not_found();
                log.finish(e.status(), 0, "none");
                Some(e.into_response())
            }
        }
    }

    /// The digest the request names, or what its tag resolves to in this node's store.
    async fn resolve(&self, req: &PullRequest) -> Option<Digest> {
        match &req.path.target {
            Target::Digest(d) => Some(d.clone()),
            Target::Tag(tag) => {
                let ns = req.ns.as_ref()?;
                match self.store.resolve(ns, &req.path.name, tag).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = %e, registry = %ns, "store resolve failed; trying peers");
                        None
                    }
                }
            }
        }
    }

    /// The policy input `namespaces`: pods on this node waiting for the image (mirror
    /// endpoint), or the namespaces named by the presented grants (peer endpoint; only a grant
    /// that passes every check lets anything through).
    fn namespaces(&self, guard: &Guard, req: &PullRequest) -> Vec<String> {
        let mut out: Vec<String> = match self.handler {
            Handler::Mirror => match (&guard.tenancy.pods, &req.ns) {
                (Some(pods), Some(ns)) => pods
                    .waiting_for(ns, &req.path.name)
                    .into_iter()
                    .map(|p| p.namespace)
                    .collect(),
                _ => Vec::new(),
            },
            Handler::Peer => req
                .presented
                .iter()
                .flatten()
                .map(|p| p.namespace.clone())
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }

    /// Mirror endpoint, private object: the grants of this node's waiting pods that verify
    /// here, put on the request for the peers. None → refused (containerd goes upstream with
    /// the pod's real credentials).
    async fn grants_to_send(
        &self,
        guard: &Guard,
        req: &mut PullRequest,
    ) -> Result<(serde_json::Value, String), Refusal> {
        let (Some(checker), Some(ns)) = (&guard.tenancy.grants, &req.ns) else {
            return Err(Refusal::NoGrant);
        };
        let mut candidates = checker.candidates(ns, &req.path.name, MAX_GRANTS_PER_REQUEST);
        for (c, _) in &candidates {
            if let Ok(v) = http::HeaderValue::from_str(&c.header_value()) {
                req.peer_headers.append(GRANT_HEADER, v);
            }
        }
        if candidates.is_empty() {
            return Err(Refusal::NoGrant);
        }
        let (first, claims) = candidates.swap_remove(0);
        let label = format!("{}/{}", first.namespace, first.pod);
        let granted = crate::tenancy::grants::Granted {
            namespace: first.namespace,
            pod: first.pod,
            claims,
        };
        Ok((granted.input(), label))
    }

    /// Peer endpoint, private object: a presented grant must pass every check against the
    /// requester's node, the pod directory and this node's store.
    async fn grant_presented(
        &self,
        guard: &Guard,
        req: &PullRequest,
        digest: Option<&Digest>,
    ) -> Result<(serde_json::Value, String), Refusal> {
        let Some(checker) = &guard.tenancy.grants else {
            return Err(Refusal::NoGrant);
        };
        if req.presented.is_empty() {
            return Err(Refusal::NoGrant);
        }
        // Without peer authentication nobody can say which node asks: fail closed.
        let Some(requester) = &req.requester else {
            return Err(Refusal::Invalid("unauthenticated peer"));
        };
        // Not in our store: nothing to serve, and no closure to check against.
        let Some(digest) = digest else {
            return Err(Refusal::OutsideClosure);
        };
        let (Some(ns), name) = (&req.ns, &req.path.name) else {
            return Err(Refusal::OtherRepository);
        };
        let granted = checker
            .check(
                &req.presented,
                &requester.node,
                ns,
                name,
                digest,
                self.store.as_ref(),
            )
            .await?;
        let label = format!("{}/{}", granted.namespace, granted.pod);
        Ok((granted.input(), label))
    }

    /// Mirror endpoint: the token that proves to peers we are a daemon of this cluster.
    async fn add_peer_token(&self, guard: &Guard, req: &mut PullRequest) {
        let Some(tokens) = &guard.tenancy.tokens else {
            return;
        };
        match tokens.token().await {
            Ok(token) => match http::HeaderValue::from_str(&format!("Bearer {token}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    req.peer_headers.insert(http::header::AUTHORIZATION, v);
                }
                Err(_) => tracing::warn!("peer token is not a valid header value"),
            },
            // Peers will answer 401 and containerd goes upstream: slower, never broken.
            Err(e) => tracing::warn!(error = %e, "no peer token; peers will refuse us"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: Method, uri: &str, range: Option<&str>) -> Result<PullRequest, String> {
        let mut headers = HeaderMap::new();
        if let Some(r) = range {
            headers.insert(http::header::RANGE, r.parse().map_err(|_| "hdr")?);
        }
        let uri: Uri = uri.parse().map_err(|e| format!("{e}"))?;
        PullRequest::parse(&method, &uri, &headers, ([127, 0, 0, 1], 1).into())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn request_table() {
        let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        type Case<'a> = (
            &'a str,
            Method,
            String,
            Option<&'a str>,
            Result<Option<&'a str>, ()>,
        );
        let cases: Vec<Case> = vec![
            (
                "ns decoded",
                Method::GET,
                "/v2/a/manifests/t?ns=127.0.0.1%3A5000".into(),
                None,
                Ok(Some("127.0.0.1:5000")),
            ),
            (
                "no ns",
                Method::HEAD,
                format!("/v2/a/blobs/{d}"),
                None,
                Ok(None),
            ),
            (
                "other params ignored",
                Method::GET,
                "/v2/a/manifests/t?x=1&ns=docker.io".into(),
                None,
                Ok(Some("docker.io")),
            ),
            (
                "two ns",
                Method::GET,
                "/v2/a/manifests/t?ns=a.io&ns=b.io".into(),
                None,
                Err(()),
            ),
            (
                "bad ns",
                Method::GET,
                "/v2/a/manifests/t?ns=a%2Fb".into(),
                None,
                Err(()),
            ),
            (
                "broken escape",
                Method::GET,
                "/v2/a/manifests/t?ns=a%2".into(),
                None,
                Err(()),
            ),
            (
                "non-utf8 ns",
                Method::GET,
                "/v2/a/manifests/t?ns=%ff".into(),
                None,
                Err(()),
            ),
            (
                "post",
                Method::POST,
                "/v2/a/blobs/uploads/".into(),
                None,
                Err(()),
            ),
            (
                "delete",
                Method::DELETE,
                format!("/v2/a/blobs/{d}"),
                None,
                Err(()),
            ),
            (
                "range ok",
                Method::GET,
                format!("/v2/a/blobs/{d}"),
                Some("bytes=5-"),
                Ok(None),
            ),
            (
                "multi range",
                Method::GET,
                format!("/v2/a/blobs/{d}"),
                Some("bytes=0-1,4-5"),
                Err(()),
            ),
            (
                "inverted range",
                Method::GET,
                format!("/v2/a/blobs/{d}"),
                Some("bytes=5-1"),
                Err(()),
            ),
        ];
        for (name, method, uri, range, want) in cases {
            let got = parse(method, &uri, range);
            match want {
                Ok(ns) => {
                    let req = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(req.ns.as_deref(), ns, "{name}");
                }
                Err(()) => assert!(got.is_err(), "{name}: expected an error"),
            }
        }
    }

    #[test]
    fn keys_and_peer_paths() {
        let req = parse(
            Method::GET,
            "/v2/rig/x/manifests/v1?ns=10.0.0.2%3A5000",
            None,
        )
        .expect("valid");
        assert_eq!(req.key().as_deref(), Some("10.0.0.2:5000/rig/x:v1"));
        assert_eq!(req.peer_path(), "/v2/rig/x/manifests/v1?ns=10.0.0.2%3A5000");
        let no_ns = parse(Method::GET, "/v2/rig/x/manifests/v1", None).expect("valid");
        assert_eq!(no_ns.key(), None, "a tag without ns has no key");
    }
}
