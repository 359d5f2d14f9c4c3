//! CRI-O's (and podman's, skopeo's) mirror configuration: one containers-registries.conf.d(5)
//! drop-in, [`DROP_IN`] in `hosts.registries_conf_dir`, with a `[[registry]]` per mirrored
//! registry whose first `[[registry.mirror]]` is this node's daemon; writing it so that a file
//! of the operator's at our path always comes back; and telling CRI-O to read it again.
//!
//! containers/image sends no `?ns=`, so the mirror location carries the upstream in its path:
//! `127.0.0.1:5080/docker.io` makes requests arrive as `/v2/docker.io/<repo>/…`. A path
//! component may not hold `:` (the rewritten reference would not parse and the pull would
//! fail, not fall back), so a port is written `_<port>`: `10.0.0.5:5000` → `10.0.0.5_5000`
//! ([`path_segment`]); hostnames never contain `_`. Parsing that path is the registry's job
//! (`registry::request`), not this module's.
//!
//! The file discipline is [`super`]'s: [`MARKER`] first, the operator's file kept as
//! `<DROP_IN><backup_suffix>` (not `*.conf`, so containers/image never reads it), temp file +
//! rename. The contract for operators is in `docs/crio.md`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{
    Action, CREATED_MARKER, DEFAULT_DIR, Found, HostsConfig, HostsError, MARKER, MirroredRegistry,
    Report, cleanup_file, io_err, keep_backup, look, mode_of, parse_url, remove_stale,
    write_atomic,
};

/// containers/image's drop-in directory (`/etc/containers/registries.conf.d`).
pub(crate) const DEFAULT_CONF_DIR: &str = "/etc/containers/registries.conf.d";

/// Our drop-in's name. Drop-ins are read in lexical order and a later `[[registry]]` for the
/// same prefix replaces an earlier one, so `99-` puts ours last.
pub const DROP_IN: &str = "99-speculum.conf";

/// The problems with `cfg` that only matter for the drop-in (called by
/// [`HostsConfig::validate`] when `runtime` is `cri-o`).
pub fn validate(cfg: &HostsConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if !cfg.registries_conf_dir.is_absolute() {
        problems.push(format!(
            "hosts.registries_conf_dir must be an absolute path, got {:?}",
            cfg.registries_conf_dir
        ));
    }
    if cfg.backup_suffix.ends_with(".conf") {
        problems.push(format!(
            "hosts.backup_suffix {:?} must not end in .conf: containers/image would read the backup as a drop-in",
            cfg.backup_suffix
        ));
    }
    if let Some(p) = cfg.crio_pid_file.as_ref().filter(|p| !p.is_absolute()) {
        problems.push(format!(
            "hosts.crio_pid_file must be an absolute path, got {p:?}"
        ));
    }
    if let Ok((_, authority)) = parse_url(&cfg.mirror_endpoint)
        && authority.starts_with('[')
    {
        // `[::1]:5080/docker.io/…` parses as a reference, but CRI-O's own tools do not all
        // agree on bracketed hosts; loopback IPv4 is what the chart uses.
        problems.push(format!(
            "hosts.mirror_endpoint {:?}: runtime cri-o needs a DNS name or IPv4 address",
            cfg.mirror_endpoint
        ));
    }
    for entry in &cfg.mirrored_registries {
        if let Ok(r) = MirroredRegistry::parse(entry)
            && r.dir != DEFAULT_DIR
            && path_segment(&r.dir).is_none()
        {
            problems.push(format!(
                "hosts.mirrored_registries: {entry:?} cannot be named in a mirror path for runtime cri-o (IPv6 addresses and hosts that are not valid path components cannot)"
            ));
        }
    }
    problems
}

/// The path segment that names `registry` (`host[:port]` as image references spell it) in
/// the mirror location: lower-cased (path components are), `:` written `_`. `None` when the
/// result would not be a path component of the reference grammar (distribution's
/// `reference/regexp.go`: alphanumerics joined by `.`, `_`, `__` or runs of `-`), e.g. for an
/// IPv6 literal.
pub(crate) fn path_segment(registry: &str) -> Option<String> {
    let segment = registry.to_ascii_lowercase().replacen(':', "_", 1);
    is_path_component(&segment).then_some(segment)
}

fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !b.first().copied().is_some_and(alnum) || !b.last().copied().is_some_and(alnum) {
        return false;
    }
    // Between two alphanumerics: exactly ".", "_" or "__", or any run of "-".
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `<registries_conf_dir>/99-speculum.conf`.
pub(crate) fn drop_in_path(cfg: &HostsConfig) -> PathBuf {
    cfg.registries_conf_dir.join(DROP_IN)
}

fn backup_path(cfg: &HostsConfig) -> PathBuf {
    cfg.registries_conf_dir
        .join(format!("{DROP_IN}{}", cfg.backup_suffix))
}

/// A TOML basic string. The values are validated host names and paths, but quoting goes
/// through the TOML writer anyway.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The drop-in's text for `cfg` (which must be valid). `_default` is left out with a comment:
/// containers/image has no catch-all registry, each prefix must be named.
pub fn render(cfg: &HostsConfig) -> Result<String, HostsError> {
    let (scheme, endpoint) =
        parse_url(&cfg.mirror_endpoint).map_err(|reason| HostsError::InvalidRegistry {
            entry: cfg.mirror_endpoint.clone(),
            reason,
        })?;
    let pull_from_mirror = if cfg.resolve_tags {
        "all"
    } else {
        "digest-only"
    };
    let mut out = format!(
        "{MARKER}\n\
         # Written by speculum for CRI-O, podman and skopeo (containers-registries.conf.d(5)).\n\
         # Its cleanup deletes this file, or puts back the file that was here from\n\
         # {DROP_IN}{suffix}: edit that one, not this.\n",
        suffix = cfg.backup_suffix
    );
    for entry in &cfg.mirrored_registries {
        let registry = MirroredRegistry::parse(entry)?;
        if registry.dir == DEFAULT_DIR {
            out.push_str(
                "\n# `_default` is not written: containers/image has no catch-all registry.\n",
            );
            continue;
        }
        let segment = path_segment(&registry.dir).ok_or_else(|| HostsError::InvalidRegistry {
            entry: entry.clone(),
            reason: "cannot be named in a mirror path".to_owned(),
        })?;
        let plain_upstream = registry.server().is_some_and(|s| s.starts_with("http://"));
        out.push_str("\n[[registry]]\n");
        out.push_str(&format!("prefix = {}\n", quoted(&registry.dir)));
        out.push_str(&format!("location = {}\n", quoted(&registry.dir)));
        if plain_upstream {
            out.push_str("insecure = true\n");
        }
        out.push_str("\n[[registry.mirror]]\n");
        out.push_str(&format!(
            "location = {}\n",
            quoted(&format!("{endpoint}/{segment}"))
        ));
        if scheme == "http" {
            // containers/image's `insecure` is what allows plain http (after trying https).
            out.push_str("insecure = true\n");
        }
        out.push_str(&format!(
            "pull-from-mirror = {}\n",
            quoted(pull_from_mirror)
        ));
    }
    Ok(out)
}

/// Installs the drop-in (backing up a file of someone else's at its path first), then asks
/// CRI-O to read it again if anything changed. Running it again changes nothing.
pub fn configure(cfg: &HostsConfig) -> Result<Report, HostsError> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(HostsError::InvalidConfig(problems));
    }
    let mut report = Report::default();
    let dir = &cfg.registries_conf_dir;
    let (file, backup) = (drop_in_path(cfg), backup_path(cfg));
    let want = render(cfg)?;

    // Decide before touching anything, so a refusal leaves the directory as it was.
    let current = look(&file)?;
    let saved = look(&backup)?;
    let (take_backup, mode_from) = match (&current, &saved) {
        (Found::Theirs(_), Found::Missing) => (true, Some(&file)),
        // A crash between taking the backup and writing ours leaves both equal.
        (Found::Theirs(now), Found::Ours(kept) | Found::Theirs(kept)) => {
            if now != kept {
                return Err(HostsError::Conflict { path: file, backup });
            }
            (false, Some(&backup))
        }
        (Found::Ours(_) | Found::Missing, Found::Ours(_) | Found::Theirs(_)) => {
            (false, Some(&backup))
        }
        (Found::Ours(_) | Found::Missing, Found::Missing) => (false, None),
    };
    let mode = match mode_from {
        Some(p) => mode_of(p)?,
        None => 0o644,
    };
    let up_to_date = match &current {
        Found::Ours(bytes) => bytes == want.as_bytes() && mode_of(&file)? == mode,
        _ => false,
    };

    if dir.is_dir() {
        remove_stale(dir, &mut report)?;
    } else {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        // Written before our file, so a crash in between still lets cleanup remove the dir.
        write_atomic(&dir.join(CREATED_MARKER), b"", 0o644)?;
        report.push(dir, Action::CreatedDir);
    }
    if let (true, Found::Theirs(bytes)) = (take_backup, &current) {
        keep_backup(&file, &backup, bytes)?;
        report.push(&backup, Action::BackedUp);
    }
    if up_to_date {
        report.push(&file, Action::Unchanged);
    } else {
        write_atomic(&file, want.as_bytes(), mode)?;
        report.push(&file, Action::Wrote);
    }
    finish(cfg, report)
}

