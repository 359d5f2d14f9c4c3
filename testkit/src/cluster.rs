//! Driving the cluster tier (`tests/cluster/cluster.sh`): a real Kubernetes cluster on network
//! namespaces (kubelets, containerd, CNI, kube-proxy). Brings it up once per test binary,
//! hands out kubectl, helm and node commands, and reads what the scenarios assert on: daemon
//! metrics from inside a node, audit lines from `kubectl logs`, the upstream registry's access
//! log. `cluster.sh down` runs on drop, also when a scenario fails.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;

use crate::rig::{Series, sum_series};

/// The longest any single wait in the cluster scenarios may take.
pub const WAIT: Duration = Duration::from_secs(180);
/// The release and namespace the scenarios install the chart as.
pub const RELEASE: &str = "speculum";
pub const NAMESPACE: &str = "speculum-system";

/// One image `tests/cluster/images.py` made (`images.json`).
#[derive(Deserialize, Debug, Clone)]
pub struct ClusterImage {
    /// `name:tag`, e.g. `big:v1`.
    pub name: String,
    /// `upstream` or `private`.
    pub registry: String,
    pub layout: String,
    pub tag: String,
    /// `host:port/repo:tag`.
    pub full: String,
    pub by_digest: String,
    pub digest: String,
    pub layers: Vec<Layer>,
    pub bytes: u64,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
}

#[derive(Deserialize)]
struct ImagesFile {
    images: Vec<ClusterImage>,
}

/// One line of a registry's access log (combined format).
#[derive(Debug, Clone)]
pub struct Access {
    pub client: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
}

/// A running cluster; `cluster.sh down` when dropped.
pub struct Cluster {
    pub script: PathBuf,
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub started: Instant,
    // Dropped after `Drop::drop` ran `down`: the next test run waits until this one is gone.
    _lock: std::fs::File,
}

impl Cluster {
    /// Brings the cluster up. Never skips: every reason it cannot run is an error.
    pub fn start(extra_env: &[(&str, &str)]) -> Result<Cluster> {
        ensure!(
            crate::rig::is_root()?,
            "the cluster tier needs root (namespaces, mounts, cgroups)"
        );
        let repo = repo_root();
        let script = repo.join("tests/cluster/cluster.sh");
        let dir = PathBuf::from(
            std::env::var("CLUSTER_DIR").unwrap_or_else(|_| "/tmp/speculum-cluster".into()),
        );
        let helm = crate::helm::helm().context("helm is needed (scripts/setup.sh)")?;
        let lock = test_lock(&dir)?;
        let started = Instant::now();
        let mut up = Command::new("bash");
        up.arg(&script).arg("up").envs(extra_env.iter().copied());
        // Whatever `up` leaves behind is removed by this guard's drop too.
        let mut cluster = Cluster {
            script,
            dir,
            env: BTreeMap::new(),
            kubectl: PathBuf::new(),
            helm,
            started,
            _lock: lock,
        };
        cluster.step("cluster up");
        // Its progress goes to our stderr as it happens (a cold first run builds binaries).
        run_loud(&mut up, Duration::from_secs(1800)).context("cluster.sh up")?;
        let env = run(Command::new("bash").arg(&cluster.script).arg("env"), WAIT)?;
        cluster.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        cluster.kubectl = PathBuf::from(cluster.var("CLUSTER_K8S_BIN")?).join("kubectl");
        cluster.step(&format!("cluster up in {:.0?}", cluster.started.elapsed()));
        Ok(cluster)
    }

