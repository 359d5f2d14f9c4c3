//! Serving certificates and the MutatingWebhookConfiguration they are trusted through.
//!
//! Two modes. *Self-managed*: generate a CA and a serving certificate ([`generate`]), keep them
//! in a `kubernetes.io/tls` Secret shared by all replicas, put the CA into `caBundle` of our
//! MutatingWebhookConfiguration and rotate before expiry ([`KubeCertManager`]). During a
//! rotation the bundle holds the new and the previous CA, so replicas still serving the old
//! certificate keep working until they reload. *Bring-your-own* (cert-manager): read
//! `tls.crt`/`tls.key` files and reload them when they change ([`FileCerts`]).
//!
//! Either way the server reads the current [`TlsState`] at every TLS accept, so a new
//! certificate takes effect without a restart. [`webhook_configuration`] renders the
//! MutatingWebhookConfiguration (rules, namespace selector with opt-in/opt-out labels,
//! failurePolicy, timeout) as pure data.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::admit::FailurePolicy;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("PEM {what}: {message}")]
    Pem { what: &'static str, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// A CA, a serving certificate it signed, and when that certificate expires.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// Generates a fresh CA and a serving certificate for `dns_names` valid for `validity`.
pub fn generate(dns_names: &[String], validity: Duration) -> Result<Bundle, CertError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();
    // A little slack backwards for API servers whose clocks run behind ours.
    let not_before = now - time::Duration::minutes(5);
    let not_after = now + time::Duration::seconds(validity.as_secs().min(i64::MAX as u64) as i64);

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "speculum-webhook-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(dns_names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| "speculum-webhook".into()),
    );
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Bundle {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: SystemTime::UNIX_EPOCH
            + Duration::from_secs(not_after.unix_timestamp().max(0) as u64),
    })
}

/// Builds a rustls server config from PEM (certificate chain and private key).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, CertError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem {
            what: "certificate",
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            what: "certificate",
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Pem {
        what: "private key",
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // The API server speaks HTTP/1.1 (and h2); we serve HTTP/1.1 only.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The serving configuration in force; swapped whole on reload.
#[derive(Clone)]
pub struct TlsState(Arc<RwLock<Arc<ServerConfig>>>);

impl TlsState {
    pub fn new(cfg: ServerConfig) -> TlsState {
        TlsState(Arc::new(RwLock::new(Arc::new(cfg))))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, cfg: ServerConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
    }
}

/// Certificate files written by someone else (cert-manager), reloaded when they change.
pub struct FileCerts {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl FileCerts {
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>), CertError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| CertError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    pub fn load(&self) -> Result<ServerConfig, CertError> {
        let (c, k) = self.read()?;
        server_config(&c, &k)
    }

    /// Polls the files every `interval` and swaps the TLS config when their content changes.
    /// A broken new pair is logged and the old one kept.
    pub async fn run(
        self,
        state: TlsState,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut last = self.read().ok();
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let Ok(now) = self.read() else { continue };
            if last.as_ref() == Some(&now) {
                continue;
            }
            match server_config(&now.0, &now.1) {
                Ok(cfg) => {
                    state.replace(cfg);
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                    last = Some(now);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new certificate files are unusable; keeping the old ones")
                }
            }
        }
    }
}

/// Where the webhook is reachable and how the API server should call it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Name of our MutatingWebhookConfiguration.
    pub configuration_name: String,
    pub service_name: String,
    pub service_namespace: String,
    pub service_port: u16,
    /// Secret holding the self-managed certificate.
    pub secret_name: String,
    pub failure_policy: FailurePolicy,
    /// `timeoutSeconds` of the webhook (1–30).
    pub timeout_seconds: u32,
    /// Namespaces must carry this label (`key=value`, or `key` for any value) to be mutated.
    /// Empty: every namespace is mutated unless opted out.
    pub opt_in_label: String,
    /// Namespaces with this label key set to `disabled` are never mutated.
    pub opt_out_label: String,
    #[serde(with = "humantime_serde")]
    pub cert_validity: Duration,
    /// Rotate when less than this remains.
    #[serde(with = "humantime_serde")]
    pub rotate_before: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            configuration_name: "speculum-webhook".into(),
            service_name: "speculum-webhook".into(),
            service_namespace: "speculum-system".into(),
            service_port: 443,
            secret_name: "speculum-webhook-tls".into(),
            failure_policy: FailurePolicy::Ignore,
            timeout_seconds: 10,
            opt_in_label: String::new(),
            opt_out_label: "speculum.io/pinning".into(),
            cert_validity: Duration::from_secs(365 * 24 * 3600),
            rotate_before: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl WebhookConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if !(1..=30).contains(&self.timeout_seconds) {
            e.push(format!(
                "webhook.timeoutSeconds is {}, must be 1..30",
                self.timeout_seconds
            ));
        }
        if self.rotate_before >= self.cert_validity {
            e.push("webhook.rotateBefore must be shorter than webhook.certValidity".into());
        }
        for (name, v) in [
            ("configurationName", &self.configuration_name),
            ("serviceName", &self.service_name),
            ("serviceNamespace", &self.service_namespace),
            ("secretName", &self.secret_name),
        ] {
            if v.is_empty() {
                e.push(format!("webhook.{name} must not be empty"));
            }
        }
        e
    }

    /// DNS names the serving certificate must carry.
    pub fn dns_names(&self) -> Vec<String> {
        let (s, n) = (&self.service_name, &self.service_namespace);
        vec![
            format!("{s}.{n}.svc"),
            format!("{s}.{n}.svc.cluster.local"),
            format!("{s}.{n}"),
        ]
    }
}

