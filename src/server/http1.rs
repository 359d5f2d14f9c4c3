//! Our own HTTP/1.1 server side for requests without a body (`GET` and `HEAD`): read and
//! parse the request head, call the app, write the response. Its reason to exist is the one
//! thing hyper cannot do: send a blob body straight from its content file with `sendfile(2)`
//! (a response carrying a [`FileBody`], see [`super::file_body`]), so the bytes go from the page
//! cache to the socket without being copied through user space.
//!
//! It leaves to hyper everything else: a request with a body, an upgrade, `Expect`, HTTP/1.0,
//! any method but `GET`/`HEAD`. For those it returns the bytes it has read
//! ([`Ended::Handoff`]) and [`super::listen`] hands the connection, with those bytes put back in
//! front, to hyper for the rest of its life.
//!
//! What it keeps from hyper's behaviour: keep-alive and pipelining (requests are answered in
//! order; bytes after one head stay buffered for the next), `Connection: close`, a `date`
//! header, `content-length` from the body when the handler set none (else chunked), no body
//! for `HEAD`/204/304, and graceful shutdown (an idle connection closes at once, a response in
//! flight is finished and then the connection closes). What it adds: every refusal is an OCI
//! error body, also for request lines hyper could not parse (400 `UNSUPPORTED`) and heads over
//! [`MAX_HEAD_BYTES`] (431), and a response whose bytes make no progress for the write stall
//! timeout is abandoned, so a client that stops reading cannot pin a task.
//!
//! `sendfile` on a non-blocking socket never waits for the peer, but it would wait for the
//! disk when the file's pages are not cached (nginx's `sendfile on` does, without `aio
//! threads`). So before each call (at most [`SENDFILE_CHUNK`] bytes) one byte at its offset is
//! read with `RWF_NOWAIT`; if that page is not cached, the chunk is read on tokio's blocking
//! pool first ([`warm`]), and `sendfile` then finds it in the page cache. Blobs served here
//! were usually written by containerd recently and are cached: the probe is one cheap
//! syscall per chunk.

use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::ServiceExt as _;

use super::file_body::{FileBody, FileSend};
use super::options::{MAX_HEADER_BYTES, MAX_HEADERS, Refusal, ServeOptions, check_headers};

/// Most bytes of a request line (method, target, version). containerd's longest are a few
/// hundred bytes; a longer head is refused with 431 before it is parsed further.
pub(crate) const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Most bytes of a whole request head this writer buffers: the request line plus our header
/// limit. Anything larger is answered 431 without reading the rest.
pub(crate) const MAX_HEAD_BYTES: usize = MAX_REQUEST_LINE + MAX_HEADER_BYTES;
/// Upper bound of one `sendfile` call: the socket buffer usually limits a call to less; the
/// cap bounds how long one call can wait for the disk on uncached pages.
pub(crate) const SENDFILE_CHUNK: usize = 1024 * 1024;
/// Bytes read from the socket at a time while waiting for a head.
const READ_CHUNK: usize = 8 * 1024;
/// Small bodies (errors, manifests) up to this size go out in one write with the head.
const COALESCE_BYTES: usize = 16 * 1024;
/// After refusing a request the connection closes; its unread bytes are drained for at most
/// this long first, so the refusal is not lost to a TCP reset (RFC 9112, 9.6).
const LINGER: Duration = Duration::from_secs(1);

/// How one connection's time with this writer ended.
pub(super) enum Ended {
    /// The connection is done (closed by either side, refused, failed or shut down).
    Closed,
    /// A request this writer does not handle: these bytes (read but not answered, starting
    /// with that request's head) belong in front of the socket for hyper.
    Handoff(Bytes),
}

/// One parsed request head.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per request head, moved once: boxing would only add an allocation"
)]
enum Parsed {
    /// Ours to answer. `head_len` bytes of the buffer hold it.
    Serve {
        request: Request<Body>,
        head_len: usize,
        keep_alive: bool,
    },
    /// Hyper's to answer.
    Handoff,
}

