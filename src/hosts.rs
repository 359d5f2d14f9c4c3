//! containerd's `hosts.toml` for each mirrored registry: what to write, and writing it so that
//! the operator's own file always comes back.
//!
//! containerd (1.5+, `registry.config_path`) reads `<certs_dir>/<registry>/hosts.toml`, or
//! `<certs_dir>/_default/hosts.toml` for registries without a directory of their own, and tries
//! each `[host."…"]` in file order before `server`. We put our endpoint first.
//!
//! Two halves, so a newcomer can read one without the other:
//! - pure: [`HostsConfig`] (the `hosts:` section of the daemon config), [`MirroredRegistry`]
//!   and [`render`], which turns them (plus the operator's file, if any) into the file text;
//! - I/O: [`configure`] and [`cleanup`], which install and remove that text atomically and
//!   keep the operator's original as `hosts.toml<backup_suffix>` beside it, byte for byte.
//!
//! Every file we write starts with [`MARKER`]; that line alone tells ours from theirs. Serving
//! the mirror, and whether containerd is actually configured with `config_path`, are not this
//! module's business. The contract for operators is in `docs/hosts.md`.
//!
//! CRI-O, podman and skopeo (containers/image) read a registries.conf.d drop-in instead: that
//! is [`registries_conf`], which shares this module's config section and file discipline
//! (marker, backup, atomic write); `runtime` says which of the two `speculum configure` writes.

pub mod registries_conf;

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// First line of every file we write: how `configure` and `cleanup` tell ours from theirs.
pub const MARKER: &str = "# managed-by: speculum";

/// The directory name containerd falls back to for registries without their own directory.
pub(crate) const DEFAULT_DIR: &str = "_default";

const HOSTS_FILE: &str = "hosts.toml";
/// Prefix of our temporary files; anything with it in a registry directory is a crash leftover.
const TEMP_PREFIX: &str = ".speculum-tmp.";
/// Present in a registry directory that `configure` created, so `cleanup` may remove it.
const CREATED_MARKER: &str = ".speculum-created-dir";
/// Docker Hub's image names say `docker.io`, but its registry API lives elsewhere.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_SERVER: &str = "registry-1.docker.io";

/// The container runtime `speculum configure` and `cleanup` write for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Runtime {
    /// containerd: `<certs_dir>/<registry>/hosts.toml` (this module).
    #[default]
    #[serde(rename = "containerd")]
    Containerd,
    /// CRI-O (and podman, skopeo): one drop-in in `registries_conf_dir` ([`registries_conf`]).
    #[serde(rename = "cri-o")]
    CriO,
}

/// The `hosts:` section of the daemon config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostsConfig {
    /// Which runtime's files `configure` and `cleanup` manage.
    pub runtime: Runtime,
    /// containerd's `registry.config_path`.
    pub certs_dir: PathBuf,
    /// `https://ghcr.io`, `http://10.0.0.5:5000`, … (the scheme is the upstream's), or
    /// `_default` for every registry that has no directory of its own.
    pub mirrored_registries: Vec<String>,
    /// Where containerd reaches this node's daemon.
    pub mirror_endpoint: String,
    /// `true`: tags resolve through us (capabilities `pull`, `resolve`); `false`: only digests
    /// come to us and tags always resolve upstream.
    pub resolve_tags: bool,
    /// How long containerd ≥ 1.7 waits to connect to us before falling back; 1.6 ignores it.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Keep the operator's `server`, top-level settings and `[host]` tables, after ours.
    pub prepend_existing: bool,
    /// The operator's original is kept as `hosts.toml<backup_suffix>` in the same directory.
    pub backup_suffix: String,
    /// containers-registries.conf.d(5)'s directory: where the CRI-O drop-in goes.
    pub registries_conf_dir: PathBuf,
    /// A file holding CRI-O's pid (CRI-O writes none itself; systemd knows it as `$MAINPID`):
    /// after the drop-in changed, that process gets SIGHUP if it is named `crio`.
    pub crio_pid_file: Option<PathBuf>,
    /// Without `crio_pid_file`: send SIGHUP to the one process named `crio` in this pid
    /// namespace (the host's with `hostPID`), if there is exactly one.
    pub crio_find_process: bool,
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig {
            runtime: Runtime::Containerd,
            certs_dir: PathBuf::from("/etc/containerd/certs.d"),
            mirrored_registries: [
                "https://docker.io",
                "https://ghcr.io",
                "https://quay.io",
                "https://registry.k8s.io",
                "https://gcr.io",
                "https://mcr.microsoft.com",
                "https://public.ecr.aws",
            ]
            .map(String::from)
            .to_vec(),
            mirror_endpoint: "http://127.0.0.1:5080".to_owned(),
            resolve_tags: true,
            dial_timeout: Duration::from_millis(200),
            prepend_existing: true,
            backup_suffix: ".speculum-backup".to_owned(),
            registries_conf_dir: PathBuf::from(registries_conf::DEFAULT_CONF_DIR),
            crio_pid_file: None,
            crio_find_process: true,
        }
    }
}