/// Renders our MutatingWebhookConfiguration. Two webhooks share one endpoint: pods (including
/// the ephemeralcontainers subresource) and workload templates. `reinvocationPolicy:
/// IfNeeded` lets us see images other webhooks inject; our patch is idempotent.
pub fn webhook_configuration(cfg: &WebhookConfig, ca_bundle_pem: &str) -> Value {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem);
    // Never our own namespace (a webhook pod waiting on itself) nor kube-system (the control
    // plane's own pods must not depend on us); the chart renders the same selector.
    let mut exprs = vec![
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [cfg.service_namespace, "kube-system"]}),
    ];
    if !cfg.opt_out_label.is_empty() {
        exprs.push(json!({"key": cfg.opt_out_label, "operator": "NotIn", "values": ["disabled"]}));
    }
    if !cfg.opt_in_label.is_empty() {
        match cfg.opt_in_label.split_once('=') {
            Some((k, v)) => exprs.push(json!({"key": k, "operator": "In", "values": [v]})),
            None => exprs.push(json!({"key": cfg.opt_in_label, "operator": "Exists"})),
        }
    }
    let failure = match cfg.failure_policy {
        FailurePolicy::Ignore => "Ignore",
        FailurePolicy::Fail => "Fail",
    };
    let hook = |name: &str, rules: Value| {
        json!({
            "name": format!("{name}.speculum.io"),
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure,
            "timeoutSeconds": cfg.timeout_seconds,
            "reinvocationPolicy": "IfNeeded",
            "matchPolicy": "Equivalent",
            "namespaceSelector": {"matchExpressions": exprs},
            "clientConfig": {
                "service": {"name": cfg.service_name, "namespace": cfg.service_namespace, "path": "/mutate", "port": cfg.service_port},
                "caBundle": ca,
            },
            "rules": rules,
        })
    };
    let ops = json!(["CREATE", "UPDATE"]);
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": cfg.configuration_name},
        "webhooks": [
            hook("pods", json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ops, "resources": ["pods", "pods/ephemeralcontainers"], "scope": "Namespaced"}])),
            hook("workloads", json!([
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ops, "resources": ["replicationcontrollers", "podtemplates"], "scope": "Namespaced"},
                {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ops, "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"], "scope": "Namespaced"},
                {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ops, "resources": ["jobs", "cronjobs"], "scope": "Namespaced"}
            ])),
        ]
    })
}

/// True when the certificate whose expiry (unix seconds, our annotation) is given must be
/// replaced now: unknown, unparsable, expired, or within `rotate_before` of expiry.
pub fn needs_rotation(not_after: Option<&str>, now: SystemTime, rotate_before: Duration) -> bool {
    let Some(secs) = not_after.and_then(|s| s.trim().parse::<u64>().ok()) else {
        return true;
    };
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    expiry
        .duration_since(now)
        .map_or(true, |left| left <= rotate_before)
}

/// The `caBundle` after a rotation: the new CA, then the newest CA of the old bundle, so
/// replicas still serving the old certificate stay trusted. Older CAs are dropped.
pub fn rotated_bundle(new_ca: &str, old_bundle: Option<&str>) -> String {
    let previous = old_bundle
        .and_then(|b| b.split_inclusive("-----END CERTIFICATE-----").next())
        .map(str::trim)
        .filter(|c| c.starts_with("-----BEGIN CERTIFICATE-----"))
        .unwrap_or_default();
    let mut out = new_ca.trim_end().to_owned();
    out.push('\n');
    if !previous.is_empty() && previous != new_ca.trim() {
        out.push_str(previous);
        out.push('\n');
    }
    out
}

