//! The one conformance suite every [`Pods`] source must pass: [`MemoryPods`](super::MemoryPods)
//! and [`FilePods`](super::FilePods) in unit tests, [`KubePods`](super::KubePods) against a
//! real kube-apiserver in `tests/tools/tenancy_kube.rs`.
//!
//! A [`Driver`] creates, finishes and deletes pods in the backing source (memory, the pods
//! file, the API server); the suite checks what the seam promises for the node [`NODE`]: pods
//! on another node are not in the index but are in the directory, tags and digests are ignored
//! and Docker defaults apply, grants come through, finished pods leave the index, deleted pods
//! leave both. Changes are awaited by polling with a bound ([`Timing`]), never by sleeping a
//! fixed time. Failures panic with the name of the broken rule: this is test code.
//!
//! The pods live in the namespaces [`NAMESPACES`], which a Kubernetes driver must create first.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{PodInfo, Pods};

/// The node whose index is under test.
pub const NODE: &str = "node-a";
/// Another node.
pub(crate) const OTHER_NODE: &str = "node-b";
/// The namespaces the suite's pods live in.
pub const NAMESPACES: [&str; 2] = ["tenancy-a", "tenancy-b"];

const APP: &str = "127.0.0.1:5000/team/app";
const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Any error a driver reports; the suite only prints it.
pub type DriverError = Box<dyn std::error::Error + Send + Sync>;

/// Changes pods in the source behind the [`Pods`] under test.
#[async_trait]
pub trait Driver: Send + Sync {
    /// Creates a pod (running; `pod.grants` become the grants annotation).
    async fn create(&self, pod: &PodInfo) -> Result<(), DriverError>;
    /// Moves a pod to phase `Succeeded`.
    async fn finish(&self, namespace: &str, name: &str) -> Result<(), DriverError>;
    /// Deletes a pod.
    async fn delete(&self, namespace: &str, name: &str) -> Result<(), DriverError>;
}

/// How long the suite waits for a change to show.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Bound for a change in the source to show in the index or the directory (for a
    /// directory with a cache, longer than its TTL).
    pub settle: Duration,
    /// Pause between two polls.
    pub poll: Duration,
}

impl Timing {
    /// For the memory twin: everything is immediate.
    pub fn fast() -> Timing {
        Timing {
            settle: Duration::from_secs(1),
            poll: Duration::from_millis(5),
        }
    }

    /// For sources that poll a file or watch an API server.
    pub fn slow() -> Timing {
        Timing {
            settle: Duration::from_secs(20),
            poll: Duration::from_millis(50),
        }
    }
}

fn pod(namespace: &str, name: &str, node: &str, images: &[&str], grants: &[&str]) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        node: node.into(),
        images: images.iter().map(|s| (*s).to_owned()).collect(),
        grants: grants.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn names(pods: &[PodInfo]) -> Vec<String> {
    pods.iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

/// Polls `check` until it returns `Ok`, or panics with `rule` and the last `Err` after
/// `timing.settle`.
async fn eventually<F, Fut>(timing: Timing, rule: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timing.settle;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{rule}: not true within {:?}: {last}",
            timing.settle
        );
        tokio::time::sleep(timing.poll).await;
    }
}

