//! The offline `pin FILE|-` command, run as the real binary against a real registry:
//! multi-document YAML keeps its comments and untouched documents byte for byte, flow-style
//! documents are re-serialised, and `--strict` fails on images that cannot be pinned.

use std::io::Write;
use std::process::{Command, Stdio};

use testkit::registries::{Auth, Registry};

fn config(dir: &std::path::Path, host: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("resolver:\n  timeout: 3s\n  registries:\n    \"{host}\": {{insecure: true}}\n"),
    )
    .expect("config");
    path
}

fn run(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_speculum-webhook"))
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("DOCKER_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn pins_multi_document_yaml() {
    let reg = Registry::start(Auth::None);
    let host = reg.host();
    let d = reg.push_image("team/app", "v1", "amd64", "a").await;
    let (idx, _) = reg.push_index("team/multi", "v2", "b").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), &host);

    let service = "---\n# the service stays exactly as written\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n";
    let deployment = format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web # front\nspec:\n  template:\n    spec:\n      containers:\n        - name: app\n          image: {host}/team/app:v1   # pinned by CI\n        - name: multi\n          image: \"{host}/team/multi:v2\"\n"
    );
    let flow = format!(
        "--- {{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {{\"name\": \"p\"}}, \"spec\": {{\"containers\": [{{\"name\": \"a\", \"image\": \"{host}/team/app:v1\"}}]}}}}\n"
    );
    let input = format!("{service}{deployment}{flow}");

    let (code, out, err) = run(
        &["--config", cfg.to_str().expect("utf8"), "pin", "-"],
        Some(&input),
    );
    assert_eq!(code, 0, "{err}");
    let want_deployment = deployment
        .replace(
            &format!("{host}/team/app:v1 "),
            &format!("{host}/team/app:v1@{d} "),
        )
        .replace(
            &format!("{host}/team/multi:v2\""),
            &format!("{host}/team/multi:v2@{idx}\""),
        );
    assert!(
        out.starts_with(&format!("{service}{want_deployment}")),
        "comments and layout kept:\n{out}\nstderr: {err}"
    );
    let rest = &out[service.len() + want_deployment.len()..];
    let flow_doc: serde_json::Value =
        yaml_serde::from_str(rest.trim_start_matches("---").trim_start()).expect("yaml");
    assert_eq!(
        flow_doc["spec"]["containers"][0]["image"],
        format!("{host}/team/app:v1@{d}")
    );
    assert!(err.contains("pinned 3 image reference(s)"), "{err}");

    // Pinned output is a fixed point.
    let file = dir.path().join("pinned.yaml");
    std::fs::write(&file, &out).expect("write");
    let (code, again, _) = run(
        &[
            "--config",
            cfg.to_str().expect("utf8"),
            "pin",
            file.to_str().expect("utf8"),
        ],
        None,
    );
    assert_eq!((code, again.as_str()), (0, out.as_str()));

    // A tag that does not exist: a warning, or a failure with --strict.
    let missing = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: m}}\nspec:\n  containers:\n  - {{name: a, image: {host}/team/app:gone}}\n"
    );
    let (code, out, err) = run(
        &["--config", cfg.to_str().expect("utf8"), "pin", "-"],
        Some(&missing),
    );
    assert_eq!((code, out.as_str()), (0, missing.as_str()), "{err}");
    assert!(err.contains("not found"), "{err}");
    let (code, _, _) = run(
        &[
            "--config",
            cfg.to_str().expect("utf8"),
            "pin",
            "--strict",
            "-",
        ],
        Some(&missing),
    );
    assert_eq!(code, 1);

    // Unreadable YAML documents are reported and passed through.
    let (code, out, err) = run(&["pin", "-"], Some("a: [unclosed\n"));
    assert_eq!((code, out.as_str()), (0, "a: [unclosed\n"));
    assert!(err.contains("document 0"), "{err}");
}
