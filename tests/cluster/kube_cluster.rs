//! The cluster tier: speculum as users run it. A real cluster (`tests/cluster/cluster.sh`:
//! kubelets, containerd, CNI, kube-proxy on network namespaces), the chart installed with Helm
//! from the locally built image, and the scenarios of issue 15 run through it in order, each
//! asserting from daemon metrics, audit lines and the upstream registry's access log, and
//! recording where the bytes came from (peers or upstream).
//!
//! One test function: the cluster comes up once (about a minute) and the scenarios share it;
//! the order matters (uninstall is last). Never skipped: without root or a tool it fails.
//! `SPECULUM_SKIP_CLUSTER=1` skips it loudly (`make test` runs it on its own first).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use testkit::cluster::*;
use testkit::rig::Series;

/// Bytes a daemon's mirror endpoint sent its containerd that came from another node.
const PEER_BYTES: Series = Series {
    name: "speculum_served_bytes_total",
    labels: &[("handler", "mirror"), ("source", "peer")],
};
/// Bytes a daemon's peer endpoint sent other nodes from its own store.
const SERVED_TO_PEERS: Series = Series {
    name: "speculum_served_bytes_total",
    labels: &[("handler", "peer"), ("source", "local")],
};
const READY: Series = Series {
    name: "speculum_ready",
    labels: &[],
};
const ROUTING_PEERS: Series = Series {
    name: "speculum_routing_peers",
    labels: &[],
};
/// A pull of the big image on 2 shared cores, through a shaped link at worst.
const PULL_WAIT: Duration = Duration::from_secs(300);

