//! The node status page: one read-only HTML page on the metrics listener that shows what this
//! daemon is doing — its peers, the keys it advertises, its cache, the policy bundle in force
//! and the last requests it served with their source, decision, bytes and duration — and the
//! JSON it polls once a second (`/status/api`). Off by default (`status.enabled`).
//!
//! This module only reads. The numbers come from the daemon's own Prometheus registry (by
//! metric name, the stable contract; [`snapshot::Gauges`]), the recent requests from the audit
//! pipeline's bounded ring ([`crate::audit::recent::RecentRequests`]), the policy from a
//! description closure (name, revision and fingerprint, never the bundle's contents). Every
//! asset is compiled into the binary; nothing is fetched from elsewhere, and a strict
//! Content-Security-Policy (`script-src 'self'`, no inline script) means that even a string
//! that escaped escaping could not run. The page renders every string with `textContent`:
//! repository names and references come from clients and are hostile input.
//!
//! Layout: [`page`] (the HTML, CSS and JS, and the one server-side escape), [`snapshot`] (the
//! JSON the page polls).

pub mod page;
pub mod snapshot;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::audit::recent::RecentRequests;
use crate::readiness::Readiness;

/// The `status:` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusConfig {
    /// Serve `/status` and `/status/api` on the metrics listener. Off by default: the page
    /// names images and client addresses, so an operator decides who may reach it.
    pub enabled: bool,
    /// How many of the most recent requests the page keeps and shows.
    pub recent: usize,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            enabled: false,
            recent: 100,
        }
    }
}

impl StatusConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.recent == 0 || self.recent > 2000 {
            errors.push("status.recent must be between 1 and 2000".to_owned());
        }
        errors
    }
}

/// A text the page shows, asked for at every poll (the active policy's description).
pub(crate) type Describe = Arc<dyn Fn() -> String + Send + Sync>;

/// What the page reads from. Built by the composition root (`src/app.rs`).
#[derive(Clone)]
pub struct StatusSources {
    /// This node's name (`node.name`).
    pub node: String,
    /// This node's libp2p peer id and DHT listen addresses.
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    /// Whether the blob cache is on, and its bound (`cache.max_bytes`).
    pub cache_enabled: bool,
    pub cache_max_bytes: u64,
    /// The daemon's Prometheus text exposition (`Metrics::encode`).
    pub metrics: Describe,
    /// The policy in force (`Policy::describe`: bundle name@revision and fingerprint).
    pub policy: Describe,
    pub readiness: Readiness,
    pub recent: RecentRequests,
}

/// The status page's routes, to merge into the metrics listener's router.
pub fn router(sources: StatusSources) -> Router {
    Router::new()
        .route("/status", get(index))
        .route("/status/", get(index))
        .route("/status/status.js", get(script))
        .route("/status/status.css", get(style))
        .route("/status/api", get(api))
        .with_state(Arc::new(sources))
}

/// The policy every response of the page carries: nothing from elsewhere, no inline script,
/// no framing, no caching, no sniffing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn respond(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    (headers, body.into()).into_response()
}

async fn index(State(sources): State<Arc<StatusSources>>) -> Response {
    respond("text/html; charset=utf-8", page::index(&sources.node))
}

async fn script() -> Response {
    respond("text/javascript; charset=utf-8", page::SCRIPT)
}

async fn style() -> Response {
    respond("text/css; charset=utf-8", page::STYLE)
}

