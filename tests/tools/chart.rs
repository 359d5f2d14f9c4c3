//! The Helm chart (`chart/`, issue #6) against the real tools: `helm lint --strict`, `helm
//! template` over a values matrix parsed and asserted object by object, the rendered daemon
//! config validated by the real `speculum config --config FILE` (a renamed key fails it), the
//! init container's and the post-delete hook's arguments run as real `speculum configure` /
//! `speculum cleanup` invocations (containerd's hosts.toml and, with `runtime=cri-o`, the
//! registries.conf.d drop-in), the policy ConfigMap run through `speculum policy test`, and
//! every rendered manifest applied with server-side dry run to a real kube-apiserver, and an
//! install + upgrade there keeping the generated Secrets (`lookup`).
//!
//! helm comes from `scripts/setup.sh` (pinned, Go module proxy); without it the tests skip
//! with a message, except under `CI=true`. The webhook half (its config validated by the
//! real binary, the chart's MutatingWebhookConfiguration used by the running webhook) is in
//! `webhook/tests/kube/chart.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use testkit::helm::{self, find, name};

/// Config keys other work adds (routing.psk_file, the tenancy and cache sections). Until the
/// binary knows them, their features are switched off for the config validation; afterwards
/// they are validated like every other key. (feature, key the binary's defaults show, values
/// that switch it off)
const PENDING: [(&str, &str, &str); 3] = [
    ("psk", "psk_file:", "routing.psk.enabled=false"),
    ("tenancy", "\ntenancy:", "tenancy.enabled=false"),
    ("cache", "\ncache:", "cache.enabled=false"),
];

/// The values matrix: (name, helm arguments).
fn cases(custom_bundle: &Path) -> Vec<(&'static str, Vec<String>)> {
    let set = |kv: &[&str]| -> Vec<String> {
        kv.iter()
            .flat_map(|s| ["--set".to_owned(), (*s).to_owned()])
            .collect()
    };
    vec![
        ("defaults", vec![]),
        ("webhook off", set(&["webhook.enabled=false"])),
        (
            "monitoring on",
            set(&[
                "monitoring.serviceMonitor.enabled=true",
                "monitoring.dashboard.enabled=true",
                "networkPolicy.enabled=true",
            ]),
        ),
        ("custom bundle", {
            let mut a = set(&["policy.bundle=mine"]);
            for file in ["mirror.rego", "mirror_test.rego"] {
                a.push("--set-file".into());
                a.push(format!(
                    "policy.bundles.mine.{}={}",
                    file.replace('.', "\\."),
                    custom_bundle.join(file).display()
                ));
            }
            a
        }),
        ("resolveTags off", set(&["policy.resolveTags=false"])),
        ("tenancy off", set(&["tenancy.enabled=false"])),
        ("cache on", set(&["cache.enabled=true"])),
        ("cri-o", set(&["runtime=cri-o", "cache.enabled=true"])),
        (
            "cri-o signal",
            set(&[
                "runtime=cri-o",
                "crio.signalReload=true",
                "crio.pidFile=/run/crio/crio.pid",
            ]),
        ),
    ]
}

const CUSTOM_BUNDLE: &str = r#"package speculum.mirror

# Only the rig's registry is shared peer to peer.
default decision := {"allow": false, "reason": "not shared", "resolve_tag": false, "require_grant": false}

decision := {"allow": true, "reason": "rig", "resolve_tag": true, "require_grant": false} if {
	input.image.registry == "127.0.0.1:5000"
}
"#;

const CUSTOM_BUNDLE_TEST: &str = r#"package speculum.mirror_test

import data.speculum.mirror

test_rig_allowed if {
	mirror.decision.allow with input as {"image": {"registry": "127.0.0.1:5000"}}
}

test_others_refused if {
	not mirror.decision.allow with input as {"image": {"registry": "docker.io"}}
}
"#;

fn speculum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_speculum"))
}