#[test]
fn cluster_scenarios() -> Result<()> {
    if std::env::var("SPECULUM_SKIP_CLUSTER").as_deref() == Ok("1") {
        testkit::rig::skip(
            "cluster_scenarios",
            "SPECULUM_SKIP_CLUSTER=1 (make test runs it on its own)",
        );
        return Ok(());
    }
    let t0 = Instant::now();
    let c = Cluster::start(&image_env()?)?;
    let mut report = Report::default();
    let originals = hosts_files(&c)?;
    let run = |name: &str, report: &mut Report, f: &dyn Fn(&Cluster, &mut Split) -> Result<()>| {
        c.step(&format!("scenario {name}"));
        let started = Instant::now();
        let mut split = Split::default();
        let before = Snapshot::take(&c)?;
        f(&c, &mut split).with_context(|| format!("scenario {name}"))?;
        let after = Snapshot::take(&c)?;
        split.measure(&c, &before, &after)?;
        c.step(&format!(
            "scenario {name} green in {:.0?}: {split}",
            started.elapsed()
        ));
        report.add(name, started.elapsed(), split);
        Ok::<(), anyhow::Error>(())
    };
    run("a helm install", &mut report, &|c, _| install(c))?;
    run(
        "b big image over peers, upstream stopped",
        &mut report,
        &|c, s| big_image(c, s),
    )?;
    run("g daemon pod deleted mid-stream", &mut report, &|c, s| {
        deleted_mid_stream(c, s)
    })?;
    run(
        "c webhook pins, tag moves, upstream down",
        &mut report,
        &|c, s| webhook(c, s),
    )?;
    run("d tenancy: private image by grant", &mut report, &|c, s| {
        tenancy(c, s)
    })?;
    run(
        "e helm upgrade rolls during a scale-up; policy hot reload",
        &mut report,
        &|c, s| upgrade(c, s),
    )?;
    run("f helm uninstall", &mut report, &|c, _| {
        uninstall(c, &originals)
    })?;
    report.write(&c, t0.elapsed())?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The speculum image and the chart values.

/// What the cluster pushes as the speculum image: the layout scripts/image.sh built
/// (`SPECULUM_IMAGE_LAYOUT=DIR:TAG`, else cluster.sh builds it from the debug binaries), else a
/// stand-in packed from those binaries.
fn image_env() -> Result<Vec<(&'static str, &'static str)>> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    if let Ok(layout) = std::env::var("SPECULUM_IMAGE_LAYOUT") {
        return Ok(vec![("CLUSTER_SPECULUM_LAYOUT", leak(layout))]);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"));
    let bin = std::env::var("SPECULUM_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| target.join("debug/speculum"));
    let webhook = bin.with_file_name("speculum-webhook");
    ensure!(
        bin.is_file() && webhook.is_file(),
        "no image layout (SPECULUM_IMAGE_LAYOUT) and no binaries at {} and {} (cargo build --bins)",
        bin.display(),
        webhook.display()
    );
    Ok(vec![
        ("SPECULUM_BIN", leak(bin.display().to_string())),
        ("SPECULUM_WEBHOOK_BIN", leak(webhook.display().to_string())),
    ])
}

/// The values a cluster without cluster DNS needs: the image from the upstream registry, the
/// registries mirrored over plain HTTP, static DHT bootstrap peers and webhook cluster
/// endpoints (node addresses), the cleanup hook's images from the upstream registry.
fn values(c: &Cluster, extra: Value) -> Result<String> {
    let up = c.upstream()?;
    let private = c.var("CLUSTER_PRIVATE")?;
    let ips: Vec<String> = (1..=c.nodes()?)
        .map(|n| c.node_ip(n))
        .collect::<Result<_>>()?;
    let image = c.var("CLUSTER_SPECULUM_IMAGE")?;
    let (repository, tag) = image
        .rsplit_once(':')
        .context("CLUSTER_SPECULUM_IMAGE without a tag")?;
    let mut v = json!({
        "image": {"repository": repository, "tag": tag},
        // The tenancy scenario's repository is private: served peer to peer only with a grant.
        "policy": {"bundle": "cluster", "bundles": {"cluster": bundle(&[&format!("{private}/team-a/")])}},
        "daemon": {
            "mirroredRegistries": [format!("http://{up}"), format!("http://{private}")],
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
        },
        "routing": {
            "bootstrapService": false,
            "peers": ips.iter().map(|ip| format!("/ip4/{ip}/tcp/5082")).collect::<Vec<_>>(),
        },
        "webhook": {
            "replicas": 2,
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
            "resolver": {
                "cacheTtl": "1s",
                "registries": {up: {"insecure": true}, private: {"insecure": true}},
                "clusterEndpoints": ips.iter().map(|ip| format!("{ip}:5081")).collect::<Vec<_>>(),
            },
        },
        "cleanup": {
            "pauseImage": c.var("CLUSTER_PAUSE")?,
            "kubectlImage": format!("{up}/cluster/kubectl:v1.33.13"),
            "timeout": "3m",
        },
    });
    merge(&mut v, extra);
    Ok(serde_json::to_string_pretty(&v)?)
}

/// The chart's private-grant bundle with `prefixes` (`registry/repository` prefixes) private.
fn bundle(prefixes: &[&str]) -> Value {
    let rego = include_str!("../../policies/private-grant/mirror.rego");
    json!({
        "mirror.rego": rego,
        "data.json": json!({"private": {"prefixes": prefixes}}).to_string(),
    })
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn write_values(c: &Cluster, extra: Value) -> Result<std::path::PathBuf> {
    let path = c.dir.join("values.json");
    std::fs::write(&path, values(c, extra)?).context("writing values")?;
    Ok(path)
}

// ------------------------------------------------------------------------------------------------
// Scenario a: helm install.

fn install(c: &Cluster) -> Result<()> {
    let values = write_values(c, json!({}))?;
    let chart = repo_root().join("chart");
    c.helm(&[
        "install",
        RELEASE,
        &chart.display().to_string(),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "-f",
        &values.display().to_string(),
        "--wait",
        "--timeout",
        "6m",
    ])?;
    let nodes = c.nodes()?;
    wait_daemonset(c)?;
    c.wait("the webhook Deployment Ready", WAIT, || {
        let wh = c.kubectl_json(&[
            "get",
            "deployment",
            "-n",
            NAMESPACE,
            &format!("{RELEASE}-webhook"),
        ])?;
        let want = wh["spec"]["replicas"].as_u64().unwrap_or(0);
        Ok(want > 0 && wh["status"]["readyReplicas"].as_u64() == Some(want))
    })?;
    let up = c.upstream()?.to_string();
    for n in 1..=nodes {
        // The init container rewrote the node's hosts.toml to point at the daemon.
        let hosts = std::fs::read_to_string(
            c.node_path(n, &format!("/etc/containerd/certs.d/{up}/hosts.toml"))?,
        )?;
        ensure!(
            hosts.contains("127.0.0.1:5080"),
            "n{n}'s certs.d/{up}/hosts.toml does not name the mirror:\n{hosts}"
        );
        c.wait(
            &format!("n{n}'s daemon ready with {} DHT peers", nodes - 1),
            WAIT,
            || {
                Ok(c.metric(n, &READY)? == 1.0
                    && c.metric(n, &ROUTING_PEERS)? >= f64::from(nodes - 1))
            },
        )?;
    }
    Ok(())
}

/// Waits until the daemon DaemonSet is rolled out and Ready on every node, with no pod left
/// terminating: `helm --wait` returns once at most maxUnavailable pods are not ready.
fn wait_daemonset(c: &Cluster) -> Result<()> {
    let nodes = u64::from(c.nodes()?);
    c.wait(
        &format!("the DaemonSet rolled out and Ready on all {nodes} nodes"),
        WAIT,
        || {
            let ds = c.kubectl_json(&["get", "daemonset", "-n", NAMESPACE, RELEASE])?;
            let st = &ds["status"];
            let pods = c.kubectl_json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=daemon",
            ])?;
            let count = pods["items"].as_array().map_or(0, Vec::len) as u64;
            Ok(st["observedGeneration"] == ds["metadata"]["generation"]
                && st["numberReady"].as_u64() == Some(nodes)
                && st["updatedNumberScheduled"].as_u64() == Some(nodes)
                && count == nodes)
        },
    )
}

// ------------------------------------------------------------------------------------------------
// Scenario b: a big image spread over the nodes.

fn big_image(c: &Cluster, split: &mut Split) -> Result<()> {
    let images = c.images()?;
    let big = images.get("big:v1").context("no big:v1")?;
    let layer = big
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .context("no layers")?;
    ensure!(
        layer.size >= 200 << 20,
        "the big layer is only {} bytes",
        layer.size
    );
    c.kubectl(&["create", "namespace", "apps"]).ok();
    let log0 = c.access_log("upstream")?.len();
    // One replica first: that node pulls from upstream and advertises what it holds.
    c.apply(&deployment("big", "apps", &big.full, 1, None))?;
    let first = wait_replicas(c, "apps", "big", 1, PULL_WAIT)?;
    let x = first[0];
    let ip = |n: u32| c.node_ip(n);
    let from = |n: u32| -> Result<Vec<Access>> {
        let ip = ip(n)?;
        Ok(c.access_log("upstream")?[log0..]
            .iter()
            .filter(|a| a.client == ip && a.method == "GET" && a.path.contains(&layer.digest))
            .cloned()
            .collect())
    };
    ensure!(
        from(x)?.len() == 1,
        "n{x} fetched the big layer upstream {} times",
        from(x)?.len()
    );
    let others: Vec<u32> = (1..=c.nodes()?).filter(|&n| n != x).collect();
    for &n in &others {
        wait_mirror_has(c, n, "cluster/big", &big.digest)?;
    }
    // The second replica: straight from n{x}, no upstream layer GET.
    c.kubectl(&["scale", "-n", "apps", "deployment/big", "--replicas=2"])?;
    let placed = wait_replicas(c, "apps", "big", 2, PULL_WAIT)?;
    let y = *placed
        .iter()
        .find(|&&n| n != x)
        .context("second replica on the same node")?;
    ensure!(
        from(y)?.is_empty(),
        "n{y} fetched the big layer upstream: {:?}",
        from(y)?
    );
    let peer_y = c.metric(y, &PEER_BYTES)?;
    ensure!(
        peer_y >= layer.size as f64,
        "n{y} got only {peer_y} bytes from peers"
    );
    let audit = c.audit(y)?;
    ensure!(
        audit.iter().any(|a| a["served_from"] == "peer"
            && a["digest"].as_str() == Some(&layer.digest)
            && a["status"] == 200),
        "no audit line on n{y} for the big layer served from a peer"
    );
    // Upstream stopped: the third replica, on a node without the image, still starts.
    c.script(&["upstream-stop"])?;
    let result = (|| -> Result<()> {
        c.kubectl(&["scale", "-n", "apps", "deployment/big", "--replicas=3"])?;
        let placed = wait_replicas(c, "apps", "big", 3, PULL_WAIT)?;
        let z = *placed
            .iter()
            .find(|&&n| n != x && n != y)
            .context("no third node")?;
        ensure!(from(z)?.is_empty(), "n{z} reached a stopped upstream?");
        let peer_z = c.metric(z, &PEER_BYTES)?;
        ensure!(
            peer_z >= layer.size as f64,
            "n{z} got only {peer_z} bytes from peers"
        );
        split.note(format!(
            "n{x} upstream, n{y} and n{z} from peers (n{z} with upstream stopped)"
        ));
        let failed = failed_events(c, "apps", "big-")?;
        ensure!(
            failed.is_empty(),
            "failed pulls of the big image: {failed:?}"
        );
        Ok(())
    })();
    c.script(&["upstream-start"])?;
    result?;
    c.kubectl(&["delete", "deployment", "-n", "apps", "big", "--wait=false"])?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Scenario g: the serving daemon's pod deleted while a layer streams from it.

fn deleted_mid_stream(c: &Cluster, split: &mut Split) -> Result<()> {
    let images = c.images()?;
    let big2 = images.get("big2:v1").context("no big2:v1")?;
    let layer = big2
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .context("no layers")?;
    let (src, dst) = (1, 2);
    c.apply(&deployment("big2-src", "apps", &big2.full, 1, Some(src)))?;
    wait_replicas(c, "apps", "big2-src", 1, PULL_WAIT)?;
    wait_mirror_has(c, dst, "cluster/big2", &big2.digest)?;
    // Slow the source's link so the stream is still running when its pod goes.
    c.script(&["shape", &src.to_string(), "100mbit"])?;
    let result = (|| -> Result<()> {
        let peer0 = c.metric(dst, &PEER_BYTES)?;
        c.apply(&deployment("big2-dst", "apps", &big2.full, 1, Some(dst)))?;
        c.wait("the layer to stream from n1 to n2", PULL_WAIT, || {
            Ok(c.metric(dst, &PEER_BYTES)? > peer0 + (16 << 20) as f64)
        })?;
        let pod = c
            .daemon_pod(src)?
            .context("no daemon pod on the source node")?;
        c.step(&format!("deleting {pod} mid-stream"));
        c.kubectl(&["delete", "pod", "-n", NAMESPACE, &pod, "--wait=false"])?;
        wait_replicas(c, "apps", "big2-dst", 1, PULL_WAIT)?;
        let ip = c.node_ip(dst)?;
        let upstream: u64 = c
            .access_log("upstream")?
            .iter()
            .filter(|a| a.client == ip && a.method == "GET" && a.path.contains(&layer.digest))
            .map(|a| a.bytes)
            .sum();
        split.note(format!(
            "n{dst}: {:.0} MB of the layer from n{src}'s peer endpoint, {:.0} MB upstream after the cut",
            (c.metric(dst, &PEER_BYTES)? - peer0) / 1e6,
            upstream as f64 / 1e6
        ));
        Ok(())
    })();
    c.script(&["unshape", &src.to_string()])?;
    result?;
    // The DaemonSet brings the node's daemon back.
    c.wait("the daemon on n1 back", WAIT, || {
        Ok(c.daemon_pod(src)?.is_some() && c.metric(src, &READY).unwrap_or(0.0) == 1.0)
    })?;
    for d in ["big2-src", "big2-dst"] {
        c.kubectl(&["delete", "deployment", "-n", "apps", d, "--wait=false"])?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Scenario c: the webhook as pods.

fn webhook(c: &Cluster, split: &mut Split) -> Result<()> {
    let images = c.images()?;
    let (v1, v2) = (
        images.get("web:v1").context("web:v1")?,
        images.get("web:v2").context("web:v2")?,
    );
    let up = c.upstream()?;
    let moving = format!("{up}/cluster/web:current");
    c.kubectl(&["create", "namespace", "pin"]).ok();
    c.kubectl(&[
        "label",
        "namespace",
        "pin",
        "speculum.io/pinning=enabled",
        "--overwrite",
    ])?;
    c.script(&["push", &format!("{}:v1", v1.layout), &moving])?;
    // By tag → pinned to what the tag names now.
    let pinned = |name: &str| -> Result<String> {
        c.apply(&deployment(name, "pin", &moving, 1, None))?;
        let d = c.kubectl_json(&["get", "deployment", "-n", "pin", name])?;
        Ok(d["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or("")
            .to_string())
    };
    let a = pinned("web-a")?;
    ensure!(
        a == format!("{moving}@{}", v1.digest),
        "web-a pinned to {a:?}, want {moving}@{}",
        v1.digest
    );
    wait_replicas(c, "pin", "web-a", 1, PULL_WAIT)?;
    // The tag moves upstream → a new Deployment gets the new digest (cache TTL 1 s).
    c.script(&["push", &format!("{}:v2", v2.layout), &moving])?;
    let mut b = String::new();
    c.wait(
        "web-b pinned to the moved tag",
        Duration::from_secs(30),
        || {
            c.kubectl(&[
                "delete",
                "deployment",
                "-n",
                "pin",
                "web-b",
                "--ignore-not-found",
            ])?;
            b = pinned("web-b")?;
            Ok(b == format!("{moving}@{}", v2.digest))
        },
    )?;
    wait_replicas(c, "pin", "web-b", 1, PULL_WAIT)?;
    // Upstream down → the tag resolves through the daemons. Pinned pods are pulled by digest
    // (containerd then records no tag), so the tag is held by a pull by tag: a Deployment in a
    // namespace that is not pinned.
    c.apply(&deployment("web-holder", "apps", &moving, 1, None))?;
    let holder = wait_replicas(c, "apps", "web-holder", 1, PULL_WAIT)?[0];
    wait_mirror_has(c, holder, "cluster/web", "current")?;
    c.script(&["upstream-stop"])?;
    let result = (|| -> Result<()> {
        let got = pinned("web-c")?;
        ensure!(
            got == format!("{moving}@{}", v2.digest),
            "web-c pinned to {got:?} with upstream down"
        );
        wait_replicas(c, "pin", "web-c", 1, PULL_WAIT)?;
        // The webhook's audit line says where the digest came from.
        let lines = webhook_audit(c)?;
        ensure!(
            lines.iter().any(
                |l| l["name"].as_str().is_some_and(|n| n.starts_with("web-c"))
                    && l["decision"] == "pinned"
                    && l["source"] == "cluster"
            ),
            "no webhook audit line pinning web-c through the cluster"
        );
        Ok(())
    })();
    c.script(&["upstream-start"])?;
    result?;
    split.note("web-a → v1, web-b → v2 after the tag moved, web-c → v2 through the daemons".into());
    c.kubectl(&["delete", "namespace", "pin", "--wait=false"])?;
    c.kubectl(&[
        "delete",
        "deployment",
        "-n",
        "apps",
        "web-holder",
        "--wait=false",
    ])?;
    Ok(())
}

/// The webhook pods' audit lines (JSON on stdout).
fn webhook_audit(c: &Cluster) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let pods = c.kubectl_json(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/component=webhook",
    ])?;
    for p in pods["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let logs = c.kubectl(&["logs", "-n", NAMESPACE, name])?;
        out.extend(
            logs.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v.get("decision").is_some()),
        );
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Scenario d: tenancy.

fn tenancy(c: &Cluster, split: &mut Split) -> Result<()> {
    let images = c.images()?;
    let secret = images.get("secret:v1").context("secret:v1")?;
    let layer = secret
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .context("no layers")?;
    let private = c.var("CLUSTER_PRIVATE")?;
    let (user, pass) = c
        .var("CLUSTER_PRIVATE_CREDS")?
        .split_once(':')
        .context("creds")?;
    for ns in ["team-a", "team-b"] {
        c.kubectl(&["create", "namespace", ns]).ok();
        c.kubectl(&[
            "label",
            "namespace",
            ns,
            "speculum.io/pinning=enabled",
            "--overwrite",
        ])?;
    }
    c.kubectl(&[
        "create",
        "secret",
        "docker-registry",
        "regcred",
        "-n",
        "team-a",
        &format!("--docker-server={private}"),
        &format!("--docker-username={user}"),
        &format!("--docker-password={pass}"),
    ])?;
    let log0 = c.access_log("private")?.len();
    let blob_gets = |n: u32| -> Result<usize> {
        let ip = c.node_ip(n)?;
        Ok(c.access_log("private")?[log0..]
            .iter()
            .filter(|a| {
                a.client == ip && a.method == "GET" && a.path.contains("/blobs/") && a.status == 200
            })
            .count())
    };
    // team-a on n1 with the pull secret: from the registry (nobody holds it yet).
    let adv0 = c.metric(1, &ADVERTISED)?;
    c.apply(&pod(
        "a1",
        "team-a",
        &secret.full,
        1,
        Some("regcred"),
        "IfNotPresent",
    ))?;
    wait_pod(c, "team-a", "a1", PULL_WAIT)?;
    let annotations = c.kubectl_json(&["get", "pod", "-n", "team-a", "a1"])?;
    ensure!(
        annotations["metadata"]["annotations"]["speculum.io/pull-grants"].is_string(),
        "the webhook signed no grant for a1: {}",
        annotations["metadata"]["annotations"]
    );
    ensure!(
        blob_gets(1)? >= 1,
        "n1 did not pull the private image from its registry"
    );
    // The private image is private to plain mirror requests too, so wait for n1 to advertise
    // its blobs (manifest and layers at least) rather than asking a mirror.
    let want = adv0 + (secret.layers.len() + 1) as f64;
    c.wait("n1 to advertise the private image", WAIT, || {
        Ok(c.metric(1, &ADVERTISED)? >= want)
    })?;
    // team-a on n2: peer to peer through its grant, no blob from the registry.
    let peer0 = c.metric(2, &PEER_BYTES)?;
    c.apply(&pod(
        "a2",
        "team-a",
        &secret.full,
        2,
        Some("regcred"),
        "IfNotPresent",
    ))?;
    wait_pod(c, "team-a", "a2", PULL_WAIT)?;
    ensure!(
        blob_gets(2)? == 0,
        "n2 fetched {} private blobs from the registry",
        blob_gets(2)?
    );
    let peer = c.metric(2, &PEER_BYTES)? - peer0;
    ensure!(
        peer >= layer.size as f64,
        "n2 got only {peer} bytes of the private image from peers"
    );
    let served = c.audit(1)?;
    ensure!(
        served.iter().any(|a| a["source"] == "peer"
            && a["repository"] == "team-a/secret"
            && a["status"] == 200
            && a["grant"]
                .as_str()
                .is_some_and(|g| g.starts_with("team-a/"))),
        "no audit line on n1 serving the private image to a peer under a team-a grant"
    );
    // team-b on n2 without credentials, once team-a's pod is gone (while it exists, its grant
    // covers the image on that node: containerd's requests carry no pod identity). n2 still
    // holds the image, but the mirror refuses it (no grant) and the registry says 401.
    c.kubectl(&[
        "delete",
        "pod",
        "-n",
        "team-a",
        "a2",
        "--wait=true",
        "--timeout=60s",
    ])?;
    c.apply(&pod("b2", "team-b", &secret.full, 2, None, "Always"))?;
    c.wait("b2 to fail its pull", PULL_WAIT, || {
        let p = c.kubectl_json(&["get", "pod", "-n", "team-b", "b2"])?;
        let reason = p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            .as_str()
            .unwrap_or("");
        ensure!(
            p["status"]["phase"] != "Running",
            "b2 is running without credentials"
        );
        Ok(reason == "ErrImagePull" || reason == "ImagePullBackOff")
    })?;
    let refused = c.audit(2)?;
    ensure!(
        refused.iter().any(|a| a["repository"] == "team-a/secret"
            && a["reason"] == "private: no grant"
            && a["namespaces"]
                .as_array()
                .is_some_and(|ns| ns.iter().any(|n| n == "team-b"))),
        "no audit line on n2 refusing team-b (private: no grant)"
    );
    let ip2 = c.node_ip(2)?;
    ensure!(
        c.access_log("private")?[log0..]
            .iter()
            .any(|a| a.client == ip2 && a.status == 401),
        "the private registry never refused n2 (401)"
    );
    split.note(format!(
        "n1 from the private registry, n2 (team-a) {:.1} MB from n1 by grant, team-b refused",
        peer / 1e6
    ));
    for ns in ["team-a", "team-b"] {
        c.kubectl(&["delete", "namespace", ns, "--wait=false"])?;
    }
    Ok(())
}

/// Keys a daemon holds provider records for.
const ADVERTISED: Series = Series {
    name: "speculum_routing_advertised_keys",
    labels: &[],
};

fn pod(name: &str, ns: &str, image: &str, node: u32, secret: Option<&str>, policy: &str) -> String {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 1,
        "nodeSelector": {"kubernetes.io/hostname": format!("n{node}")},
        "containers": [{"name": "main", "image": image, "imagePullPolicy": policy,
                        "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}}}],
    });
    if let Some(s) = secret {
        spec["imagePullSecrets"] = json!([{"name": s}]);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec})
        .to_string()
}

fn wait_pod(c: &Cluster, ns: &str, name: &str, limit: Duration) -> Result<()> {
    c.wait(&format!("pod {ns}/{name} ready"), limit, || {
        let p = c.kubectl_json(&["get", "pod", "-n", ns, name])?;
        let waiting = &p["status"]["containerStatuses"][0]["state"]["waiting"];
        let reason = waiting["reason"].as_str().unwrap_or("");
        if reason == "ErrImagePull" || reason == "ImagePullBackOff" {
            bail!("pull failed for {ns}/{name}: {waiting}");
        }
        Ok(p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"))
    })
}

// ------------------------------------------------------------------------------------------------
// Scenario e: helm upgrade while a Deployment scales up; a policy change hot-reloads.

fn upgrade(c: &Cluster, split: &mut Split) -> Result<()> {
    let images = c.images()?;
    let roll = images.get("roll:v1").context("roll:v1")?;
    let big = images.get("big:v1").context("big:v1")?;
    let chart = repo_root().join("chart").display().to_string();
    let uids = |c: &Cluster| -> Result<Vec<String>> {
        let pods = c.kubectl_json(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=daemon",
        ])?;
        let mut v: Vec<String> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        v.sort();
        Ok(v)
    };
    let before = uids(c)?;
    // A changed daemon value rolls the DaemonSet; the Deployment scales up meanwhile.
    let values = write_values(
        c,
        json!({"daemon": {"log": {"level": "info,speculum=debug"}}}),
    )?;
    c.apply(&deployment("roll", "apps", &roll.full, 0, None))?;
    let mut helm = std::process::Command::new(&c.helm);
    helm.env("KUBECONFIG", c.dir.join("kubeconfig")).args([
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        NAMESPACE,
        "-f",
        &values.display().to_string(),
        "--wait",
        "--timeout",
        "6m",
    ]);
    let upgrading = std::thread::spawn(move || run(&mut helm, Duration::from_secs(420)));
    c.wait("the DaemonSet to start rolling", WAIT, || {
        Ok(uids(c)? != before)
    })?;
    c.kubectl(&[
        "scale",
        "-n",
        "apps",
        "deployment/roll",
        &format!("--replicas={}", c.nodes()?),
    ])?;
    let placed = wait_replicas(c, "apps", "roll", c.nodes()? as usize, PULL_WAIT)?;
    upgrading
        .join()
        .map_err(|_| anyhow::anyhow!("helm upgrade thread panicked"))??;
    wait_daemonset(c)?;
    let after = uids(c)?;
    ensure!(
        after.iter().all(|u| !before.contains(u)),
        "not every daemon pod was replaced by the upgrade"
    );
    let failed = failed_events(c, "apps", "roll-")?;
    ensure!(
        failed.is_empty(),
        "failed events during the roll: {failed:?}"
    );
    split.note(format!(
        "roll on {placed:?} while the DaemonSet rolled, no failed pull"
    ));
    // A policy change reaches the running pods without a restart: cluster/big turns private,
    // so a node's mirror no longer serves it to a containerd without a granted pod.
    let up = c.upstream()?.to_string();
    let private = c.var("CLUSTER_PRIVATE")?.to_string();
    let reloads0: f64 = (1..=c.nodes()?)
        .map(|n| c.metric(n, &RELOADS_OK))
        .sum::<Result<f64>>()?;
    let values = write_values(
        c,
        json!({"daemon": {"log": {"level": "info,speculum=debug"}},
               "policy": {"bundles": {"cluster": bundle(&[&format!("{private}/team-a/"), &format!("{up}/cluster/big")])}}}),
    )?;
    c.helm(&[
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        NAMESPACE,
        "-f",
        &values.display().to_string(),
        "--wait",
        "--timeout",
        "5m",
    ])?;
    wait_daemonset(c)?;
    let url = format!(
        "http://127.0.0.1:5080/v2/cluster/big/manifests/{}?ns={}",
        big.digest,
        up.replace(':', "%3A")
    );
    c.wait(
        "n1's mirror to refuse cluster/big after the policy change",
        Duration::from_secs(150),
        || {
            let code = c.node_exec(
                1,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-I",
                    "--max-time",
                    "5",
                    &url,
                ],
            )?;
            Ok(code.trim() == "404")
        },
    )?;
    ensure!(uids(c)? == after, "the policy change restarted daemon pods");
    let reloads: f64 = (1..=c.nodes()?)
        .map(|n| c.metric(n, &RELOADS_OK))
        .sum::<Result<f64>>()?;
    ensure!(
        reloads > reloads0,
        "no policy reload counted ({reloads0} → {reloads})"
    );
    ensure!(
        c.audit(1)?
            .iter()
            .any(|a| a["repository"] == "cluster/big" && a["reason"] == "private: no grant"),
        "no audit line on n1 for the now-private cluster/big"
    );
    c.kubectl(&["delete", "deployment", "-n", "apps", "roll", "--wait=false"])?;
    Ok(())
}

const RELOADS_OK: Series = Series {
    name: "speculum_policy_reloads_total",
    labels: &[("result", "ok")],
};

// ------------------------------------------------------------------------------------------------
// Scenario f: helm uninstall.

fn uninstall(c: &Cluster, originals: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    c.helm(&[
        "uninstall",
        RELEASE,
        "-n",
        NAMESPACE,
        "--wait",
        "--timeout",
        "5m",
    ])?;
    let now = hosts_files(c)?;
    for (path, bytes) in originals {
        let got = now
            .get(path)
            .with_context(|| format!("{path} is gone after uninstall"))?;
        ensure!(
            got == bytes,
            "{path} not restored byte for byte:\n{}",
            String::from_utf8_lossy(got)
        );
    }
    // Nothing listens on a node's mirror port any more, and a pull goes straight upstream.
    let images = c.images()?;
    let after = images.get("after:v1").context("no after:v1")?;
    let layer = after
        .layers
        .iter()
        .max_by_key(|l| l.size)
        .context("no layers")?;
    let log0 = c.access_log("upstream")?.len();
    c.apply(&deployment("after", "apps", &after.full, 1, Some(3)))?;
    wait_replicas(c, "apps", "after", 1, PULL_WAIT)?;
    let ip = c.node_ip(3)?;
    let gets = c.access_log("upstream")?[log0..]
        .iter()
        .filter(|a| a.client == ip && a.method == "GET" && a.path.contains(&layer.digest))
        .count();
    ensure!(
        gets == 1,
        "n3 fetched after:v1's layer upstream {gets} times (want 1)"
    );
    ensure!(
        c.node_exec(
            3,
            &[
                "curl",
                "-sS",
                "--max-time",
                "2",
                "http://127.0.0.1:5080/v2/"
            ]
        )
        .is_err(),
        "something still answers on n3's mirror port"
    );
    Ok(())
}

/// Every node's hosts.toml files, by path (what scenario f compares after uninstall).
fn hosts_files(c: &Cluster) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for n in 1..=c.nodes()? {
        let root = c.node_path(n, "/etc/containerd/certs.d")?;
        for entry in std::fs::read_dir(&root).with_context(|| format!("{}", root.display()))? {
            let file = entry?.path().join("hosts.toml");
            if file.is_file() {
                out.insert(file.display().to_string(), std::fs::read(&file)?);
            }
        }
    }
    ensure!(!out.is_empty(), "no hosts.toml on any node");
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Workloads.

/// A Deployment of `image`, one pod per node (required anti-affinity), optionally pinned to
/// node `n`.
fn deployment(name: &str, ns: &str, image: &str, replicas: u32, node: Option<u32>) -> String {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 1,
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": name}}}
        ]}},
        "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                        "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}}}],
    });
    if let Some(n) = node {
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": format!("n{n}")});
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    })
    .to_string()
}

