//! The shipped bundles are plain OPA bundles: every one of them passes its own tests under real
//! OPA (`opa test DIR`, and `opa test -b DIR` for bundle mode), the same tests regorus runs in
//! `tests/loopback/policy.rs`.
//!
//! OPA comes from `scripts/setup.sh` (`go install github.com/open-policy-agent/opa@v1.22.2`).
//! It is looked up as `$OPA`, then on `PATH`, then in `$(go env GOPATH)/bin`. Without it the
//! test prints why it skipped, on stderr past cargo's capture, and returns — unless
//! `SPECULUM_REQUIRE_OPA=1`, which CI sets to make a missing OPA a failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

fn opa() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OPA") {
        return Some(PathBuf::from(p));
    }
    if Command::new("opa")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("opa"));
    }
    let gopath = Command::new("go").args(["env", "GOPATH"]).output().ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&gopath.stdout).trim()).join("bin/opa");
    p.is_file().then_some(p)
}

#[test]
fn shipped_bundles_pass_their_tests_under_real_opa() {
    let Some(opa) = opa() else {
        assert!(
            std::env::var("SPECULUM_REQUIRE_OPA").as_deref() != Ok("1"),
            "opa not found and SPECULUM_REQUIRE_OPA=1 (run scripts/setup.sh)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED shipped_bundles_pass_their_tests_under_real_opa: opa not found (scripts/setup.sh installs it)"
        );
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("policies/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "{dirs:?}");
    for dir in &dirs {
        for mode in [&["test", "-v"][..], &["test", "-v", "-b"][..]] {
            let out = Command::new(&opa)
                .args(mode)
                .arg(dir)
                .output()
                .expect("running opa");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "opa {mode:?} {}:\n{text}",
                dir.display()
            );
            assert!(
                text.contains("PASS"),
                "opa ran no tests in {}:\n{text}",
                dir.display()
            );
        }
    }
}
