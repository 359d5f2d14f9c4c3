//! Serving an axum app on a TCP listener over HTTP/1.1, with our own header limits and, for
//! `GET`/`HEAD`, our own writer that can send blob bodies with `sendfile(2)`.
//!
//! What `axum::serve` does (accept, `ConnectInfo`, graceful shutdown), plus two things it
//! cannot:
//! - Refusals with the application's body. hyper answers requests it refuses itself (too
//!   many headers, header section over its buffer, unparseable request line) with a bare
//!   status and no body. Our limits ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`]) are enforced here,
//!   where the refusal is the caller's response ([`ServeOptions::refuse`]; the registry's is a
//!   431 with an OCI error body like every other error).
//! - Zero-copy blob bodies. With [`ServeOptions::sendfile`] (the default) each connection is
//!   first read by [`super::http1`], which answers bodiless requests itself and sends content
//!   files with `sendfile(2)`; the first request it does not handle (a request body, an
//!   upgrade, HTTP/1.0, another method) hands the connection, with the bytes already read
//!   put back in front ([`Rewind`]), to hyper for the rest of its life.
//!
//! hyper's limits are raised a little above ours ([`HYPER_MAX_HEADERS`], [`HYPER_MAX_BUF`]).
//! What still gets hyper's bare answer (ROBUSTNESS.md §1): on connections hyper serves (all of
//! them with `sendfile` off; after a hand-off otherwise), a header section beyond
//! `HYPER_MAX_BUF` or with more than `HYPER_MAX_HEADERS` fields (431), and a request line
//! hyper cannot parse (400). With `sendfile` on, the first request of a connection and every
//! `GET`/`HEAD` before a hand-off are parsed by `http1`, which answers all of those with OCI
//! bodies.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::Response;
use bytes::{Buf, Bytes};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt as _;

use super::http1::{self, Ended};
use super::options::{HYPER_MAX_BUF, HYPER_MAX_HEADERS, ServeOptions, check_headers};
#[cfg(doc)]
use super::options::{MAX_HEADER_BYTES, MAX_HEADERS};

/// After an accept error other than a failed connection (e.g. out of file descriptors), wait
/// this long before accepting again instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `app` until `shutdown` completes; then stops accepting, lets every connection
/// finish its current response and returns when all are closed (bound the wait outside).
pub async fn serve<S>(
    listener: TcpListener,
    app: axum::Router,
    options: ServeOptions,
    shutdown: S,
) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_headers(HYPER_MAX_HEADERS)
        .max_buf_size(HYPER_MAX_BUF)
        // hyper's own bound for a request head, on the connections it serves.
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.idle);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a sender; `recv` returns `None` once all are gone.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (mut stream, client) = tokio::select! {
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
        let http = http.clone();
        let mut stop = stop_rx.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let _open = open;
            let read = if options.sendfile {
                match http1::serve(&mut stream, client, &app, &mut stop, options).await {
                    Ended::Closed => return,
                    Ended::Handoff(read) => read,
                }
            } else {
                Bytes::new()
            };
            let io = TokioIo::new(Rewind {
                read,
                inner: stream,
            });
            hyper_connection(&http, io, app, client, stop, options.refuse).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
    Ok(())
}

/// Serves one connection with hyper until it closes; on shutdown, finishes the response in
/// flight and closes.
async fn hyper_connection(
    http: &hyper::server::conn::http1::Builder,
    io: TokioIo<Rewind>,
    app: axum::Router,
    client: SocketAddr,
    mut stop: watch::Receiver<bool>,
    refuse: fn(super::Refusal) -> Response,
) {
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(client));
        let app = app.clone();
        async move {
            if let Err(refused) = check_headers(req.headers()) {
                return Ok::<Response, Infallible>(refuse(refused));
            }
            app.oneshot(req.map(axum::body::Body::new)).await
        }
    });
    let conn = http.serve_connection(io, service);
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
}

/// A socket with bytes already read from it put back in front: what hyper reads first after
/// a hand-off from [`super::http1`]. Writes go straight to the socket.
pub(crate) struct Rewind {
    read: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
