//! `speculum policy test DIR` and `speculum policy eval DIR --input FILE`, run as the real binary.

use std::path::PathBuf;
use std::process::Command;

fn speculum(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_speculum"))
        .args(args)
        .output()
        .expect("running speculum");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn shipped(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn policy_test_passes_shipped_bundles_and_fails_broken_ones() {
    for name in [
        "default",
        "registry-allowlist",
        "namespace-isolation",
        "no-latest",
        "private-grant",
    ] {
        let (code, out) = speculum(&["policy", "test", &shipped(name)]);
        assert_eq!(code, 0, "{name}: {out}");
        assert!(
            out.contains("PASS data.speculum.mirror_test."),
            "{name}: {out}"
        );
        assert!(!out.contains("FAIL"), "{name}: {out}");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("mirror.rego"),
        "package speculum.mirror\n\ndecision := {\"allow\": true}\n",
    )
    .expect("write");
    std::fs::write(
        tmp.path().join("mirror_test.rego"),
        "package speculum.mirror_test\n\nimport data.speculum.mirror\n\ntest_ok if mirror.decision.allow\n\ntest_wrong if not mirror.decision.allow\n",
    )
    .expect("write");
    let (code, out) = speculum(&["policy", "test", tmp.path().to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("PASS data.speculum.mirror_test.test_ok"),
        "{out}"
    );
    assert!(
        out.contains("FAIL data.speculum.mirror_test.test_wrong"),
        "{out}"
    );
    let (code, out) = speculum(&["policy", "test", "/nonexistent/bundle"]);
    assert_eq!(code, 2, "{out}");
}

#[test]
fn policy_eval_prints_the_decision() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("input.json");
    std::fs::write(
        &input,
        r#"{"request": {"action": "serve", "kind": "manifest", "method": "HEAD", "source": "local", "reference": "latest", "is_tag": true},
            "image": {"registry": "127.0.0.1:5000", "repository": "rig/tags", "tag": "latest"}}"#,
    )
    .expect("write");
    let input = input.to_str().expect("utf-8");
    // (bundle, want allow, want resolve_tag)
    for (bundle, allow, resolve_tag) in [
        ("default", true, true),
        ("no-latest", true, false),
        ("registry-allowlist", true, true),
    ] {
        let (code, out) = speculum(&["policy", "eval", &shipped(bundle), "--input", input]);
        assert_eq!(code, 0, "{bundle}: {out}");
        let d: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{bundle}: {e}: {out}"));
        assert_eq!(d["allow"], allow, "{bundle}: {out}");
        assert_eq!(d["resolve_tag"], resolve_tag, "{bundle}: {out}");
        assert!(
            d["reason"].is_string() && d.get("require_grant").is_some(),
            "{bundle}: {out}"
        );
    }
    std::fs::write(tmp.path().join("bad.json"), "{not json").expect("write");
    let (code, out) = speculum(&[
        "policy",
        "eval",
        &shipped("default"),
        "--input",
        tmp.path().join("bad.json").to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2, "{out}");
}