/// Runs every check against `pods`, changing the source through `driver`.
pub async fn run(pods: &dyn Pods, driver: &dyn Driver, timing: Timing) {
    let [a, b] = NAMESPACES;
    let web_images = [&format!("{APP}:v1") as &str, "busybox"];
    let pinned_image = format!("{APP}@{DIGEST}");
    let created = [
        pod(a, "web", NODE, &web_images, &["grant-1", "grant-2"]),
        pod(a, "pinned", NODE, &[&pinned_image], &[]),
        pod(
            b,
            "elsewhere",
            OTHER_NODE,
            &[&format!("{APP}:v1")],
            &["grant-3"],
        ),
        pod(b, "job", NODE, &["127.0.0.1:5000/team/job:v1"], &[]),
    ];
    for p in &created {
        driver
            .create(p)
            .await
            .unwrap_or_else(|e| panic!("driver: create {}/{}: {e}", p.namespace, p.name));
    }

    // The index: pods on this node only, tag and digest ignored. Wait for every pod created on
    // this node, the last one (in the second namespace) included: a watch delivers namespaces'
    // events in no promised order, so the first namespace settling says nothing of the second.
    let indexed = || {
        let got = (
            names(&pods.waiting_for("127.0.0.1:5000", "team/app")),
            names(&pods.waiting_for("127.0.0.1:5000", "team/job")),
        );
        let want = (
            vec![format!("{a}/pinned"), format!("{a}/web")],
            vec![format!("{b}/job")],
        );
        async move {
            if got == want {
                Ok(())
            } else {
                Err(format!("got {got:?}, want {want:?}"))
            }
        }
    };
    eventually(
        timing,
        "index holds this node's pods of a repository",
        indexed,
    )
    .await;
    assert!(pods.ready(), "ready once the index holds the pods");

    // (rule, registry, repository, want)
    let cases: Vec<(&str, &str, &str, Vec<String>)> = vec![
        (
            "docker defaults, full query",
            "docker.io",
            "library/busybox",
            vec![format!("{a}/web")],
        ),
        (
            "docker defaults, short query",
            "docker.io",
            "busybox",
            vec![format!("{a}/web")],
        ),
        (
            "index.docker.io alias",
            "index.docker.io",
            "library/busybox",
            vec![format!("{a}/web")],
        ),
        (
            "a repository prefix is not a match",
            "127.0.0.1:5000",
            "team",
            vec![],
        ),
        (
            "another registry port",
            "127.0.0.1:5001",
            "team/app",
            vec![],
        ),
        (
            "another node's pod is not indexed",
            "127.0.0.1:5000",
            "team/other",
            vec![],
        ),
        (
            "second namespace",
            "127.0.0.1:5000",
            "team/job",
            vec![format!("{b}/job")],
        ),
    ];
    for (rule, registry, repository, want) in cases {
        assert_eq!(
            names(&pods.waiting_for(registry, repository)),
            want,
            "{rule}"
        );
    }

    // What the index hands out about a pod.
    let web = pods
        .waiting_for("127.0.0.1:5000", "team/app")
        .into_iter()
        .find(|p| p.name == "web")
        .expect("web is indexed");
    assert_eq!(web.namespace, a, "index: namespace");
    assert_eq!(web.node, NODE, "index: node");
    assert_eq!(
        web.grants,
        ["grant-1", "grant-2"],
        "index: grants from the annotation"
    );
    assert!(
        web.images.iter().any(|i| i == "busybox"),
        "index: images as written in the spec: {:?}",
        web.images
    );

    // The directory: any pod by name, on any node.
    let elsewhere = pods
        .get(b, "elsewhere")
        .await
        .expect("directory: get a pod on another node")
        .expect("directory: a pod on another node exists");
    assert_eq!(
        elsewhere.node, OTHER_NODE,
        "directory: node of a pod elsewhere"
    );
    assert_eq!(elsewhere.grants, ["grant-3"], "directory: grants");
    let local = pods
        .get(a, "pinned")
        .await
        .expect("directory: get a local pod")
        .expect("directory: a local pod exists");
    assert_eq!(local.node, NODE, "directory: node of a local pod");
    assert_eq!(
        pods.get(a, "missing")
            .await
            .expect("directory: get a missing pod"),
        None,
        "directory: a missing pod is None"
    );
    assert_eq!(
        pods.get(b, "web")
            .await
            .expect("directory: same name, other namespace"),
        None,
        "directory: names are per namespace"
    );

    // A finished pod leaves the index.
    driver
        .finish(b, "job")
        .await
        .unwrap_or_else(|e| panic!("driver: finish: {e}"));
    eventually(timing, "a finished pod leaves the index", || {
        let got = names(&pods.waiting_for("127.0.0.1:5000", "team/job"));
        async move {
            if got.is_empty() {
                Ok(())
            } else {
                Err(format!("still {got:?}"))
            }
        }
    })
    .await;

    // A deleted pod leaves the index and the directory.
    driver
        .delete(a, "web")
        .await
        .unwrap_or_else(|e| panic!("driver: delete: {e}"));
    eventually(timing, "a deleted pod leaves the index", || {
        let got = names(&pods.waiting_for("127.0.0.1:5000", "team/app"));
        let want = vec![format!("{a}/pinned")];
        async move {
            if got == want {
                Ok(())
            } else {
                Err(format!("got {got:?}, want {want:?}"))
            }
        }
    })
    .await;
    eventually(timing, "a deleted pod leaves the directory", || async {
        match pods.get(a, "web").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    driver
        .delete(b, "elsewhere")
        .await
        .unwrap_or_else(|e| panic!("driver: delete: {e}"));
    eventually(
        timing,
        "a deleted pod on another node leaves the directory",
        || async {
            match pods.get(b, "elsewhere").await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(pods.ready(), "still ready");
}
