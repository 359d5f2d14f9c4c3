//! The policy seam through the real shipped bundles and regorus: every bundle's own Rego tests,
//! the default-policy conformance table (shared with the static twin), decision tables for the
//! example bundles, fail-closed on bundles that error, loop, are undefined or mis-shaped, and a
//! hot reload good → broken → good (ConfigMap-style symlink swaps) while decisions flow.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use speculum::policy::conformance::{self, input};
use speculum::policy::rego::{Bundle, load_tested, run_tests};
use speculum::policy::{
    Gate, PolicyConfig, PolicyMetrics, RegoPolicy, StaticPolicy, Switches, reload,
};
use speculum::readiness::Readiness;

const LIMIT: Duration = Duration::from_millis(50);

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(name)
}

fn bundles() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(shipped(""))
        .expect("policies/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_shipped_bundle_passes_its_rego_tests_with_regorus() {
    let dirs = bundles();
    assert!(
        dirs.len() >= 5,
        "expected the default and four examples, found {dirs:?}"
    );
    for dir in dirs {
        let bundle = Bundle::read(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let results = run_tests(&bundle, Duration::from_secs(2)).expect("tests run");
        assert!(
            results.len() >= 3,
            "{}: only {} tests",
            dir.display(),
            results.len()
        );
        for r in &results {
            assert!(
                r.passed,
                "{}: {} failed: {}",
                dir.display(),
                r.name,
                r.detail
            );
        }
        // And each one is a loadable policy (tests pass, entrypoint defined).
        load_tested(&dir, LIMIT).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
}

#[test]
fn default_bundle_and_static_twin_agree() {
    let rego = RegoPolicy::load(&shipped("default"), LIMIT).expect("default bundle");
    conformance::default_policy(&rego);
    conformance::default_policy(&StaticPolicy::default());
}

fn gate(name: &str, switches: Switches) -> Gate {
    let p = RegoPolicy::load(&shipped(name), LIMIT).unwrap_or_else(|e| panic!("{name}: {e}"));
    Gate::new(Arc::new(p), switches, PolicyMetrics::unregistered())
}

#[test]
fn example_bundles_decision_table() {
    let with_ns = |mut i: speculum::policy::Input, ns: &[&str]| {
        i.namespaces = ns.iter().map(|s| (*s).to_owned()).collect();
        i
    };
    // The grant that passed the daemon's checks, as the policy sees it (docs/tenancy.md).
    let with_grant = |mut i: speculum::policy::Input, repo: &str| {
        i.grant = Some(serde_json::json!({
            "namespace": "billing",
            "pod": "api-1",
            "repository": repo,
            "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "expires": 1,
        }));
        i
    };
    let on = Switches::default();
    let no_latest = Switches {
        resolve_tags: true,
        resolve_latest_tag: false,
    };
    let no_tags = Switches {
        resolve_tags: false,
        resolve_latest_tag: true,
    };
    // (name, bundle, switches, input, want served)
    let cases: Vec<(&str, &str, Switches, speculum::policy::Input, bool)> = vec![
        (
            "default v1",
            "default",
            on,
            input("127.0.0.1:5000", "rig/x", Some("v1"), None),
            true,
        ),
        (
            "default latest, switch off",
            "default",
            no_latest,
            input("127.0.0.1:5000", "rig/x", Some("latest"), None),
            false,
        ),
        (
            "default v1, latest switch off",
            "default",
            no_latest,
            input("127.0.0.1:5000", "rig/x", Some("v1"), None),
            true,
        ),
        (
            "default tag, tags off",
            "default",
            no_tags,
            input("127.0.0.1:5000", "rig/x", Some("v1"), None),
            false,
        ),
        (
            "default digest, tags off",
            "default",
            no_tags,
            input("127.0.0.1:5000", "rig/x", None, Some("sha256:ab")),
            true,
        ),
        (
            "allowlist listed",
            "registry-allowlist",
            on,
            input("ghcr.io", "org/app", Some("v1"), None),
            true,
        ),
        (
            "allowlist unlisted",
            "registry-allowlist",
            on,
            input("docker.io", "library/alpine", Some("3"), None),
            false,
        ),
        (
            "no-latest latest",
            "no-latest",
            on,
            input("127.0.0.1:5000", "rig/tags", Some("latest"), None),
            false,
        ),
        (
            "no-latest v1",
            "no-latest",
            on,
            input("127.0.0.1:5000", "rig/tags", Some("v1"), None),
            true,
        ),
        (
            "no-latest digest",
            "no-latest",
            on,
            input("127.0.0.1:5000", "rig/tags", None, Some("sha256:ab")),
            true,
        ),
        (
            "isolation shared",
            "namespace-isolation",
            on,
            input("ghcr.io", "public/app", Some("v1"), None),
            true,
        ),
        (
            "isolation unknown waiters",
            "namespace-isolation",
            on,
            input("ghcr.io", "team-a/app", Some("v1"), None),
            false,
        ),
        (
            "isolation owner",
            "namespace-isolation",
            on,
            with_ns(
                input("ghcr.io", "team-a/app", Some("v1"), None),
                &["team-a"],
            ),
            true,
        ),
        (
            "isolation stranger",
            "namespace-isolation",
            on,
            with_ns(
                input("ghcr.io", "team-a/app", Some("v1"), None),
                &["team-b"],
            ),
            false,
        ),
        (
            "private no grant",
            "private-grant",
            on,
            input("ghcr.io", "acme-internal/billing", Some("v3"), None),
            false,
        ),
        (
            "private granted",
            "private-grant",
            on,
            with_grant(
                input("ghcr.io", "acme-internal/billing", Some("v3"), None),
                "ghcr.io/acme-internal/billing",
            ),
            true,
        ),
        (
            "private other grant",
            "private-grant",
            on,
            with_grant(
                input("ghcr.io", "acme-internal/billing", Some("v3"), None),
                "ghcr.io/acme-internal/x",
            ),
            false,
        ),
        (
            "public next to private",
            "private-grant",
            on,
            input("ghcr.io", "acme/site", Some("v1"), None),
            true,
        ),
    ];
    for (name, bundle, switches, input, want) in cases {
        let g = gate(bundle, switches);
        let d = g.decide(&input);
        assert_eq!(Gate::permits(&d, &input), want, "{name}: {d:?}");
    }
}

fn write_bundle(dir: &Path, rego: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("mirror.rego"), rego).expect("write");
}

#[test]
fn failing_policies_fail_closed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // (name, module, want reason). Each compiles (an empty input is fine) but fails for the
    // request below.
    let cases = [
        (
            "error",
            "package speculum.mirror\n\ndecision := {\"allow\": to_number(input.image.repository) > 0}\n",
            "policy-error",
        ),
        (
            "loop",
            "package speculum.mirror\n\ndecision := {\"allow\": count([1 | some x in numbers.range(1, n); some y in numbers.range(1, n)]) > 0}\n\nn := 1 if not input.image.repository\nn := 5000 if input.image.repository\n",
            "policy-timeout",
        ),
        (
            "undefined",
            "package speculum.mirror\n\ndecision := {\"allow\": true} if not input.image.repository\n",
            "policy-undefined",
        ),
        (
            "shape",
            "package speculum.mirror\n\ndecision := {\"allow\": \"yes\", \"reason\": 1}\n",
            "policy-output",
        ),
    ];
    for (name, rego, want) in cases {
        let dir = tmp.path().join(name);
        write_bundle(&dir, rego);
        let policy = match RegoPolicy::load(&dir, Duration::from_millis(20)) {
            Ok(p) => p,
            Err(e) => panic!("{name}: should compile: {e}"),
        };
        let g = Gate::new(
            Arc::new(policy),
            Switches::default(),
            PolicyMetrics::unregistered(),
        );
        let req = input("127.0.0.1:5000", "rig/x", Some("v1"), None);
        let started = Instant::now();
        let d = g.decide(&req);
        assert!(!d.allow, "{name}: must deny, got {d:?}");
        assert!(!Gate::permits(&d, &req), "{name}");
        assert_eq!(d.reason, want, "{name}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn broken_bundles_are_refused_at_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("syntax", "package speculum.mirror\n\ndecision := {\n"),
        (
            "no entrypoint",
            "package speculum.mirror\n\nallow := true\n",
        ),
        (
            "rego v0",
            "package speculum.mirror\n\ndecision = {\"allow\": true} { true }\n",
        ),
    ];
    for (name, rego) in cases {
        let dir = tmp.path().join(name.replace(' ', "-"));
        write_bundle(&dir, rego);
        assert!(load_tested(&dir, LIMIT).is_err(), "{name}: must be refused");
    }
    // A bundle whose own tests fail is refused too.
    let dir = tmp.path().join("failing-test");
    write_bundle(
        &dir,
        "package speculum.mirror\n\ndecision := {\"allow\": true}\n",
    );
    std::fs::write(
        dir.join("mirror_test.rego"),
        "package speculum.mirror_test\n\nimport data.speculum.mirror\n\ntest_denies if {\n\tnot mirror.decision.allow\n}\n",
    )
    .expect("write");
    let err = load_tested(&dir, LIMIT).err().expect("refused");
    assert!(err.to_string().contains("test_denies"), "{err}");
}

/// The ConfigMap layout: `dir/..data -> ..vN/`, `dir/mirror.rego -> ..data/mirror.rego`. A
/// version switch is one atomic rename of the `..data` link.
fn configmap_version(dir: &Path, version: u32, rego: &str) {
    let v = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&v).expect("mkdir");
    std::fs::write(v.join("mirror.rego"), rego).expect("write");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    let link = dir.join("mirror.rego");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/mirror.rego", &link).expect("symlink");
    }
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_good_broken_good_while_decisions_flow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("bundle");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let allow = "package speculum.mirror\n\ndefault allow := true\n\ndecision := {\"allow\": allow, \"reason\": \"v1\"}\n";
    let broken = "package speculum.mirror\n\ndecision := {\n";
    let deny = "package speculum.mirror\n\ndefault allow := false\n\ndecision := {\"allow\": allow, \"reason\": \"v3\"}\n";
    configmap_version(&dir, 1, allow);

    let config = PolicyConfig {
        bundle: dir.display().to_string(),
        reload_interval: Duration::from_millis(100),
        ..PolicyConfig::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = PolicyMetrics::register(&mut registry);
    let readiness = Readiness::new();
    let (gate, fingerprint) = reload::initial(&config, metrics, &readiness);
    assert!(fingerprint.is_some(), "v1 loads");
    let (stop, shutdown) = speculum::shutdown::channel();
    let watcher = tokio::spawn(reload::watch(
        config,
        gate.clone(),
        readiness.clone(),
        fingerprint,
        shutdown,
    ));

    // Decisions flow the whole time; none may come from anything but a valid bundle.
    let running = Arc::new(AtomicBool::new(true));
    let count = Arc::new(AtomicU64::new(0));
    let flow = {
        let (gate, running, count) = (gate.clone(), running.clone(), count.clone());
        std::thread::spawn(move || {
            let req = input("127.0.0.1:5000", "rig/x", Some("v1"), None);
            let mut reasons = std::collections::BTreeSet::new();
            for _ in 0..2_000_000 {
                if !running.load(Ordering::Relaxed) {
                    break;
                }
                reasons.insert(gate.decide(&req).reason);
                count.fetch_add(1, Ordering::Relaxed);
            }
            reasons
        })
    };
    let reason = |g: &Gate| {
        g.decide(&input("127.0.0.1:5000", "rig/x", Some("v1"), None))
            .reason
    };
    let encoded = || {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &registry).expect("encode");
        s
    };

    assert_eq!(reason(&gate), "v1");
    configmap_version(&dir, 2, broken);
    wait_for(
        "the broken bundle to be rejected",
        Duration::from_secs(10),
        || readiness.detail().contains("rejected"),
    );
    assert_eq!(reason(&gate), "v1", "the previous bundle stays active");
    assert!(
        readiness.is_ready(),
        "a rejected reload does not make the daemon unready"
    );
    assert!(
        encoded().contains("policy_reloads_total{result=\"rejected\"} 1"),
        "{}",
        encoded()
    );

    configmap_version(&dir, 3, deny);
    wait_for("the good bundle to load", Duration::from_secs(10), || {
        reason(&gate) == "v3"
    });
    assert!(
        !readiness.detail().contains("rejected"),
        "{}",
        readiness.detail()
    );
    assert!(
        encoded().contains("policy_reloads_total{result=\"ok\"} 2"),
        "{}",
        encoded()
    );

    running.store(false, Ordering::Relaxed);
    let reasons = flow.join().expect("flow thread");
    assert!(count.load(Ordering::Relaxed) > 0);
    let allowed: std::collections::BTreeSet<String> = ["v1", "v3"].map(String::from).into();
    assert!(
        reasons.is_subset(&allowed),
        "decisions came from: {reasons:?}"
    );
    stop.fire();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("watcher stops")
        .expect("watcher ran");
}

#[test]
fn a_bundle_broken_at_start_denies_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("broken");
    write_bundle(&dir, "package speculum.mirror\n\ndecision := {\n");
    let config = PolicyConfig {
        bundle: dir.display().to_string(),
        ..PolicyConfig::default()
    };
    let readiness = Readiness::new();
    let (gate, _) = reload::initial(&config, PolicyMetrics::unregistered(), &readiness);
    let d = gate.decide(&input("127.0.0.1:5000", "rig/x", Some("v1"), None));
    assert!(!d.allow);
    assert!(
        readiness.detail().contains("rejected"),
        "{}",
        readiness.detail()
    );
    assert!(speculum::policy::Policy::describe(gate.active().as_ref()).contains("static"));
}