/// Self-managed certificates in a Secret, trusted through our webhook configuration.
pub struct KubeCertManager {
    pub client: kube::Client,
    pub cfg: WebhookConfig,
}

const NOT_AFTER_ANNOTATION: &str = "speculum.io/not-after";

impl KubeCertManager {
    /// Makes sure a valid certificate exists (creating or rotating it), that `caBundle` trusts
    /// it, and returns the TLS config to serve with. When several replicas start at once, all
    /// but one lose the write race (409 Conflict / AlreadyExists); they read the winner's.
    pub async fn ensure(&self) -> Result<ServerConfig, CertError> {
        let mut attempt = 0;
        loop {
            match self.ensure_once().await {
                Err(CertError::Kube(kube::Error::Api(status)))
                    if attempt < 3 && (status.is_conflict() || status.code == 409) =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn ensure_once(&self) -> Result<ServerConfig, CertError> {
        use k8s_openapi::ByteString;
        use k8s_openapi::api::core::v1::Secret;
        let api: kube::Api<Secret> =
            kube::Api::namespaced(self.client.clone(), &self.cfg.service_namespace);
        let existing = api.get_opt(&self.cfg.secret_name).await?;
        let now = SystemTime::now();
        let usable = existing.as_ref().and_then(|s| {
            let annotation = s.metadata.annotations.as_ref()?.get(NOT_AFTER_ANNOTATION);
            if needs_rotation(annotation.map(String::as_str), now, self.cfg.rotate_before) {
                return None;
            }
            let data = s.data.as_ref()?;
            let field = |k: &str| data.get(k).map(|b| b.0.clone()).unwrap_or_default();
            Some((field("tls.crt"), field("tls.key"), field("ca.crt")))
        });
        let (cert, key, ca_bundle) = match usable {
            Some(t) => t,
            None => {
                let b = generate(&self.cfg.dns_names(), self.cfg.cert_validity)?;
                // Keep the previous CA trusted during the switch (see module docs).
                let previous = existing.as_ref().and_then(|s| {
                    s.data
                        .as_ref()?
                        .get("ca.crt")
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                });
                let bundle = rotated_bundle(&b.ca_pem, previous.as_deref());
                let not_after = b
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.cfg.secret_name.clone()),
                        namespace: Some(self.cfg.service_namespace.clone()),
                        annotations: Some(
                            [(NOT_AFTER_ANNOTATION.to_owned(), not_after.to_string())].into(),
                        ),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(
                        [
                            (
                                "tls.crt".to_owned(),
                                ByteString(b.cert_pem.clone().into_bytes()),
                            ),
                            (
                                "tls.key".to_owned(),
                                ByteString(b.key_pem.clone().into_bytes()),
                            ),
                            ("ca.crt".to_owned(), ByteString(bundle.clone().into_bytes())),
                        ]
                        .into(),
                    ),
                    ..Default::default()
                };
                let pp = kube::api::PostParams::default();
                let written = match &existing {
                    // resourceVersion makes concurrent rotations by two replicas conflict
                    // instead of overwriting each other; the loser re-reads next round.
                    Some(old) => {
                        secret.metadata.resource_version = old.metadata.resource_version.clone();
                        api.replace(&self.cfg.secret_name, &pp, &secret).await
                    }
                    None => api.create(&pp, &secret).await,
                };
                if let Err(e) = written {
                    tracing::info!(error = %e, "writing the certificate secret failed; another replica may have won");
                    return Err(e.into());
                }
                tracing::info!(secret = %self.cfg.secret_name, "generated a new serving certificate");
                (
                    b.cert_pem.into_bytes(),
                    b.key_pem.into_bytes(),
                    bundle.into_bytes(),
                )
            }
        };
        self.patch_ca_bundle(&String::from_utf8_lossy(&ca_bundle))
            .await?;
        server_config(&cert, &key)
    }

    /// Sets `caBundle` on every webhook of our configuration, creating it if it is missing.
    async fn patch_ca_bundle(&self, ca_pem: &str) -> Result<(), CertError> {
        use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration as Mwc;
        let api: kube::Api<Mwc> = kube::Api::all(self.client.clone());
        let desired = webhook_configuration(&self.cfg, ca_pem);
        let pp = kube::api::PatchParams::apply("speculum-webhook").force();
        api.patch(
            &self.cfg.configuration_name,
            &pp,
            &kube::api::Patch::Apply(&desired),
        )
        .await?;
        Ok(())
    }

    /// Re-checks every `interval`: rotates when due, and picks up a certificate another
    /// replica rotated.
    pub async fn run(
        self,
        state: TlsState,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            match self.ensure().await {
                Ok(cfg) => state.replace(cfg),
                Err(e) => {
                    tracing::warn!(error = %e, "certificate check failed; keeping the current one")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bundle_serves() {
        let b = generate(
            &["speculum-webhook.x.svc".into()],
            Duration::from_secs(3600),
        )
        .expect("generate");
        assert!(b.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let left = b
            .not_after
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(
            left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
            "{left:?}"
        );
        server_config(b.cert_pem.as_bytes(), b.key_pem.as_bytes()).expect("rustls accepts it");
        assert!(server_config(b"nope", b.key_pem.as_bytes()).is_err());
        assert!(server_config(b.cert_pem.as_bytes(), b"nope").is_err());
    }

    #[test]
    fn configuration_table() {
        let base = WebhookConfig::default();
        let cases = [
            ("default", base.clone(), "Ignore", 2usize),
            (
                "opt-in key=value",
                WebhookConfig {
                    opt_in_label: "speculum.io/pin=enabled".into(),
                    ..base.clone()
                },
                "Ignore",
                3,
            ),
            (
                "opt-in key",
                WebhookConfig {
                    opt_in_label: "pin".into(),
                    opt_out_label: String::new(),
                    failure_policy: FailurePolicy::Fail,
                    ..base.clone()
                },
                "Fail",
                2,
            ),
        ];
        for (name, cfg, failure, exprs) in cases {
            let v = webhook_configuration(&cfg, "CA");
            for hook in v["webhooks"].as_array().expect("webhooks") {
                assert_eq!(hook["failurePolicy"], failure, "{name}");
                assert_eq!(hook["timeoutSeconds"], 10, "{name}");
                assert_eq!(hook["clientConfig"]["caBundle"], "Q0E=", "{name}");
                assert_eq!(
                    hook["namespaceSelector"]["matchExpressions"]
                        .as_array()
                        .map(Vec::len),
                    Some(exprs),
                    "{name}"
                );
            }
        }
        assert!(
            WebhookConfig {
                timeout_seconds: 31,
                ..base.clone()
            }
            .validate()
            .len()
                == 1
        );
        assert!(base.validate().is_empty());
    }

    // Paused time: the poll interval and the waits below advance virtually, so "several poll
    // rounds" is exact and the test takes no wall-clock time.
    #[tokio::test(start_paused = true)]
    async fn file_certs_reload_on_change_and_keep_the_old_on_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCerts {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        let write = |b: &Bundle| {
            std::fs::write(&files.cert, &b.cert_pem).expect("cert");
            std::fs::write(&files.key, &b.key_pem).expect("key");
        };
        write(&generate(&["a".into()], Duration::from_secs(3600)).expect("a"));
        let state = TlsState::new(files.load().expect("load"));
        let first = state.current();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cert_path = files.cert.clone();
        let key_path = files.key.clone();
        let task = tokio::spawn(
            files.run(state.clone(), Duration::from_millis(20), async move {
                let _ = stop_rx.await;
            }),
        );

        // Garbage is ignored: the current config stays.
        std::fs::write(&cert_path, "garbage").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await; // five poll rounds: nothing may change
        assert!(Arc::ptr_eq(&first, &state.current()));

        let b = generate(&["b".into()], Duration::from_secs(3600)).expect("b");
        std::fs::write(&key_path, &b.key_pem).expect("key");
        std::fs::write(&cert_path, &b.cert_pem).expect("cert");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::ptr_eq(&first, &state.current()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "certificate not reloaded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("join");
    }

    #[test]
    fn rotation_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let cases = [
            ("missing", None, true),
            ("garbage", Some("soon"), true),
            ("expired", Some("999999"), true),
            ("inside the window", Some("1086400"), true),
            ("just outside", Some("1086401"), false),
            ("far away", Some("99999999"), false),
        ];
        for (name, ann, want) in cases {
            assert_eq!(needs_rotation(ann, now, day), want, "{name}");
        }
    }

    #[test]
    fn rotated_bundle_keeps_one_previous_ca() {
        let ca = |n: &str| format!("-----BEGIN CERTIFICATE-----\n{n}\n-----END CERTIFICATE-----\n");
        let cases = [
            ("first", None, ca("new")),
            (
                "rotation",
                Some(ca("old")),
                format!("{}{}", ca("new"), ca("old")),
            ),
            (
                "second rotation drops the oldest",
                Some(format!("{}{}", ca("old"), ca("older"))),
                format!("{}{}", ca("new"), ca("old")),
            ),
            ("garbage", Some("junk".to_owned()), ca("new")),
        ];
        for (name, old, want) in cases {
            assert_eq!(rotated_bundle(&ca("new"), old.as_deref()), want, "{name}");
        }
    }
}
