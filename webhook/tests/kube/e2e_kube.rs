//! The webhook against a real kube-apiserver + etcd on 127.0.0.1 (the Kubernetes E2E tier,
//! tests/k8s/): the kube-backed credential source reads real Secrets and ServiceAccounts; the
//! certificate manager creates its Secret, patches `caBundle` and rotates; and the
//! `speculum-webhook` binary, registered with the MutatingWebhookConfiguration it prints itself
//! (URL client config), pins Pods, Deployments and CronJobs created through the API server,
//! with a real pull secret for an htpasswd registry, and leaves an opted-out namespace alone.
//!
//! Skipped with a message when not root or when `SPECULUM_SKIP_K8S=1`. The control plane
//! helper is `testkit::k8s`, shared with the root crate's tests.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use speculum_webhook::certs::{self, KubeCertManager, WebhookConfig};
use speculum_webhook::credentials::{
    CredentialSource, DOCKER_CONFIG_JSON, KubeCredentials, keychain_for,
};
use testkit::k8s;
use testkit::registries::{Auth, Registry};

fn docker_config(registry: &str, user: &str, pass: &str) -> Vec<u8> {
    json!({"auths": {registry: {"username": user, "password": pass}}})
        .to_string()
        .into_bytes()
}

async fn create_pull_secret(client: &kube::Client, ns: &str, name: &str, config: Vec<u8>) {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some(DOCKER_CONFIG_JSON.into()),
        data: Some([(".dockerconfigjson".to_owned(), ByteString(config))].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create pull secret");
}

async fn create_service_account(client: &kube::Client, ns: &str, name: &str, secrets: &[&str]) {
    let sa: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": name},
        "imagePullSecrets": secrets.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
    }))
    .expect("service account");
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create service account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_credentials_read_real_secrets_and_service_accounts() {
    if k8s::skip() {
        return;
    }
    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    k8s::namespace(&client, "creds", &[]).await;
    create_pull_secret(
        &client,
        "creds",
        "pod-cred",
        docker_config("reg.example:5000", "alice", "a-secret"),
    )
    .await;
    create_pull_secret(
        &client,
        "creds",
        "sa-cred",
        docker_config("reg.example:5000/team", "bob", "b-secret"),
    )
    .await;
    create_service_account(&client, "creds", "builder", &["sa-cred", "gone"]).await;

    let source = KubeCredentials::new(client.clone());
    // (name, namespace, secret, want: Some(type) or None for missing)
    let cases = [
        (
            "existing secret",
            "creds",
            "pod-cred",
            Some(DOCKER_CONFIG_JSON),
        ),
        ("missing secret", "creds", "nope", None),
        ("missing namespace", "nowhere", "pod-cred", None),
    ];
    for (name, ns, secret, want) in cases {
        let got = source.secret(ns, secret).await.expect(name);
        assert_eq!(got.as_ref().map(|s| s.type_.as_str()), want, "{name}");
        if let Some(s) = got {
            assert_eq!(
                s.data.get(".dockerconfigjson"),
                Some(&docker_config("reg.example:5000", "alice", "a-secret")),
                "{name}: data comes back decoded"
            );
        }
    }
    // (name, service account, want pull secret names)
    let cases: [(&str, &str, &[&str]); 3] = [
        ("with pull secrets", "builder", &["sa-cred", "gone"]),
        ("default, none", "default", &[]),
        ("missing", "ghost", &[]),
    ];
    for (name, sa, want) in cases {
        let got = source
            .service_account_pull_secrets("creds", sa)
            .await
            .expect(name);
        assert_eq!(got, want, "{name}");
    }

    // The kubelet's order: the pod's own secrets first, then the service account's; the more
    // specific (path) match wins; the missing one is reported, not fatal.
    let chain = keychain_for(&source, "creds", &["pod-cred".into()], Some("builder"))
        .await
        .expect("keychain");
    let users = |repo: &str| -> Vec<String> {
        chain
            .matching("reg.example:5000", repo)
            .into_iter()
            .map(|c| c.username)
            .collect()
    };
    assert_eq!(users("team/app"), ["bob", "alice"]);
    assert_eq!(users("other/app"), ["alice"]);
    assert_eq!(chain.problems, ["secret gone not found"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_creates_secret_patches_ca_bundle_and_rotates() {
    if k8s::skip() {
        return;
    }
    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    k8s::namespace(&client, "speculum-system", &[]).await;
    let cfg = WebhookConfig {
        configuration_name: "e2e-certs".into(),
        cert_validity: Duration::from_secs(3600),
        rotate_before: Duration::from_secs(600),
        ..WebhookConfig::default()
    };
    let mgr = KubeCertManager {
        client: client.clone(),
        cfg: cfg.clone(),
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "speculum-system");
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let field = |s: &Secret, k: &str| -> Vec<u8> {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    let bundles = |m: &MutatingWebhookConfiguration| -> Vec<Vec<u8>> {
        m.webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.clone().unwrap_or_default().0)
            .collect()
    };

    // 1. Nothing exists: the Secret and the configuration are created.
    mgr.ensure().await.expect("first ensure");
    let first = secrets.get(&cfg.secret_name).await.expect("secret created");
    assert_eq!(first.type_.as_deref(), Some("kubernetes.io/tls"));
    let ca1 = field(&first, "ca.crt");
    assert!(ca1.starts_with(b"-----BEGIN CERTIFICATE-----"));
    let mwc = mwcs.get("e2e-certs").await.expect("configuration created");
    assert_eq!(
        bundles(&mwc),
        [ca1.clone(), ca1.clone()],
        "caBundle of both webhooks"
    );

    // 2. Still valid: nothing is rewritten (a restart must not rotate).
    mgr.ensure().await.expect("second ensure");
    let second = secrets.get(&cfg.secret_name).await.expect("secret");
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );

    // 3. Expired (as another replica would see it later): rotated, and the bundle trusts the
    // new CA and the previous one while replicas switch over.
    secrets
        .patch(
            &cfg.secret_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"speculum.io/not-after": "1"}}})),
        )
        .await
        .expect("age the certificate");
    mgr.ensure().await.expect("rotating ensure");
    let third = secrets.get(&cfg.secret_name).await.expect("secret");
    assert_ne!(field(&third, "tls.crt"), field(&first, "tls.crt"));
    let bundle = String::from_utf8(field(&third, "ca.crt")).expect("pem");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    assert!(
        bundle
            .trim_end()
            .ends_with(String::from_utf8_lossy(&ca1).trim()),
        "old CA kept second"
    );
    let mwc = mwcs.get("e2e-certs").await.expect("configuration");
    assert_eq!(
        bundles(&mwc),
        [bundle.clone().into_bytes(), bundle.into_bytes()],
        "caBundle follows the rotation"
    );
}