    pub fn var(&self, key: &str) -> Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("cluster.sh env printed no {key}"))
    }

    pub fn step(&self, what: &str) {
        let _ = writeln!(
            std::io::stderr(),
            "[{:>6.1}s] {what}",
            self.started.elapsed().as_secs_f64()
        );
    }

    pub fn upstream(&self) -> Result<&str> {
        self.var("CLUSTER_UPSTREAM")
    }

    pub fn nodes(&self) -> Result<u32> {
        self.var("CLUSTER_NODES")?.parse().context("CLUSTER_NODES")
    }

    /// Node `n`'s address on the cluster subnet.
    pub fn node_ip(&self, n: u32) -> Result<String> {
        self.var("CLUSTER_NODE_IPS")?
            .split_whitespace()
            .nth(n as usize - 1)
            .map(str::to_string)
            .with_context(|| format!("no node {n}"))
    }

    pub fn kube_cmd(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", self.dir.join("kubeconfig"));
        c
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(self.kube_cmd().args(args), WAIT)
    }

    /// `kubectl apply -f -` of a manifest (YAML or JSON).
    pub fn apply(&self, manifest: &str) -> Result<String> {
        run_stdin(self.kube_cmd().args(["apply", "-f", "-"]), manifest, WAIT)
    }

    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all)?;
        serde_json::from_str(&out).with_context(|| format!("kubectl {args:?} printed {out:.200}"))
    }

    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.helm);
        c.env("KUBECONFIG", self.dir.join("kubeconfig")).args(args);
        run(&mut c, Duration::from_secs(900))
    }

    /// CMD inside node `n` (its network and mount namespace).
    pub fn node_exec(&self, n: u32, args: &[&str]) -> Result<String> {
        let mut c = Command::new("bash");
        c.arg(&self.script)
            .arg("exec")
            .arg(n.to_string())
            .args(args);
        run(&mut c, WAIT)
    }

    /// A cluster.sh subcommand (`upstream-stop`, `push SRC DEST`, …).
    pub fn script(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("bash");
        c.arg(&self.script).args(args);
        run(&mut c, WAIT)
    }

    /// The host path of a node file (the source of its mount namespace's binds), e.g.
    /// `node_path(1, "/etc/containerd/certs.d")`.
    pub fn node_path(&self, n: u32, path: &str) -> Result<PathBuf> {
        let d = self.dir.join(format!("n{n}"));
        for (inside, outside) in [
            ("/etc/containerd", "etc-containerd"),
            ("/var/lib", "var-lib"),
            ("/var/log", "var-log"),
            ("/run/containerd", "run-containerd"),
        ] {
            if let Some(rest) = path.strip_prefix(inside) {
                return Ok(d.join(outside).join(rest.trim_start_matches('/')));
            }
        }
        bail!("{path} is not under a node bind")
    }

    pub fn images(&self) -> Result<BTreeMap<String, ClusterImage>> {
        let path = self.var("CLUSTER_IMAGES")?;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let file: ImagesFile = serde_json::from_str(&text).context("images.json")?;
        Ok(file
            .images
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect())
    }

    /// Node `n`'s daemon `/metrics`, fetched from inside the node (the daemon is hostNetwork).
    pub fn metrics(&self, n: u32) -> Result<String> {
        self.node_exec(
            n,
            &[
                "curl",
                "-fsS",
                "--max-time",
                "5",
                "http://127.0.0.1:9402/metrics",
            ],
        )
    }

    pub fn metric(&self, n: u32, series: &Series) -> Result<f64> {
        Ok(sum_series(&self.metrics(n)?, series))
    }

    /// Every request in the upstream registry's access log so far.
    pub fn access_log(&self, registry: &str) -> Result<Vec<Access>> {
        let path = self.dir.join(registry).join("access.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        Ok(text.lines().filter_map(parse_access).collect())
    }

    /// Polls `check` every 500 ms until it returns true; fails after `limit` with `what`.
    pub fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let t0 = Instant::now();
        let mut last_err = None;
        loop {
            match check() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            if t0.elapsed() > limit {
                match last_err {
                    Some(e) => {
                        bail!("timed out after {limit:?} waiting for {what}; last error: {e:#}")
                    }
                    None => bail!("timed out after {limit:?} waiting for {what}"),
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The speculum daemon pod on node `n` (`nN`), if any.
    pub fn daemon_pod(&self, n: u32) -> Result<Option<String>> {
        let pods = self.kubectl_json(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=daemon",
            "--field-selector",
            &format!("spec.nodeName=n{n}"),
        ])?;
        Ok(pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["metadata"]["deletionTimestamp"].is_null())
            .and_then(|p| p["metadata"]["name"].as_str())
            .map(str::to_string))
    }

    /// The audit records node `n`'s daemon pod logged (JSON lines with an `event` field).
    pub fn audit(&self, n: u32) -> Result<Vec<Value>> {
        let pod = self
            .daemon_pod(n)?
            .with_context(|| format!("no daemon pod on n{n}"))?;
        let logs = self.kubectl(&["logs", "-n", NAMESPACE, &pod, "-c", "speculum"])?;
        Ok(logs
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| audit_line(&v))
            .collect())
    }
}

