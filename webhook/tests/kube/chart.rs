//! The Helm chart's webhook half: the webhook config the chart renders is validated by the
//! real binary (`speculum-webhook --config FILE config`), the chart's
//! MutatingWebhookConfiguration is exactly what the webhook itself applies in self-managed
//! mode (otherwise the two would fight over it), and — against a real kube-apiserver — that
//! configuration, pointed at a `speculum-webhook serve` on 127.0.0.1, pins a Pod created in an
//! opted-in namespace and leaves a namespace without the label alone.
//!
//! helm: see `testkit::helm` (skips without it unless `CI=true`); the API server part
//! skips like the rest of the Kubernetes tier (not root, `SPECULUM_SKIP_K8S=1`).

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use testkit::helm::{find, name};
use testkit::registries::{Auth, Registry};
use testkit::{helm, k8s};

const BIN: &str = env!("CARGO_BIN_EXE_speculum-webhook");

/// The chart's webhook config with its grant files (mounted from a Secret and the policy
/// ConfigMap in a cluster) replaced by local ones, after checking the chart points at the
/// mounts: the binary reads both when it validates.
fn local_grants(config: &str, dir: &Path) -> String {
    let mut cfg: Value = yaml_serde::from_str(config).expect("config yaml");
    let grants = &mut cfg["grants"];
    assert_eq!(
        grants["signingKeyFile"],
        json!("/etc/speculum-webhook/grant-key/grant.key"),
        "the chart mounts the grant key Secret there"
    );
    assert_eq!(grants["mirrorPolicyDir"], json!("/etc/speculum/policy"));
    let (private, _) = speculum_grant::generate();
    let key = dir.join("grant.key");
    std::fs::write(&key, private).expect("write key");
    grants["signingKeyFile"] = json!(key);
    grants["mirrorPolicyDir"] =
        json!(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/private-grant"));
    yaml_serde::to_string(&cfg).expect("yaml")
}

fn webhook_config(objects: &[Value]) -> String {
    find(objects, "ConfigMap", &name("webhook-config"))["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml")
        .to_owned()
}

fn check(config: &Path) -> Result<String, String> {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("config")
        .output()
        .expect("speculum-webhook config");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn rendered_webhook_config_is_valid_and_the_configuration_matches_the_binary() {
    let Some(h) = helm::helm() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "CA").expect("ca");
    let set = |kv: &[&str]| -> Vec<String> {
        kv.iter()
            .flat_map(|s| ["--set".to_owned(), (*s).to_owned()])
            .collect()
    };
    // (name, values, want in the printed config)
    let cases = [
        ("defaults", set(&[]), "mode: SelfManaged"),
        (
            "fail closed, opt-in by key",
            set(&["webhook.failurePolicy=Fail", "webhook.optInLabel=pin"]),
            "failure_policy: Fail",
        ),
        (
            "no opt-in, no cluster fallback",
            set(&[
                "webhook.optInLabel=",
                "webhook.resolver.clusterFallback=false",
            ]),
            "cluster_endpoints: []",
        ),
        (
            "tenancy off",
            set(&["tenancy.enabled=false"]),
            "mode: SelfManaged",
        ),
    ];
    for (case, values, want) in cases {
        let objects = helm::template(&h, &values).unwrap_or_else(|e| panic!("{case}: {e}"));
        let path = dir.path().join("config.yaml");
        let config = webhook_config(&objects);
        let config = if values.iter().any(|v| v == "tenancy.enabled=false") {
            config
        } else {
            local_grants(&config, dir.path())
        };
        std::fs::write(&path, config).expect("write");
        let printed = check(&path).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(printed.contains(want), "{case}: {want} not in\n{printed}");

        // The configuration the webhook would server-side apply equals the chart's, caBundle
        // aside (the chart leaves it to the webhook / cert-manager).
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(["configuration", "--ca-file"])
            .arg(&ca)
            .output()
            .expect("configuration");
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut theirs: Value = serde_json::from_slice(&out.stdout).expect("json");
        for hook in theirs["webhooks"].as_array_mut().expect("webhooks") {
            hook["clientConfig"]
                .as_object_mut()
                .expect("clientConfig")
                .remove("caBundle");
        }
        let mut ours = find(&objects, "MutatingWebhookConfiguration", &name("webhook")).clone();
        ours["metadata"] = json!({"name": ours["metadata"]["name"]});
        assert_eq!(ours, theirs, "{case}");
    }

    // A key the binary does not know fails the check (so a rename breaks this test).
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "resolver:\n  cacheTTL: 5m\n").expect("write");
    let err = check(&bad).expect_err("unknown key");
    assert!(err.contains("cacheTTL"), "{err}");
}

