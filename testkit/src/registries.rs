//! A real CNCF distribution registry (`docker-registry`) on 127.0.0.1, started and
//! stopped by the test, with optional htpasswd (Basic) or token (Bearer) auth, and helpers to
//! push small images and indexes into it over the registry API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// How the registry authenticates.
pub enum Auth {
    None,
    /// htpasswd users (bcrypt entries, as distribution requires).
    Htpasswd(Vec<(String, String)>),
    /// Token auth: realm URL, service, issuer, and the PEM bundle of the token signer.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_pem: String,
    },
}

/// One `docker-registry` process. Killed (by PID, it is our child) on drop.
pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    config: PathBuf,
    /// `Authorization` header value used for pushes.
    pub push_auth: Option<String>,
}

pub fn free_port() -> u16 {
    // Bind :0, read the port, release it. A race with another process is possible but rare;
    // `start` fails loudly if the registry cannot bind.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        Registry::start_on(free_port(), auth)
    }

    pub fn start_on(port: u16, auth: Auth) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth_yaml = match &auth {
            Auth::None => String::new(),
            Auth::Htpasswd(users) => {
                let mut lines = String::new();
                for (u, p) in users {
                    let out = Command::new("htpasswd")
                        .args(["-Bbn", u, p])
                        .output()
                        .expect("htpasswd (apache2-utils)");
                    assert!(out.status.success(), "htpasswd failed");
                    lines.push_str(String::from_utf8_lossy(&out.stdout).trim());
                    lines.push('\n');
                }
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, lines).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                    path.display()
                )
            }
            Auth::Token {
                realm,
                service,
                issuer,
                root_cert_pem,
            } => {
                let path = dir.path().join("token-ca.pem");
                std::fs::write(&path, root_cert_pem).expect("write token ca");
                format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                    path.display()
                )
            }
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_yaml}",
                dir.path().join("data").display()
            ),
        )
        .expect("write config");
        let push_auth = match &auth {
            Auth::Htpasswd(users) => users.first().map(|(u, p)| basic(u, p)),
            _ => None,
        };
        let mut r = Registry {
            port,
            dir,
            child: None,
            config,
            push_auth,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry");
        self.child = Some(child);
        self.wait_up();
    }

    /// Polls `GET /v2/` until the registry answers (any status), for at most 10 s.
    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("docker-registry exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "registry on port {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the process (SIGKILL to our own child) and waits for it to go away.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same registry (same port, same storage) again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// POST to open an upload, then a single PUT with the whole blob (distribution 2.8 does
    /// not take the body on the POST).
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let url = format!("http://{}/v2/{repo}/blobs/uploads/", self.host());
        let mut req = Self::client().post(url);
        if let Some(a) = &self.push_auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("blob upload start");
        assert_eq!(resp.status().as_u16(), 202, "upload start");
        let location = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .expect("location")
            .to_owned();
        let location = if location.starts_with('/') {
            format!("http://{}{location}", self.host())
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut req = Self::client()
            .put(format!("{location}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec());
        if let Some(a) = &self.push_auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("blob upload put");
        assert_eq!(
            resp.status().as_u16(),
            201,
            "blob put: {:?}",
            resp.text().await
        );
        digest
    }

    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let url = format!("http://{}/v2/{repo}/manifests/{reference}", self.host());
        let mut req = Self::client()
            .put(url)
            .header("content-type", media_type)
            .body(bytes.to_vec());
        if let Some(a) = &self.push_auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("manifest put");
        assert_eq!(
            resp.status().as_u16(),
            201,
            "manifest put: {:?}",
            resp.text().await
        );
        sha256(bytes)
    }

    /// Pushes a one-layer image for `arch` and tags it; returns the manifest digest.
    pub async fn push_image(&self, repo: &str, tag: &str, arch: &str, salt: &str) -> String {
        let (manifest, _) = self.image_manifest(repo, arch, salt).await;
        self.push_manifest(repo, tag, OCI_MANIFEST, &manifest).await
    }

    async fn image_manifest(&self, repo: &str, arch: &str, salt: &str) -> (Vec<u8>, String) {
        let layer = format!("layer {repo} {arch} {salt}").into_bytes();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Labels": {"salt": salt}},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}
        })
        .to_string()
        .into_bytes();
        let config_digest = self.push_blob(repo, &config).await;
        let layer_digest = self.push_blob(repo, &layer).await;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]
        }))
        .expect("json");
        let digest = sha256(&manifest);
        (manifest, digest)
    }

    /// Pushes an amd64 + arm64 index and tags it; returns (index digest, child digests).
    pub async fn push_index(&self, repo: &str, tag: &str, salt: &str) -> (String, Vec<String>) {
        let mut children = Vec::new();
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let (m, d) = self.image_manifest(repo, arch, salt).await;
            self.push_manifest(repo, &d, OCI_MANIFEST, &m).await;
            entries.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": {"architecture": arch, "os": "linux"}}));
            children.push(d);
        }
        let index = serde_json::to_vec(
            &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
        )
        .expect("json");
        (
            self.push_manifest(repo, tag, OCI_INDEX, &index).await,
            children,
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