/// Waits until `want` pods of the Deployment are Running and Ready; their node numbers. Fails
/// at once on a pull failure (ErrImagePull / ImagePullBackOff), with the pod's events.
fn wait_replicas(
    c: &Cluster,
    ns: &str,
    app: &str,
    want: usize,
    limit: Duration,
) -> Result<Vec<u32>> {
    let mut nodes = Vec::new();
    c.wait(&format!("{want} ready pods of {ns}/{app}"), limit, || {
        let pods = c.kubectl_json(&["get", "pods", "-n", ns, "-l", &format!("app={app}")])?;
        nodes.clear();
        for p in pods["items"].as_array().into_iter().flatten() {
            if !p["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            for cs in p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let reason = cs["state"]["waiting"]["reason"].as_str().unwrap_or("");
                if reason == "ErrImagePull" || reason == "ImagePullBackOff" {
                    bail!(
                        "pull failed for {}: {}",
                        p["metadata"]["name"],
                        cs["state"]["waiting"]
                    );
                }
            }
            let ready = p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                let node = p["spec"]["nodeName"].as_str().unwrap_or("");
                nodes.push(node.trim_start_matches('n').parse::<u32>().unwrap_or(0));
            }
        }
        Ok(nodes.len() == want)
    })?;
    nodes.sort_unstable();
    Ok(nodes)
}

