//! The node pod index and the pod directory.
//!
//! SKELETON: the trait and types below are the agreed interface; implementations
//! (`MemoryPods`, `FilePods`, `KubePods`) and the conformance suite are to be written.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

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