impl HostsConfig {
    /// Every problem with this section, each naming its key; empty when it is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.certs_dir.is_absolute() {
            problems.push(format!(
                "hosts.certs_dir must be an absolute path, got {:?}",
                self.certs_dir
            ));
        }
        let mut dirs = HashSet::new();
        for entry in &self.mirrored_registries {
            match MirroredRegistry::parse(entry) {
                Ok(r) if !dirs.insert(r.dir.clone()) => problems.push(format!(
                    "hosts.mirrored_registries names {} more than once",
                    r.dir
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!("hosts.mirrored_registries: {e}")),
            }
        }
        if let Err(reason) = parse_url(&self.mirror_endpoint) {
            problems.push(format!(
                "hosts.mirror_endpoint {:?}: {reason}",
                self.mirror_endpoint
            ));
        }
        if self.dial_timeout < Duration::from_millis(1) {
            problems.push("hosts.dial_timeout must be at least 1ms".to_owned());
        }
        let s = &self.backup_suffix;
        // containerd reads *.crt, *.cert and *.key in a host directory as certificates when
        // hosts.toml is absent, so the backup must never look like one.
        if !s.starts_with('.')
            || s.len() < 2
            || s.contains('/')
            || [".crt", ".cert", ".key"].iter().any(|ext| s.ends_with(ext))
        {
            problems.push(format!(
                "hosts.backup_suffix {s:?} must start with '.', contain no '/' and not end in .crt, .cert or .key"
            ));
        }
        if self.runtime == Runtime::CriO {
            problems.extend(registries_conf::validate(self));
        }
        problems
    }

    /// The mirrored registries whose upstream is `http://` (as `ns` names them): the
    /// daemon's own upstream requests (tag `HEAD`s) use plain http for these too.
    pub fn plain_http_registries(&self) -> Vec<String> {
        self.mirrored_registries
            .iter()
            .filter_map(|e| MirroredRegistry::parse(e).ok())
            .filter(|r| r.server().is_some_and(|s| s.starts_with("http://")))
            .map(|r| r.dir)
            .collect()
    }

    /// The registries (as `ns` names them) containerd sends to the mirror: `None` when
    /// `_default` is mirrored (every registry). The daemon's own upstream requests go only to
    /// these, so a local client cannot point it at arbitrary hosts with a made-up `ns`.
    pub fn mirrored_dirs(&self) -> Option<Vec<String>> {
        let parsed: Vec<MirroredRegistry> = self
            .mirrored_registries
            .iter()
            .filter_map(|e| MirroredRegistry::parse(e).ok())
            .collect();
        if parsed.iter().any(|r| r.dir == DEFAULT_DIR) {
            return None;
        }
        Some(parsed.into_iter().map(|r| r.dir).collect())
    }

    fn mirror_key(&self) -> String {
        self.mirror_endpoint.trim_end_matches('/').to_owned()
    }
}

/// One entry of `mirrored_registries`: the directory containerd looks in, and the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredRegistry {
    dir: String,
    server: Option<String>,
}

impl MirroredRegistry {
    /// Parses `https://host[:port]`, `http://host[:port]` or `_default`.
    pub fn parse(entry: &str) -> Result<MirroredRegistry, HostsError> {
        if entry == DEFAULT_DIR {
            // No `server`: containerd then uses the registry named in the image reference.
            return Ok(MirroredRegistry {
                dir: DEFAULT_DIR.to_owned(),
                server: None,
            });
        }
        let (scheme, authority) =
            parse_url(entry).map_err(|reason| HostsError::InvalidRegistry {
                entry: entry.to_owned(),
                reason,
            })?;
        let upstream = if authority == DOCKER_HUB {
            DOCKER_HUB_SERVER
        } else {
            authority
        };
        Ok(MirroredRegistry {
            dir: authority.to_owned(),
            server: Some(format!("{scheme}://{upstream}")),
        })
    }