/// `Failed` events (failed pulls, …) of pods in `ns` whose name starts with `prefix`, as
/// "pod: message".
fn failed_events(c: &Cluster, ns: &str, prefix: &str) -> Result<Vec<String>> {
    let events = c.kubectl_json(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "reason=Failed",
    ])?;
    Ok(events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["involvedObject"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|e| format!("{}: {}", e["involvedObject"]["name"], e["message"]))
        .collect())
}

/// Waits until node `n`'s mirror finds a manifest by digest or tag (a holder advertised it in
/// the DHT, or `n` holds it).
fn wait_mirror_has(c: &Cluster, n: u32, repo: &str, digest: &str) -> Result<()> {
    let up = c.upstream()?.replace(':', "%3A");
    let url = format!("http://127.0.0.1:5080/v2/{repo}/manifests/{digest}?ns={up}");
    c.wait(
        &format!("n{n}'s mirror to find {repo}@{digest}"),
        WAIT,
        || {
            let code = c.node_exec(
                n,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-I",
                    "--max-time",
                    "5",
                    "-H",
                    "Accept: application/vnd.oci.image.manifest.v1+json",
                    &url,
                ],
            )?;
            Ok(code.trim() == "200")
        },
    )
}

// ------------------------------------------------------------------------------------------------
// Where the bytes came from.

