//! `hosts::registries_conf`: the CRI-O drop-in's exact bytes, its config checks, and
//! configure/cleanup on real directories — twice, a file of someone else's at our path
//! (restored byte for byte), and the states a crash can leave (a temp file, a backup taken
//! but ours not yet written) — plus the SIGHUP reload against a real process named `crio`.
//!
//! That containers/image parses the drop-in and sends `/v2/<host>_<port>/…` to the mirror is
//! checked with real skopeo and podman in `tests/tools/crio_conf.rs`, and with real CRI-O in
//! `tests/rig/crio.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use speculum::hosts::registries_conf::{self, DROP_IN, Reload};
use speculum::hosts::{Action, HostsConfig, HostsError, Runtime};

const HEADER: &str = "# managed-by: speculum
# Written by speculum for CRI-O, podman and skopeo (containers-registries.conf.d(5)).
# Its cleanup deletes this file, or puts back the file that was here from
# 99-speculum.conf.speculum-backup: edit that one, not this.
";

/// A cri-o config writing into `dir`, never signalling anyone (tests run in parallel, and a
/// process named crio on this machine is none of theirs).
fn config(dir: &Path, registries: &[&str]) -> HostsConfig {
    HostsConfig {
        runtime: Runtime::CriO,
        registries_conf_dir: dir.to_owned(),
        mirrored_registries: registries.iter().map(|s| s.to_string()).collect(),
        crio_find_process: false,
        ..HostsConfig::default()
    }
}

#[test]
fn render_table() {
    let base = || config(Path::new("/etc/containers/registries.conf.d"), &[]);
    // (name, config, want after the header)
    let cases: Vec<(&str, HostsConfig, &str)> = vec![
        (
            "https upstream, tags through us: pull-from-mirror all",
            HostsConfig {
                mirrored_registries: vec!["https://docker.io".into()],
                ..base()
            },
            r#"
[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "127.0.0.1:5080/docker.io"
insecure = true
pull-from-mirror = "all"
"#,
        ),
        (
            "plain-http upstream with a port: insecure registry, port written _port",
            HostsConfig {
                mirrored_registries: vec!["http://10.250.91.2:5000/".into()],
                ..base()
            },
            r#"
[[registry]]
prefix = "10.250.91.2:5000"
location = "10.250.91.2:5000"
insecure = true

[[registry.mirror]]
location = "127.0.0.1:5080/10.250.91.2_5000"
insecure = true
pull-from-mirror = "all"
"#,
        ),
        (
            "resolve_tags=false: digest-only; an https mirror endpoint is not insecure",
            HostsConfig {
                mirrored_registries: vec!["https://ghcr.io".into(), "https://Quay.IO".into()],
                resolve_tags: false,
                mirror_endpoint: "https://mirror.local:6000/".into(),
                ..base()
            },
            r#"
[[registry]]
prefix = "ghcr.io"
location = "ghcr.io"

[[registry.mirror]]
location = "mirror.local:6000/ghcr.io"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "Quay.IO"
location = "Quay.IO"

[[registry.mirror]]
location = "mirror.local:6000/quay.io"
pull-from-mirror = "digest-only"
"#,
        ),
        (
            "_default has no catch-all in containers/image: a comment, no table",
            HostsConfig {
                mirrored_registries: vec!["_default".into(), "https://localhost:5000".into()],
                ..base()
            },
            r#"
# `_default` is not written: containers/image has no catch-all registry.

[[registry]]
prefix = "localhost:5000"
location = "localhost:5000"

[[registry.mirror]]
location = "127.0.0.1:5080/localhost_5000"
insecure = true
pull-from-mirror = "all"
"#,
        ),
    ];
    for (name, cfg, want) in cases {
        assert_eq!(cfg.validate(), Vec::<String>::new(), "{name}: config valid");
        let got = registries_conf::render(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, format!("{HEADER}{want}"), "{name}");
        // Every rendered file is TOML, whatever containers/image makes of it.
        if let Err(e) = got.parse::<toml::Table>() {
            panic!("{name}: not TOML: {e}\n{got}");
        }
    }
}

#[test]
fn validate_reports_each_problem_for_cri_o_only() {
    let dir = Path::new("/etc/containers/registries.conf.d");
    // (name, config, substrings of the problems, in order)
    let cases: Vec<(&str, HostsConfig, Vec<&str>)> = vec![
        (
            "default cri-o config",
            config(dir, &["https://docker.io"]),
            vec![],
        ),
        (
            "relative dir, .conf backup suffix, relative pid file",
            HostsConfig {
                registries_conf_dir: "registries.conf.d".into(),
                backup_suffix: ".old.conf".into(),
                crio_pid_file: Some("crio.pid".into()),
                ..config(dir, &[])
            },
            vec![
                "hosts.registries_conf_dir must be an absolute path",
                "must not end in .conf",
                "hosts.crio_pid_file must be an absolute path",
            ],
        ),
        (
            "an IPv6 registry or mirror endpoint cannot be path-encoded",
            HostsConfig {
                mirror_endpoint: "http://[::1]:5080".into(),
                ..config(dir, &["http://[::1]:5000", "https://docker.io"])
            },
            vec![
                "hosts.mirror_endpoint \"http://[::1]:5080\": runtime cri-o needs",
                "\"http://[::1]:5000\" cannot be named in a mirror path",
            ],
        ),
    ];
    for (name, cfg, want) in cases {
        let got = cfg.validate();
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!(g.contains(w), "{name}: {g:?} should contain {w:?}");
        }
    }
    // The same IPv6 entries are fine for containerd, which needs no path encoding.
    let containerd = HostsConfig {
        runtime: Runtime::Containerd,
        mirror_endpoint: "http://[::1]:5080".into(),
        ..config(dir, &["http://[::1]:5000"])
    };
    assert_eq!(containerd.validate(), Vec::<String>::new());
}

