//! The HTTP side: HTTPS (rustls) serving `POST /mutate`, `/readyz` and `/livez`, and a plain
//! HTTP metrics port of its own.
//!
//! Bodies are read up to a limit; a larger one is answered from its first bytes (the request
//! `uid` comes first in what the API server sends) so that even that response carries the uid.
//! The TLS handshake has a deadline and runs in the connection's own task, so a slow client
//! cannot hold up accepting others. Listeners and the shutdown future come from the caller,
//! so tests own both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::admit::Admitter;
use crate::certs::TlsState;
use crate::metrics::Metrics;
use crate::review::Response as AdmissionResponse;

/// Readiness latch: set once the webhook can answer (certificates loaded, policy compiled),
/// cleared on shutdown so the Service stops sending us requests first.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    admitter: Arc<Admitter>,
    ready: Readiness,
    body_limit: usize,
}

/// The webhook's routes.
pub fn router(admitter: Arc<Admitter>, ready: Readiness, body_limit: usize) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/readyz", get(readyz))
        .route("/livez", get(|| async { "ok" }))
        .with_state(AppState {
            admitter,
            ready,
            body_limit,
        })
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.ready.get() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn mutate(State(s): State<AppState>, body: Body) -> Response {
    let bytes = match read_limited(body, s.body_limit).await {
        Ok(b) => b,
        Err(Oversize::Prefix(prefix)) => {
            let msg = format!("AdmissionReview larger than {} bytes", s.body_limit);
            return match sniff_uid(&prefix) {
                Some(uid) => {
                    let r = match s.admitter.failure_policy {
                        crate::admit::FailurePolicy::Ignore => {
                            let mut r = AdmissionResponse::allow(&uid);
                            r.warnings
                                .push(format!("speculum-webhook did not pin images: {msg}"));
                            r
                        }
                        crate::admit::FailurePolicy::Fail => {
                            AdmissionResponse::deny(&uid, 413, msg)
                        }
                    };
                    json_response(StatusCode::OK, &r.into_review())
                }
                None => json_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &serde_json::json!({"error": msg}),
                ),
            };
        }
        Err(Oversize::Broken(e)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": format!("reading body: {e}")}),
            );
        }
    };
    let (status, body) = s.admitter.review(&bytes).await;
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        &body,
    )
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

enum Oversize {
    /// The body was over the limit; here are its first bytes.
    Prefix(Vec<u8>),
    Broken(String),
}

async fn read_limited(mut body: Body, limit: usize) -> Result<Vec<u8>, Oversize> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Oversize::Broken(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                let room = limit.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..room.min(data.len())]);
                return Err(Oversize::Prefix(buf));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

/// Finds `"uid":"…"` inside `"request"` in the first bytes of an AdmissionReview. The API
/// server writes `request.uid` before the (large) object, so the prefix of an oversized
/// review still names it.
pub fn sniff_uid(prefix: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(&prefix[..prefix.len().min(64 * 1024)]);
    let req = s.find("\"request\"")?;
    let rest = &s[req..];
    let at = rest.find("\"uid\"")?;
    let after = rest[at + 5..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = after.find('"')?;
    let uid = &after[..end];
    (!uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    .then(|| uid.to_owned())
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish for at most `grace`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: TlsState,
    app: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let app = app.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(client.addr = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            serve_conn(TokioIo::new(stream), app, peer, &mut stop).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
    Ok(())
}

async fn serve_conn<I>(
    io: I,
    app: Router,
    peer: SocketAddr,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(app);
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(client.addr = %peer, error = %e, "connection ended with an error");
            }
        }
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Serves `/metrics` on its own plain-HTTP listener.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        // The same as the daemon's (speculum::metrics::text::CONTENT_TYPE).
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_uid_table() {
        let cases: [(&str, Option<&str>); 6] = [
            (
                r#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","kind":"#,
                Some("705ab4f5-6393-11e8-b7cc-42010a800002"),
            ),
            (r#"{"request": { "uid" : "abc" "#, Some("abc")),
            (r#"{"uid":"top","request":{"#, None),
            (r#"{"request":{"uid":"bad\"quote"}}"#, None),
            (r#"{"request":{"uid":""}}"#, None),
            ("\u{0}\u{1}", None),
        ];
        for (input, want) in cases {
            assert_eq!(sniff_uid(input.as_bytes()).as_deref(), want, "{input}");
        }
    }
}
