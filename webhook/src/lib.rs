//! `speculum-webhook`: a mutating admission webhook that pins image tags to digests
//! (`name:tag` → `name:tag@sha256:…`), so reused tags cannot make a peer-to-peer cache serve a
//! stale image.
//!
//! # Layout
//! - [`review`]: the AdmissionReview envelope: decoding with clear errors, encoding responses.
//! - [`mutate`]: the pure part: image sites of every workload kind → JSON Patch.
//! - [`policy`]: per image pin / skip / deny (`skipPrefixes`, strict namespaces, or Rego).
//! - [`credentials`]: the `CredentialSource` seam (kube, memory) and pull-secret matching.
//! - [`resolve`]: tag → digest through oci-client, with the cluster's speculum daemons as the
//!   fallback when a registry is down; [`cache`] keys answers by credential identity.
//! - [`grants`]: pull grants for private images on new Pods (signing, annotation, key publishing).
//! - [`admit`]: one admission start to end, shared with the offline [`pin`] command.
//! - [`audit`], [`metrics`]: a line per image decision; the webhook's Prometheus registry.
//! - [`certs`]: serving certificates: self-managed CA + rotation, or files (cert-manager).
//! - [`server`]: HTTPS `/mutate`, `/readyz`, `/livez`; metrics on a separate port.
//! - [`config`]: defaults → YAML → flags, validated at once.

pub mod admit;
pub mod audit;
pub mod cache;
pub mod certs;
pub mod config;
pub mod credentials;
pub mod grants;
pub mod metrics;
pub mod mutate;
pub mod pin;
pub mod policy;
pub mod resolve;
pub mod review;
pub mod server;