/// The `speculum-webhook serve` process; killed (our child, by PID) on drop.
struct WebhookProcess {
    child: Child,
    dir: std::path::PathBuf,
}

impl WebhookProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("webhook.err")).unwrap_or_default()
    }
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The webhook's own files in `dir`: a serving certificate for 127.0.0.1 (the URL the API
/// server dials) and a configuration naming `configuration_name`, reaching `registries` over
/// plain HTTP, plus `extra` YAML. Returns (config, CA file, listen port).
fn webhook_files(
    dir: &std::path::Path,
    configuration_name: &str,
    registries: &[&str],
    extra: &str,
) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let bundle = certs::generate(&["127.0.0.1".into()], Duration::from_secs(3600)).expect("certs");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (cert, key, ca) = (
        write("tls.crt", &bundle.cert_pem),
        write("tls.key", &bundle.key_pem),
        write("ca.crt", &bundle.ca_pem),
    );
    let port = free_port();
    let registries: String = registries
        .iter()
        .map(|r| format!("    \"{r}\": {{insecure: true}}\n"))
        .collect();
    let config = write(
        "config.yaml",
        &format!(
            "listen: 127.0.0.1:{port}\nmetricsListen: 127.0.0.1:{}\ntls:\n  mode: files\n  certFile: {}\n  keyFile: {}\nwebhook:\n  configurationName: {configuration_name}\nresolver:\n  registries:\n{registries}{extra}",
            free_port(),
            cert.display(),
            key.display(),
        ),
    );
    (config, ca, port)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn image_of(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {pointer} in {obj}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_pins_workloads_created_through_the_api_server() {
    if k8s::skip() {
        return;
    }
    let open = Registry::start(Auth::None);
    let private = Registry::start(Auth::Htpasswd(vec![("puller".into(), "s3cret".into())]));
    let app_digest = open.push_image("e2e/app", "v1", "amd64", "e2e").await;
    let private_digest = private.push_image("team/app", "v1", "amd64", "e2e").await;
    let app = format!("{}/e2e/app:v1", open.host());
    let private_app = format!("{}/team/app:v1", private.host());

    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    for (ns, labels) in [
        ("speculum-system", &[][..]),
        ("apps", &[][..]),
        ("private", &[][..]),
        ("optout", &[("speculum.io/pinning", "disabled")][..]),
    ] {
        k8s::namespace(&client, ns, labels).await;
    }
    create_pull_secret(
        &client,
        "private",
        "regcred",
        docker_config(&private.host(), "puller", "s3cret"),
    )
    .await;
    create_service_account(&client, "private", "builder", &["regcred"]).await;

    // The webhook's own files: a serving certificate for 127.0.0.1 (the URL the API server
    // dials), and its configuration.
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, ca, port) = webhook_files(
        dir.path(),
        "e2e-pinning",
        &[&open.host(), &private.host()],
        "",
    );
    let bin = env!("CARGO_BIN_EXE_speculum-webhook");

    // The MutatingWebhookConfiguration exactly as the binary prints it, with the in-cluster
    // Service reference swapped for the URL of this process.
    let out = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("configuration")
        .arg("--ca-file")
        .arg(&ca)
        .output()
        .expect("speculum-webhook configuration");
    assert!(
        out.status.success(),
        "configuration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut mwc: Value = serde_json::from_slice(&out.stdout).expect("configuration is JSON");
    for hook in mwc["webhooks"].as_array_mut().expect("webhooks") {
        let cc = &mut hook["clientConfig"];
        assert!(cc.get("service").is_some(), "rendered with a service: {cc}");
        cc.as_object_mut().expect("clientConfig").remove("service");
        cc["url"] = json!(format!("https://127.0.0.1:{port}/mutate"));
    }
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(mwc).expect("typed");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .expect("the API server accepts the rendered configuration");

    let stderr = std::fs::File::create(dir.path().join("webhook.err")).expect("log");
    let webhook = WebhookProcess {
        child: Command::new(bin)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("KUBECONFIG", cp.kubeconfig())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("speculum-webhook serve"),
        dir: dir.path().to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "webhook did not listen:\n{}",
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pod = |name: &str, image: &str, extra: Value| -> Pod {
        let mut spec = json!({"nodeName": "node-a", "containers": [{"name": "c", "image": image}]});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod")
    };
    let pods = |ns: &str| Api::<Pod>::namespaced(client.clone(), ns);
    let as_json = |p: &Pod| serde_json::to_value(p).expect("json");

    // The API server picks the configuration up through an informer: wait (bounded) until a
    // dry-run pod comes back pinned.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pods("apps")
            .create(&dry, &pod("probe", &app, json!({})))
            .await
            .expect("dry-run pod");
        if image_of(&as_json(&p), "/spec/containers/0/image").contains('@') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API server never called the webhook:\n{}",
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let pinned = format!("{app}@{app_digest}");
    let private_pinned = format!("{private_app}@{private_digest}");
    // (name, namespace, pod, want image)
    let cases = [
        ("pod", "apps", pod("web", &app, json!({})), pinned.clone()),
        (
            "pod with a pull secret",
            "private",
            pod(
                "with-secret",
                &private_app,
                json!({"imagePullSecrets": [{"name": "regcred"}]}),
            ),
            private_pinned.clone(),
        ),
        (
            "pod with the service account's pull secret",
            "private",
            pod(
                "with-sa",
                &private_app,
                json!({"serviceAccountName": "builder"}),
            ),
            private_pinned.clone(),
        ),
        (
            // failurePolicy Ignore: unresolvable (401) means admitted unchanged, never refused.
            "pod without credentials",
            "private",
            pod("no-secret", &private_app, json!({})),
            private_app.clone(),
        ),
        (
            "opted-out namespace",
            "optout",
            pod("left-alone", &app, json!({})),
            app.clone(),
        ),
    ];
    for (name, ns, p, want) in cases {
        let created = pods(ns)
            .create(&PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", webhook.log()));
        assert_eq!(
            image_of(&as_json(&created), "/spec/containers/0/image"),
            want,
            "{name}"
        );
        assert_eq!(
            created.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("node-a"),
            "{name}: bound to the node it names"
        );
    }

    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": app}]}}}
    }))
    .expect("deployment");
    let created = Api::<Deployment>::namespaced(client.clone(), "apps")
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");
    assert_eq!(
        image_of(
            &serde_json::to_value(&created).expect("json"),
            "/spec/template/spec/containers/0/image"
        ),
        pinned,
        "deployment template"
    );

    let cronjob: CronJob = serde_json::from_value(json!({
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 3 * * *",
                 "jobTemplate": {"spec": {"template": {"spec": {
                     "restartPolicy": "OnFailure",
                     "containers": [{"name": "c", "image": app}]}}}}}
    }))
    .expect("cronjob");
    let created = Api::<CronJob>::namespaced(client.clone(), "apps")
        .create(&PostParams::default(), &cronjob)
        .await
        .expect("create cronjob");
    assert_eq!(
        image_of(
            &serde_json::to_value(&created).expect("json"),
            "/spec/jobTemplate/spec/template/spec/containers/0/image"
        ),
        pinned,
        "cronjob job template"
    );

    // The caBundle the binary rendered is what the API server trusted.
    let stored = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("e2e-pinning")
        .await
        .expect("configuration");
    let ca_pem = std::fs::read_to_string(&ca).expect("ca.crt");
    let want = base64::engine::general_purpose::STANDARD.encode(&ca_pem);
    for hook in stored.webhooks.iter().flatten() {
        let got = base64::engine::general_purpose::STANDARD
            .encode(&hook.client_config.ca_bundle.as_ref().expect("caBundle").0);
        assert_eq!(got, want, "{}", hook.name);
    }
    drop(webhook);
}

