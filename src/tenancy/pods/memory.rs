//! [`MemoryPods`]: the in-memory twin of the pod index and directory, filled by tests.

use std::sync::RwLock;

use async_trait::async_trait;

use super::{PodInfo, PodSet, Pods, PodsError};

/// Pods held in memory. The node is fixed at construction; the directory is every pod
/// inserted, on any node. Always ready.
#[derive(Debug)]
pub struct MemoryPods {
    node: String,
    pods: RwLock<PodSet>,
}

impl MemoryPods {
    pub fn new(node: impl Into<String>) -> MemoryPods {
        MemoryPods {
            node: node.into(),
            pods: RwLock::new(PodSet::default()),
        }
    }

    /// The node this index is for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Adds or replaces a running pod.
    pub fn insert(&self, pod: PodInfo) {
        self.write().upsert(pod, false);
    }

    /// Marks a pod finished (phase Succeeded or Failed): it leaves the index, stays in the
    /// directory. False when there is no such pod.
    pub fn finish(&self, namespace: &str, name: &str) -> bool {
        let mut pods = self.write();
        let Some(info) = pods.get(namespace, name).map(|p| p.info.clone()) else {
            return false;
        };
        pods.upsert(info, true);
        true
    }

    /// Removes a pod; false when there was none.
    pub fn remove(&self, namespace: &str, name: &str) -> bool {
        self.write().remove(namespace, name)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodSet> {
        // A panic while holding the lock cannot leave a PodSet half-written in a way that
        // matters to a test twin: keep going with it.
        self.pods.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PodSet> {
        self.pods.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Pods for MemoryPods {
    fn waiting_for(&self, registry: &str, repository: &str) -> Vec<PodInfo> {
        self.read().waiting_for(&self.node, registry, repository)
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, PodsError> {
        Ok(self.read().get(namespace, name).map(|p| p.info.clone()))
    }

    fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::conformance::{self, Driver, DriverError, Timing};
    use super::*;

    struct Twin(Arc<MemoryPods>);

    #[async_trait]
    impl Driver for Twin {
        async fn create(&self, pod: &PodInfo) -> Result<(), DriverError> {
            self.0.insert(pod.clone());
            Ok(())
        }
        async fn finish(&self, namespace: &str, name: &str) -> Result<(), DriverError> {
            self.0.finish(namespace, name);
            Ok(())
        }
        async fn delete(&self, namespace: &str, name: &str) -> Result<(), DriverError> {
            self.0.remove(namespace, name);
            Ok(())
        }
    }

    #[tokio::test]
    async fn memory_pods_conform() {
        let pods = Arc::new(MemoryPods::new(conformance::NODE));
        conformance::run(pods.as_ref(), &Twin(pods.clone()), Timing::fast()).await;
    }
}