/// Serves requests on `stream` until it closes, `stop` turns true while no request is in
/// flight, or a request needs hyper. `options.write_stall` bounds every wait for the socket to
/// take more bytes; `options.idle` bounds the wait for each complete request head.
pub(super) async fn serve(
    stream: &mut TcpStream,
    client: SocketAddr,
    app: &axum::Router,
    stop: &mut watch::Receiver<bool>,
    options: ServeOptions,
) -> Ended {
    let write_stall = options.write_stall;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        // Draining: requests already pipelined behind the last response are not started.
        if *stop.borrow() {
            return Ended::Closed;
        }
        // The whole next head must arrive by then (from the connection's start or the end
        // of the previous response), however its bytes trickle in.
        let head_deadline = tokio::time::Instant::now() + options.idle;
        let parsed = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Ok(Some(p)) => break Ok(p),
                    Ok(None) if buf.len() >= MAX_HEAD_BYTES => {
                        break Err(Refusal::HeadersTooLarge);
                    }
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
            }
            buf.reserve(READ_CHUNK);
            let read = tokio::select! {
                r = stream.read_buf(&mut buf) => r,
                // Between requests (or inside a half-sent head) nothing is in flight: close.
                () = stopped(stop) => return Ended::Closed,
                () = tokio::time::sleep_until(head_deadline) => {
                    tracing::debug!(client.addr = %client, "no complete request head within the idle timeout; closing");
                    return Ended::Closed;
                }
            };
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            }
        };
        let (request, head_len, keep_alive) = match parsed {
            Ok(Parsed::Serve {
                request,
                head_len,
                keep_alive,
            }) => (request, head_len, keep_alive),
            Ok(Parsed::Handoff) => return Ended::Handoff(buf.freeze()),
            Err(refused) => {
                tracing::debug!(client.addr = %client, error = %refused, "request head refused");
                // Where this request ends is unknown, so the connection cannot go on.
                let _ =
                    write_response(stream, (options.refuse)(refused), false, false, write_stall)
                        .await;
                linger(stream).await;
                return Ended::Closed;
            }
        };
        buf.advance(head_len);
        let head_only = request.method() == Method::HEAD;
        let response = match check_headers(request.headers()) {
            Err(refused) => (options.refuse)(refused),
            Ok(()) => {
                let mut request = request;
                request.extensions_mut().insert(ConnectInfo(client));
                match app.clone().oneshot(request).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
        };
        // Shutdown began while the handler ran: this response is the connection's last.
        let keep_alive = keep_alive && !*stop.borrow();
        match write_response(stream, response, head_only, keep_alive, write_stall).await {
            Ok(true) => {}
            Ok(false) => {
                linger(stream).await;
                return Ended::Closed;
            }
            Err(e) => {
                tracing::debug!(client.addr = %client, error = %e, "response not completed");
                return Ended::Closed;
            }
        }
    }
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete, an error for a
/// head we refuse (the connection then closes).
fn parse(buf: &[u8]) -> Result<Option<Parsed>, Refusal> {
    // One slot more would be over the limit: httparse reports that as TooManyHeaders.
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(e) => return Err(Refusal::Malformed(parse_error(e))),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Malformed("incomplete request line"));
    };
    // HTTP/1.0 has other keep-alive and framing rules: hyper knows them.
    if version != 1 {
        return Ok(Some(Parsed::Handoff));
    }
    let method = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        _ => return Ok(Some(Parsed::Handoff)),
    };
    let uri: http::Uri = target
        .parse()
        .map_err(|_| Refusal::Malformed("invalid request target"))?;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Refusal::Malformed("invalid header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Refusal::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    for value in headers.get_all(header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case("upgrade") {
                return Ok(Some(Parsed::Handoff));
            }
        }
    }
    // A body (RFC 9112, 6.3: Transfer-Encoding or a non-zero Content-Length), an upgrade or an
    // `Expect: 100-continue`: hyper's job.
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0");
    if has_body || headers.contains_key(header::UPGRADE) || headers.contains_key(header::EXPECT) {
        return Ok(Some(Parsed::Handoff));
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(Some(Parsed::Serve {
        request,
        head_len,
        keep_alive,
    }))
}

