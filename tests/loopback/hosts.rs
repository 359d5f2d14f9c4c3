//! `hosts`: the rendered text (table tests against the exact bytes containerd reads), config
//! validation, and configure/cleanup on real directories, including the states a crash at any
//! point can leave behind.
//!
//! That containerd 1.6.20 accepts the rendered text (`dial_timeout` included) and tries our
//! host first, the operator's hosts next and `server` last was checked by hand with a private
//! containerd (see docs/hosts.md); the namespace integration test exercises it on every run.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use speculum::hosts::{
    Action, HostsConfig, HostsError, MARKER, MirroredRegistry, cleanup, configure, render,
};

const HEADER: &str = "# managed-by: speculum
# Written by speculum. Its cleanup deletes this file, or puts back the operator's
# original from hosts.toml.speculum-backup when there was one: edit that file, not this.

";

fn config(certs_dir: &Path, registries: &[&str]) -> HostsConfig {
    HostsConfig {
        certs_dir: certs_dir.to_owned(),
        mirrored_registries: registries.iter().map(|s| s.to_string()).collect(),
        ..HostsConfig::default()
    }
}

fn registry(entry: &str) -> MirroredRegistry {
    MirroredRegistry::parse(entry).expect("test registry entry parses")
}

#[test]
fn render_table() {
    let default = HostsConfig::default;
    // (name, registry entry, config, operator's file, want after the header)
    let cases: Vec<(&str, &str, HostsConfig, Option<&str>, &str)> = vec![
        (
            "docker.io maps to registry-1, tags resolve through us",
            "https://docker.io",
            default(),
            None,
            r#"server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5080"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"
"#,
        ),
        (
            "plain-http registry with a port keeps its scheme",
            "http://127.0.0.1:5000/",
            default(),
            None,
            r#"server = "http://127.0.0.1:5000"

[host."http://127.0.0.1:5080"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"
"#,
        ),
        (
            "resolve_tags=false leaves tags to upstream; dial_timeout in Go syntax",
            "https://ghcr.io",
            HostsConfig {
                resolve_tags: false,
                dial_timeout: Duration::from_millis(1500),
                mirror_endpoint: "http://127.0.0.1:6000/".to_owned(),
                ..default()
            },
            None,
            r#"server = "https://ghcr.io"

[host."http://127.0.0.1:6000"]
capabilities = ["pull"]
dial_timeout = "1500ms"
"#,
        ),
        (
            "_default has no server: containerd uses the image's own registry",
            "_default",
            default(),
            None,
            r#"[host."http://127.0.0.1:5080"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"
"#,
        ),
        (
            "prepend keeps their server, settings and hosts after ours, drops our old entries",
            "https://docker.io",
            default(),
            Some(
                "# their comment\r\nserver = \"https://proxy.example.test\"\r\nca = \"corp.pem\"\r\n\
                 [header]\r\nx-team = \"büro\"\r\n\
                 [host.\"http://127.0.0.1:5080/v2\"]\r\n  capabilities = [\"pull\"]\r\n\
                 [host.\"https://m1.example.test\"]\r\n  capabilities = [\"pull\"]\r\n\
                 [host.\"http://127.0.0.1:5080/\"]\r\n\
                 [host.\"https://m2.example.test\"]\r\n  skip_verify = true",
            ),
            r#"server = "https://proxy.example.test"
ca = "corp.pem"

[header]
x-team = "büro"

[host."http://127.0.0.1:5080"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"

[host."https://m1.example.test"]
capabilities = ["pull"]

[host."https://m2.example.test"]
skip_verify = true
"#,
        ),
        (
            "prepend with a server-only file (which containerd itself rejects) still gets a host",
            "https://quay.io",
            default(),
            Some("server = \"https://quay.io\"\n"),
            r#"server = "https://quay.io"

[host."http://127.0.0.1:5080"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"
"#,
        ),
        (
            "prepend_existing=false ignores their file entirely",
            "https://docker.io",
            HostsConfig {
                prepend_existing: false,
                ..default()
            },
            Some("server = \"https://proxy.example.test\"\n[host.\"https://m1.example.test\"]\n"),
            r#"server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5080"]
capabilities = ["pull", "resolve"]
dial_timeout = "200ms"
"#,
        ),
    ];
    for (name, entry, cfg, existing, want) in cases {
        let got = render(&registry(entry), &cfg, existing)
            .unwrap_or_else(|e| panic!("{name}: render failed: {e}"));
        assert_eq!(got, format!("{HEADER}{want}"), "{name}");
        // Never a file without a [host] table: containerd rejects it ("invalid `host` tree").
        let doc: toml::Table = got.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        let hosts = doc.get("host").and_then(|h| h.as_table());
        assert!(hosts.is_some_and(|h| !h.is_empty()), "{name}: no hosts");
    }
}

#[test]
fn render_refuses_unusable_existing_files() {
    let cfg = HostsConfig::default();
    let docker = registry("https://docker.io");
    // (name, operator's file, want error variant)
    let cases = [
        ("not TOML", "server = \n[host", "not valid TOML"),
        (
            "host is a string",
            "host = \"x\"\n",
            "`host` is not a table",
        ),
        (
            "server is a number",
            "server = 5\n",
            "`server` is not a string",
        ),
        (
            "a host is not a table",
            "host = { a = 1 }\n",
            "is not a table",
        ),
    ];
    for (name, existing, want) in cases {
        let err = render(&docker, &cfg, Some(existing)).expect_err(name);
        let msg = err.to_string();
        assert!(msg.contains(want), "{name}: {msg}");
        assert!(
            msg.contains("/etc/containerd/certs.d/docker.io/hosts.toml"),
            "{name}: {msg}"
        );
    }
}

#[test]
fn validate_reports_each_problem() {
    assert_eq!(HostsConfig::default().validate(), Vec::<String>::new());
    let with = |f: fn(&mut HostsConfig)| {
        let mut c = HostsConfig::default();
        f(&mut c);
        c
    };
    // (name, config, a substring of the one problem reported)
    let cases: Vec<(&str, HostsConfig, &str)> = vec![
        (
            "no scheme",
            with(|c| c.mirrored_registries = vec!["docker.io".into()]),
            "http:// or https://",
        ),
        (
            "ftp",
            with(|c| c.mirrored_registries = vec!["ftp://x.io".into()]),
            "scheme",
        ),
        (
            "empty host",
            with(|c| c.mirrored_registries = vec!["https://".into()]),
            "host",
        ),
        (
            "path",
            with(|c| c.mirrored_registries = vec!["https://x.io/v2".into()]),
            "no path",
        ),
        (
            "climbs out",
            with(|c| c.mirrored_registries = vec!["https://..".into()]),
            "host",
        ),
        (
            "dots",
            with(|c| c.mirrored_registries = vec!["https://a..b".into()]),
            "host",
        ),
        (
            "userinfo",
            with(|c| c.mirrored_registries = vec!["https://u@x.io".into()]),
            "host",
        ),
        (
            "port 0",
            with(|c| c.mirrored_registries = vec!["https://x.io:0".into()]),
            "port",
        ),
        (
            "port too big",
            with(|c| c.mirrored_registries = vec!["https://x.io:70000".into()]),
            "port",
        ),
        (
            "bad v6",
            with(|c| c.mirrored_registries = vec!["https://[zz]:5000".into()]),
            "IPv6",
        ),
        (
            "twice",
            with(|c| c.mirrored_registries = vec!["https://x.io".into(), "http://x.io/".into()]),
            "more than once",
        ),
        (
            "relative dir",
            with(|c| c.certs_dir = "certs.d".into()),
            "absolute",
        ),
        (
            "endpoint",
            with(|c| c.mirror_endpoint = "127.0.0.1:5080".into()),
            "mirror_endpoint",
        ),
        (
            "timeout",
            with(|c| c.dial_timeout = Duration::ZERO),
            "dial_timeout",
        ),
        (
            "suffix .crt",
            with(|c| c.backup_suffix = ".orig.crt".into()),
            "backup_suffix",
        ),
        (
            "suffix no dot",
            with(|c| c.backup_suffix = "orig".into()),
            "backup_suffix",
        ),
        (
            "suffix slash",
            with(|c| c.backup_suffix = ".a/b".into()),
            "backup_suffix",
        ),
    ];
    for (name, c, want) in cases {
        let problems = c.validate();
        assert_eq!(problems.len(), 1, "{name}: {problems:?}");
        assert!(problems[0].contains(want), "{name}: {problems:?}");
    }
    // Everything is reported at once.
    let all_bad = with(|c| {
        c.certs_dir = "x".into();
        c.mirrored_registries = vec!["nope".into()];
        c.dial_timeout = Duration::ZERO;
    });
    assert_eq!(all_bad.validate().len(), 3);
    // IPv6 literals and `_default` are fine.
    let ok = with(|c| c.mirrored_registries = vec!["http://[::1]:5000".into(), "_default".into()]);
    assert_eq!(ok.validate(), Vec::<String>::new());
}

#[test]
fn config_from_yaml() {
    let c: HostsConfig = yaml_serde::from_str(
        "certs_dir: /x\nmirrored_registries: [_default]\ndial_timeout: 1s\nresolve_tags: false\n",
    )
    .expect("valid section");
    assert_eq!(c.dial_timeout, Duration::from_secs(1));
    assert_eq!(c.mirror_endpoint, HostsConfig::default().mirror_endpoint);
    assert!(!c.resolve_tags);
    let unknown = yaml_serde::from_str::<HostsConfig>("certs_dirs: /x\n");
    assert!(unknown.is_err(), "unknown keys are refused");
}

/// Every file, symlink and directory under `root`: bytes (or link target) and mode.
fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.expect("read_dir entry").path();
            let meta = fs::symlink_metadata(&path).expect("metadata");
            let name = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("link");
                out.insert(name, (format!("-> {}", target.display()).into_bytes(), 0));
            } else if meta.is_dir() {
                out.insert(format!("{name}/"), (Vec::new(), mode));
                walk(root, &path, out);
            } else {
                out.insert(name, (fs::read(&path).expect("read"), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, bytes).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn actions(report: &speculum::hosts::Report) -> Vec<(String, Action)> {
    report
        .changes
        .iter()
        .map(|c| {
            let name = c
                .path
                .file_name()
                .expect("named")
                .to_string_lossy()
                .into_owned();
            (name, c.action)
        })
        .collect()
}

#[test]
fn fresh_dir_configure_twice_then_cleanup() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("certs.d"); // does not exist yet
    let cfg = config(
        &certs,
        &["https://docker.io", "http://127.0.0.1:5000", "_default"],
    );

    let first = configure(&cfg).expect("configure");
    assert!(first.changed());
    for entry in ["https://docker.io", "http://127.0.0.1:5000", "_default"] {
        let r = registry(entry);
        let got = fs::read_to_string(r.hosts_path(&cfg)).expect("written");
        assert_eq!(got, render(&r, &cfg, None).expect("render"), "{entry}");
        let mode = fs::metadata(r.hosts_path(&cfg))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{entry}");
    }
    let after_first = snapshot(&certs);

    let second = configure(&cfg).expect("configure again");
    assert!(!second.changed(), "second run changed things:\n{second}");
    assert_eq!(
        snapshot(&certs),
        after_first,
        "second run is byte-identical"
    );

    let clean = cleanup(&cfg).expect("cleanup");
    assert!(clean.changed());
    assert_eq!(
        snapshot(&certs),
        BTreeMap::new(),
        "everything we created is gone"
    );
    assert!(!cleanup(&cfg).expect("cleanup again").changed());
}

#[test]
fn foreign_file_is_restored_byte_for_byte() {
    // (name, original bytes, prepend_existing)
    let cases: [(&str, &[u8], bool); 3] = [
        (
            "odd bytes, replaced",
            b"\xff\xfe\x00not toml\r\n\tno newline at end",
            false,
        ),
        (
            "valid TOML, CRLF, no trailing newline",
            b"server = \"https://docker.io\"\r\n# caf\xc3\xa9",
            true,
        ),
        ("empty file", b"", true),
    ];
    for (name, original, prepend) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let certs = tmp.path();
        let file = certs.join("docker.io/hosts.toml");
        write_mode(&file, original, 0o640);
        write_mode(&certs.join("docker.io/ca.crt"), b"cert", 0o600);
        let before = snapshot(certs);
        let cfg = HostsConfig {
            prepend_existing: prepend,
            ..config(certs, &["https://docker.io"])
        };

        let report = configure(&cfg).expect(name);
        assert_eq!(
            actions(&report),
            [
                ("hosts.toml.speculum-backup".into(), Action::BackedUp),
                ("hosts.toml".into(), Action::Wrote)
            ],
            "{name}"
        );
        let ours = fs::read(&file).expect("ours");
        assert!(ours.starts_with(MARKER.as_bytes()), "{name}");
        let mode = fs::metadata(&file).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{name}: our file keeps the original's mode");

        // A second configure must not take our file for the original.
        assert!(!configure(&cfg).expect(name).changed(), "{name}");
        let backup = fs::read(certs.join("docker.io/hosts.toml.speculum-backup")).expect("backup");
        assert_eq!(backup, original, "{name}: backup is still the original");

        let report = cleanup(&cfg).expect(name);
        assert_eq!(
            actions(&report),
            [("hosts.toml".into(), Action::Restored)],
            "{name}"
        );
        assert_eq!(snapshot(certs), before, "{name}: tree restored exactly");
        assert!(!cleanup(&cfg).expect(name).changed(), "{name}");
    }
}

#[test]
fn prepend_existing_keeps_their_mirrors_after_ours() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path();
    let theirs = "server = \"https://registry-1.docker.io\"\n\n\
                  [host.\"https://mirror.example.test\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
    write_mode(
        &certs.join("docker.io/hosts.toml"),
        theirs.as_bytes(),
        0o644,
    );
    let cfg = config(certs, &["https://docker.io"]);
    configure(&cfg).expect("configure");
    let ours = fs::read_to_string(certs.join("docker.io/hosts.toml")).expect("ours");
    let us = ours
        .find("[host.\"http://127.0.0.1:5080\"]")
        .expect("our host");
    let them = ours
        .find("[host.\"https://mirror.example.test\"]")
        .expect("their host");
    assert!(
        us < them,
        "containerd tries hosts in file order; we go first:\n{ours}"
    );

    // The operator edits their original (the backup) while we are installed: the next
    // configure picks it up.
    let edited = format!("{theirs}\n[host.\"https://second.example.test\"]\n");
    fs::write(certs.join("docker.io/hosts.toml.speculum-backup"), &edited).expect("edit");
    assert!(configure(&cfg).expect("configure").changed());
    let ours = fs::read_to_string(certs.join("docker.io/hosts.toml")).expect("ours");
    assert!(ours.contains("second.example.test"), "{ours}");
    cleanup(&cfg).expect("cleanup");
    assert_eq!(
        fs::read_to_string(certs.join("docker.io/hosts.toml")).expect("restored"),
        edited
    );
}

#[test]
fn unusable_original_is_refused_before_anything_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path();
    write_mode(
        &certs.join("docker.io/hosts.toml"),
        b"\xff not utf-8",
        0o644,
    );
    write_mode(&certs.join("ghcr.io/hosts.toml"), b"[host", 0o644);
    let before = snapshot(certs);
    for entry in ["https://docker.io", "https://ghcr.io"] {
        let err = configure(&config(certs, &[entry])).expect_err(entry);
        assert!(
            matches!(
                err,
                HostsError::ExistingUnusable { .. } | HostsError::ExistingNotToml { .. }
            ),
            "{entry}: {err}"
        );
        assert_eq!(snapshot(certs), before, "{entry}: nothing touched");
    }
}

