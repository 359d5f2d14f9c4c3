//! `RegistryError`: every way a registry request can fail, and the one place where errors
//! become HTTP responses with an OCI error body (distribution spec, "Error Codes"), also for
//! the requests the transport refuses ([`refusal`]).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::oci::error::ErrorCode;
use crate::oci::path::PathError;
use crate::oci::range::RangeError;
use crate::server::Refusal;

/// Errors of the registry seam. Each maps to exactly one status and error code.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("blob unknown")]
    BlobUnknown,
    #[error("{source}")]
    Range {
        #[source]
        source: RangeError,
        /// The blob size, sent back in `Content-Range: bytes */size` (RFC 9110, 15.5.17).
        size: u64,
    },
    #[error("only GET and HEAD are supported: this is a pull-only mirror")]
    MethodNotAllowed,
    /// Peer endpoint: the request carries no valid proof that a daemon of this cluster sent it.
    #[error("peer authentication required: {0}")]
    Unauthorized(&'static str),
    /// Peer endpoint: an authenticated daemon asked for a private object without a grant that
    /// covers it (the reason names the check that failed).
    #[error("{0}")]
    Denied(String),
    /// Over our header limits (`server::options`); RFC 6585, 5.
    #[error("{}", Refusal::HeadersTooLarge)]
    HeadersTooLarge,
    /// A request head that is not HTTP/1.1 at all (a raw space or non-ASCII byte in the
    /// target, a bad method token or version): refused by the transport's own parser
    /// (`server::http1`), so that it too gets an OCI body. RFC 9112, 3.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Peer endpoint: this node already serves as many blob streams to peers as
    /// `registry.peer_serving_limit` allows; the asker moves on to another holder.
    #[error("serving {serving} blob streams to peers, the limit")]
    Busy { serving: u32 },
}

impl From<Refusal> for RegistryError {
    fn from(r: Refusal) -> RegistryError {
        match r {
            Refusal::HeadersTooLarge => RegistryError::HeadersTooLarge,
            Refusal::Malformed(why) => RegistryError::Malformed(why),
        }
    }
}

/// The registry's answer to a request the transport refuses ([`ServeOptions::refuse`](crate::server::ServeOptions)):
/// the same OCI error body as every other error.
pub fn refusal(r: Refusal) -> Response {
    RegistryError::from(r).into_response()
}

impl RegistryError {
    fn code(&self) -> ErrorCode {
        match self {
            RegistryError::Path(PathError::NotFound) => ErrorCode::NameUnknown,
            RegistryError::Path(
                PathError::NameInvalid | PathError::NsInvalid | PathError::NsConflict,
            ) => ErrorCode::NameInvalid,
            RegistryError::Path(PathError::TagInvalid) => ErrorCode::ManifestUnknown,
            RegistryError::Path(PathError::DigestInvalid(_)) => ErrorCode::DigestInvalid,
            RegistryError::ManifestUnknown => ErrorCode::ManifestUnknown,
            RegistryError::BlobUnknown => ErrorCode::BlobUnknown,
            RegistryError::Range { .. } => ErrorCode::RangeInvalid,
            RegistryError::MethodNotAllowed
            | RegistryError::HeadersTooLarge
            | RegistryError::Malformed(_) => ErrorCode::Unsupported,
            RegistryError::Unauthorized(_) => ErrorCode::Unauthorized,
            RegistryError::Denied(_) => ErrorCode::Denied,
            RegistryError::Busy { .. } => ErrorCode::TooManyRequests,
        }
    }

    /// The status sent. Invalid tags are 400 (distribution answers `MANIFEST_INVALID`-style
    /// errors for references it cannot parse); everything else follows the code's status.
    pub fn status(&self) -> StatusCode {
        match self {
            RegistryError::Path(PathError::TagInvalid) => StatusCode::BAD_REQUEST,
            RegistryError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            RegistryError::Malformed(_) => StatusCode::BAD_REQUEST,
            other => other.code().status(),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let code = self.code();
        let mut response = (self.status(), code.body(&self.to_string())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let RegistryError::Range { size, .. } = self
            && let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}"))
        {
            headers.insert(header::CONTENT_RANGE, v);
        }
        if code == ErrorCode::Unauthorized {
            // RFC 9110, 11.6.1: a 401 names the scheme it wants.
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"speculum-peer\""),
            );
        }
        if let RegistryError::Busy { .. } = self {
            // RFC 6585, 4: how long to wait; a daemon moves to the next holder at once anyway.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let RegistryError::MethodNotAllowed = self {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        response
    }
}
