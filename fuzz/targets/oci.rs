//! Fuzz target bodies for the daemon's parsers of untrusted input, as plain functions so the
//! same code runs under libFuzzer (`fuzz/fuzz_targets/*`) and as a stable smoke test in
//! `make test` (`tests/loopback/fuzz_smoke.rs` includes this file). Each checks a property, not only
//! "no panic": what a parser accepts must print back to exactly what it was given, and what
//! it hands on must be within bounds.
//!
//! Included with `#[path]`, so it names `speculum` directly and uses no crate of its own.

use speculum::oci::media;
use speculum::oci::path::{parse_ns, parse_v2_path, valid_name};
use speculum::oci::range::parse_range;
use speculum::oci::{Digest, Reference};
use speculum::registry::PullRequest;
use speculum::server::http1::{Classified, classify};

/// `sha256:…` and `sha512:…`: accepted digests round-trip byte for byte (only the canonical
/// form is accepted, so a URL and the store always name the same bytes).
pub fn digest(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s, "digest does not round-trip");
        assert_eq!(
            d.hex().len(),
            if s.starts_with("sha256:") { 64 } else { 128 }
        );
    }
}

/// `registry/repo:tag@digest`: accepted references print back and parse to the same value.
pub fn reference(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::parse(s) {
        assert!(
            valid_name(&r.repository),
            "invalid repository accepted: {s:?}"
        );
        assert!(
            parse_ns(&r.registry).is_ok(),
            "invalid registry accepted: {s:?}"
        );
        let again = Reference::parse(&r.to_string());
        assert_eq!(
            again.as_ref().ok(),
            Some(&r),
            "reference does not round-trip: {s:?}"
        );
    }
}

/// `/v2/<name>/(manifests|blobs)/<reference>`: an accepted path is exactly the one its parts
/// print as (no normalisation that could turn `..` or `%2F` into something else).
pub fn v2_path(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = parse_v2_path(s) {
        assert!(valid_name(&p.name));
        assert_eq!(
            format!("/v2/{}/{}s/{}", p.name, p.kind.as_str(), p.target),
            s,
            "path does not round-trip"
        );
    }
    let _ = parse_ns(s);
}

/// `Range: bytes=…` against a size taken from the first 8 bytes: an accepted range lies
/// inside the blob.
pub fn range(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (size, header) = data.split_at(8);
    let mut b = [0u8; 8];
    b.copy_from_slice(size);
    // Small sizes are where the edge cases are (0, 1, suffix longer than the blob): half the
    // inputs use one byte of size, the other half the full 64 bits.
    let size = if b[7] & 0x80 == 0 {
        u64::from(b[0])
    } else {
        u64::from_le_bytes(b)
    };
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    if let Ok(r) = parse_range(header, size) {
        assert!(
            r.start <= r.end && r.end < size,
            "{r:?} outside a blob of {size} bytes"
        );
        assert_eq!(r.len(), r.end - r.start + 1);
    }
}

/// Manifest/index detection and child extraction on arbitrary bytes.
pub fn media(data: &[u8]) {
    let t = media::detect(data);
    if t != media::OCTET_STREAM {
        // Only a JSON object is ever given a document type.
        let first = data.iter().find(|b| !b.is_ascii_whitespace());
        assert_eq!(first, Some(&b'{'), "{t} detected for non-object input");
    }
    let _ = media::is_manifest_type(t) || media::is_index_type(t);
    for c in media::children(data) {
        // Children are parsed digests: canonical by construction.
        assert_eq!(c.digest.to_string().parse::<Digest>().ok(), Some(c.digest));
    }
}

/// The whole request parser: method, URI and a `Range` header from the input. An accepted
/// request's peer path parses back to the same request (what is forwarded to a peer is what
/// was asked for).
pub fn pull_request(data: &[u8]) {
    let (head, rest) = match data.split_first() {
        Some((m, rest)) => (m & 1 == 1, rest),
        None => return,
    };
    let (uri, range) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let Ok(uri) = http::Uri::try_from(uri) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    if let Some(r) = range
        && let Ok(v) = http::HeaderValue::from_bytes(r)
    {
        headers.insert(http::header::RANGE, v);
    }
    let method = if head {
        http::Method::HEAD
    } else {
        http::Method::GET
    };
    let client = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    if let Ok(req) = PullRequest::parse(&method, &uri, &headers, client) {
        let peer: http::Uri = req.peer_path().parse().expect("peer path is a valid URI");
        let again = PullRequest::parse(&method, &peer, &http::HeaderMap::new(), client)
            .expect("peer path parses");
        assert_eq!(again.path, req.path);
        assert_eq!(again.ns, req.ns);
        let _ = req.key();
    }
}

/// The start of a connection (`server::http1`, the GET/HEAD writer in front of hyper): never a
/// panic; a head it serves lies within the bytes, is found again in exactly those bytes (the
/// bytes after it stay for the next request), and is only ever a GET or HEAD; a refusal is a
/// 400 or 431.
pub fn http_head(data: &[u8]) {
    match classify(data) {
        Classified::Serve {
            head_len,
            keep_alive,
        } => {
            assert!(
                head_len > 0 && head_len <= data.len(),
                "head length out of bounds"
            );
            assert_eq!(
                classify(&data[..head_len]),
                Classified::Serve {
                    head_len,
                    keep_alive
                },
                "the head alone classifies differently"
            );
            // httparse skips empty lines before a request line (RFC 9112, 2.2).
            let start = data
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .unwrap_or(0);
            let line = &data[start..];
            assert!(
                line.starts_with(b"GET ") || line.starts_with(b"HEAD "),
                "served a head that is not GET or HEAD: {:?}",
                String::from_utf8_lossy(&data[..head_len.min(64)])
            );
        }
        Classified::Refused(status) => {
            assert!(matches!(status, 400 | 431), "refused with {status}");
        }
        Classified::Partial | Classified::Handoff => {}
    }
}