/// Per-node counters before and after a scenario.
struct Snapshot {
    peer: BTreeMap<u32, f64>,
    served: BTreeMap<u32, f64>,
    log_len: usize,
    private_len: usize,
}

impl Snapshot {
    fn take(c: &Cluster) -> Result<Snapshot> {
        let mut peer = BTreeMap::new();
        let mut served = BTreeMap::new();
        for n in 1..=c.nodes()? {
            // No daemon (before install, after uninstall): nothing came from peers.
            let text = c.metrics(n).unwrap_or_default();
            peer.insert(n, testkit::rig::sum_series(&text, &PEER_BYTES));
            served.insert(n, testkit::rig::sum_series(&text, &SERVED_TO_PEERS));
        }
        Ok(Snapshot {
            peer,
            served,
            log_len: c.access_log("upstream")?.len(),
            private_len: c.access_log("private")?.len(),
        })
    }
}

#[derive(Default)]
struct Split {
    /// Blob bytes the upstream registry sent to nodes.
    upstream: u64,
    /// Bytes daemons' mirrors got from other nodes (a restarted daemon's counters start at 0,
    /// so a negative difference counts as 0).
    peer: f64,
    /// Bytes daemons' peer endpoints sent (the same transfers, counted by the sender).
    served: f64,
    notes: Vec<String>,
}

