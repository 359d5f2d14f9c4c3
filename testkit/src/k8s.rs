//! A real Kubernetes control plane for E2E tests: etcd and kube-apiserver on free 127.0.0.1
//! ports, with generated certificates, RBAC, a ServiceAccount signing key and issuer (projected
//! tokens, `/openid/v1/jwks`) and the admission webhook plugins. No kubelet or scheduler: tests
//! create pods with `spec.nodeName` set.
//!
//! The binaries and certificates come from `tests/k8s/control-plane.sh` (built from source
//! through the Go module proxy on first use, then cached); this module only starts, waits for
//! and stops the processes, and hands out `kube::Client`s. Both processes are our children and
//! are killed by PID when the [`ControlPlane`] drops.
//!
//! Used by the root crate's Kubernetes tests and the webhook's E2E tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};

/// How long the first (cold) build of the binaries may take before the test gives up.
const BUILD_LIMIT: Duration = Duration::from_secs(45 * 60);
/// How long etcd + kube-apiserver may take to report `/readyz` ok.
const READY_LIMIT: Duration = Duration::from_secs(120);

/// True (after printing why) when the Kubernetes tier must not run here: `SPECULUM_SKIP_K8S=1`,
/// or not root (the tier, like the containerd one, assumes the machine `scripts/setup.sh`
/// prepared).
pub fn skip() -> bool {
    if std::env::var("SPECULUM_SKIP_K8S").as_deref() == Ok("1") {
        eprintln!("SKIPPED: Kubernetes E2E tier (SPECULUM_SKIP_K8S=1)");
        return true;
    }
    if !is_root() {
        eprintln!("SKIPPED: Kubernetes E2E tier needs root (run scripts/setup.sh as root)");
        return true;
    }
    false
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `tests/k8s/control-plane.sh` in the repository.
pub fn script() -> PathBuf {
    crate::repo_root().join("tests/k8s/control-plane.sh")
}

fn run_script(args: &[&str], limit: Duration) -> String {
    // `timeout` bounds a cold build; the script's own progress goes to our stderr.
    let out = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .arg("bash")
        .arg(script())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running tests/k8s/control-plane.sh");
    assert!(
        out.status.success(),
        "control-plane.sh {args:?} failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The directory holding `etcd` and `kube-apiserver` (built on first use, then cached).
pub fn binaries() -> PathBuf {
    let started = Instant::now();
    let dir = PathBuf::from(run_script(&["binaries"], BUILD_LIMIT));
    eprintln!(
        "k8s binaries ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    dir
}

fn free_port() -> u16 {
    // Bind :0, read the port, release it. Another process may take it in between (rare); the
    // start then fails loudly with the log tail.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One etcd + kube-apiserver pair. Killed (by PID, both are our children) on drop.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`; also the ServiceAccount token issuer.
    pub server: String,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

impl ControlPlane {
    /// Starts a fresh control plane and waits (bounded) until `/readyz` answers ok.
    pub async fn start() -> ControlPlane {
        // kube's rustls finds both ring and aws-lc-rs in the build; pick one (notes/crates.md).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let bin = binaries();
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_owned();
        run_script(
            &["certs", d.to_str().expect("utf-8 temp path")],
            Duration::from_secs(60),
        );
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let log = |name: &str| std::fs::File::create(d.join(name)).expect("log file");
        let etcd = Command::new(bin.join("etcd"))
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg("--name=e2e")
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=e2e=http://127.0.0.1:{peer_port}"
            ))
            .arg("--log-level=warn")
            // No fsync: the data dies with the test; this keeps etcd off the shared disk's queue.
            .arg("--unsafe-no-fsync")
            .stdout(log("etcd.log"))
            .stderr(log("etcd.log"))
            .spawn()
            .expect("spawning etcd");
        let server = format!("https://127.0.0.1:{api_port}");
        let p = |name: &str| d.join(name).display().to_string();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            // Keep the flags in step with apiserver_flags() in control-plane.sh.
            .args([
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", p("apiserver-certs")),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!("--service-account-issuer={server}"),
                "--service-cluster-ip-range=10.233.0.0/24".into(),
                "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount".into(),
            ])
            // Webhook calls go to 127.0.0.1 directly, never through a proxy from the environment.
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("http_proxy")
            .stdout(log("apiserver.log"))
            .stderr(log("apiserver.log"))
            .spawn()
            .expect("spawning kube-apiserver");
        std::fs::write(d.join("kubeconfig"), kubeconfig(&d, &server)).expect("kubeconfig");
        let mut cp = ControlPlane {
            dir,
            server,
            etcd: Some(etcd),
            apiserver: Some(apiserver),
        };
        cp.wait_ready().await;
        eprintln!(
            "k8s control plane ready in {:.1} s at {}",
            started.elapsed().as_secs_f64(),
            cp.server
        );
        cp
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_LIMIT;
        let client = self.client().await;
        loop {
            for (name, log) in [("etcd", "etcd.log"), ("kube-apiserver", "apiserver.log")] {
                let child = if name == "etcd" {
                    &mut self.etcd
                } else {
                    &mut self.apiserver
                };
                if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                    panic!("{name} exited early ({status}):\n{}", self.log_tail(log));
                }
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within {READY_LIMIT:?}:\n{}",
                self.log_tail("apiserver.log")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last lines of one of the logs in [`ControlPlane::dir`], for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A kubeconfig file for cluster-admin (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// The CA that signed the API server's serving certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A cluster-admin client.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        kube::Client::try_from(cfg).expect("kube client")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first: it would otherwise log etcd reconnects until it dies.
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn kubeconfig(dir: &Path, server: &str) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: admin}}\ncurrent-context: e2e\n",
        p("ca.crt"),
        p("admin.crt"),
        p("admin.key")
    )
}

/// Creates a namespace with `labels` and its `default` ServiceAccount (the ServiceAccount
/// admission plugin requires it for pods, and no controller-manager runs here to create it).
pub async fn namespace(client: &kube::Client, name: &str, labels: &[(&str, &str)]) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), name)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create default service account");
}