/// `speculum config` with no file: the daemon's own defaults, as YAML text.
fn daemon_defaults() -> String {
    let out = speculum().arg("config").output().expect("speculum config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn yaml(text: &str) -> Value {
    yaml_serde::from_str(text).expect("YAML")
}

fn port_of(addr: &Value) -> u64 {
    addr.as_str()
        .and_then(|a| a.rsplit([':', '/']).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// Values that switch off the features the binary does not know yet (see [`PENDING`]).
fn pending_off(defaults: &str) -> Vec<String> {
    let mut off = Vec::new();
    for (feature, key, values) in PENDING {
        if defaults.contains(key) {
            eprintln!("chart: {feature} keys validated by the binary");
        } else {
            eprintln!("chart: the binary does not know {feature} yet; validated with {values}");
            off.push("--set".to_owned());
            off.push(values.to_owned());
        }
    }
    off
}

fn config_map_data(objects: &[Value], cm: &str) -> serde_json::Map<String, Value> {
    find(objects, "ConfigMap", cm)["data"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

fn write_daemon_config(objects: &[Value], dir: &Path) -> PathBuf {
    let text = config_map_data(objects, &name("config"))["config.yaml"]
        .as_str()
        .expect("config.yaml")
        .to_owned();
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `speculum config --config FILE`: the effective config, or every problem.
fn validate(config: &Path) -> Result<Value, String> {
    let out = speculum()
        .arg("config")
        .arg("--config")
        .arg(config)
        .env("NODE_NAME", "node-a")
        .output()
        .expect("speculum config");
    if out.status.success() {
        Ok(yaml(&String::from_utf8_lossy(&out.stdout)))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

/// Runs a container's `command` + `args` with the real binary, the container's config path
/// replaced by `config`.
fn run_container(c: &Value, config: Option<&Path>) -> std::process::Output {
    assert_eq!(c["command"], json!(["speculum"]), "{c}");
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("string arg");
            match config {
                Some(p) if a == "/etc/speculum/config.yaml" => p.display().to_string(),
                _ => a.to_owned(),
            }
        })
        .collect();
    speculum()
        .args(&args)
        .env("NODE_NAME", "node-a")
        .output()
        .expect("run container args")
}

#[test]
fn lint_template_and_validate_every_case() {
    let Some(helm) = helm::helm() else { return };
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    std::fs::write(bundle.join("mirror.rego"), CUSTOM_BUNDLE).expect("bundle");
    std::fs::write(bundle.join("mirror_test.rego"), CUSTOM_BUNDLE_TEST).expect("bundle test");
    let defaults_text = daemon_defaults();
    let defaults = yaml(&defaults_text);
    let off = pending_off(&defaults_text);

    for (case, values) in cases(&bundle) {
        // Lint, strict, with the schema.
        let mut lint: Vec<String> = vec![
            "lint".into(),
            "--strict".into(),
            helm::chart_dir().display().to_string(),
            "--kube-version".into(),
            helm::KUBE_VERSION.into(),
        ];
        lint.extend(values.iter().cloned());
        helm::run(&helm, &lint).unwrap_or_else(|e| panic!("{case}: {e}"));

        // As rendered (features on where the values say so): objects, ports, probes, RBAC.
        let objects = helm::template(&helm, &values).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_objects(case, &objects, &defaults);

        // The daemon config, validated by the binary.
        let mut checked = values.clone();
        checked.extend(off.iter().cloned());
        let objects = helm::template(&helm, &checked).unwrap_or_else(|e| panic!("{case}: {e}"));
        let case_dir = dir.path().join(case.replace(' ', "-"));
        std::fs::create_dir_all(&case_dir).expect("case dir");
        let config = write_daemon_config(&objects, &case_dir);
        let effective = validate(&config).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(effective["node"]["name"], "node-a", "{case}: NODE_NAME");
        let ds = find(&objects, "DaemonSet", &name(""));
        let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("grace");
        let drain = humantime::parse_duration(
            effective["registry"]["drain_grace"]
                .as_str()
                .expect("drain"),
        )
        .expect("drain_grace");
        assert!(
            grace > drain.as_secs(),
            "{case}: terminationGracePeriodSeconds {grace} must exceed drain_grace {drain:?}"
        );
        match case {
            "resolveTags off" => {
                assert_eq!(effective["policy"]["resolve_tags"], false, "{case}");
                assert_eq!(
                    effective["hosts"]["resolve_tags"], false,
                    "{case}: configure writes pull only"
                );
            }
            "cache on" if off.iter().all(|o| o != "cache.enabled=false") => {
                assert_eq!(effective["cache"]["enabled"], true, "{case}");
            }
            "cri-o" | "cri-o signal" => {
                let h = &effective["hosts"];
                assert_eq!(h["runtime"], "cri-o", "{case}");
                assert_eq!(
                    h["registries_conf_dir"], "/etc/containers/registries.conf.d",
                    "{case}"
                );
                assert_eq!(
                    effective["containerd"]["enabled"], false,
                    "{case}: no containerd on a CRI-O node"
                );
                let signal = case == "cri-o signal";
                assert_eq!(h["crio_find_process"], signal, "{case}");
                let pid_file = if signal {
                    json!("/run/crio/crio.pid")
                } else {
                    Value::Null
                };
                assert_eq!(h["crio_pid_file"], pid_file, "{case}");
            }
            _ => assert_eq!(effective["policy"]["resolve_tags"], true, "{case}"),
        }

        // The policy ConfigMap is a bundle the daemon accepts (its own tests pass).
        let policy = config_map_data(&objects, &name("policy"));
        let bundle_dir = case_dir.join("policy");
        std::fs::create_dir_all(&bundle_dir).expect("bundle dir");
        for (file, text) in &policy {
            std::fs::write(bundle_dir.join(file), text.as_str().expect("text")).expect("write");
        }
        let out = speculum()
            .args(["policy", "test"])
            .arg(&bundle_dir)
            .output()
            .expect("speculum policy test");
        assert!(
            out.status.success(),
            "{case}: policy test: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if case == "custom bundle" {
            assert_eq!(
                policy["mirror.rego"], CUSTOM_BUNDLE,
                "{case}: file verbatim"
            );
            let passed = String::from_utf8_lossy(&out.stdout);
            assert!(passed.contains("2/2 passed"), "{case}: {passed}");
        }
    }
    let elapsed = started.elapsed();
    eprintln!("chart: lint + template + validate of 9 cases in {elapsed:.1?}");
}

/// What every rendered case must hold.
fn assert_objects(case: &str, objects: &[Value], defaults: &Value) {
    let has = |kind: &str, n: &str| {
        objects
            .iter()
            .any(|o| o["kind"] == kind && o["metadata"]["name"] == n)
    };
    let webhook = case != "webhook off";
    let tenancy = case != "tenancy off";
    let crio = case.starts_with("cri-o");
    // (kind, name, present)
    let want = [
        ("DaemonSet", name(""), true),
        ("ConfigMap", name("config"), true),
        ("ConfigMap", name("policy"), true),
        ("Service", name("bootstrap"), true),
        ("Service", name("registry"), true),
        ("Service", name("metrics"), true),
        ("ServiceAccount", name("daemon"), true),
        ("ClusterRole", name("daemon"), tenancy),
        ("ConfigMap", name("grant-keys"), tenancy),
        ("Secret", name("psk"), true),
        ("Deployment", name("webhook"), webhook),
        ("Service", name("webhook"), webhook),
        ("PodDisruptionBudget", name("webhook"), webhook),
        ("MutatingWebhookConfiguration", name("webhook"), webhook),
        ("ClusterRole", name("webhook"), webhook),
        ("Role", name("webhook"), webhook),
        ("Secret", name("webhook-tls"), webhook),
        ("Secret", name("grant-key"), webhook && tenancy),
        ("ServiceMonitor", name(""), case == "monitoring on"),
        ("ConfigMap", name("dashboard"), case == "monitoring on"),
        ("NetworkPolicy", name("daemon"), case == "monitoring on"),
        ("DaemonSet", name("cleanup"), true),
        ("Job", name("cleanup-wait"), true),
    ];
    for (kind, n, present) in &want {
        assert_eq!(has(kind, n), *present, "{case}: {kind}/{n}");
    }

    // Ports: the daemon's own defaults, by name.
    let ds = find(objects, "DaemonSet", &name(""));
    let pod = &ds["spec"]["template"]["spec"];
    let main = container(pod, "containers", "speculum");
    let ports: Vec<(String, u64)> = main["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_owned(),
                p["containerPort"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let want_ports = [
        ("mirror", port_of(&defaults["registry"]["mirror_listen"])),
        ("peer", port_of(&defaults["registry"]["peer_listen"])),
        ("p2p", port_of(&defaults["routing"]["listen"])),
        ("metrics", port_of(&defaults["metrics"]["listen"])),
    ];
    assert_eq!(
        ports,
        want_ports
            .iter()
            .map(|(n, p)| ((*n).to_owned(), *p))
            .collect::<Vec<_>>(),
        "{case}"
    );
    assert_eq!(want_ports.map(|p| p.1), [5080, 5081, 5082, 9402]);
    assert_eq!(pod["hostNetwork"], true, "{case}");
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{case}");
    assert!(pod["priorityClassName"].is_string(), "{case}");
    assert!(
        main["resources"]["limits"]["memory"].is_string(),
        "{case}: memory limit"
    );
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/livez"),
        ("startupProbe", "/livez"),
    ] {
        assert_eq!(main[probe]["httpGet"]["path"], path, "{case}: {probe}");
        assert_eq!(main[probe]["httpGet"]["port"], "metrics", "{case}: {probe}");
    }
    assert_eq!(
        main["args"],
        json!(["registry", "--config", "/etc/speculum/config.yaml"]),
        "{case}"
    );

    // hostPath mounts: (volume, host path, mount read-only).
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mounts = main["volumeMounts"].as_array().expect("mounts");
    let host_mounts: Vec<(String, String, bool)> = volumes
        .iter()
        .filter_map(|v| {
            let path = v["hostPath"]["path"].as_str()?;
            let name = v["name"].as_str()?;
            let ro = mounts
                .iter()
                .chain(
                    container(pod, "initContainers", "configure")["volumeMounts"]
                        .as_array()
                        .expect("init mounts"),
                )
                .find(|m| m["name"] == name)
                .map(|m| m["readOnly"] == true)
                .unwrap_or_else(|| panic!("{case}: volume {name} not mounted"));
            Some((name.to_owned(), path.to_owned(), ro))
        })
        .collect();
    let mut want_mounts = match case {
        // No containerd socket or content store on a CRI-O node; the drop-in directory
        // instead of certs.d, and CRI-O's pid directory (read-only) when it is signalled.
        "cri-o" => vec![
            (
                "registries-conf-dir",
                "/etc/containers/registries.conf.d",
                false,
            ),
            ("data", "/var/lib/speculum", false),
        ],
        "cri-o signal" => vec![
            (
                "registries-conf-dir",
                "/etc/containers/registries.conf.d",
                false,
            ),
            ("crio-pid", "/run/crio", true),
            ("data", "/var/lib/speculum", false),
        ],
        _ => vec![
            (
                "containerd-socket",
                "/run/containerd/containerd.sock",
                false,
            ),
            (
                "content",
                "/var/lib/containerd/io.containerd.content.v1.content",
                true,
            ),
            ("certs-dir", "/etc/containerd/certs.d", false),
            ("data", "/var/lib/speculum", false),
        ],
    };
    // hostPID only to signal CRI-O: a pid means nothing outside the host's pid namespace.
    let host_pid = case == "cri-o signal";
    assert_eq!(
        pod["hostPID"].as_bool().unwrap_or(false),
        host_pid,
        "{case}"
    );
    let init_args = &container(pod, "initContainers", "configure")["args"];
    let want_init = if crio {
        json!([
            "configure",
            "--runtime",
            "cri-o",
            "--config",
            "/etc/speculum/config.yaml"
        ])
    } else {
        json!(["configure", "--config", "/etc/speculum/config.yaml"])
    };
    assert_eq!(*init_args, want_init, "{case}");
    if case == "cache on" || case == "cri-o" {
        want_mounts.push(("cache", "/var/lib/speculum/cache", false));
    }
    assert_eq!(
        host_mounts,
        want_mounts
            .iter()
            .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), *c))
            .collect::<Vec<_>>(),
        "{case}"
    );
    // The policy directory is a ConfigMap mounted whole (no subPath): updates hot-reload.
    let policy_mount = mounts
        .iter()
        .find(|m| m["name"] == "policy")
        .expect("policy mount");
    assert!(policy_mount.get("subPath").is_none(), "{case}");
    let node_name = &main["env"][0];
    assert_eq!(node_name["name"], "NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    if tenancy {
        let token = volumes
            .iter()
            .find(|v| v["name"] == "peer-token")
            .expect("projected token");
        let src = &token["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(src["audience"], "speculum", "{case}");
        assert_eq!(src["expirationSeconds"], 3600, "{case}");
    }

    // RBAC, verb for verb.
    if tenancy {
        assert_eq!(
            find(objects, "ClusterRole", &name("daemon"))["rules"],
            json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]),
            "{case}: daemon"
        );
    }
    if webhook {
        assert_eq!(
            find(objects, "ClusterRole", &name("webhook"))["rules"],
            json!([
                {"apiGroups": [""], "resources": ["secrets", "serviceaccounts"], "verbs": ["get"]},
                {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                 "resourceNames": [name("webhook")], "verbs": ["get", "patch"]},
            ]),
            "{case}: webhook cluster role"
        );
        let mut own = vec![json!({"apiGroups": [""], "resources": ["secrets"],
            "resourceNames": [name("webhook-tls")], "verbs": ["get", "update", "patch"]})];
        if tenancy {
            own.push(json!({"apiGroups": [""], "resources": ["configmaps"],
                "resourceNames": [name("grant-keys")], "verbs": ["get", "update", "patch"]}));
        }
        assert_eq!(
            find(objects, "Role", &name("webhook"))["rules"],
            Value::Array(own),
            "{case}: webhook role"
        );
        let dep = find(objects, "Deployment", &name("webhook"));
        assert_eq!(dep["spec"]["replicas"], 2, "{case}");
        assert!(
            dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_object(),
            "{case}"
        );
        for hook in find(objects, "MutatingWebhookConfiguration", &name("webhook"))["webhooks"]
            .as_array()
            .expect("webhooks")
        {
            assert_eq!(hook["sideEffects"], "None", "{case}");
            assert_eq!(hook["reinvocationPolicy"], "IfNeeded", "{case}");
            assert_eq!(hook["failurePolicy"], "Ignore", "{case}");
            assert_eq!(hook["timeoutSeconds"], 10, "{case}");
            let exprs = &hook["namespaceSelector"]["matchExpressions"];
            assert_eq!(
                exprs[0]["values"],
                json!([helm::NAMESPACE, "kube-system"]),
                "{case}"
            );
            assert!(
                exprs.as_array().expect("exprs").contains(
                    &json!({"key": "speculum.io/pinning", "operator": "In", "values": ["enabled"]})
                ),
                "{case}: opt-in label"
            );
        }
    }
    let bootstrap = find(objects, "Service", &name("bootstrap"));
    assert_eq!(bootstrap["spec"]["clusterIP"], "None");
    assert_eq!(bootstrap["spec"]["publishNotReadyAddresses"], true);
}

#[test]
fn a_renamed_config_key_fails_validation() {
    let Some(helm) = helm::helm() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let off = pending_off(&daemon_defaults());
    let mut values = vec![
        "--set".to_owned(),
        "daemon.extraConfig.mirror.atempts=5".to_owned(),
    ];
    values.extend(off);
    let objects = helm::template(&helm, &values).expect("template");
    let err = validate(&write_daemon_config(&objects, dir.path())).expect_err("unknown key");
    assert!(err.contains("atempts"), "{err}");
}

/// `chart/files/policies` is a symlink to `policies/` (one copy of the bundles, architecture
/// §2.7): helm follows it for `lint`, `template` and `package`. A real copy put back in its place
/// would drift, so it fails here; the chart still ships the five bundles.
#[test]
fn chart_bundles_are_the_shipped_ones() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chart = root.join("chart/files/policies");
    let link = std::fs::symlink_metadata(&chart).expect("chart/files/policies");
    assert!(
        link.file_type().is_symlink(),
        "chart/files/policies must be a symlink to ../../policies, not a copy"
    );
    assert_eq!(
        std::fs::canonicalize(&chart).expect("resolve chart/files/policies"),
        std::fs::canonicalize(root.join("policies")).expect("resolve policies/"),
        "chart/files/policies must point at policies/"
    );
    let mut names: Vec<String> = std::fs::read_dir(&chart)
        .expect("chart/files/policies")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "default",
            "namespace-isolation",
            "no-latest",
            "private-grant",
            "registry-allowlist"
        ]
    );
}