struct WebhookProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_chart_webhook_configuration_pins_pods_in_opted_in_namespaces() {
    if k8s::skip() {
        return;
    }
    let Some(h) = helm::helm() else { return };
    let objects = helm::template(&h, &[]).expect("template");
    let registry = Registry::start(Auth::None);
    let digest = registry.push_image("e2e/app", "v1", "amd64", "chart").await;
    let image = format!("{}/e2e/app:v1", registry.host());

    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    for (ns, labels) in [
        (helm::NAMESPACE, &[][..]),
        ("opted-in", &[("speculum.io/pinning", "enabled")][..]),
        ("not-labelled", &[][..]),
    ] {
        k8s::namespace(&client, ns, labels).await;
    }

    // The chart's webhook config, moved onto 127.0.0.1 with certificate files (the API server
    // dials the URL below), the test registry plain HTTP.
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle =
        speculum_webhook::certs::generate(&["127.0.0.1".into()], Duration::from_secs(3600))
            .expect("certs");
    let write = |n: &str, text: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (cert, key) = (
        write("tls.crt", &bundle.cert_pem),
        write("tls.key", &bundle.key_pem),
    );
    let port = free_port();
    let mut cfg: Value = yaml_serde::from_str(&local_grants(&webhook_config(&objects), dir.path()))
        .expect("config yaml");
    cfg["listen"] = json!(format!("127.0.0.1:{port}"));
    cfg["metricsListen"] = json!(format!("127.0.0.1:{}", free_port()));
    cfg["tls"] = json!({"mode": "files", "certFile": cert, "keyFile": key});
    let host = registry.host();
    cfg["resolver"]["registries"] = json!({host: {"insecure": true}});
    cfg["resolver"]["clusterEndpoints"] = json!([]);
    let config = write("config.yaml", &yaml_serde::to_string(&cfg).expect("yaml"));
    check(&config).expect("adjusted config valid");

    let mut mwc = find(&objects, "MutatingWebhookConfiguration", &name("webhook")).clone();
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(&bundle.ca_pem);
    for hook in mwc["webhooks"].as_array_mut().expect("webhooks") {
        hook["clientConfig"] =
            json!({"url": format!("https://127.0.0.1:{port}/mutate"), "caBundle": ca});
    }
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(mwc).expect("typed");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .expect("the API server accepts the chart's configuration");

    let log = dir.path().join("webhook.err");
    let webhook = WebhookProcess {
        child: Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("KUBECONFIG", cp.kubeconfig())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("speculum-webhook serve"),
        log: log.clone(),
    };
    let webhook_log = || std::fs::read_to_string(&webhook.log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "webhook did not listen:\n{}",
            webhook_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pod = |n: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": n},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": image}]}}))
        .expect("pod")
    };
    let image_of = |p: &Pod| -> String {
        p.spec.as_ref().expect("spec").containers[0]
            .image
            .clone()
            .unwrap_or_default()
    };
    let pinned = format!("{image}@{digest}");
    // The API server picks the configuration up through an informer: dry-run pods until one
    // comes back pinned (bounded).
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = Api::<Pod>::namespaced(client.clone(), "opted-in")
            .create(&dry, &pod("probe"))
            .await
            .expect("dry-run pod");
        if image_of(&p) == pinned {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never pinned:\n{}",
            webhook_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (name, namespace, want image)
    let cases = [
        ("opted-in namespace", "opted-in", pinned.clone()),
        ("namespace without the label", "not-labelled", image.clone()),
        ("our own namespace", helm::NAMESPACE, image.clone()),
    ];
    for (case, ns, want) in cases {
        let created = Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &pod("web"))
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}\n{}", webhook_log()));
        assert_eq!(image_of(&created), want, "{case}");
    }
    drop(webhook);
}
