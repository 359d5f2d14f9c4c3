//! The Helm chart (`chart/`) as tests see it: find the pinned `helm` that `scripts/setup.sh`
//! installs, render the chart with a values matrix case, and parse the YAML stream into JSON
//! objects. Used by the chart tests of both the root crate and the webhook.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;

/// The Kubernetes version the chart is rendered for (the E2E tier's kube-apiserver).
pub const KUBE_VERSION: &str = "1.33.0";
/// Release name and namespace of every render.
pub const RELEASE: &str = "t";
pub const NAMESPACE: &str = "speculum-system";

/// `helm`, as `$HELM`, on `PATH`, or in `$(go env GOPATH)/bin` (where setup installs it).
/// `None` after printing why, unless `CI=true`, where a missing helm fails the test.
pub fn helm() -> Option<PathBuf> {
    let found = std::env::var_os("HELM").map(PathBuf::from).or_else(|| {
        if Command::new("helm")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(PathBuf::from("helm"));
        }
        let gopath = Command::new("go").args(["env", "GOPATH"]).output().ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&gopath.stdout).trim()).join("bin/helm");
        p.is_file().then_some(p)
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "helm not found and CI=true (scripts/setup.sh installs it)"
        );
        eprintln!(
            "SKIPPED: helm not found (scripts/setup.sh installs it: go install helm.sh/helm/v3/cmd/helm@v3.16.3)"
        );
    }
    found
}

/// `chart/` in the repository.
pub fn chart_dir() -> PathBuf {
    crate::repo_root().join("chart")
}

/// Runs helm with `args`; returns stdout, or stderr as the error.
pub fn run(helm: &Path, args: &[String]) -> Result<String, String> {
    let out = Command::new(helm)
        .args(args)
        .output()
        .map_err(|e| format!("running helm: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "helm {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `helm template` of the chart with `values` (`--set`, `--set-file`, … as given).
pub fn template(helm: &Path, values: &[String]) -> Result<Vec<Value>, String> {
    let mut args: Vec<String> = vec![
        "template".into(),
        RELEASE.into(),
        chart_dir().display().to_string(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--kube-version".into(),
        KUBE_VERSION.into(),
    ];
    args.extend(values.iter().cloned());
    let text = run(helm, &args)?;
    parse_stream(&text)
}

/// Every non-empty document of a YAML stream, as JSON.
pub fn parse_stream(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| format!("rendered YAML: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The object of `kind` named `name`; panics listing what was rendered.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", kinds(objects)))
}

/// `Kind/name` of every object, sorted.
pub fn kinds(objects: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    v.sort();
    v
}

/// Resource names are `<release>-speculum-…`.
pub fn name(suffix: &str) -> String {
    if suffix.is_empty() {
        format!("{RELEASE}-speculum")
    } else {
        format!("{RELEASE}-speculum-{suffix}")
    }
}
