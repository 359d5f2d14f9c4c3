//! [`FilePods`]: the pod index and directory read from a file listing every pod of the
//! cluster, for installs without Kubernetes and for the namespace-node rig.
//!
//! The file ([`PodsFile`], YAML or JSON) is checked for changes (modification time, size,
//! inode) at most once per poll interval by a background task; a changed file is parsed in
//! full and swapped in at once. A broken file keeps the previous view and is logged once per
//! version. Until a first good read, the source is not ready and the directory answers
//! `Unavailable`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{PodInfo, PodSet, Pods, PodsError, finished_phase, grants_from_annotations};
use crate::shutdown::Shutdown;

/// The pods file: `{pods: [{namespace, name, node, images: [..], annotations: {..}}]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodsFile {
    pub pods: Vec<PodsFileEntry>,
}

/// One pod of a [`PodsFile`]. Grants come from the `speculum.io/pull-grants` annotation, as
/// on a real pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodsFileEntry {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub images: Vec<String>,
    pub annotations: BTreeMap<String, String>,
    /// `status.phase`; absent = running. `Succeeded`/`Failed` pods are not in the index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl PodsFile {
    /// Parses the file's text (YAML, so JSON too).
    pub fn parse(text: &str) -> Result<PodsFile, String> {
        let file: PodsFile = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        for (i, p) in file.pods.iter().enumerate() {
            if p.namespace.is_empty() || p.name.is_empty() {
                return Err(format!("pods[{i}]: namespace and name are required"));
            }
        }
        Ok(file)
    }

    fn into_set(self) -> PodSet {
        let mut set = PodSet::default();
        for p in self.pods {
            let grants = grants_from_annotations(&p.namespace, &p.name, Some(&p.annotations));
            let finished = finished_phase(p.phase.as_deref());
            set.upsert(
                PodInfo {
                    namespace: p.namespace,
                    name: p.name,
                    node: p.node,
                    images: p.images,
                    grants,
                },
                finished,
            );
        }
        set
    }
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

#[derive(Debug, Default)]
struct Seen {
    /// The version last looked at (good or broken).
    fingerprint: Option<Fingerprint>,
    /// Whether that version was unreadable (so the next failure is not logged again).
    failing: bool,
}

/// Pods read from a [`PodsFile`].
#[derive(Debug)]
pub struct FilePods {
    path: PathBuf,
    node: String,
    view: RwLock<Option<Arc<PodSet>>>,
    seen: Mutex<Seen>,
}

impl FilePods {
    /// Reads `path` now (a missing or broken file is logged and leaves the source not ready)
    /// without watching it; see [`FilePods::start`].
    pub fn new(path: impl Into<PathBuf>, node: impl Into<String>) -> FilePods {
        let pods = FilePods {
            path: path.into(),
            node: node.into(),
            view: RwLock::new(None),
            seen: Mutex::new(Seen::default()),
        };
        pods.reload_if_changed();
        pods
    }