async fn api(State(sources): State<Arc<StatusSources>>) -> Response {
    let snapshot = snapshot::Snapshot::take(&sources);
    match serde_json::to_vec(&snapshot) {
        Ok(body) => respond("application/json", body),
        Err(e) => {
            tracing::warn!(error = %e, "status snapshot did not serialise");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "status snapshot failed\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditRecord, AuditSink};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    pub(crate) fn sources(recent: RecentRequests) -> StatusSources {
        StatusSources {
            node: "n1".to_owned(),
            peer_id: "12D3KooWtest".to_owned(),
            listen_addrs: vec!["/ip4/10.0.0.1/tcp/5082".to_owned()],
            cache_enabled: true,
            cache_max_bytes: 1 << 30,
            metrics: Arc::new(|| {
                "# TYPE speculum_routing_peers gauge\nspeculum_routing_peers 2\n\
                 speculum_routing_advertised_keys 17\nspeculum_cache_bytes 4096\n"
                    .to_owned()
            }),
            policy: Arc::new(|| "bundle tenants@r7 (0123456789ab)".to_owned()),
            readiness: Readiness::new(),
            recent,
        }
    }

    async fn get(app: &Router, path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, headers, body.to_vec())
    }

    #[tokio::test]
    async fn routes_answer_with_strict_headers() {
        let app = router(sources(RecentRequests::new(4)));
        // (path, want content type prefix)
        let cases = [
            ("/status", "text/html"),
            ("/status/", "text/html"),
            ("/status/status.js", "text/javascript"),
            ("/status/status.css", "text/css"),
            ("/status/api", "application/json"),
        ];
        for (path, want) in cases {
            let (status, headers, body) = get(&app, path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            let ct = headers[header::CONTENT_TYPE].to_str().expect("ascii");
            assert!(ct.starts_with(want), "{path}: {ct}");
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            let csp = headers[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .expect("ascii");
            assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
            assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
            assert!(!body.is_empty(), "{path}");
        }
        let (status, _, _) = get(&app, "/status/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn config_layers_and_bounds() {
        // (name, environment, flags, want: Ok((enabled, recent)) or Err(text in the error))
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, &'a str)>,
            Vec<(&'a str, &'a str)>,
            Result<(bool, usize), &'a str>,
        );
        let cases: Vec<Case> = vec![
            ("off by default", vec![], vec![], Ok((false, 100))),
            (
                "env on",
                vec![("SPECULUM_STATUS_ENABLED", "true")],
                vec![],
                Ok((true, 100)),
            ),
            (
                "flag beats env",
                vec![("SPECULUM_STATUS_ENABLED", "true")],
                vec![("status.enabled", "false"), ("status.recent", "500")],
                Ok((false, 500)),
            ),
            (
                "ring too large",
                vec![("SPECULUM_STATUS_RECENT", "100000")],
                vec![],
                Err("status.recent"),
            ),
            (
                "not a bool",
                vec![("SPECULUM_STATUS_ENABLED", "yes")],
                vec![],
                Err("SPECULUM_STATUS_ENABLED"),
            ),
        ];
        for (name, env, flags, want) in cases {
            let env: Vec<(String, String)> = env
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let flags: Vec<(String, String)> = flags
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            match (crate::config::load(None, env, &flags), want) {
                (Ok(cfg), Ok((enabled, recent))) => {
                    assert_eq!(cfg.status.enabled, enabled, "{name}");
                    assert_eq!(cfg.status.recent, recent, "{name}");
                }
                (Err(e), Err(needle)) => assert!(e.to_string().contains(needle), "{name}: {e}"),
                (got, _) => panic!("{name}: unexpected {:?}", got.map(|c| c.status)),
            }
        }
    }

    #[tokio::test]
    async fn writes_are_refused() {
        let app = router(sources(RecentRequests::new(4)));
        for path in ["/status", "/status/api"] {
            let response = app
                .clone()
                .oneshot(Request::post(path).body(Body::empty()).expect("request"))
                .await
                .expect("response");
            assert_eq!(
                response.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{path} is read-only"
            );
        }
    }

    #[tokio::test]
    async fn api_returns_the_snapshot_newest_first() {
        let ring = RecentRequests::new(3);
        for i in 0..5u64 {
            ring.record(AuditRecord {
                repository: format!("r{i}"),
                bytes: i,
                ..AuditRecord::default()
            });
        }
        let app = router(sources(ring));
        let (_, _, body) = get(&app, "/status/api").await;
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["node"], "n1");
        assert_eq!(v["peers"]["connected"], 2);
        assert_eq!(v["advertised_keys"], 17);
        assert_eq!(v["cache"]["bytes"], 4096);
        assert_eq!(v["policy"], "bundle tenants@r7 (0123456789ab)");
        let repos: Vec<&str> = v["recent"]["requests"]
            .as_array()
            .expect("array")
            .iter()
            .map(|r| r["repository"].as_str().expect("string"))
            .collect();
        assert_eq!(repos, ["r4", "r3", "r2"], "bounded, newest first");
        assert_eq!(v["recent"]["seen"], 5);
    }
}