/// An audit record out of one JSON log line: the daemon's JSON log carries it, as a JSON
/// string, in `message` (target `speculum::audit`); an audit file line is the record itself.
fn audit_line(line: &Value) -> Option<Value> {
    let is_audit = |v: &Value| v.get("event").is_some() && v.get("served_from").is_some();
    if is_audit(line) {
        return Some(line.clone());
    }
    let msg = line
        .get("message")
        .or_else(|| line.get("fields")?.get("message"))?
        .as_str()?;
    let inner: Value = serde_json::from_str(msg).ok()?;
    is_audit(&inner).then_some(inner)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var("CLUSTER_KEEP").as_deref() == Ok("1") {
            self.step(
                "CLUSTER_KEEP=1: leaving the cluster up (tests/cluster/cluster.sh down removes it)",
            );
            return;
        }
        self.step("cluster down");
        let mut c = Command::new("bash");
        c.arg(&self.script).arg("down");
        if let Err(e) = run_loud(&mut c, Duration::from_secs(300)) {
            eprintln!("cluster.sh down failed: {e:#}");
        }
    }
}

/// A lock held for the whole test: one cluster per `CLUSTER_DIR` at a time (cluster.sh's own
/// lock only covers one `up` or `down`).
fn test_lock(dir: &Path) -> Result<std::fs::File> {
    let path = format!("{}.test.lock", dir.display());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    file.lock().with_context(|| format!("locking {path}"))?;
    Ok(file)
}

pub fn repo_root() -> PathBuf {
    crate::repo_root()
}

/// `IP - - [time] "METHOD PATH PROTO" STATUS BYTES "referer" "agent"`.
pub fn parse_access(line: &str) -> Option<Access> {
    let client = line.split_whitespace().next()?.to_string();
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split_whitespace();
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let mut tail = rest.split_whitespace();
    let status = tail.next()?.parse().ok()?;
    let bytes = tail.next()?.parse().unwrap_or(0);
    Some(Access {
        client,
        method,
        path,
        status,
        bytes,
    })
}

/// Runs a command with a bound; stdout on success, else an error with stderr.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<String> {
    cmd.stderr(Stdio::piped());
    run_loud(cmd, limit)
}

/// [`run`] with the child's stderr going to ours (unless the caller piped it).
pub fn run_loud(cmd: &mut Command, limit: Duration) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    finish(cmd, child, limit)
}

pub fn run_stdin(cmd: &mut Command, input: &str, limit: Duration) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())
        .context("writing stdin")?;
    finish(cmd, child, limit)
}

fn finish(cmd: &Command, child: std::process::Child, limit: Duration) -> Result<String> {
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut child = child;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(err) = err.as_mut() {
            let _ = std::io::Read::read_to_string(err, &mut s);
        }
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if !status.success() {
        bail!("{cmd:?}: {status}\n{}", tail(&stderr, 4000));
    }
    Ok(stdout)
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}