/// Undoes [`configure`]: puts back the backup byte for byte, or removes our drop-in, removes
/// crash leftovers and the directory if `configure` created it (and it is empty); then asks
/// CRI-O to read the directory again if anything changed. Safe to run twice, and after a
/// crash at any point of either function.
pub fn cleanup(cfg: &HostsConfig) -> Result<Report, HostsError> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(HostsError::InvalidConfig(problems));
    }
    let mut report = Report::default();
    let dir = &cfg.registries_conf_dir;
    if dir.is_dir() {
        cleanup_file(dir, &drop_in_path(cfg), &backup_path(cfg), &mut report)?;
    }
    finish(cfg, report)
}

fn finish(cfg: &HostsConfig, mut report: Report) -> Result<Report, HostsError> {
    let only_leftovers = report
        .changes
        .iter()
        .all(|c| matches!(c.action, Action::Unchanged | Action::RemovedStale));
    let reload = if only_leftovers {
        Reload::NotNeeded
    } else {
        reload(cfg)
    };
    report.notes.push(reload.to_string());
    Ok(report)
}

/// What [`reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The drop-in did not change: nothing to tell CRI-O.
    NotNeeded,
    /// SIGHUP went to CRI-O (`how` names where the pid came from); it re-reads
    /// registries.conf and the drop-ins.
    Signalled { pid: i32, how: String },
    /// No CRI-O process to signal: CRI-O reads the drop-in when it starts, or on its own with
    /// `auto_reload_registries = true`; podman and skopeo read it on every run.
    NoProcess { why: String },
    /// A CRI-O process was found but could not be signalled.
    Failed { pid: i32, error: String },
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reload::NotNeeded => write!(f, "reload         not needed (drop-in unchanged)"),
            Reload::Signalled { pid, how } => {
                write!(f, "reloaded       crio pid {pid} (SIGHUP; pid from {how})")
            }
            Reload::NoProcess { why } => write!(
                f,
                "not reloaded   {why}: CRI-O reads the drop-in when it starts (or at once with auto_reload_registries = true); podman and skopeo read it on every run"
            ),
            Reload::Failed { pid, error } => {
                write!(f, "reload failed  crio pid {pid}: {error}")
            }
        }
    }
}

/// Sends SIGHUP to CRI-O: the pid in `crio_pid_file` if set, else (with
/// `crio_find_process`) the one process named `crio` under `/proc`. A pid whose process is
/// not named `crio` is never signalled (a stale pid file may name someone else by now).
pub fn reload(cfg: &HostsConfig) -> Reload {
    reload_in(cfg, Path::new("/proc"))
}