    /// The directory under `certs_dir`: the registry host as image references spell it.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The upstream `server`; `None` for `_default`.
    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// `<certs_dir>/<dir>/hosts.toml`.
    pub fn hosts_path(&self, cfg: &HostsConfig) -> PathBuf {
        cfg.certs_dir.join(&self.dir).join(HOSTS_FILE)
    }
}

/// Splits `http(s)://host[:port]` (one trailing `/` allowed) into scheme and authority.
/// Anything else is refused: the authority becomes a directory name, so it must not be able
/// to climb out of `certs_dir`.
fn parse_url(s: &str) -> Result<(&str, &str), String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| "must start with http:// or https://".to_owned())?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme must be http or https, got {scheme:?}"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let port = match authority.strip_prefix('[') {
        // An IPv6 literal, `[::1]:5000`.
        Some(v6) => {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| "unclosed '[' in host".to_owned())?;
            let hex_or_colon = |c: char| c.is_ascii_hexdigit() || c == ':' || c == '.';
            if addr.is_empty() || !addr.chars().all(hex_or_colon) {
                return Err(format!("bad IPv6 address {addr:?}"));
            }
            match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or("junk after ']'")?),
            }
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let valid = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && !host.starts_with(['.', '-'])
                && !host.ends_with('.')
                && !host.contains("..");
            if !valid {
                return Err(format!(
                    "host must be a DNS name or IP address with no path, got {authority:?}"
                ));
            }
            port
        }
    };
    // `u16` parsing alone would accept "+80".
    let port_ok =
        |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && matches!(p.parse(), Ok(1..=65535u32));
    if let Some(p) = port.filter(|p| !port_ok(p)) {
        return Err(format!("port must be 1-65535, got {p:?}"));
    }
    Ok((scheme, authority))
}

/// Errors of the hosts seam; each names the path or entry at fault.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("invalid hosts config: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    #[error("invalid mirrored registry {entry:?}: {reason}")]
    InvalidRegistry { entry: String, reason: String },
    #[error("existing {path} is not valid TOML")]
    ExistingNotToml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("existing {path} cannot be carried over: {reason}")]
    ExistingUnusable { path: PathBuf, reason: String },
    #[error(
        "{path} is not speculum's and differs from the backup {backup}; keep one, delete the other (docs/hosts.md)"
    )]
    Conflict { path: PathBuf, backup: PathBuf },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The text of `hosts.toml` for `registry`: our endpoint first, then, when
/// `cfg.prepend_existing`, everything `existing` (the operator's original) configured, minus
/// any earlier entry for our own endpoint.
pub fn render(
    registry: &MirroredRegistry,
    cfg: &HostsConfig,
    existing: Option<&str>,
) -> Result<String, HostsError> {
    render_from(registry, cfg, existing, &registry.hosts_path(cfg))
}

/// [`render`], naming `origin` (where `existing` was read) in errors.
fn render_from(
    registry: &MirroredRegistry,
    cfg: &HostsConfig,
    existing: Option<&str>,
    origin: &Path,
) -> Result<String, HostsError> {
    let unusable = |reason: String| HostsError::ExistingUnusable {
        path: origin.to_owned(),
        reason,
    };
    let mut theirs = match existing {
        Some(text) if cfg.prepend_existing => {
            text.parse::<toml::Table>()
                .map_err(|source| HostsError::ExistingNotToml {
                    path: origin.to_owned(),
                    source,
                })?
        }
        _ => toml::Table::new(),
    };
    let their_hosts = match theirs.remove("host") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(unusable("`host` is not a table".to_owned())),
    };
    // Their `server` wins: it is where their pulls went before us, and they may point
    // `docker.io` at an internal proxy.
    let server = match theirs.remove("server") {
        None => registry.server.clone(),
        Some(toml::Value::String(s)) => Some(s),
        Some(_) => return Err(unusable("`server` is not a string".to_owned())),
    };

    let mut doc = toml::Table::new();
    if let Some(server) = server {
        doc.insert("server".to_owned(), server.into());
    }
    // Top-level settings (ca, skip_verify, header, …) configure `server` in containerd.
    doc.extend(theirs);

    let ours = cfg.mirror_key();
    let mut hosts = toml::Table::new();
    let capabilities: &[&str] = if cfg.resolve_tags {
        &["pull", "resolve"]
    } else {
        &["pull"]
    };
    let mut mirror = toml::Table::new();
    mirror.insert("capabilities".to_owned(), capabilities.to_vec().into());
    // Go's time.ParseDuration reads "200ms"; humantime's "1s 500ms" it would not.
    mirror.insert(
        "dial_timeout".to_owned(),
        format!("{}ms", cfg.dial_timeout.as_millis()).into(),
    );
    hosts.insert(ours.clone(), mirror.into());
    for (key, value) in their_hosts {
        if !value.is_table() {
            return Err(unusable(format!("`host.{key:?}` is not a table")));
        }
        if same_endpoint(&key, &ours) {
            continue;
        }
        hosts.insert(key, value);
    }
    doc.insert("host".to_owned(), hosts.into());

    let body = toml::to_string(&doc).map_err(|e| unusable(e.to_string()))?;
    Ok(format!(
        "{MARKER}\n\
         # Written by speculum. Its cleanup deletes this file, or puts back the operator's\n\
         # original from {HOSTS_FILE}{suffix} when there was one: edit that file, not this.\n\
         \n{body}",
        suffix = cfg.backup_suffix
    ))
}