#[test]
fn invalid_config_touches_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path(), &["https://ok.example.test", "https://bad/path"]);
    let err = configure(&cfg).expect_err("invalid");
    assert!(
        matches!(err, HostsError::InvalidConfig(ref p) if p.len() == 1),
        "{err}"
    );
    assert!(err.to_string().contains("bad/path"), "{err}");
    assert_eq!(snapshot(tmp.path()), BTreeMap::new());
    assert!(matches!(cleanup(&cfg), Err(HostsError::InvalidConfig(_))));
}

#[test]
fn symlinked_original_comes_back_as_a_symlink() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path();
    write_mode(
        &certs.join("shared.toml"),
        b"[host.\"https://m.example.test\"]\n",
        0o600,
    );
    fs::create_dir(certs.join("quay.io")).expect("mkdir");
    symlink("../shared.toml", certs.join("quay.io/hosts.toml")).expect("symlink");
    let before = snapshot(certs);
    let cfg = config(certs, &["https://quay.io"]);
    configure(&cfg).expect("configure");
    let ours = fs::symlink_metadata(certs.join("quay.io/hosts.toml")).expect("ours");
    assert!(ours.is_file(), "the link is replaced, its target untouched");
    assert_eq!(
        ours.permissions().mode() & 0o777,
        0o600,
        "target's mode kept"
    );
    cleanup(&cfg).expect("cleanup");
    assert_eq!(snapshot(certs), before);
}