/// The init container's `speculum configure` and the post-delete hook's `speculum cleanup`,
/// run exactly as rendered (only the host path moved to a temporary directory).
#[test]
fn init_container_configures_and_the_hook_cleans_up() {
    let Some(helm) = helm::helm() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join("ghcr.io")).expect("certs");
    let theirs = "server = \"https://ghcr.io\"\n# the operator's own file\n";
    std::fs::write(certs.join("ghcr.io/hosts.toml"), theirs).expect("their hosts.toml");
    let mut values = vec![
        "--set".to_owned(),
        format!("containerd.certsDir={}", certs.display()),
    ];
    values.extend(pending_off(&daemon_defaults()));
    let objects = helm::template(&helm, &values).expect("template");
    let config = write_daemon_config(&objects, dir.path());

    let pod = &find(&objects, "DaemonSet", &name(""))["spec"]["template"]["spec"];
    let out = run_container(container(pod, "initContainers", "configure"), Some(&config));
    assert!(
        out.status.success(),
        "configure: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for registry in ["docker.io", "ghcr.io", "registry.k8s.io"] {
        let text = std::fs::read_to_string(certs.join(registry).join("hosts.toml"))
            .unwrap_or_else(|e| panic!("{registry}: {e}"));
        assert!(
            text.starts_with("# managed-by: speculum"),
            "{registry}: {text}"
        );
        assert!(text.contains("http://127.0.0.1:5080"), "{registry}: {text}");
    }

    let hook = &find(&objects, "DaemonSet", &name("cleanup"));
    assert_eq!(
        hook["metadata"]["annotations"]["helm.sh/hook"],
        "post-delete"
    );
    let out = run_container(
        container(
            &hook["spec"]["template"]["spec"],
            "initContainers",
            "cleanup",
        ),
        None,
    );
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(certs.join("ghcr.io/hosts.toml")).expect("restored"),
        theirs,
        "the operator's file back byte for byte"
    );
    assert!(!certs.join("docker.io").exists(), "our directories removed");
    let wait = find(&objects, "Job", &name("cleanup-wait"));
    assert_eq!(
        wait["spec"]["template"]["spec"]["containers"][0]["args"][2],
        format!("daemonset/{}", name("cleanup"))
    );
}