/// Whether two `[host."…"]` keys name the same endpoint as containerd sees them: it assumes
/// `https://` when no scheme is given and adds `/v2` itself.
fn same_endpoint(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> String {
        let s = s.trim_end_matches('/');
        let s = s.strip_suffix("/v2").unwrap_or(s).trim_end_matches('/');
        let s = s.to_ascii_lowercase();
        if s.starts_with("http://") || s.starts_with("https://") {
            s
        } else {
            format!("https://{s}")
        }
    }
    norm(a) == norm(b)
}

/// What [`configure`] or [`cleanup`] did, path by path, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<Change>,
    /// Lines about what was done besides files (the CRI-O reload), printed after them.
    pub notes: Vec<String>,
}

impl Report {
    /// Whether anything on disk changed.
    pub fn changed(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::Unchanged)
    }

    fn push(&mut self, path: impl Into<PathBuf>, action: Action) {
        self.changes.push(Change {
            path: path.into(),
            action,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.changes {
            writeln!(f, "{c}")?;
        }
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        Ok(())
    }
}

/// One path and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub action: Action,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<14} {}", self.action.as_str(), self.path.display())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A registry directory did not exist and was created.
    CreatedDir,
    /// The operator's file was kept as the backup (the path named).
    BackedUp,
    /// Our file was written.
    Wrote,
    /// Our file was already as wanted.
    Unchanged,
    /// The backup was put back in place (the `hosts.toml` path named).
    Restored,
    /// Our file, a redundant backup or our directory marker was removed.
    Removed,
    /// A directory we had created was removed.
    RemovedDir,
    /// A temporary file left by an interrupted run was removed.
    RemovedStale,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreatedDir => "created dir",
            Action::BackedUp => "backed up",
            Action::Wrote => "wrote",
            Action::Unchanged => "unchanged",
            Action::Restored => "restored",
            Action::Removed => "removed",
            Action::RemovedDir => "removed dir",
            Action::RemovedStale => "removed stale",
        }
    }
}

/// Installs our `hosts.toml` for every mirrored registry, backing up the operator's file
/// first, and cleans up directories we manage that are no longer in the list. Running it
/// again changes nothing.
pub fn configure(cfg: &HostsConfig) -> Result<Report, HostsError> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(HostsError::InvalidConfig(problems));
    }
    let mut report = Report::default();
    let mut wanted = HashSet::new();
    for entry in &cfg.mirrored_registries {
        let registry = MirroredRegistry::parse(entry)?;
        configure_one(&registry, cfg, &mut report)?;
        wanted.insert(registry.dir);
    }
    for dir in registry_dirs(&cfg.certs_dir)? {
        let known = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| wanted.contains(n));
        if !known {
            cleanup_one(&dir, cfg, &mut report)?;
        }
    }
    Ok(report)
}

/// Undoes [`configure`] under `certs_dir`: restores every backup, removes our files (and the
/// directories we created, when empty) and crash leftovers. Other files are left alone.
/// Safe to run twice, and after a crash at any point of either function.
pub fn cleanup(cfg: &HostsConfig) -> Result<Report, HostsError> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(HostsError::InvalidConfig(problems));
    }
    let mut report = Report::default();
    for dir in registry_dirs(&cfg.certs_dir)? {
        cleanup_one(&dir, cfg, &mut report)?;
    }
    Ok(report)
}

