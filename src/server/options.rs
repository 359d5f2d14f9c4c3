//! How a listener serves its connections, one job: the options ([`ServeOptions`]), our header
//! limits ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`], [`check_headers`]) and what the transport
//! refuses on its own ([`Refusal`]). The body of a refusal is the application's business: the
//! caller passes [`ServeOptions::refuse`] (the registry writes an OCI error body), so the
//! transport never names an application error type.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;

/// Most header fields a request may carry. containerd sends fewer than 10.
pub(crate) const MAX_HEADERS: usize = 100;
/// Most bytes of header names and values (plus `: ` and CRLF each) a request may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper refuses (bare 431) above this many fields; between [`MAX_HEADERS`] and this we
/// answer ourselves.
pub const HYPER_MAX_HEADERS: usize = 256;
/// hyper's read buffer (its default is about 400 KiB): a request head larger than this gets
/// hyper's bare 431. It only grows that large for a client that sends that much.
pub const HYPER_MAX_BUF: usize = 1024 * 1024;

/// The default of `registry.write_stall_timeout`: far beyond any pause of a client that is
/// still reading (containerd reads layers as fast as it can write them), short enough that
/// a vanished client is noticed well before file descriptors run out.
pub(crate) const DEFAULT_WRITE_STALL: Duration = Duration::from_secs(60);

/// The default of `registry.idle_timeout`: above the idle-connection timeouts of the clients
/// (90 s in containerd's Go `http.Transport`; 30 s in the daemons' own peer client, see
/// `src/wire/peer_client.rs`), so a client normally closes its idle connection first and never
/// sends a request into one we close.
pub(crate) const DEFAULT_IDLE: Duration = Duration::from_secs(120);

/// A request the transport refuses before any handler runs; the connection then closes
/// (except for [`Refusal::HeadersTooLarge`] found by [`check_headers`] on a parsed head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Over our header limits; RFC 6585, 5.
    #[error(
        "request header fields too large: at most {MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes"
    )]
    HeadersTooLarge,
    /// A request head that is not HTTP/1.1 at all (a raw space or non-ASCII byte in the
    /// target, a bad method token or version); RFC 9112, 3.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

impl Refusal {
    /// The status sent for it.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A bare answer (status and a text line): the default of [`ServeOptions::refuse`] for an
    /// application that has no error body of its own.
    pub fn plain(self) -> Response {
        (self.status(), format!("{self}\n")).into_response()
    }
}

/// How a listener serves its connections (`registry.sendfile`, `registry.write_stall_timeout`,
/// `registry.idle_timeout`, and the refusal body).
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Serve `GET`/`HEAD` with [`super::http1`] (blob bodies from content files with
    /// `sendfile(2)`); `false`: hyper serves every request and streams every body.
    pub sendfile: bool,
    /// With `sendfile`: a response whose bytes make no progress for this long is abandoned
    /// and its connection closed (a client that stops reading must not pin a task).
    pub write_stall: Duration,
    /// A connection gets this long, after it opens or after its last response, to deliver a
    /// complete request head; then it is closed. Bounds what an idle or trickling client
    /// (slowloris) holds: one descriptor and at most one head's buffer, for this long.
    pub idle: Duration,
    /// The response for a request the transport refuses (the registry's is an OCI error body,
    /// `registry::refusal`).
    pub refuse: fn(Refusal) -> Response,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            sendfile: true,
            write_stall: DEFAULT_WRITE_STALL,
            idle: DEFAULT_IDLE,
            refuse: Refusal::plain,
        }
    }
}

/// Our header limits, checked before any handler runs.
pub(crate) fn check_headers(headers: &http::HeaderMap) -> Result<(), Refusal> {
    let count = headers.len();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if count > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(Refusal::HeadersTooLarge);
    }
    Ok(())
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

    #[test]
    fn refusal_statuses() {
        let cases = [
            (Refusal::HeadersTooLarge, 431),
            (Refusal::Malformed("invalid request"), 400),
        ];
        for (refusal, status) in cases {
            assert_eq!(refusal.status().as_u16(), status, "{refusal:?}");
            assert_eq!(refusal.plain().status().as_u16(), status, "{refusal:?}");
        }
    }
}
