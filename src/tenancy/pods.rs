//! The node pod index and the pod directory.
//!
//! The index answers "which pods on this node wait for `registry/repository`?" (the policy
//! input `namespaces`, and the grants those pods carry) from memory on every request; the
//! directory answers "does pod `namespace/name` exist, and on which node?" for the serving side
//! of a grant check. Three sources implement the [`Pods`] seam:
//! - [`MemoryPods`] (`memory.rs`): the twin, filled by tests;
//! - [`FilePods`] (`file.rs`): a [`PodsFile`] listing every pod of the cluster, re-read when it
//!   changes (non-Kubernetes installs, the namespace-node rig);
//! - [`KubePods`] (`kube.rs`): a watcher on pods with `spec.nodeName=<node>` for the index and
//!   cached `GET`s for the directory.
//!
//! [`conformance`] is the one suite all three pass. Image matching lives here: every image is
//! parsed with the project's reference parser after Docker's defaults are applied
//! (`nginx` = `docker.io/library/nginx:latest`), and only registry + repository are compared;
//! tags and digests are ignored (a pod waiting for `app:v1` waits for every blob of `app`).
//! What a grant says, and whether it verifies, is not this module's business.

pub mod conformance;
mod file;
mod kube;
mod memory;

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::oci::Reference;

pub use file::{FilePods, PodsFile, PodsFileEntry};
pub use kube::KubePods;
pub use memory::MemoryPods;

/// The pod annotation holding the pull grants the webhook signed for the pod: a JSON array of
/// strings (compact JWTs).
pub const GRANTS_ANNOTATION: &str = "speculum.io/pull-grants";

/// At most this many grants are read from one pod's annotation (the rest are ignored).
const MAX_GRANTS_PER_POD: usize = 64;

/// What the tenancy checks need to know about one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName` (empty while unscheduled).
    pub node: String,
    /// Every container image as written in the spec (init, regular and ephemeral containers).
    pub images: Vec<String>,
    /// The tokens of the `speculum.io/pull-grants` annotation (a JSON array), unverified.
    pub grants: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    /// The source cannot be reached right now (API server down, file unreadable).
    #[error("pod source unavailable: {0}")]
    Unavailable(String),
}

/// The node pod index (pods bound to this node) and the pod directory (any pod by name).
#[async_trait]
pub trait Pods: Send + Sync + 'static {
    /// Pods bound to this node, not finished (phase Pending, Running or Unknown), with at least
    /// one image naming `registry/repository` (Docker defaults applied on both sides:
    /// `nginx` = `docker.io/library/nginx`). Answered from memory: called per request.
    fn waiting_for(&self, registry: &str, repository: &str) -> Vec<PodInfo>;

    /// One pod by namespace and name, on any node; `Ok(None)` when it does not exist.
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, PodsError>;

    /// True once the index holds a complete view (the watcher's first list is done).
    fn ready(&self) -> bool;
}