/// What [`serve`] makes of the bytes at the start of a connection's buffer (for the fuzz
/// target, `fuzz/targets/oci.rs`, and the tests).
#[derive(Debug, PartialEq, Eq)]
pub enum Classified {
    /// Not a whole head yet: more bytes are read (up to [`MAX_HEAD_BYTES`]).
    Partial,
    /// Answered here; the head is the first `head_len` bytes.
    Serve { head_len: usize, keep_alive: bool },
    /// Handed to hyper.
    Handoff,
    /// Refused with this status and an OCI body; the connection closes.
    Refused(u16),
}

/// Classifies `buf` as [`serve`] would.
pub fn classify(buf: &[u8]) -> Classified {
    match parse(buf) {
        Ok(None) => Classified::Partial,
        Ok(Some(Parsed::Serve {
            head_len,
            keep_alive,
            ..
        })) => Classified::Serve {
            head_len,
            keep_alive,
        },
        Ok(Some(Parsed::Handoff)) => Classified::Handoff,
        Err(e) => Classified::Refused(e.status().as_u16()),
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Token => "invalid token in the request line or a header name",
        httparse::Error::Version => "invalid HTTP version (or a raw space in the target)",
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "invalid request",
    }
}

/// How the body is delimited on the wire.
enum Framing {
    /// No body (HEAD, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes `response`. `Ok(true)` when the connection can carry another request.
async fn write_response(
    stream: &mut TcpStream,
    response: Response,
    head_only: bool,
    keep_alive: bool,
    write_stall: Duration,
) -> io::Result<bool> {
    let (mut parts, body) = response.into_parts();
    let headers = &mut parts.headers;
    let status = parts.status;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let framing = match (
        bodiless,
        declared,
        axum::body::HttpBody::size_hint(&body).exact(),
    ) {
        (true, _, _) => Framing::None,
        (false, Some(n), _) => Framing::Length(n),
        (false, None, Some(n)) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Framing::Length(n)
        }
        (false, None, None) => {
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            Framing::Chunked
        }
    };
    let keep_alive = keep_alive
        && !headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    if !keep_alive && !headers.contains_key(header::CONNECTION) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if !headers.contains_key(header::DATE)
        && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now()))
    {
        headers.insert(header::DATE, v);
    }
    let mut head = Vec::with_capacity(256 + 32 * headers.len());
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");

    // The file is sent only when it is exactly the declared body; otherwise the body streams.
    let file = parts
        .extensions
        .remove::<FileBody>()
        .filter(|f| matches!(framing, Framing::Length(n) if n == f.len()));
    match framing {
        Framing::None => {
            timed(write_stall, stream.write_all(&head)).await?;
            Ok(keep_alive)
        }
        Framing::Length(_) if file.is_some() => {
            // Claimed before anything is written: from here the sender owns the audit record,
            // written with the bytes really sent however this ends. `body` (dropped after it)
            // then writes none.
            let mut send = file.map(FileBody::claim);
            // Corked (nginx's `tcp_nopush`): the head and the file leave in full-sized
            // segments, and a small file shares the head's packet instead of waiting behind
            // it for the client's delayed ACK (Nagle). Uncorking sends what is left.
            let corked = rustix::net::sockopt::set_tcp_cork(&*stream, true).is_ok();
            let sent = async {
                timed(write_stall, stream.write_all(&head)).await?;
                if let Some(send) = &mut send {
                    send_file(stream, send, write_stall).await?;
                }
                Ok::<(), io::Error>(())
            }
            .await;
            if corked {
                let _ = rustix::net::sockopt::set_tcp_cork(&*stream, false);
            }
            sent?;
            drop(send);
            drop(body);
            Ok(keep_alive)
        }
        Framing::Length(len) => {
            let sent = write_stream(stream, head, body, Some(len), write_stall).await?;
            // A body shorter than it said (the content ended early): the client must not
            // read the next response as the rest of this one.
            Ok(keep_alive && sent == len)
        }
        Framing::Chunked => {
            write_stream(stream, head, body, None, write_stall).await?;
            Ok(keep_alive)
        }
    }
}

