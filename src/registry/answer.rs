//! The answer, one job: run the guard ([`super::guard`]) and then the responders in order —
//! this node's store ([`super::local`]), its blob cache ([`super::from_cache`]), the peers
//! ([`super::peers`], mirror endpoint only, never for a request that already came from a
//! peer), the coalesced cold path — and 404 when nobody has it, so containerd goes upstream.
//! A tag on the mirror endpoint is first resolved by [`super::tags`]. A containers/image
//! client's manifest request (registry in the path) is answered by [`super::complete`]:
//! complete-or-nothing, because such a client takes every blob from where it got the manifest.

use std::time::Instant;

use axum::response::{IntoResponse, Response};

use super::access_log::AccessLog;
use super::guard::{Admitted, Guard};
use super::metrics::{Handler, Outcome, Source};
use super::{PullRequest, RegistryError, RegistryState, complete, from_cache, local, tags};
use crate::oci::{Digest, Kind, Target};
use crate::policy;

impl RegistryState {
    /// Answers a valid request: local store first, then peers (mirror endpoint only, and never
    /// for a request that already came from a peer), else 404.
    pub(super) async fn answer(
        &self,
        guard: &Guard,
        mut req: PullRequest,
        started: Instant,
    ) -> (Response, Outcome) {
        let log = AccessLog::new(
            &req,
            self.handler,
            started,
            &guard.node,
            guard.audit.clone(),
        );
        if let Some(who) = &req.requester {
            log.set_requester(who.node.clone());
        }
        if !complete::registry_allowed(self, &req) {
            // A registry we do not mirror, named in the path: not from us.
            let e = req.not_found();
            log.finish(e.status(), 0, None);
            return (e.into_response(), Outcome::Miss);
        }
        let Admitted { decision, digest } = match self.admit(guard, &mut req, &log).await {
            Ok(admitted) => admitted,
            Err(refused) => return (refused, Outcome::Miss),
        };
        // The tag the client asked for, before upstream-first resolution turns it into a digest
        // (a containers/image manifest is cached under it).
        let asked = req.path.target.clone();
        if let Some(response) = self.resolve_tag(&decision, &mut req, &log).await {
            return (response, Outcome::Miss);
        }
        if req.path_encoded
            && req.path.kind == Kind::Manifest
            && self.handler == Handler::Mirror
            && !req.hop
        {
            return complete::manifest(self, guard, &decision, &asked, &mut req, &log).await;
        }
        let digest = match digest {
            Some(d) => d,
            None => self.resolve(&req).await,
        };
        // The responders, in order: this node's store, its cache, the peers (mirror endpoint,
        // never for a hop), the coalesced cold path; nobody: 404, containerd goes upstream.
        if let Some(digest) = digest {
            log.set_digest(digest.to_string());
            let local = local::local(self, &req, &digest, log.clone()).await;
            if let Some(done) = settle(local, Source::Local, Outcome::Local, &log) {
                return done;
            }
            let cached = from_cache::from_cache(self, &req, &digest, &log).await;
            if let Some(done) = settle(cached, Source::Cache, Outcome::Local, &log) {
                return done;
            }
            let cached = complete::cached_manifest(self, &req, &digest, &log).await;
            if let Some(done) = settle(cached, Source::Cache, Outcome::Local, &log) {
                return done;
            }
        }
        if let (Some(mirror), false) = (&self.mirror, req.hop)
            && let Some(key) = req.key()
        {
            self.add_peer_token(guard, &mut req).await;
            let fetched = mirror.fetch(&key, &req, self, log.clone()).await;
            if let Some(done) = settle(fetched, Source::Peer, Outcome::Peer, &log) {
                return done;
            }
            // Nobody holds it: fetch it once for the cluster, or follow who does. Public
            // images only: a blob that needs a grant is never fetched on anyone's behalf.
            if !decision.require_grant
                && let Target::Digest(digest) = &req.path.target
                && let Some(response) = from_cache::coalesce(self, &req, digest, &log).await
            {
                return (response, Outcome::Peer);
            }
        }
        let e = req.not_found();
        log.finish(e.status(), 0, None);
        (e.into_response(), Outcome::Miss)
    }

    /// Mirror endpoint, a manifest by tag from this node's containerd: who names its digest
    /// ([`tags`]). When upstream does, the request becomes one for that digest (served from
    /// this node or peers like any digest); a tag upstream does not have is answered here
    /// (`Some`: a 404, containerd goes upstream); otherwise the cluster resolves the tag.
    pub(super) async fn resolve_tag(
        &self,
        decision: &policy::Decision,
        req: &mut PullRequest,
        log: &AccessLog,
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
                log.finish(e.status(), 0, None);
                Some(e.into_response())
            }
        }
    }

    /// The digest the request names, or what its tag resolves to in this node's store, else
    /// in its cache (the manifests it fetched, `crate::cache::manifests`).
    pub(super) async fn resolve(&self, req: &PullRequest) -> Option<Digest> {
        match &req.path.target {
            Target::Digest(d) => Some(d.clone()),
            Target::Tag(tag) => {
                let ns = req.ns.as_ref()?;
                let stored = match self.store.resolve(ns, &req.path.name, tag).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = %e, registry = %ns, "store resolve failed; trying peers");
                        None
                    }
                };
                match (stored, &self.cache) {
                    (Some(d), _) => Some(d),
                    (None, Some(c)) => c.cache().tag(ns, &req.path.name, tag).await,
                    (None, None) => None,
                }
            }
        }
    }
}

/// One responder's result as the chain reads it: served (the response and its outcome), an
/// error that must reach the client as it is (a 416, say; recorded with where it arose), or
/// `None`: not here, ask the next responder.
fn settle(
    result: Result<Option<Response>, RegistryError>,
    source: Source,
    outcome: Outcome,
    log: &AccessLog,
) -> Option<(Response, Outcome)> {
    match result {
        Ok(Some(response)) => Some((response, outcome)),
        Ok(None) => None,
        Err(e) => {
            log.finish(e.status(), 0, Some(source));
            Some((e.into_response(), Outcome::Miss))
        }
    }
}