fn reload_in(cfg: &HostsConfig, proc_root: &Path) -> Reload {
    let (pid, how) = match &cfg.crio_pid_file {
        Some(file) => {
            let text = match fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Reload::NoProcess {
                        why: format!("no pid file {}", file.display()),
                    };
                }
                Err(e) => {
                    return Reload::NoProcess {
                        why: format!("cannot read {}: {e}", file.display()),
                    };
                }
            };
            let Some(pid) = text.trim().parse::<i32>().ok().filter(|p| *p > 0) else {
                return Reload::NoProcess {
                    why: format!("{} holds no pid", file.display()),
                };
            };
            if !is_crio(proc_root, pid) {
                return Reload::NoProcess {
                    why: format!("pid {pid} from {} is not a running crio", file.display()),
                };
            }
            (pid, file.display().to_string())
        }
        None if cfg.crio_find_process => match find_crio(proc_root) {
            Ok(pid) => (pid, "the process named crio".to_owned()),
            Err(why) => return Reload::NoProcess { why },
        },
        None => {
            return Reload::NoProcess {
                why: "no hosts.crio_pid_file and hosts.crio_find_process is off".to_owned(),
            };
        }
    };
    let Some(target) = rustix::process::Pid::from_raw(pid) else {
        return Reload::NoProcess {
            why: format!("pid {pid} is not a pid"),
        };
    };
    match rustix::process::kill_process(target, rustix::process::Signal::HUP) {
        Ok(()) => Reload::Signalled { pid, how },
        Err(e) => Reload::Failed {
            pid,
            error: io::Error::from(e).to_string(),
        },
    }
}

/// Whether `/proc/<pid>/comm` says `crio`.
fn is_crio(proc_root: &Path, pid: i32) -> bool {
    fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .is_ok_and(|comm| comm.trim_end_matches('\n') == "crio")
}

/// The one process named `crio`; an error saying why when there are none or several.
fn find_crio(proc_root: &Path) -> Result<i32, String> {
    let entries = fs::read_dir(proc_root).map_err(|e| format!("cannot list /proc: {e}"))?;
    let mut found: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_crio(proc_root, *pid))
        .collect();
    found.sort_unstable();
    match found.as_slice() {
        [] => Err("no process named crio in this pid namespace".to_owned()),
        [pid] => Ok(*pid),
        many => Err(format!(
            "{} processes named crio ({many:?}); set hosts.crio_pid_file",
            many.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments() {
        // (name, registry as image references spell it, want)
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("plain host", "docker.io", Some("docker.io")),
            ("port becomes _port", "10.0.0.5:5000", Some("10.0.0.5_5000")),
            (
                "localhost with port",
                "localhost:5000",
                Some("localhost_5000"),
            ),
            (
                "upper case lowered",
                "Registry.Example.COM",
                Some("registry.example.com"),
            ),
            (
                "dashes kept",
                "my-registry.example",
                Some("my-registry.example"),
            ),
            ("ipv6 refused", "[::1]:5000", None),
            ("trailing dash refused", "host-", None),
            ("dot dash refused", "a.-b", None),
        ];
        for (name, registry, want) in cases {
            assert_eq!(
                path_segment(registry).as_deref(),
                *want,
                "{name}: {registry}"
            );
        }
    }

    #[test]
    fn reload_finds_only_processes_named_crio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path();
        for (pid, comm) in [("7", "crio\n"), ("8", "crio-helper\n"), ("9", "bash\n")] {
            fs::create_dir(proc_root.join(pid)).expect("mkdir");
            fs::write(proc_root.join(pid).join("comm"), comm).expect("write comm");
        }
        assert_eq!(find_crio(proc_root), Ok(7));
        fs::create_dir(proc_root.join("12")).expect("mkdir");
        fs::write(proc_root.join("12/comm"), "crio\n").expect("write comm");
        assert!(
            find_crio(proc_root).is_err_and(|e| e.contains("2 processes")),
            "two crio processes: refuse to guess"
        );
        let pid_file = proc_root.join("crio.pid");
        fs::write(&pid_file, "9\n").expect("write pid file");
        let cfg = HostsConfig {
            crio_pid_file: Some(pid_file),
            ..HostsConfig::default()
        };
        assert!(
            matches!(reload_in(&cfg, proc_root), Reload::NoProcess { why } if why.contains("not a running crio")),
            "a pid file naming bash is not signalled"
        );
        let off = HostsConfig {
            crio_find_process: false,
            ..HostsConfig::default()
        };
        assert!(matches!(
            reload_in(&off, proc_root),
            Reload::NoProcess { .. }
        ));
    }
}