/// Writes `head` and then the body's data frames, with chunked encoding when `len` is `None`
/// and cut at `len` otherwise. Returns the body bytes written; a body error is an error.
async fn write_stream(
    stream: &mut TcpStream,
    mut head: Vec<u8>,
    mut body: Body,
    len: Option<u64>,
    write_stall: Duration,
) -> io::Result<u64> {
    let mut sent = 0u64;
    let mut pending = Some(&mut head);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers: not sent over HTTP/1.1 without a TE: trailers request
        };
        if let Some(len) = len {
            let left = len - sent;
            if data.len() as u64 > left {
                data.truncate(left as usize);
            }
        }
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        let framed = match len {
            Some(_) => data,
            None => {
                let mut c = BytesMut::with_capacity(data.len() + 16);
                c.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                c.extend_from_slice(&data);
                c.extend_from_slice(b"\r\n");
                c.freeze()
            }
        };
        match pending.take() {
            Some(h) if h.len() + framed.len() <= COALESCE_BYTES => {
                h.extend_from_slice(&framed);
                timed(write_stall, stream.write_all(h)).await?;
            }
            Some(h) => {
                timed(write_stall, stream.write_all(h)).await?;
                timed(write_stall, stream.write_all(&framed)).await?;
            }
            None => timed(write_stall, stream.write_all(&framed)).await?,
        }
        if len.is_some_and(|l| sent >= l) {
            break;
        }
    }
    let mut tail: &[u8] = if len.is_none() { b"0\r\n\r\n" } else { b"" };
    if let Some(h) = pending.take() {
        h.extend_from_slice(tail);
        tail = b"";
        timed(write_stall, stream.write_all(h)).await?;
    }
    if !tail.is_empty() {
        timed(write_stall, stream.write_all(tail)).await?;
    }
    Ok(sent)
}

/// Sends the rest of `send`'s file region to the socket with `sendfile(2)`, waiting for the
/// socket to drain in between (never blocking the runtime on it).
async fn send_file(
    stream: &TcpStream,
    send: &mut FileSend,
    write_stall: Duration,
) -> io::Result<()> {
    while send.remaining() > 0 {
        let count = usize::try_from(send.remaining())
            .unwrap_or(usize::MAX)
            .min(SENDFILE_CHUNK);
        if !cached(send.file(), send.position()) {
            warm(send.shared_file(), send.position(), count).await?;
        }
        timed(write_stall, stream.writable()).await?;
        let mut offset = send.position();
        let result = stream.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(stream, send.file(), Some(&mut offset), count)
                .map_err(io::Error::from)
        });
        match result {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "content file ended before its size",
                ));
            }
            Ok(n) => send.advance(n as u64),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether the page holding `offset` is in the page cache (a read of it would not wait for
/// the disk). Anything but "would block" counts as cached: `sendfile` reports real errors.
fn cached(file: &std::fs::File, offset: u64) -> bool {
    let mut byte = [0u8; 1];
    let probe = rustix::io::preadv2(
        file,
        &mut [io::IoSliceMut::new(&mut byte)],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    !matches!(probe, Err(rustix::io::Errno::AGAIN))
}

/// Reads `len` bytes of `file` from `offset` on the blocking pool, so that they are in the
/// page cache when `sendfile` wants them. Through a small buffer: only the disk read matters.
async fn warm(file: std::sync::Arc<std::fs::File>, offset: u64, len: usize) -> io::Result<()> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut scratch = vec![0u8; 64 * 1024];
        let mut done = 0usize;
        while done < len {
            let want = scratch.len().min(len - done);
            match file.read_at(&mut scratch[..want], offset + done as u64)? {
                0 => break, // the end of the file: sendfile reports it
                n => done += n,
            }
        }
        Ok(())
    })
    .await
    .map_err(io::Error::other)?
}