#[test]
fn runtime_key_parses_from_yaml_and_env() {
    let cfg = speculum::config::load(
        None,
        [("SPECULUM_HOSTS_RUNTIME".to_owned(), "cri-o".to_owned())],
        &[(
            "hosts.registries_conf_dir".to_owned(),
            "/srv/registries.conf.d".to_owned(),
        )],
    )
    .expect("config loads");
    assert_eq!(cfg.hosts.runtime, Runtime::CriO);
    assert_eq!(
        cfg.hosts.registries_conf_dir,
        Path::new("/srv/registries.conf.d")
    );
    let bad = speculum::config::load(
        None,
        std::iter::empty(),
        &[("hosts.runtime".to_owned(), "docker".to_owned())],
    );
    assert!(bad.is_err(), "an unknown runtime is refused");
}

/// Every file under `root`: name → (bytes, mode, inode).
fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, u64)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = fs::read_dir(root) else {
        return out;
    };
    for entry in entries {
        let path = entry.expect("entry").path();
        let meta = fs::symlink_metadata(&path).expect("metadata");
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let bytes = if meta.is_file() {
            fs::read(&path).expect("read")
        } else {
            Vec::new()
        };
        out.insert(
            name,
            (bytes, meta.permissions().mode() & 0o7777, meta.ino()),
        );
    }
    out
}

fn actions(report: &speculum::hosts::Report) -> Vec<(String, Action)> {
    report
        .changes
        .iter()
        .map(|c| {
            let name = c.path.file_name().expect("named").to_string_lossy();
            (name.into_owned(), c.action)
        })
        .collect()
}

fn names(list: &[(&str, Action)]) -> Vec<(String, Action)> {
    list.iter().map(|(n, a)| (n.to_string(), *a)).collect()
}