#[test]
fn registries_dropped_from_the_config_are_cleaned_by_configure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path();
    write_mode(
        &certs.join("ghcr.io/hosts.toml"),
        b"# theirs\n[host.\"https://x\"]\n",
        0o644,
    );
    write_mode(
        &certs.join("other.io/hosts.toml"),
        b"# not in our list\n",
        0o644,
    );
    let before = snapshot(certs);
    configure(&config(certs, &["https://ghcr.io", "https://quay.io"])).expect("configure");
    let report = configure(&config(certs, &["https://docker.io"])).expect("reconfigure");
    let got = actions(&report);
    assert!(
        got.contains(&("hosts.toml".into(), Action::Restored)),
        "{report}"
    );
    assert!(
        got.contains(&("quay.io".into(), Action::RemovedDir)),
        "{report}"
    );
    cleanup(&config(certs, &[])).expect("cleanup");
    assert_eq!(snapshot(certs), before, "other.io was never touched");
}

/// A crash can stop `configure` or `cleanup` between any two steps. Each case lays out the
/// files one such stop leaves in `docker.io/` and says what `cleanup` must leave behind.
#[test]
fn cleanup_recovers_from_any_crash_point() {
    let theirs: &[u8] = b"server = \"https://registry-1.docker.io\"\n[host.\"https://m\"]\n";
    let ours_text = render(
        &registry("https://docker.io"),
        &config(Path::new("/unused"), &[]),
        Some(std::str::from_utf8(theirs).expect("utf-8")),
    )
    .expect("render");
    let ours = ours_text.as_bytes();
    type Files<'a> = Vec<(&'a str, &'a [u8])>;
    // (name, files before cleanup, files after cleanup; None = directory gone)
    let cases: Vec<(&str, Files, Option<Files>)> = vec![
        (
            "stale temp file beside ours and the backup",
            vec![
                (".speculum-tmp.4242", b"half"),
                ("hosts.toml", ours),
                ("hosts.toml.speculum-backup", theirs),
            ],
            Some(vec![("hosts.toml", theirs)]),
        ),
        (
            "backup taken, ours not yet written",
            vec![
                ("hosts.toml", theirs),
                ("hosts.toml.speculum-backup", theirs),
            ],
            Some(vec![("hosts.toml", theirs)]),
        ),
        (
            "ours gone (deleted by hand), backup still there",
            vec![("hosts.toml.speculum-backup", theirs)],
            Some(vec![("hosts.toml", theirs)]),
        ),
        (
            "dir created, marker written, nothing else",
            vec![(".speculum-created-dir", b"")],
            None,
        ),
        (
            "dir created, ours written, temp of a second write left",
            vec![
                (".speculum-created-dir", b""),
                ("hosts.toml", ours),
                (".speculum-tmp.1", b""),
            ],
            None,
        ),
        (
            "an operator cert in a dir we created keeps the dir",
            vec![
                (".speculum-created-dir", b""),
                ("hosts.toml", ours),
                ("ca.crt", b"pem"),
            ],
            Some(vec![("ca.crt", b"pem")]),
        ),
        (
            "their file alone is left alone",
            vec![("hosts.toml", theirs)],
            Some(vec![("hosts.toml", theirs)]),
        ),
    ];
    for (name, files, want) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("docker.io");
        fs::create_dir(&dir).expect("mkdir");
        for (file, bytes) in &files {
            write_mode(&dir.join(file), bytes, 0o644);
        }
        let cfg = config(tmp.path(), &["https://docker.io"]);
        cleanup(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = snapshot(&dir);
        match want {
            None => assert!(
                !dir.exists(),
                "{name}: dir should be gone, has {:?}",
                got.keys()
            ),
            Some(want) => {
                let want: BTreeMap<String, (Vec<u8>, u32)> = want
                    .into_iter()
                    .map(|(f, b)| (f.to_owned(), (b.to_vec(), 0o644)))
                    .collect();
                assert_eq!(got, want, "{name}");
            }
        }

        // The same crash state, followed by configure instead: it must converge to the normal
        // installed state, whatever was left.
        let tmp2 = tempfile::tempdir().expect("tempdir");
        let dir2 = tmp2.path().join("docker.io");
        fs::create_dir(&dir2).expect("mkdir");
        for (file, bytes) in &files {
            write_mode(&dir2.join(file), bytes, 0o644);
        }
        let cfg2 = config(tmp2.path(), &["https://docker.io"]);
        configure(&cfg2).unwrap_or_else(|e| panic!("{name}: configure: {e}"));
        let installed = fs::read(dir2.join("hosts.toml")).expect("ours");
        assert!(installed.starts_with(MARKER.as_bytes()), "{name}");
        assert!(
            !configure(&cfg2).expect(name).changed(),
            "{name}: converged"
        );
        assert!(
            snapshot(&dir2)
                .keys()
                .all(|k| !k.starts_with(".speculum-tmp")),
            "{name}: temp files removed"
        );
    }
}

#[test]
fn conflicting_original_and_backup_are_left_for_a_human() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path();
    write_mode(
        &certs.join("docker.io/hosts.toml"),
        b"# new theirs\n",
        0o644,
    );
    write_mode(
        &certs.join("docker.io/hosts.toml.speculum-backup"),
        b"# old theirs\n",
        0o644,
    );
    let before = snapshot(certs);
    let cfg = config(certs, &["https://docker.io"]);
    for (name, result) in [("configure", configure(&cfg)), ("cleanup", cleanup(&cfg))] {
        let err = result.expect_err(name);
        assert!(matches!(err, HostsError::Conflict { .. }), "{name}: {err}");
        assert!(
            err.to_string().contains("hosts.toml.speculum-backup"),
            "{name}: {err}"
        );
        assert_eq!(snapshot(certs), before, "{name}: nothing touched");
    }
}