    /// [`FilePods::new`], plus a task that calls [`FilePods::reload_if_changed`] every
    /// `interval` until `shutdown`.
    pub fn start(
        path: impl Into<PathBuf>,
        node: impl Into<String>,
        interval: Duration,
        shutdown: Shutdown,
    ) -> Arc<FilePods> {
        let pods = Arc::new(FilePods::new(path, node));
        let watched = pods.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let stop = shutdown.wait();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => {
                        let pods = watched.clone();
                        // A stat and, rarely, a read: off the async workers.
                        let _ = tokio::task::spawn_blocking(move || pods.reload_if_changed()).await;
                    }
                }
            }
        });
        pods
    }

    /// The file this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if it changed since last looked at; true when a new view was
    /// swapped in.
    pub fn reload_if_changed(&self) -> bool {
        let fingerprint = std::fs::metadata(&self.path).map(|m| Fingerprint {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let fingerprint = match fingerprint {
            Ok(f) => f,
            Err(e) => {
                if !seen.failing {
                    tracing::warn!(path = %self.path.display(), error = %e, "pods file unreadable; keeping the previous view");
                    seen.failing = true;
                }
                seen.fingerprint = None;
                return false;
            }
        };
        if seen.fingerprint.as_ref() == Some(&fingerprint) {
            return false;
        }
        seen.fingerprint = Some(fingerprint);
        let parsed = std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|text| PodsFile::parse(&text));
        match parsed {
            Ok(file) => {
                let count = file.pods.len();
                let set = Arc::new(file.into_set());
                *self.view.write().unwrap_or_else(|e| e.into_inner()) = Some(set);
                seen.failing = false;
                tracing::info!(path = %self.path.display(), pods = count, "pods file loaded");
                true
            }
            Err(e) => {
                // Once per broken version: the fingerprint is remembered above.
                tracing::warn!(path = %self.path.display(), error = %e, "pods file rejected; keeping the previous view");
                seen.failing = true;
                false
            }
        }
    }

    fn current(&self) -> Option<Arc<PodSet>> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl Pods for FilePods {
    fn waiting_for(&self, registry: &str, repository: &str) -> Vec<PodInfo> {
        self.current()
            .map(|set| set.waiting_for(&self.node, registry, repository))
            .unwrap_or_default()
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, PodsError> {
        let set = self.current().ok_or_else(|| {
            PodsError::Unavailable(format!("pods file {} not loaded", self.path.display()))
        })?;
        Ok(set.get(namespace, name).map(|p| p.info.clone()))
    }

    fn ready(&self) -> bool {
        self.current().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::super::GRANTS_ANNOTATION;
    use super::super::conformance::{self, Driver, DriverError, Timing};
    use super::*;

    /// Keeps the whole cluster's pods and rewrites the file (atomically) on every change.
    struct FileDriver {
        path: PathBuf,
        pods: Mutex<Vec<PodsFileEntry>>,
    }

    impl FileDriver {
        fn write(&self) -> Result<(), DriverError> {
            let file = PodsFile {
                pods: self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            };
            let tmp = self.path.with_extension("tmp");
            std::fs::write(&tmp, yaml_serde::to_string(&file)?)?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(())
        }

        fn edit(&self, f: impl FnOnce(&mut Vec<PodsFileEntry>)) -> Result<(), DriverError> {
            f(&mut self.pods.lock().unwrap_or_else(|e| e.into_inner()));
            self.write()
        }
    }

    #[async_trait]
    impl Driver for FileDriver {
        async fn create(&self, pod: &PodInfo) -> Result<(), DriverError> {
            let mut annotations = BTreeMap::new();
            if !pod.grants.is_empty() {
                annotations.insert(
                    GRANTS_ANNOTATION.to_owned(),
                    serde_json::to_string(&pod.grants)?,
                );
            }
            let entry = PodsFileEntry {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                node: pod.node.clone(),
                images: pod.images.clone(),
                annotations,
                phase: None,
            };
            self.edit(|pods| pods.push(entry))
        }
        async fn finish(&self, namespace: &str, name: &str) -> Result<(), DriverError> {
            self.edit(|pods| {
                for p in pods
                    .iter_mut()
                    .filter(|p| p.namespace == namespace && p.name == name)
                {
                    p.phase = Some("Succeeded".into());
                }
            })
        }
        async fn delete(&self, namespace: &str, name: &str) -> Result<(), DriverError> {
            self.edit(|pods| pods.retain(|p| !(p.namespace == namespace && p.name == name)))
        }
    }

    #[tokio::test]
    async fn file_pods_conform() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods.yaml");
        let driver = FileDriver {
            path: path.clone(),
            pods: Mutex::new(Vec::new()),
        };
        driver.write().expect("empty pods file");
        let (trigger, shutdown) = crate::shutdown::channel();
        let pods = FilePods::start(
            &path,
            conformance::NODE,
            Duration::from_millis(20),
            shutdown,
        );
        conformance::run(pods.as_ref(), &driver, Timing::slow()).await;
        trigger.fire();
    }

    #[test]
    fn broken_file_keeps_the_previous_view() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods.json");
        let pods = FilePods::new(&path, "n1");
        assert!(!pods.ready(), "missing file: not ready");
        let good = r#"{"pods": [{"namespace": "a", "name": "p", "node": "n1", "images": ["127.0.0.1:5000/x:1"],
            "annotations": {"speculum.io/pull-grants": "[\"t1\"]"}}]}"#;
        // (name, content, want swapped in, want pods of 127.0.0.1:5000/x)
        let cases: Vec<(&str, Option<&str>, bool, Vec<&str>)> = vec![
            ("good json", Some(good), true, vec!["p"]),
            ("unchanged", None, false, vec!["p"]),
            ("not yaml", Some("pods: [unclosed"), false, vec!["p"]),
            (
                "missing name",
                Some(r#"{"pods": [{"namespace": "a"}]}"#),
                false,
                vec!["p"],
            ),
            (
                "unknown top-level key",
                Some(r#"{"pod": []}"#),
                false,
                vec!["p"],
            ),
            (
                "good yaml, finished pod",
                Some(
                    "pods:\n- {namespace: a, name: p, node: n1, images: ['127.0.0.1:5000/x:1'], phase: Succeeded}\n- {namespace: a, name: q, node: n1, images: ['127.0.0.1:5000/x@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08']}\n",
                ),
                true,
                vec!["q"],
            ),
            ("empty list", Some("pods: []\n"), true, vec![]),
        ];
        for (name, content, want_swap, want) in cases {
            if let Some(c) = content {
                std::fs::write(&path, c).expect("write");
            }
            assert_eq!(pods.reload_if_changed(), want_swap, "{name}: swapped");
            assert!(pods.ready(), "{name}: ready after a first good read");
            let got: Vec<String> = pods
                .waiting_for("127.0.0.1:5000", "x")
                .into_iter()
                .map(|p| p.name)
                .collect();
            assert_eq!(got, want, "{name}");
        }
        std::fs::remove_file(&path).expect("remove");
        assert!(!pods.reload_if_changed(), "deleted file: keep the view");
        assert!(
            pods.ready(),
            "deleted file: still ready with the previous view"
        );
    }
}