#[test]
fn fresh_dir_configure_twice_then_cleanup_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("registries.conf.d"); // does not exist yet
    let cfg = config(&dir, &["https://docker.io", "http://127.0.0.1:5000"]);

    let first = registries_conf::configure(&cfg).expect("configure");
    assert_eq!(
        actions(&first),
        names(&[
            ("registries.conf.d", Action::CreatedDir),
            (DROP_IN, Action::Wrote)
        ])
    );
    let file = dir.join(DROP_IN);
    let text = fs::read_to_string(&file).expect("written");
    assert_eq!(text, registries_conf::render(&cfg).expect("render"));
    assert_eq!(
        fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
        0o644
    );
    assert!(
        first.notes.iter().any(|n| n.starts_with("not reloaded")),
        "the reload step reports: {:?}",
        first.notes
    );
    let after_first = snapshot(&dir);

    let second = registries_conf::configure(&cfg).expect("configure again");
    assert!(!second.changed(), "second run changed things:\n{second}");
    assert_eq!(second.notes, vec![Reload::NotNeeded.to_string()]);
    assert_eq!(snapshot(&dir), after_first, "second run is byte-identical");

    let clean = registries_conf::cleanup(&cfg).expect("cleanup");
    assert!(clean.changed());
    assert!(!dir.exists(), "the directory we created is gone");
    let again = registries_conf::cleanup(&cfg).expect("cleanup again");
    assert!(!again.changed(), "{again}");
}

#[test]
fn a_file_of_theirs_at_our_path_comes_back_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let theirs =
        b"# the operator's own, not TOML we would write\r\n[[registry]]\nprefix = \"x.test\"\n";
    let file = dir.join(DROP_IN);
    fs::write(&file, theirs).expect("write theirs");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::write(dir.join("50-other.conf"), "# someone else's drop-in\n").expect("other");
    let before = snapshot(&dir);
    let cfg = config(&dir, &["https://docker.io"]);

    let report = registries_conf::configure(&cfg).expect("configure");
    assert_eq!(
        actions(&report),
        names(&[
            ("99-speculum.conf.speculum-backup", Action::BackedUp),
            (DROP_IN, Action::Wrote)
        ])
    );
    let backup = dir.join("99-speculum.conf.speculum-backup");
    assert_eq!(fs::read(&backup).expect("backup"), theirs);
    assert_eq!(
        fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
        0o600,
        "ours takes the mode of theirs"
    );
    // Twice: the backup is taken once and never replaced by ours.
    assert!(!registries_conf::configure(&cfg).expect("again").changed());
    assert_eq!(fs::read(&backup).expect("backup"), theirs);

    registries_conf::cleanup(&cfg).expect("cleanup");
    assert_eq!(
        snapshot(&dir),
        before,
        "bytes, mode and the very inode are back; the other drop-in untouched"
    );
}