/// What [`configure`] would find and write for one registry, decided before anything is
/// touched. Read-only: [`inspect`] and `speculum doctor` use it too.
struct Plan {
    dir: PathBuf,
    file: PathBuf,
    backup: PathBuf,
    current: Found,
    take_backup: bool,
    want: String,
    mode: u32,
    up_to_date: bool,
}

fn plan(registry: &MirroredRegistry, cfg: &HostsConfig) -> Result<Plan, HostsError> {
    let dir = cfg.certs_dir.join(&registry.dir);
    let file = dir.join(HOSTS_FILE);
    let backup = backup_path(&dir, cfg);

    // Decide everything before touching anything, so a refusal leaves the directory as it was.
    // The operator's original is either already in the backup or in place, to be backed up.
    let current = look(&file)?;
    let (original, origin, take_backup) = match (&current, look(&backup)?) {
        (Found::Theirs(current), Found::Missing) => (Some(current.clone()), &file, true),
        // A crash between taking the backup and writing our file leaves both equal.
        (Found::Theirs(current), Found::Ours(saved) | Found::Theirs(saved)) => {
            if *current != saved {
                return Err(HostsError::Conflict { path: file, backup });
            }
            (Some(saved), &backup, false)
        }
        (Found::Ours(_) | Found::Missing, Found::Ours(saved) | Found::Theirs(saved)) => {
            (Some(saved), &backup, false)
        }
        (Found::Ours(_) | Found::Missing, Found::Missing) => (None, &file, false),
    };
    let mode = match original {
        Some(_) => mode_of(origin)?,
        None => 0o644,
    };
    let existing =
        match &original {
            Some(bytes) if cfg.prepend_existing => Some(std::str::from_utf8(bytes).map_err(
                |_| HostsError::ExistingUnusable {
                    path: origin.clone(),
                    reason: "not UTF-8".to_owned(),
                },
            )?),
            _ => None,
        };
    let want = render_from(registry, cfg, existing, origin)?;
    let up_to_date = match &current {
        Found::Ours(bytes) => bytes == want.as_bytes() && mode_of(&file)? == mode,
        _ => false,
    };
    Ok(Plan {
        dir,
        file,
        backup,
        current,
        take_backup,
        want,
        mode,
        up_to_date,
    })
}

/// The state of one registry's `hosts.toml` compared with what [`configure`] would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// No file: containerd goes straight to the registry.
    Missing,
    /// A file without our [`MARKER`]: `configure` has not run, or someone replaced ours.
    Theirs,
    /// Ours, but not what `configure` writes now (config changed, or edited by hand).
    Stale,
    /// Ours and current, byte for byte and mode.
    Current,
}

/// Compares `registry`'s `hosts.toml` with what [`configure`] would write, changing nothing.
pub fn inspect(registry: &MirroredRegistry, cfg: &HostsConfig) -> Result<FileState, HostsError> {
    let plan = plan(registry, cfg)?;
    Ok(match (&plan.current, plan.up_to_date) {
        (_, true) => FileState::Current,
        (Found::Missing, _) => FileState::Missing,
        (Found::Theirs(_), _) => FileState::Theirs,
        (Found::Ours(_), false) => FileState::Stale,
    })
}

