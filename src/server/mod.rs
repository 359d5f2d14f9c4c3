//! The HTTP/1.1 transport, one job: serve *an* axum app on a TCP listener — accept, our header
//! limits, graceful drain, and the `GET`/`HEAD` writer that sends file bodies with
//! `sendfile(2)`. It knows no registry, store or policy (pingora's `protocols/` under `apps/`):
//! what a refusal says is the caller's ([`ServeOptions::refuse`]), what a sent file means is
//! the caller's ([`SendObserver`]).
//!
//! - [`listen`]: the accept loop, hand-off to hyper, drain ([`serve`]).
//! - [`http1`]: our own writer for bodiless requests (sendfile, OCI-style refusals).
//! - [`options`]: [`ServeOptions`], header limits, [`Refusal`].
//! - [`file_body`]: the [`FileBody`] response extension and [`SendObserver`].
//!
//! Tests serve their apps through this same transport (`speculum::server::serve`), so every
//! suite runs the production writer.

pub(crate) mod file_body;
pub mod http1;
pub mod listen;
pub mod options;

pub use file_body::{FileBody, FileSend, SendObserver};
pub use listen::serve;
pub use options::{Refusal, ServeOptions};