#[test]
fn crash_leftovers_are_finished_or_undone() {
    let theirs = b"# theirs\n".to_vec();
    // (name, files before (name, bytes)); after configure only ours (and the backup of
    // theirs) is left, after cleanup only theirs.
    type Files = Vec<(&'static str, Vec<u8>)>;
    let cases: Vec<(&str, Files)> = vec![
        (
            "a temp file from a killed write",
            vec![(".speculum-tmp.4242", b"half".to_vec())],
        ),
        (
            "backup taken, ours not yet written (file and backup equal)",
            vec![
                (DROP_IN, theirs.clone()),
                ("99-speculum.conf.speculum-backup", theirs.clone()),
            ],
        ),
    ];
    for (name, files) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        for (f, bytes) in &files {
            fs::write(dir.join(f), bytes).expect("lay out");
        }
        let cfg = config(&dir, &["https://docker.io"]);
        let had_theirs = files.iter().any(|(f, _)| *f == DROP_IN);

        let report = registries_conf::configure(&cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let after = snapshot(&dir);
        let left: Vec<&String> = after.keys().collect();
        let mut want = vec![DROP_IN.to_owned()];
        if had_theirs {
            want.push("99-speculum.conf.speculum-backup".to_owned());
        }
        assert_eq!(left, want.iter().collect::<Vec<_>>(), "{name}: {report}");
        assert!(
            fs::read_to_string(dir.join(DROP_IN))
                .expect("ours")
                .starts_with(speculum::hosts::MARKER),
            "{name}"
        );

        // A temp file left by a crash in the middle of cleanup, too.
        fs::write(dir.join(".speculum-tmp.9"), b"y").expect("leftover");
        registries_conf::cleanup(&cfg).unwrap_or_else(|e| panic!("{name}: cleanup: {e}"));
        let end: BTreeMap<String, Vec<u8>> = snapshot(&dir)
            .into_iter()
            .map(|(k, (b, _, _))| (k, b))
            .collect();
        let want_end: BTreeMap<String, Vec<u8>> = if had_theirs {
            [(DROP_IN.to_owned(), theirs.clone())].into()
        } else {
            BTreeMap::new()
        };
        assert_eq!(end, want_end, "{name}: only their file is left");
    }
}

#[test]
fn a_new_file_of_theirs_beside_the_backup_is_left_for_a_human() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let cfg = config(&dir, &["https://docker.io"]);
    fs::write(dir.join(DROP_IN), b"# theirs, v1\n").expect("theirs");
    registries_conf::configure(&cfg).expect("configure");
    // Someone replaced ours with a new file while ours was installed.
    fs::write(dir.join(DROP_IN), b"# theirs, v2\n").expect("replace");
    let before = snapshot(&dir);
    for (what, result) in [
        ("configure", registries_conf::configure(&cfg)),
        ("cleanup", registries_conf::cleanup(&cfg)),
    ] {
        assert!(
            matches!(result, Err(HostsError::Conflict { .. })),
            "{what}: {result:?}"
        );
        assert_eq!(snapshot(&dir), before, "{what} touched nothing");
    }
}

/// A process whose name (`/proc/PID/comm`) is `crio`: a copy of `sleep`, so SIGHUP ends it
/// (the default action) and the test can see it arrived.
fn fake_crio(dir: &Path) -> Child {
    let bin = dir.join("crio");
    fs::copy("/bin/sleep", &bin).expect("copy sleep");
    Command::new(&bin)
        .arg("60")
        .spawn()
        .expect("start fake crio")
}

/// Waits (at most 20 s) for `child` to end; the signal that ended it.
fn ended_by(child: &mut Child) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.signal();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_change_sends_sighup_to_the_crio_the_pid_file_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf_dir = tmp.path().join("registries.conf.d");
    let mut crio = fake_crio(tmp.path());
    let pid_file = tmp.path().join("crio.pid");
    fs::write(&pid_file, format!("{}\n", crio.id())).expect("pid file");
    let cfg = HostsConfig {
        crio_pid_file: Some(pid_file.clone()),
        ..config(&conf_dir, &["https://docker.io"])
    };
    // /proc/PID/comm is set at exec; poll until the child has exec'd (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let comm = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() == "crio")
            .unwrap_or(false)
    };
    while !comm(crio.id()) {
        assert!(Instant::now() < deadline, "fake crio never exec'd");
        std::thread::sleep(Duration::from_millis(10));
    }

    let report = registries_conf::configure(&cfg).expect("configure");
    let want = Reload::Signalled {
        pid: crio.id() as i32,
        how: pid_file.display().to_string(),
    };
    assert_eq!(report.notes, vec![want.to_string()], "{report}");
    assert_eq!(ended_by(&mut crio), Some(libc_sighup()), "crio got SIGHUP");

    // Unchanged: nobody is signalled (the pid file now names a dead process anyway).
    let again = registries_conf::configure(&cfg).expect("again");
    assert_eq!(again.notes, vec![Reload::NotNeeded.to_string()]);
    // Cleanup changes the directory: it reloads too, and says the pid is no crio now.
    let clean = registries_conf::cleanup(&cfg).expect("cleanup");
    assert!(
        clean.notes[0].contains("is not a running crio"),
        "{:?}",
        clean.notes
    );
}

/// SIGHUP's number on Linux.
fn libc_sighup() -> i32 {
    1
}