/// With `runtime=cri-o`: the init container's `speculum configure --runtime cri-o` writes the
/// drop-in and the post-delete hook's `speculum cleanup --runtime cri-o …` (flags only, the
/// ConfigMap is gone by then) puts back what was at its path, both run as rendered by the real
/// binary (only the host path moved to a temporary directory).
#[test]
fn cri_o_init_container_writes_the_drop_in_and_the_hook_restores() {
    let Some(helm) = helm::helm() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let conf_d = dir.path().join("registries.conf.d");
    std::fs::create_dir_all(&conf_d).expect("conf.d");
    let theirs = "# an operator's file that happens to sit at our path\n";
    std::fs::write(conf_d.join("99-speculum.conf"), theirs).expect("theirs");
    std::fs::write(conf_d.join("shortnames.conf"), "[aliases]\n").expect("other drop-in");
    let mut values: Vec<String> = [
        "runtime=cri-o".to_owned(),
        format!("crio.registriesConfDir={}", conf_d.display()),
    ]
    .into_iter()
    .flat_map(|kv| ["--set".to_owned(), kv])
    .collect();
    values.extend(pending_off(&daemon_defaults()));
    let objects = helm::template(&helm, &values).expect("template");
    let config = write_daemon_config(&objects, dir.path());

    let pod = &find(&objects, "DaemonSet", &name(""))["spec"]["template"]["spec"];
    let out = run_container(container(pod, "initContainers", "configure"), Some(&config));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "configure: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("not reloaded"),
        "without signalReload nobody is signalled, and the report says so: {said}"
    );
    let text = std::fs::read_to_string(conf_d.join("99-speculum.conf")).expect("drop-in");
    assert!(text.starts_with("# managed-by: speculum"), "{text}");
    assert!(
        text.contains("location = \"127.0.0.1:5080/docker.io\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(conf_d.join("99-speculum.conf.speculum-backup")).expect("backup"),
        theirs
    );

    let hook = &find(&objects, "DaemonSet", &name("cleanup"));
    let out = run_container(
        container(
            &hook["spec"]["template"]["spec"],
            "initContainers",
            "cleanup",
        ),
        None,
    );
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut left: Vec<String> = std::fs::read_dir(&conf_d)
        .expect("conf.d")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["99-speculum.conf", "shortnames.conf"]);
    assert_eq!(
        std::fs::read_to_string(conf_d.join("99-speculum.conf")).expect("restored"),
        theirs,
        "the operator's file back byte for byte"
    );
}

