//! Pure OCI types with no I/O: digests, image references, `/v2/` paths, `Range` headers, media
//! types and the distribution-spec error codes. Everything that parses untrusted input lives
//! here so it can be table-tested and fuzzed in isolation.

pub mod digest;
pub mod error;
pub mod media;
pub mod path;
pub mod range;
pub mod reference;

pub use digest::Digest;
pub use path::{Kind, Target, V2Path};
pub use range::ByteRange;
pub use reference::Reference;
