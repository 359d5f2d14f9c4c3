//! [`KubePods`]: the pod index from a Kubernetes watcher on this node's pods, the directory
//! from cached `GET`s.
//!
//! The index is fed by a kube-runtime watcher on pods in all namespaces with the field selector
//! `spec.nodeName=<node>` (RBAC: pods `list` + `watch`); the watcher re-lists after a restart
//! of the API server, with kube-runtime's default backoff, and the relisted view replaces the
//! old one at once (`InitDone`). While the API server is away the last view keeps answering.
//! The directory answers pods on this node from the index and other pods with
//! `GET /api/v1/namespaces/<ns>/pods/<name>` (RBAC: pods `get`), cached for `cache_ttl` —
//! absent pods too, so a flood of bogus names costs the API server one request per name per
//! TTL — in a bounded cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::{PodInfo, PodSet, Pods, PodsError, finished_phase, grants_from_annotations};
use crate::shutdown::Shutdown;

/// At most this many pods are remembered by the directory cache.
const CACHE_MAX: usize = 4096;

type CacheEntry = (Instant, Option<PodInfo>);

/// Pods of a Kubernetes cluster, indexed for one node.
pub struct KubePods {
    node: String,
    client: kube::Client,
    index: RwLock<PodSet>,
    ready: AtomicBool,
    cache_ttl: Duration,
    cache: Mutex<HashMap<(String, String), CacheEntry>>,
}

impl std::fmt::Debug for KubePods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePods")
            .field("node", &self.node)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl KubePods {
    /// Starts the watcher (a task that runs until `shutdown`) and returns at once; the source
    /// is [`Pods::ready`] after the watcher's first complete list.
    pub fn start(
        client: kube::Client,
        node: String,
        cache_ttl: Duration,
        shutdown: Shutdown,
    ) -> Arc<KubePods> {
        let pods = Arc::new(KubePods {
            node,
            client,
            index: RwLock::new(PodSet::default()),
            ready: AtomicBool::new(false),
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
        });
        tokio::spawn(pods.clone().watch(shutdown));
        pods
    }

    /// Waits (bounded by `limit`) until the first list is done; false on timeout.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.ready() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let stream = watcher::watcher(api, config).default_backoff();
        futures::pin_mut!(stream);
        let stop = shutdown.wait();
        tokio::pin!(stop);
        // The relist in progress: swapped in whole at InitDone.
        let mut pending = PodSet::default();
        let mut healthy = true;
        loop {
            let event = tokio::select! {
                _ = &mut stop => break,
                event = stream.next() => event,
            };
            match event {
                None => break,
                Some(Err(e)) => {
                    if healthy {
                        tracing::warn!(node = %self.node, error = %e, "pod watch failed; keeping the last view and retrying with backoff");
                        healthy = false;
                    } else {
                        tracing::debug!(node = %self.node, error = %e, "pod watch still failing");
                    }
                }
                Some(Ok(Event::Init)) => pending = PodSet::default(),
                Some(Ok(Event::InitApply(pod))) => {
                    if let Some((info, finished)) = pod_info(&pod) {
                        pending.upsert(info, finished);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    let count = pending.pods.len();
                    *self.index.write().unwrap_or_else(|e| e.into_inner()) =
                        std::mem::take(&mut pending);
                    if !self.ready.swap(true, Ordering::SeqCst) || !healthy {
                        tracing::info!(node = %self.node, pods = count, "pod index listed");
                    }
                    healthy = true;
                }
                Some(Ok(Event::Apply(pod))) => {
                    if let Some((info, finished)) = pod_info(&pod) {
                        self.index
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .upsert(info, finished);
                    }
                }
                Some(Ok(Event::Delete(pod))) => {
                    let (ns, name) = (pod.metadata.namespace, pod.metadata.name);
                    if let (Some(ns), Some(name)) = (ns, name) {
                        self.index
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&ns, &name);
                    }
                }
            }
        }
    }

    fn cached(&self, key: &(String, String)) -> Option<Option<PodInfo>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.cache_ttl)
            .map(|(_, pod)| pod.clone())
    }

    fn remember(&self, key: (String, String), pod: Option<PodInfo>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            let ttl = self.cache_ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), pod));
    }
}

/// The [`PodInfo`] of a pod object and whether it finished; `None` without namespace or name.
pub(super) fn pod_info(pod: &Pod) -> Option<(PodInfo, bool)> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref();
    let mut images = Vec::new();
    if let Some(spec) = spec {
        let init = spec.init_containers.iter().flatten().map(|c| &c.image);
        let regular = spec.containers.iter().map(|c| &c.image);
        let ephemeral = spec.ephemeral_containers.iter().flatten().map(|c| &c.image);
        images.extend(init.chain(regular).chain(ephemeral).flatten().cloned());
    }
    let grants = grants_from_annotations(&namespace, &name, pod.metadata.annotations.as_ref());
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let info = PodInfo {
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        namespace,
        name,
        images,
        grants,
    };
    Some((info, finished_phase(phase)))
}

#[async_trait]
impl Pods for KubePods {
    fn waiting_for(&self, registry: &str, repository: &str) -> Vec<PodInfo> {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .waiting_for(&self.node, registry, repository)
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, PodsError> {
        if let Some(p) = self
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(namespace, name)
        {
            return Ok(Some(p.info.clone()));
        }
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = api
            .get_opt(name)
            .await
            .map_err(|e| PodsError::Unavailable(e.to_string()))?;
        let info = pod.as_ref().and_then(pod_info).map(|(info, _)| info);
        self.remember(key, info.clone());
        Ok(info)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}