/// Registers `speculum-webhook serve --config <config>` (the configuration it prints, with the
/// URL of this process) and waits (bounded) until a dry-run Pod of `probe_image` in
/// `probe_ns` comes back pinned.
#[expect(
    clippy::too_many_arguments,
    reason = "one caller; the paths and the probe are what differs between runs"
)]
async fn start_webhook(
    client: &kube::Client,
    cp: &k8s::ControlPlane,
    dir: &std::path::Path,
    config: &std::path::Path,
    ca: &std::path::Path,
    port: u16,
    probe_ns: &str,
    probe_image: &str,
) -> WebhookProcess {
    let bin = env!("CARGO_BIN_EXE_speculum-webhook");
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("configuration")
        .arg("--ca-file")
        .arg(ca)
        .output()
        .expect("speculum-webhook configuration");
    assert!(
        out.status.success(),
        "configuration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut mwc: Value = serde_json::from_slice(&out.stdout).expect("configuration is JSON");
    for hook in mwc["webhooks"].as_array_mut().expect("webhooks") {
        let cc = &mut hook["clientConfig"];
        cc.as_object_mut().expect("clientConfig").remove("service");
        cc["url"] = json!(format!("https://127.0.0.1:{port}/mutate"));
    }
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(mwc).expect("typed");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .expect("create configuration");
    let stderr = std::fs::File::create(dir.join("webhook.err")).expect("log");
    let webhook = WebhookProcess {
        child: Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("KUBECONFIG", cp.kubeconfig())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("speculum-webhook serve"),
        dir: dir.to_owned(),
    };
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let probe: Pod = serde_json::from_value(json!({"metadata": {"name": "probe"},
        "spec": {"containers": [{"name": "c", "image": probe_image}]}}))
    .expect("pod");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pinned = match Api::<Pod>::namespaced(client.clone(), probe_ns)
            .create(&dry, &probe)
            .await
        {
            Ok(p) => image_of(
                &serde_json::to_value(&p).expect("json"),
                "/spec/containers/0/image",
            )
            .contains('@'),
            Err(_) => false,
        };
        if pinned {
            return webhook;
        }
        assert!(
            Instant::now() < deadline,
            "the API server never called the webhook:\n{}",
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signs_pull_grants_for_private_images() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use speculum_grant::{ANNOTATION, DEFAULT_AUDIENCE, KeySet};

    if k8s::skip() {
        return;
    }
    let open = Registry::start(Auth::None);
    let private = Registry::start(Auth::Htpasswd(vec![("puller".into(), "s3cret".into())]));
    let app_digest = open.push_image("e2e/app", "v1", "amd64", "e2e").await;
    let private_digest = private.push_image("team/app", "v1", "amd64", "grant").await;
    let app = format!("{}/e2e/app:v1", open.host());
    let private_app = format!("{}/team/app:v1", private.host());
    let private_repo = format!("{}/team/app", private.host());

    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    for ns in ["speculum-system", "apps", "private", "other"] {
        k8s::namespace(&client, ns, &[]).await;
    }
    create_pull_secret(
        &client,
        "private",
        "regcred",
        docker_config(&private.host(), "puller", "s3cret"),
    )
    .await;
    create_pull_secret(
        &client,
        "other",
        "wrongcred",
        docker_config(&private.host(), "puller", "wrong"),
    )
    .await;
    // The chart's ConfigMap, already holding an older key: it must survive the publish.
    let (_, old_public) = speculum_grant::generate();
    let old_kid = KeySet::from_pems([old_public.as_bytes()])
        .expect("old key")
        .kids()[0]
        .clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "speculum-system");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "grant-keys"},
            "data": {format!("{old_kid}.pem"): old_public}}))
        .expect("configmap"),
    )
    .await
    .expect("create configmap");

    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_speculum-webhook");
    let keygen = Command::new(bin)
        .arg("grant-keygen")
        .arg("--out")
        .arg(dir.path().join("keys"))
        .output()
        .expect("grant-keygen");
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let key_file = dir.path().join("keys/grant.key");
    let public_pem = std::fs::read_to_string(dir.path().join("keys/grant.pub.pem")).expect("pub");
    // The daemons' bundle: the private-grant example, with the private registry's team/.
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy).expect("mkdir");
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/private-grant");
    std::fs::copy(example.join("mirror.rego"), policy.join("mirror.rego")).expect("copy");
    std::fs::write(
        policy.join("data.json"),
        json!({"private": {"prefixes": [format!("{}/team/", private.host())]}}).to_string(),
    )
    .expect("data.json");

    let (config, ca, port) = webhook_files(
        dir.path(),
        "e2e-grants",
        &[&open.host(), &private.host()],
        &format!(
            "grants:\n  signingKeyFile: {}\n  ttl: 10m\n  mirrorPolicyDir: {}\n  publishConfigMap: speculum-system/grant-keys\n",
            key_file.display(),
            policy.display(),
        ),
    );
    let webhook = start_webhook(&client, &cp, dir.path(), &config, &ca, port, "apps", &app).await;

    // The public key is published next to the old one (bounded poll: the publisher runs at start).
    let deadline = Instant::now() + Duration::from_secs(30);
    let keys = loop {
        let data = cms
            .get("grant-keys")
            .await
            .expect("configmap")
            .data
            .unwrap_or_default();
        if data.len() == 2 {
            assert_eq!(
                data.get(&format!("{old_kid}.pem")),
                Some(&old_public),
                "old key kept"
            );
            assert!(data.values().any(|v| *v == public_pem), "{data:?}");
            break KeySet::from_pems(data.values().map(|v| v.as_bytes())).expect("published keys");
        }
        assert!(
            Instant::now() < deadline,
            "key never published: {data:?}\n{}",
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(keys.len(), 2);

    let forged = json!(["eyJhbGciOiJub25lIn0.eyJzdWIiOiJwcml2YXRlIn0."]).to_string();
    let pod = |name: &str, image: &str, secret: Option<&str>, annotation: Option<&str>| -> Pod {
        let mut v = json!({"metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": image}]}});
        if let Some(s) = secret {
            v["spec"]["imagePullSecrets"] = json!([{"name": s}]);
        }
        if let Some(a) = annotation {
            v["metadata"]["annotations"] = json!({ANNOTATION: a, "keep": "me"});
        }
        serde_json::from_value(v).expect("pod")
    };
    let pinned_private = format!("{private_app}@{private_digest}");
    // (name, namespace, pod, want image, want grant)
    let cases = [
        (
            "private image, the pod's own secret",
            "private",
            pod("granted", &private_app, Some("regcred"), None),
            pinned_private.clone(),
            true,
        ),
        (
            "private image, forged annotation replaced",
            "private",
            pod(
                "forged-replaced",
                &private_app,
                Some("regcred"),
                Some(&forged),
            ),
            pinned_private.clone(),
            true,
        ),
        (
            "private image already pinned, checked with the pod's secret",
            "private",
            pod("prepinned", &pinned_private, Some("regcred"), None),
            pinned_private.clone(),
            true,
        ),
        (
            "public image",
            "apps",
            pod("public", &app, None, None),
            format!("{app}@{app_digest}"),
            false,
        ),
        (
            "public image, forged annotation removed",
            "apps",
            pod("forged-removed", &app, None, Some(&forged)),
            format!("{app}@{app_digest}"),
            false,
        ),
        (
            "wrong secret",
            "other",
            pod(
                "wrong-secret",
                &private_app,
                Some("wrongcred"),
                Some(&forged),
            ),
            private_app.clone(),
            false,
        ),
        (
            "already pinned, no secret",
            "other",
            pod("pinned-no-secret", &pinned_private, None, None),
            pinned_private.clone(),
            false,
        ),
    ];
    for (name, ns, p, want_image, want_grant) in cases {
        let created = Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", webhook.log()));
        let v = serde_json::to_value(&created).expect("json");
        assert_eq!(
            image_of(&v, "/spec/containers/0/image"),
            want_image,
            "{name}"
        );
        let annotations = created.metadata.annotations.clone().unwrap_or_default();
        if p.metadata.annotations.is_some() {
            assert_eq!(
                annotations.get("keep").map(String::as_str),
                Some("me"),
                "{name}"
            );
        }
        let Some(raw) = annotations.get(ANNOTATION) else {
            assert!(!want_grant, "{name}: no grant\n{}", webhook.log());
            continue;
        };
        assert!(want_grant, "{name}: unexpected grant {raw}");
        let tokens: Vec<String> = serde_json::from_str(raw).expect("JSON array of tokens");
        assert_eq!(tokens.len(), 1, "{name}");
        let now = std::time::SystemTime::now();
        let c = keys
            .verify(&tokens[0], DEFAULT_AUDIENCE, now)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (c.sub.as_str(), c.repo.as_str(), c.digest.as_str()),
            (ns, private_repo.as_str(), private_digest.as_str()),
            "{name}"
        );
        assert_eq!(c.exp - c.iat, 600, "{name}: ttl");
        let unix = now
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        assert!(
            (c.iat - unix).abs() < 60,
            "{name}: iat {} now {unix}",
            c.iat
        );
    }

    // Metrics count the outcomes.
    let metrics_port = {
        let text = std::fs::read_to_string(&config).expect("config");
        text.lines()
            .find_map(|l| l.strip_prefix("metricsListen: 127.0.0.1:"))
            .and_then(|p| p.trim().parse::<u16>().ok())
            .expect("metrics port")
    };
    let body = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        body.contains("speculum_webhook_grants_signed_total{outcome=\"signed\"} 3"),
        "{body}"
    );
    drop(webhook);
}