fn configure_one(
    registry: &MirroredRegistry,
    cfg: &HostsConfig,
    report: &mut Report,
) -> Result<(), HostsError> {
    let Plan {
        dir,
        file,
        backup,
        current,
        take_backup,
        want,
        mode,
        up_to_date,
    } = plan(registry, cfg)?;

    if dir.is_dir() {
        remove_stale(&dir, report)?;
    } else {
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        // Written before our file, so a crash in between still lets cleanup remove the dir.
        write_atomic(&dir.join(CREATED_MARKER), b"", 0o644)?;
        report.push(&dir, Action::CreatedDir);
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
    Ok(())
}

fn cleanup_one(dir: &Path, cfg: &HostsConfig, report: &mut Report) -> Result<(), HostsError> {
    cleanup_file(dir, &dir.join(HOSTS_FILE), &backup_path(dir, cfg), report)
}

/// Puts back `backup` over `file` (or removes `file` if it is ours and there is no backup),
/// after removing crash leftovers in `dir`; then removes `dir` if `configure` created it and
/// it is now empty.
fn cleanup_file(
    dir: &Path,
    file: &Path,
    backup: &Path,
    report: &mut Report,
) -> Result<(), HostsError> {
    let (file, backup) = (file.to_owned(), backup.to_owned());
    remove_stale(dir, report)?;
    match (look(&file)?, look(&backup)?) {
        (Found::Ours(_) | Found::Missing, Found::Ours(_) | Found::Theirs(_)) => {
            // rename puts back the very inode we kept: bytes, mode, owner, even a symlink.
            fs::rename(&backup, &file).map_err(io_err("restore backup to", &file))?;
            sync_dir(dir)?;
            report.push(&file, Action::Restored);
        }
        (Found::Theirs(current), Found::Ours(saved) | Found::Theirs(saved)) => {
            // Only a configure interrupted right after taking the backup leaves this state.
            if current != saved {
                return Err(HostsError::Conflict { path: file, backup });
            }
            remove(&backup, report)?;
        }
        (Found::Ours(_), Found::Missing) => remove(&file, report)?,
        (Found::Theirs(_) | Found::Missing, Found::Missing) => {}
    }
    let created = dir.join(CREATED_MARKER);
    if look(&file)? == Found::Missing && look(&created)? != Found::Missing {
        remove(&created, report)?;
        match fs::remove_dir(dir) {
            Ok(()) => report.push(dir, Action::RemovedDir),
            // The operator put something of theirs in it: the directory is theirs now.
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
            Err(e) => return Err(io_err("remove directory", dir)(e)),
        }
    }
    Ok(())
}

/// What sits at a path, without following a dangling symlink into an error.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Missing,
    Ours(Vec<u8>),
    /// The operator's; empty when it is a symlink to nothing.
    Theirs(Vec<u8>),
}

fn look(path: &Path) -> Result<Found, HostsError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(io_err("inspect", path)(e)),
        Ok(_) => {}
    }
    match fs::read(path) {
        Ok(b) if b.starts_with(MARKER.as_bytes()) && b.get(MARKER.len()) == Some(&b'\n') => {
            Ok(Found::Ours(b))
        }
        Ok(b) => Ok(Found::Theirs(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Theirs(Vec::new())),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Keeps the operator's file as the backup. A hard link keeps the very inode (bytes, mode,
/// owner, a symlink stays a symlink); a copy is the fallback where links are refused.
fn keep_backup(file: &Path, backup: &Path, bytes: &[u8]) -> Result<(), HostsError> {
    match fs::hard_link(file, backup) {
        Ok(()) => sync_dir(parent(backup)),
        Err(_) => write_atomic(backup, bytes, mode_of(file)?),
    }
}

/// Replaces `path` with `bytes` so that readers see the old file or the new one, never a
/// part: write a temporary file beside it, fsync, rename over, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HostsError> {
    let dir = parent(path);
    let tmp = dir.join(format!("{TEMP_PREFIX}{}", std::process::id()));
    let result = (|| {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cut bits from `mode` at creation.
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", path)(e));
    }
    sync_dir(dir)
}

/// Removes the temporary files an interrupted run left in `dir`.
fn remove_stale(dir: &Path, report: &mut Report) -> Result<(), HostsError> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(io_err("list", dir))?,
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            report.push(path, Action::RemovedStale);
        }
    }
    Ok(())
}

/// The registry directories under `certs_dir` (none when it does not exist).
fn registry_dirs(certs_dir: &Path) -> Result<Vec<PathBuf>, HostsError> {
    let entries = match fs::read_dir(certs_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.map_err(io_err("list", certs_dir))?,
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err("list", certs_dir))?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

fn remove(path: &Path, report: &mut Report) -> Result<(), HostsError> {
    fs::remove_file(path).map_err(io_err("remove", path))?;
    sync_dir(parent(path))?;
    report.push(path, Action::Removed);
    Ok(())
}

fn backup_path(dir: &Path, cfg: &HostsConfig) -> PathBuf {
    dir.join(format!("{HOSTS_FILE}{}", cfg.backup_suffix))
}

fn mode_of(path: &Path) -> Result<u32, HostsError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.permissions().mode() & 0o7777),
        // A symlink to nothing has no mode to keep.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0o644),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// A rename is durable only once the directory holding it is synced.
fn sync_dir(dir: &Path) -> Result<(), HostsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HostsError {
    let path = path.to_owned();
    move |source| HostsError::Io { op, path, source }
}