/// `fut`, failing with `TimedOut` when it takes longer than `limit`.
async fn timed<T>(limit: Duration, fut: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled")))
}

/// Resolves once shutdown has begun (or the listener is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Closes our side, then reads and discards whatever the client still sends until it closes
/// too or [`LINGER`] passes.
async fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut scratch = [0u8; 4096];
        while let Ok(n) = stream.read(&mut scratch).await
            && n > 0
        {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `parse` makes of a head (the head length left out: the table checks it apart).
    #[derive(Debug, PartialEq)]
    enum Want {
        Partial,
        Serve { keep_alive: bool },
        Handoff,
        Refused(u16),
    }

    fn want(buf: &[u8]) -> Want {
        match classify(buf) {
            Classified::Partial => Want::Partial,
            Classified::Serve {
                head_len,
                keep_alive,
            } => {
                assert!(head_len <= buf.len());
                Want::Serve { keep_alive }
            }
            Classified::Handoff => Want::Handoff,
            Classified::Refused(status) => Want::Refused(status),
        }
    }

    #[test]
    fn head_table() {
        let many: String = (0..=MAX_HEADERS)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect();
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            (
                "get",
                b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                Want::Serve { keep_alive: true },
            ),
            (
                "head",
                b"HEAD /v2/ HTTP/1.1\r\n\r\n".to_vec(),
                Want::Serve { keep_alive: true },
            ),
            (
                "close",
                b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n".to_vec(),
                Want::Serve { keep_alive: false },
            ),
            (
                "close among tokens",
                b"GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n".to_vec(),
                Want::Serve { keep_alive: false },
            ),
            (
                "zero length",
                b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
                Want::Serve { keep_alive: true },
            ),
            ("partial line", b"GET /v2/".to_vec(), Want::Partial),
            (
                "partial headers",
                b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec(),
                Want::Partial,
            ),
            (
                "post",
                b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
                Want::Handoff,
            ),
            (
                "get with a body",
                b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
                Want::Handoff,
            ),
            (
                "chunked get",
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                Want::Handoff,
            ),
            (
                "http/1.0",
                b"GET / HTTP/1.0\r\n\r\n".to_vec(),
                Want::Handoff,
            ),
            (
                "upgrade",
                b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec(),
                Want::Handoff,
            ),
            (
                "expect",
                b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n".to_vec(),
                Want::Handoff,
            ),
            (
                "raw space",
                b"GET /v2/a b/manifests/x HTTP/1.1\r\n\r\n".to_vec(),
                Want::Refused(400),
            ),
            (
                "raw non-ascii",
                b"GET /v2/\xff\xfe/manifests/x HTTP/1.1\r\n\r\n".to_vec(),
                Want::Refused(400),
            ),
            (
                "bad method",
                b"G(T / HTTP/1.1\r\n\r\n".to_vec(),
                Want::Refused(400),
            ),
            (
                "bad version",
                b"GET / HTTP/2.0\r\n\r\n".to_vec(),
                Want::Refused(400),
            ),
            (
                "too many headers",
                format!("GET / HTTP/1.1\r\n{many}\r\n").into_bytes(),
                Want::Refused(431),
            ),
        ];
        for (name, buf, expected) in cases {
            assert_eq!(want(&buf), expected, "{name}");
        }
    }
}
