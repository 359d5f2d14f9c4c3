//! The guard, one job: the policy and tenancy decision chain in front of every responder —
//! authenticate a peer → the policy input (namespaces from this node's pods, or from the
//! presented grants) → decide → for a private object, the grant exchange → decide again.
//! This is the code `docs/tenancy.md` describes; [`super::answer`] calls it in that order.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::access_log::AccessLog;
use super::metrics::Handler;
use super::{PullRequest, RegistryError, RegistryState};
use crate::audit::{AuditSink, NullSink};
use crate::oci::{Digest, Target};
use crate::policy::{self, Gate};
use crate::tenancy::grants::Refusal;
use crate::tenancy::{GRANT_HEADER, MAX_GRANTS_PER_REQUEST, Tenancy};

/// The policy side of a listener: the decision gate, where audit records go, and this node's
/// name for both.
#[derive(Clone)]
pub struct Guard {
    pub gate: Gate,
    pub audit: Arc<dyn AuditSink>,
    pub node: String,
    /// The multi-tenant parts (`docs/tenancy.md`); `Tenancy::default()`: all off.
    pub tenancy: Tenancy,
}

impl Guard {
    /// Allow everything, resolve every tag, audit nothing: the behaviour before policies.
    pub fn open() -> Guard {
        Guard {
            gate: Gate::allow_all(),
            audit: Arc::new(NullSink),
            node: String::new(),
            tenancy: Tenancy::default(),
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

/// The bearer token of an `Authorization` header, if that is what it holds.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// What the guard let through: the decision the responders follow, and the object's digest
/// when the grant exchange already resolved it (`Some`; the peer endpoint resolves before
/// deciding, since a grant covers a manifest's closure).
pub(super) struct Admitted {
    pub decision: policy::Decision,
    pub digest: Option<Option<Digest>>,
}

impl RegistryState {
    /// The decision chain, in the order `docs/tenancy.md` gives: the policy input (namespaces
    /// from this node's pods or from the presented grants) → decide → for a private object,
    /// the grant exchange → decide again → permitted? `Err` is the refusal's response, already
    /// logged and audited: on the mirror endpoint always a 404 (containerd goes upstream with
    /// its own credentials), on the peer endpoint a 403 for a refused grant.
    pub(super) async fn admit(
        &self,
        guard: &Guard,
        req: &mut PullRequest,
        log: &AccessLog,
    ) -> Result<Admitted, Response> {
        let mut input = guard.input(req, self.handler);
        input.namespaces = self.namespaces(guard, req);
        log.set_namespaces(input.namespaces.clone());
        let mut decision = guard.gate.decide(&input);
        // The object's digest, resolved at most once: the peer side needs it before deciding
        // (a grant covers a manifest's closure), everyone else after.
        let mut digest: Option<Option<Digest>> = None;
        if decision.require_grant {
            let granted = match self.handler {
                Handler::Mirror => self.grants_to_send(guard, req).await,
                Handler::Peer => {
                    let d = self.resolve(req).await;
                    let result = self.grant_presented(guard, req, d.as_ref()).await;
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
                    log.finish(e.status(), 0, None);
                    return Err(e.into_response());
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
            log.finish(e.status(), 0, None);
            return Err(e.into_response());
        }
        Ok(Admitted { decision, digest })
    }

    /// Peer endpoint with a verifier: the request must carry a token proving a daemon of this
    /// cluster sent it; otherwise 401 and an audit line. Everything else passes untouched.
    pub(super) async fn authenticate(
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
                let log =
                    AccessLog::new(req, self.handler, started, &guard.node, guard.audit.clone());
                log.decided(false, &format!("peer auth: {reason}"));
                let err = RegistryError::Unauthorized(reason);
                log.finish(err.status(), 0, None);
                Err(err.into_response())
            }
        }
    }
    /// The policy input `namespaces`: pods on this node waiting for the image (mirror
    /// endpoint), or the namespaces named by the presented grants (peer endpoint; only a grant
    /// that passes every check lets anything through).
    pub(super) fn namespaces(&self, guard: &Guard, req: &PullRequest) -> Vec<String> {
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
    pub(super) async fn grants_to_send(
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
    pub(super) async fn grant_presented(
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
    pub(super) async fn add_peer_token(&self, guard: &Guard, req: &mut PullRequest) {
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
