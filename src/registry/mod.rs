//! The HTTP side of the daemon: the OCI distribution *pull* API, served on two listeners.
//!
//! - The **mirror endpoint** (containerd-facing, loopback by default) serves from the node's
//!   store and, on a miss, from peers; when nobody has the content it answers 404 so
//!   containerd falls back to the next host in `hosts.toml` and finally upstream.
//! - The **peer endpoint** serves other daemons from this node's store only, never from
//!   further peers, so a request can never loop around the cluster.
//!
//! # The request path
//! 1. `crate::server` accepts and parses (header limits, our `GET`/`HEAD` writer with
//!    `sendfile(2)`); it knows nothing of the registry.
//! 2. [`request`]: [`PullRequest::parse`], bad input is a 4xx before anything is looked up.
//! 3. [`guard`]: peer authentication, the policy input, the decision, the grant exchange: a
//!    deny, a tag the switches or the policy will not resolve, or a failed evaluation is a
//!    plain 404 — containerd goes upstream.
//! 4. `answer` (private): a containers/image client's manifest (registry in the path) is
//!    answered complete-or-nothing by `complete` (private); a tag on the mirror endpoint is resolved by [`tags`], then the
//!    responders in order — [`local`] (the store), [`from_cache`] (the blob cache, complete
//!    or in flight), [`peers`] (mirror endpoint only; `crate::wire::resume` continues a broken
//!    stream elsewhere), the coalesced cold path — else 404.
//! 5. [`body`]: the one content-header builder and the byte-counting bodies; [`error`] is the
//!    only place errors become responses (also the transport's refusals, [`refusal`]).
//! 6. [`access_log`]: one audit record per request, with the bytes really sent; [`metrics`]
//!    counts it. [`config`] holds the `registry:` and `mirror:` sections.

pub mod access_log;
mod answer;
pub mod body;
mod complete;
pub mod config;
pub mod error;
pub(crate) mod from_cache;
pub mod guard;
pub mod local;
pub mod metrics;
pub mod peers;
pub mod request;
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
use crate::readiness::Readiness;
use crate::routing::{ServingLoad, ServingSlot};
use crate::store::Store;
pub use crate::wire::HOP_HEADER;
pub use config::MirrorConfig;
pub use config::RegistryConfig;
pub use error::{RegistryError, refusal};
pub use guard::Guard;
pub use peers::Mirror;
pub use request::PullRequest;

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
    /// Peer endpoint: the cap on blob streams served to other daemons at once
    /// (`registry.peer_serving_limit`); each stream holds a slot for its body's life. The
    /// default has no cap; the mirror endpoint never takes a slot.
    pub serving: ServingLoad,
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
pub(crate) fn readiness_response(readiness: &Readiness) -> Response {
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
                Ok(()) => match state.serving_slot(&req) {
                    Err(busy) => (busy.into_response(), kind, Some(Outcome::Miss)),
                    Ok(slot) => {
                        let (response, outcome) = state.answer(&guard, req, started).await;
                        (hold(response, slot), kind, Some(outcome))
                    }
                },
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

impl RegistryState {
    /// Peer endpoint, a blob `GET`: a slot under `registry.peer_serving_limit`, or the 429 to
    /// answer. Manifests, `HEAD`s and the mirror endpoint take none (`Ok(None)`): they are
    /// small, and the cap is about the uplink.
    fn serving_slot(&self, req: &PullRequest) -> Result<Option<ServingSlot>, RegistryError> {
        if self.handler != Handler::Peer || req.head || req.path.kind != crate::oci::Kind::Blob {
            return Ok(None);
        }
        match self.serving.try_enter() {
            Some(slot) => Ok(Some(slot)),
            None => {
                let serving = self.serving.now().serving;
                tracing::debug!(
                    client.addr = %req.client,
                    serving,
                    http.status = 429,
                    "peer endpoint at its serving limit"
                );
                Err(RegistryError::Busy { serving })
            }
        }
    }
}

/// `response` with `slot` kept inside its body, so the slot is given back when the body ends
/// or is dropped (also after a `sendfile` of the body's file, which drops the body last). The
/// body keeps its size hint: the transport frames by it (`content-length`, not chunked).
fn hold(response: Response, slot: Option<ServingSlot>) -> Response {
    let Some(slot) = slot else {
        return response;
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, axum::body::Body::new(Held { body, _slot: slot }))
}

/// A body that holds a serving slot for its life and is otherwise the body it wraps.
struct Held {
    body: axum::body::Body,
    _slot: ServingSlot,
}

impl axum::body::HttpBody for Held {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