impl Split {
    fn note(&mut self, s: String) {
        self.notes.push(s);
    }

    fn measure(&mut self, c: &Cluster, before: &Snapshot, after: &Snapshot) -> Result<()> {
        let ips: Vec<String> = (1..=c.nodes()?)
            .map(|n| c.node_ip(n))
            .collect::<Result<_>>()?;
        // Both registries count as upstream: the public one and the private one.
        let blob_bytes = |log: &[Access], from: usize| -> u64 {
            log[from.min(log.len())..]
                .iter()
                .filter(|a| {
                    ips.contains(&a.client) && a.method == "GET" && a.path.contains("/blobs/")
                })
                .map(|a| a.bytes)
                .sum()
        };
        self.upstream = blob_bytes(&c.access_log("upstream")?, before.log_len)
            + blob_bytes(&c.access_log("private")?, before.private_len);
        let delta = |a: &BTreeMap<u32, f64>, b: &BTreeMap<u32, f64>| -> f64 {
            a.iter()
                .map(|(n, v)| (v - b.get(n).copied().unwrap_or(0.0)).max(0.0))
                .sum()
        };
        self.peer = delta(&after.peer, &before.peer);
        // The other side of the same bytes: what peer endpoints sent (a cross-check).
        self.served = delta(&after.served, &before.served);
        Ok(())
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MB from peers, {:.1} MB from upstream",
            self.peer / 1e6,
            self.upstream as f64 / 1e6
        )?;
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, Duration, Split)>,
}

impl Report {
    fn add(&mut self, name: &str, took: Duration, split: Split) {
        self.rows.push((name.to_string(), took, split));
    }

    /// The per-scenario table, on stderr and in CLUSTER_DIR/results.md.
    fn write(&self, c: &Cluster, total: Duration) -> Result<()> {
        let mut s = String::from(
            "| scenario | time | from peers (received) | sent by peer endpoints | from upstream | notes |\n|---|---|---|---|---|---|\n",
        );
        for (name, took, split) in &self.rows {
            let _ = writeln!(
                s,
                "| {name} | {:.0} s | {:.1} MB | {:.1} MB | {:.1} MB | {} |",
                took.as_secs_f64(),
                split.peer / 1e6,
                split.served / 1e6,
                split.upstream as f64 / 1e6,
                split.notes.join("; ")
            );
        }
        let _ = writeln!(s, "\ntotal (with bring-up): {:.0} s", total.as_secs_f64());
        eprintln!("{s}");
        std::fs::write(c.dir.join("results.md"), &s).context("writing results.md")?;
        Ok(())
    }
}