/// Every manifest of the default render (and of the monitoring case, minus the ServiceMonitor
/// whose CRD the bare API server does not have) applied with server-side dry run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_apply_to_a_real_api_server_with_dry_run() {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::{Scope, pinned_kind};
    if testkit::k8s::skip() {
        return;
    }
    let Some(helm) = helm::helm() else { return };
    let mut objects = helm::template(&helm, &[]).expect("defaults");
    objects.extend(
        helm::template(
            &helm,
            &[
                "--set".into(),
                "monitoring.dashboard.enabled=true".into(),
                "--set".into(),
                "networkPolicy.enabled=true".into(),
                "--set".into(),
                "monitoring.serviceMonitor.enabled=true".into(),
            ],
        )
        .expect("monitoring")
        .into_iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("ConfigMap" | "NetworkPolicy")))
        .filter(|o| {
            o["metadata"]["name"] != name("config") && o["metadata"]["name"] != name("policy")
        }),
    );
    let cp = testkit::k8s::ControlPlane::start().await;
    let client = cp.client().await;
    testkit::k8s::namespace(&client, helm::NAMESPACE, &[]).await;
    let pp = PatchParams::apply("chart-test").dry_run();
    let mut applied = Vec::new();
    for obj in &objects {
        let obj: DynamicObject = serde_json::from_value(obj.clone()).expect("object");
        let types = obj.types.clone().expect("apiVersion/kind");
        let gvk = kube::core::GroupVersionKind::try_from(&types).expect("gvk");
        let (ar, caps) = pinned_kind(&client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", types.kind));
        let api: Api<DynamicObject> = if caps.scope == Scope::Namespaced {
            Api::namespaced_with(client.clone(), helm::NAMESPACE, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        let n = obj.metadata.name.clone().expect("name");
        api.patch(&n, &pp, &Patch::Apply(&obj))
            .await
            .unwrap_or_else(|e| panic!("{}/{n} refused: {e}", types.kind));
        applied.push(format!("{}/{n}", types.kind));
    }
    eprintln!(
        "chart: {} objects accepted (dry run): {applied:?}",
        applied.len()
    );
    assert!(applied.len() >= 25, "{applied:?}");
}

/// `helm install` then `helm upgrade` against a real API server: the generated Secrets and what
/// the webhook wrote (its certificate, the published grant keys) survive the upgrade, because
/// the chart reads them back with `lookup`. (No controllers run here, so no pod starts;
/// uninstall is `--no-hooks`, the hook's arguments are tested above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_generated_secrets_and_published_keys() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Api, Patch, PatchParams};
    if testkit::k8s::skip() {
        return;
    }
    let Some(h) = helm::helm() else { return };
    let cp = testkit::k8s::ControlPlane::start().await;
    let client = cp.client().await;
    testkit::k8s::namespace(&client, helm::NAMESPACE, &[]).await;
    let kubeconfig = cp.kubeconfig().display().to_string();
    let helm_cmd = |verb: &str| -> Vec<String> {
        [
            verb,
            helm::RELEASE,
            &helm::chart_dir().display().to_string(),
            "--namespace",
            helm::NAMESPACE,
            "--kubeconfig",
            &kubeconfig,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    helm::run(&h, &helm_cmd("install")).expect("helm install");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), helm::NAMESPACE);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), helm::NAMESPACE);
    let data = |s: &Secret, k: &str| -> Vec<u8> {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    let psk = data(&secrets.get(&name("psk")).await.expect("psk"), "swarm.key");
    let psk_text = String::from_utf8(psk.clone()).expect("utf-8");
    let lines: Vec<&str> = psk_text.lines().collect();
    assert_eq!(
        lines[..2],
        ["/key/swarm/psk/1.0.0/", "/base16/"],
        "{psk_text}"
    );
    assert!(
        lines[2].len() == 64 && lines[2].chars().all(|c| c.is_ascii_hexdigit()),
        "{psk_text}"
    );
    let grant_key = data(
        &secrets.get(&name("grant-key")).await.expect("grant key"),
        "grant.key",
    );
    assert!(
        String::from_utf8_lossy(&grant_key).contains("PRIVATE KEY"),
        "PEM private key"
    );
    // What the webhook does at run time: fill its certificate, publish its public key.
    let pp = PatchParams::default();
    secrets
        .patch(
            &name("webhook-tls"),
            &pp,
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {"speculum.io/not-after": "4102444800"}},
                "stringData": {"tls.crt": "CERT", "tls.key": "KEY"}})),
        )
        .await
        .expect("fill the certificate");
    config_maps
        .patch(
            &name("grant-keys"),
            &pp,
            &Patch::Merge(serde_json::json!({"data": {"webhook.pem": "PUBLIC"}})),
        )
        .await
        .expect("publish a key");

    helm::run(&h, &helm_cmd("upgrade")).expect("helm upgrade");
    assert_eq!(
        data(&secrets.get(&name("psk")).await.expect("psk"), "swarm.key"),
        psk,
        "PSK kept"
    );
    assert_eq!(
        data(
            &secrets.get(&name("grant-key")).await.expect("grant key"),
            "grant.key"
        ),
        grant_key,
        "grant key kept"
    );
    let tls = secrets.get(&name("webhook-tls")).await.expect("tls");
    assert_eq!(data(&tls, "tls.crt"), b"CERT", "certificate kept");
    assert_eq!(
        tls.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("speculum.io/not-after"))
            .map(String::as_str),
        Some("4102444800"),
        "its expiry annotation kept"
    );
    let keys = config_maps
        .get(&name("grant-keys"))
        .await
        .expect("grant keys");
    assert_eq!(
        keys.data
            .as_ref()
            .and_then(|d| d.get("webhook.pem"))
            .map(String::as_str),
        Some("PUBLIC"),
        "published keys kept"
    );
    let mut uninstall = helm_cmd("uninstall");
    uninstall.remove(2); // no chart argument
    uninstall.push("--no-hooks".into());
    helm::run(&h, &uninstall).expect("helm uninstall");
}
