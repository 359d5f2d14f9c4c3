//! `speculum config` with every shortcut flag, run as the real binary: each flag's value lands
//! on its `section.key` in the printed configuration, and `--set` wins over a shortcut.
//! (The binary's own unit tests check that every entry of the shortcut table names a key;
//! this checks the flags a user types, end to end.)

use std::process::Command;

fn speculum_config(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_speculum"))
        .arg("config")
        .args(args)
        .env_remove("SPECULUM_CONFIG")
        .output()
        .expect("running speculum");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value at `section.key` (dots separate levels) of the printed YAML.
fn at<'a>(tree: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    key.split('.').fold(tree, |v, k| &v[k])
}

#[test]
fn every_shortcut_flag_lands_on_its_key() {
    // (flag, value given, section.key, value printed); values differ from the defaults.
    let cases: &[(&str, &str, &str, serde_json::Value)] = &[
        ("--node-name", "node-7", "node.name", "node-7".into()),
        (
            "--mirror-listen",
            "127.0.0.1:6100",
            "registry.mirror_listen",
            "127.0.0.1:6100".into(),
        ),
        (
            "--peer-listen",
            "127.0.0.1:6101",
            "registry.peer_listen",
            "127.0.0.1:6101".into(),
        ),
        (
            "--registry-port",
            "6101",
            "routing.registry_port",
            6101.into(),
        ),
        (
            "--metrics-listen",
            "127.0.0.1:6102",
            "metrics.listen",
            "127.0.0.1:6102".into(),
        ),
        (
            "--containerd-socket",
            "/tmp/c.sock",
            "containerd.socket",
            "/tmp/c.sock".into(),
        ),
        (
            "--containerd-namespace",
            "ns7",
            "containerd.namespace",
            "ns7".into(),
        ),
        (
            "--content-dir",
            "/tmp/content",
            "containerd.content_dir",
            "/tmp/content".into(),
        ),
        (
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/6103",
            "routing.listen",
            "/ip4/127.0.0.1/tcp/6103".into(),
        ),
        (
            "--data-dir",
            "/tmp/data7",
            "routing.data_dir",
            "/tmp/data7".into(),
        ),
        (
            "--bootstrap-peer",
            "/ip4/127.0.0.2/tcp/6103",
            "routing.bootstrap.peers",
            serde_json::json!(["/ip4/127.0.0.2/tcp/6103"]),
        ),
        (
            "--bootstrap-dns",
            "boot.example:6103",
            "routing.bootstrap.dns",
            "boot.example:6103".into(),
        ),
        (
            "--resolve-timeout",
            "3s",
            "mirror.resolve_timeout",
            "3s".into(),
        ),
        ("--mirror-attempts", "5", "mirror.attempts", 5.into()),
        (
            "--mirrored-registry",
            "https://registry.example",
            "hosts.mirrored_registries",
            serde_json::json!(["https://registry.example"]),
        ),
        (
            "--certs-dir",
            "/tmp/certs.d",
            "hosts.certs_dir",
            "/tmp/certs.d".into(),
        ),
        (
            "--mirror-endpoint",
            "http://127.0.0.1:6100",
            "hosts.mirror_endpoint",
            "http://127.0.0.1:6100".into(),
        ),
        ("--runtime", "cri-o", "hosts.runtime", "cri-o".into()),
        ("--log-format", "text", "log.format", "text".into()),
        ("--log-level", "debug", "log.level", "debug".into()),
        (
            "--policy-bundle",
            "/tmp/bundle",
            "policy.bundle",
            "/tmp/bundle".into(),
        ),
        (
            "--resolve-tags",
            "false",
            "policy.resolve_tags",
            false.into(),
        ),
        (
            "--resolve-latest-tag",
            "true",
            "policy.resolve_latest_tag",
            true.into(),
        ),
        (
            "--audit-file",
            "/tmp/audit.jsonl",
            "audit.file",
            "/tmp/audit.jsonl".into(),
        ),
    ];
    let mut args: Vec<&str> = cases.iter().flat_map(|(f, v, _, _)| [*f, *v]).collect();
    args.push("--prepend-existing");
    let (code, stdout, stderr) = speculum_config(&args);
    assert_eq!(code, 0, "{stderr}");
    let tree: serde_json::Value = match yaml_serde::from_str(&stdout) {
        Ok(t) => t,
        Err(e) => panic!("{e}: {stdout}"),
    };
    for (flag, given, key, want) in cases {
        assert_eq!(at(&tree, key), want, "{flag} {given} → {key}");
    }
    assert_eq!(
        at(&tree, "hosts.prepend_existing"),
        &serde_json::Value::Bool(true)
    );
}

#[test]
fn set_wins_over_a_shortcut_and_bad_flags_exit_2() {
    let (code, stdout, stderr) =
        speculum_config(&["--log-level", "debug", "--set", "log.level=warn"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("level: warn"), "{stdout}");

    let cases: &[(&str, &[&str], &str)] = &[
        (
            "set without =",
            &["--set", "log.level"],
            "expected SECTION.KEY=VALUE",
        ),
        (
            "unknown key",
            &["--set", "log.colour=red"],
            "log.colour: no such setting",
        ),
        (
            "bad shortcut value",
            &["--mirror-attempts", "many"],
            "mirror.attempts",
        ),
    ];
    for (name, args, want) in cases {
        let (code, _, stderr) = speculum_config(args);
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
    }
}