/// `registry` and `repository` of an image as written in a pod spec, with Docker's defaults
/// (`docker.io`, `library/`, `latest`) applied, checked by [`Reference::parse`]. `None` for
/// anything that is not an image reference.
pub(crate) fn image_repository(image: &str) -> Option<(String, String)> {
    let image = image.trim();
    if image.is_empty() || image.contains(char::is_whitespace) {
        return None;
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    // Docker's rule: the first component is a registry host when it looks like one.
    let (registry, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("docker.io", name),
    };
    let registry = normalize_registry(registry);
    let mut full = format!("{registry}/");
    if registry == "docker.io" && !rest.contains('/') {
        full.push_str("library/");
    }
    full.push_str(rest);
    let has_tag = rest
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'));
    if let Some(d) = digest {
        full.push('@');
        full.push_str(d);
    } else if !has_tag {
        full.push_str(":latest");
    }
    let reference = Reference::parse(&full).ok()?;
    Some((reference.registry, reference.repository))
}

/// The query side of the Docker defaults: `index.docker.io` = `docker.io`, and a one-part
/// Docker Hub repository lives under `library/`.
fn normalize_query(registry: &str, repository: &str) -> (String, String) {
    let registry = normalize_registry(registry);
    let repository = if registry == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    (registry.to_owned(), repository)
}

fn normalize_registry(registry: &str) -> &str {
    match registry {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

/// The grants of a pod's annotations: the [`GRANTS_ANNOTATION`] value parsed as a JSON array
/// of strings. Anything else (absent, not JSON, not an array of strings) means no grants.
pub(crate) fn grants_from_annotations(
    namespace: &str,
    name: &str,
    annotations: Option<&BTreeMap<String, String>>,
) -> Vec<String> {
    let Some(raw) = annotations.and_then(|a| a.get(GRANTS_ANNOTATION)) else {
        return Vec::new();
    };
    match serde_json::from_str::<Vec<String>>(raw) {
        Ok(mut grants) => {
            grants.retain(|g| !g.is_empty());
            grants.truncate(MAX_GRANTS_PER_POD);
            grants
        }
        Err(e) => {
            // The value may hold tokens: log the parse error only.
            tracing::debug!(pod.namespace = namespace, pod.name = name, error = %e, "pull-grants annotation is not a JSON array of strings; ignoring it");
            Vec::new()
        }
    }
}

/// True for the phases of a pod that will not start containers again.
fn finished_phase(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// One pod as the index holds it: its info, whether it finished, and its images parsed once.
#[derive(Debug, Clone)]
struct Indexed {
    info: PodInfo,
    finished: bool,
    repositories: Vec<(String, String)>,
}

impl Indexed {
    fn new(info: PodInfo, finished: bool) -> Indexed {
        let mut repositories: Vec<(String, String)> = info
            .images
            .iter()
            .filter_map(|i| image_repository(i))
            .collect();
        repositories.sort();
        repositories.dedup();
        Indexed {
            info,
            finished,
            repositories,
        }
    }
}

/// Pods by `(namespace, name)`, the common core of every source. Holds whatever pods it is
/// given; [`PodSet::waiting_for`] keeps those on `node` only.
#[derive(Debug, Clone, Default)]
struct PodSet {
    pods: HashMap<(String, String), Indexed>,
}

impl PodSet {
    fn upsert(&mut self, info: PodInfo, finished: bool) {
        let key = (info.namespace.clone(), info.name.clone());
        self.pods.insert(key, Indexed::new(info, finished));
    }

    fn remove(&mut self, namespace: &str, name: &str) -> bool {
        self.pods
            .remove(&(namespace.to_owned(), name.to_owned()))
            .is_some()
    }

    fn get(&self, namespace: &str, name: &str) -> Option<&Indexed> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    fn waiting_for(&self, node: &str, registry: &str, repository: &str) -> Vec<PodInfo> {
        let wanted = normalize_query(registry, repository);
        let mut found: Vec<PodInfo> = self
            .pods
            .values()
            .filter(|p| !p.finished && p.info.node == node)
            .filter(|p| p.repositories.contains(&wanted))
            .map(|p| p.info.clone())
            .collect();
        found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::type_complexity)]
    fn image_repository_table() {
        const D: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let some = |r: &str, p: &str| Some((r.to_owned(), p.to_owned()));
        let cases: Vec<(&str, String, Option<(String, String)>)> = vec![
            (
                "short name",
                "nginx".into(),
                some("docker.io", "library/nginx"),
            ),
            (
                "short name with tag",
                "nginx:1.27".into(),
                some("docker.io", "library/nginx"),
            ),
            (
                "hub user repo",
                "bitnami/redis:7".into(),
                some("docker.io", "bitnami/redis"),
            ),
            (
                "hub explicit",
                "docker.io/library/alpine:3.20".into(),
                some("docker.io", "library/alpine"),
            ),
            (
                "hub one part",
                "docker.io/alpine".into(),
                some("docker.io", "library/alpine"),
            ),
            (
                "index alias",
                "index.docker.io/library/alpine".into(),
                some("docker.io", "library/alpine"),
            ),
            (
                "registry with port",
                "127.0.0.1:5000/team/app:v1".into(),
                some("127.0.0.1:5000", "team/app"),
            ),
            (
                "digest only",
                format!("127.0.0.1:5000/team/app@{D}"),
                some("127.0.0.1:5000", "team/app"),
            ),
            (
                "tag and digest",
                format!("ghcr.io/a/b:t@{D}"),
                some("ghcr.io", "a/b"),
            ),
            ("localhost", "localhost/x".into(), some("localhost", "x")),
            ("empty", "".into(), None),
            ("upper case", "docker.io/Library/alpine:1".into(), None),
            ("bad digest", "127.0.0.1:5000/a@sha256:1".into(), None),
            ("space", "127.0.0.1:5000/a b:1".into(), None),
        ];
        for (name, image, want) in cases {
            assert_eq!(image_repository(&image), want, "{name}: {image}");
        }
    }

    #[test]
    fn grants_annotation_table() {
        let cases: Vec<(&str, Option<&str>, Vec<&str>)> = vec![
            ("absent", None, vec![]),
            (
                "array",
                Some(r#"["a.b.c","d.e.f"]"#),
                vec!["a.b.c", "d.e.f"],
            ),
            ("empty strings dropped", Some(r#"["", "x"]"#), vec!["x"]),
            ("not json", Some("a.b.c"), vec![]),
            ("object", Some(r#"{"a":1}"#), vec![]),
            ("numbers", Some("[1,2]"), vec![]),
        ];
        for (name, value, want) in cases {
            let annotations: Option<BTreeMap<String, String>> =
                value.map(|v| [(GRANTS_ANNOTATION.to_owned(), v.to_owned())].into());
            assert_eq!(
                grants_from_annotations("ns", "pod", annotations.as_ref()),
                want,
                "{name}"
            );
        }
    }
}
