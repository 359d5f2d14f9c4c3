//! Serving an axum app on a TCP listener over HTTP/1.1, with our own header limits.
//!
//! What `axum::serve` does (accept, `ConnectInfo`, graceful shutdown), plus one thing it
//! cannot: hyper answers requests it refuses itself (too many headers, header section over
//! its buffer) with a bare status and no body. So hyper's limits are raised a little above
//! ours ([`HYPER_MAX_HEADERS`], [`HYPER_MAX_BUF`]) and ours ([`MAX_HEADERS`],
//! [`MAX_HEADER_BYTES`]) are enforced here, where the refusal can be a 431 with an OCI error
//! body like every other error ([`RegistryError::HeadersTooLarge`]).
//!
//! What still gets hyper's bare answer (ROBUSTNESS.md §1): a header section beyond
//! `HYPER_MAX_BUF` or with more than `HYPER_MAX_HEADERS` fields (431), and a request line
//! hyper cannot parse at all (400: a raw space or non-ASCII byte in the target, a bad method
//! or version). There is no request there for any handler to see; answering those with JSON
//! would take our own HTTP parser in front of hyper's.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;

use super::RegistryError;

/// Most header fields a request may carry. containerd sends fewer than 10.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header names and values (plus `: ` and CRLF each) a request may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper refuses (bare 431) above this many fields; between [`MAX_HEADERS`] and this we
/// answer ourselves.
pub const HYPER_MAX_HEADERS: usize = 256;
/// hyper's read buffer (its default is about 400 KiB): a request head larger than this gets
/// hyper's bare 431. It only grows that large for a client that sends that much.
pub const HYPER_MAX_BUF: usize = 1024 * 1024;
/// After an accept error other than a failed connection (e.g. out of file descriptors), wait
/// this long before accepting again instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `app` until `shutdown` completes; then stops accepting, lets every connection
/// finish its current response and returns when all are closed (bound the wait outside).
pub async fn serve<S>(listener: TcpListener, app: axum::Router, shutdown: S) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_headers(HYPER_MAX_HEADERS)
        .max_buf_size(HYPER_MAX_BUF);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a sender; `recv` returns `None` once all are gone.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, client) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(client));
            let app = app.clone();
            async move {
                if let Err(refused) = check_headers(req.headers()) {
                    return Ok::<Response, Infallible>(refused.into_response());
                }
                app.oneshot(req.map(axum::body::Body::new)).await
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut stop = stop_rx.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = async { drop(stop.wait_for(|s| *s).await) } => {
                    // Finish the response in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client.addr = %client, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
    Ok(())
}

/// Our header limits, checked before any handler runs.
pub fn check_headers(headers: &http::HeaderMap) -> Result<(), RegistryError> {
    let count = headers.len();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if count > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(RegistryError::HeadersTooLarge);
    }
    Ok(())
}

/// Errors of one connection that say nothing about the listener (as hyper-util and axum
/// treat them).
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_limits() {
        let many = |n: usize, value: &str| {
            let mut h = http::HeaderMap::new();
            for i in 0..n {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()),
                    http::HeaderValue::from_str(value),
                ) {
                    h.insert(k, v);
                }
            }
            h
        };
        let cases = [
            ("containerd-like", many(8, "v"), true),
            ("at the count limit", many(MAX_HEADERS, "v"), true),
            ("one over the count", many(MAX_HEADERS + 1, "v"), false),
            (
                "one big value",
                many(1, &"a".repeat(MAX_HEADER_BYTES)),
                false,
            ),
            (
                "just under the bytes",
                many(1, &"a".repeat(MAX_HEADER_BYTES - 8)),
                true,
            ),
        ];
        for (name, headers, ok) in cases {
            assert_eq!(check_headers(&headers).is_ok(), ok, "{name}");
        }
    }
}
