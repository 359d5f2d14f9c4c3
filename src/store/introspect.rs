//! What the node's containerd says about its own configuration, and what in it stops this node
//! from serving: the one job of this module is asking and judging, never changing anything.
//!
//! Asked over containerd's own socket, read-only:
//! - `version.Version`: which containerd (decides the config version the advice names).
//! - `Introspection.Plugins`: the content plugin exports its `root` (1.6, 1.7 and 2.x): where
//!   blob files are, so `containerd.content_dir` need not be set by hand. From 2.4 the CRI
//!   images plugin (`io.containerd.cri.v1.images`) also exports `RegistryConfigPath` and
//!   `DiscardUnpackedLayers`.
//! - CRI `RuntimeService/Status` with `verbose`: in 1.6 and 1.7 its `config` info is the CRI
//!   plugin's whole configuration as JSON (`registry.configPath`,
//!   `containerd.discardUnpackedLayers`). From 2.0 it holds only the runtime part, so 2.0–2.3
//!   expose neither setting: the findings then say "unknown" instead of guessing.
//!
//! Nothing here may break a pull: every failure is a finding or a log line, never an error the
//! caller has to act on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::PluginsRequest;
use containerd_client::services::v1::introspection_client::IntrospectionClient;
use containerd_client::services::v1::version_client::VersionClient;
use tonic::transport::Channel;

use super::StoreError;
use super::containerd::{bounded, unavailable};

/// The content plugin (`io.containerd.content.v1.content`) in every version.
const CONTENT_PLUGIN_TYPE: &str = "io.containerd.content.v1";
/// The CRI images plugin of 2.x; exports its registry settings from 2.4.
const CRI_IMAGES_PLUGIN_TYPE: &str = "io.containerd.cri.v1";
const CRI_IMAGES_PLUGIN_ID: &str = "images";
/// CRI's runtime service, served on containerd's own socket when the CRI plugin is loaded.
const CRI_STATUS_PATH: &str = "/runtime.v1.RuntimeService/Status";

/// What containerd said. `None` means containerd did not say (older version, no CRI plugin).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// `version.Version`, e.g. `v2.3.7` or `1.6.20~ds1`.
    pub version: String,
    /// The content store's directory (the content plugin's `root` export).
    pub content_root: Option<PathBuf>,
    /// CRI's `registry.config_path` (empty string: not set).
    pub registry_config_path: Option<String>,
    /// CRI's `discard_unpacked_layers`.
    pub discard_unpacked_layers: Option<bool>,
    /// Where the two CRI settings came from, for the log line.
    pub cri_source: CriSource,
}

/// Where the CRI settings in [`NodeFacts`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CriSource {
    /// The CRI images plugin's introspection exports (2.4+).
    PluginExports,
    /// CRI `Status` verbose info (1.6, 1.7).
    CriStatus,
    /// containerd exposes neither (2.0–2.3), or CRI is not loaded.
    #[default]
    Unknown,
}

impl NodeFacts {
    /// containerd's major version, when the version string has one (`v2.3.7`, `1.6.20~ds1`).
    pub fn major(&self) -> Option<u32> {
        self.version
            .trim_start_matches('v')
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// The config file version whose plugin names apply: 3 for 2.x, 2 for 1.x.
    pub fn config_version(&self) -> u32 {
        if self.major().unwrap_or(2) >= 2 { 3 } else { 2 }
    }
}

/// One thing about the node's containerd configuration that stops it being served well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// CRI's `config_path` is not set: containerd never reads the hosts.toml we write, so
    /// pulls bypass the mirror.
    HostsDirNotSet,
    /// CRI's `config_path` names other directories than the one we write.
    HostsDirDiffers { config_path: String },
    /// The version does not expose `config_path` (2.0–2.3): cannot tell.
    HostsDirUnknown,
    /// `discard_unpacked_layers = true`: layers are deleted after unpack, so this node
    /// cannot serve them to others.
    LayersDiscarded,
    /// The content root containerd reports is not a directory here (not mounted).
    ContentRootNotVisible { root: PathBuf },
}

impl Finding {
    /// The metric label of this finding.
    pub fn label(&self) -> &'static str {
        match self {
            Finding::HostsDirNotSet => "hosts_dir_not_set",
            Finding::HostsDirDiffers { .. } => "hosts_dir_differs",
            Finding::HostsDirUnknown => "hosts_dir_unknown",
            Finding::LayersDiscarded => "layers_discarded",
            Finding::ContentRootNotVisible { .. } => "content_root_not_visible",
        }
    }

    /// Every label, so the metric can report 0 for the ones that do not apply.
    pub const LABELS: [&'static str; 5] = [
        "hosts_dir_not_set",
        "hosts_dir_differs",
        "hosts_dir_unknown",
        "layers_discarded",
        "content_root_not_visible",
    ];

    /// One sentence for the log and `/readyz`, naming the config key to change for the
    /// node's config version (2: containerd 1.x, 3: 2.x).
    pub fn message(&self, config_version: u32, certs_dir: &Path) -> String {
        let keys = CriKeys::of(config_version);
        let registry = format!("[{}] config_path", keys.registry_table);
        let discard = format!("[{}] discard_unpacked_layers", keys.discard_table);
        let certs = certs_dir.display();
        match self {
            Finding::HostsDirNotSet => format!(
                "containerd does not read {certs} (no registry config_path): pulls bypass the \
                 mirror; set {registry} = \"{certs}\" in config version {config_version}"
            ),
            Finding::HostsDirDiffers { config_path } => format!(
                "containerd reads hosts.toml from {config_path:?}, not {certs}: pulls bypass the \
                 mirror; set {registry} = \"{certs}\" (config version {config_version}) or \
                 hosts.certs_dir to that directory"
            ),
            Finding::HostsDirUnknown => format!(
                "this containerd does not expose its registry config_path (2.0-2.3 do not): \
                 check that {registry} = \"{certs}\""
            ),
            Finding::LayersDiscarded => format!(
                "containerd discards layers after unpack: this node cannot serve layers to \
                 others; set {discard} = false (config version {config_version})"
            ),
            Finding::ContentRootNotVisible { root } => format!(
                "containerd's content store {} is not visible here: blobs stream through gRPC \
                 (slower); mount it at the same path or set containerd.content_dir",
                root.display()
            ),
        }
    }
}

/// Where the two CRI settings live in containerd's config file, per config version
/// (2: containerd 1.x, 3: 2.x; 2.x still reads a version 2 file and migrates it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CriKeys {
    /// The table holding `config_path`.
    pub registry_table: &'static str,
    /// The table holding `discard_unpacked_layers`.
    pub discard_table: &'static str,
}

impl CriKeys {
    pub fn of(config_version: u32) -> CriKeys {
        if config_version >= 3 {
            CriKeys {
                registry_table: r#"plugins."io.containerd.cri.v1.images".registry"#,
                discard_table: r#"plugins."io.containerd.cri.v1.images""#,
            }
        } else {
            CriKeys {
                registry_table: r#"plugins."io.containerd.grpc.v1.cri".registry"#,
                discard_table: r#"plugins."io.containerd.grpc.v1.cri".containerd"#,
            }
        }
    }
}

/// Judges the facts against the hosts directory this daemon writes. Pure.
pub fn findings(facts: &NodeFacts, certs_dir: &Path, content_dir_visible: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    match facts.registry_config_path.as_deref() {
        None => out.push(Finding::HostsDirUnknown),
        Some(p) if p.trim().is_empty() => out.push(Finding::HostsDirNotSet),
        // Local pulls read a `:`-separated list; the 2.x transfer service one directory
        // (containerd#12415), so only an exact single entry is sure to work everywhere.
        Some(p) if !p.split(':').any(|d| same_dir(Path::new(d), certs_dir)) => {
            out.push(Finding::HostsDirDiffers {
                config_path: p.to_owned(),
            });
        }
        Some(_) => {}
    }
    if facts.discard_unpacked_layers == Some(true) {
        out.push(Finding::LayersDiscarded);
    }
    if let Some(root) = &facts.content_root
        && !content_dir_visible
    {
        out.push(Finding::ContentRootNotVisible { root: root.clone() });
    }
    out
}

/// Paths equal up to trailing slashes and `.` components.
fn same_dir(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| p.components().collect::<PathBuf>();
    norm(a) == norm(b)
}

/// Asks containerd (see the module docs). Fails only when containerd does not answer
/// `version.Version`; every later question that fails leaves its fact `None`.
pub async fn inspect(channel: &Channel) -> Result<NodeFacts, StoreError> {
    let version = bounded(VersionClient::new(channel.clone()).version(()))
        .await
        .map_err(|s| unavailable("version", s))?
        .into_inner()
        .version;
    let mut facts = NodeFacts {
        version,
        ..NodeFacts::default()
    };
    let plugins = match bounded(
        IntrospectionClient::new(channel.clone()).plugins(PluginsRequest {
            filters: vec![
                format!("type=={CONTENT_PLUGIN_TYPE}"),
                format!("type=={CRI_IMAGES_PLUGIN_TYPE},id=={CRI_IMAGES_PLUGIN_ID}"),
            ],
        }),
    )
    .await
    {
        Ok(resp) => resp.into_inner().plugins,
        Err(s) => {
            tracing::info!(error = %s, "containerd introspection failed; content root unknown");
            Vec::new()
        }
    };
    for p in &plugins {
        if p.r#type == CONTENT_PLUGIN_TYPE
            && let Some(root) = p.exports.get("root").filter(|r| !r.is_empty())
        {
            facts.content_root = Some(PathBuf::from(root));
        }
        if p.r#type == CRI_IMAGES_PLUGIN_TYPE
            && p.id == CRI_IMAGES_PLUGIN_ID
            && p.init_err.is_none()
        {
            apply_exports(&mut facts, &p.exports);
        }
    }
    if facts.cri_source == CriSource::Unknown {
        match cri_status_config(channel).await {
            Ok(Some(json)) => apply_cri_config(&mut facts, &json),
            Ok(None) => {}
            Err(s) => {
                tracing::debug!(error = %s, "CRI status unavailable (no CRI plugin?)");
            }
        }
    }
    Ok(facts)
}

/// The 2.4+ exports of the CRI images plugin.
fn apply_exports(facts: &mut NodeFacts, exports: &HashMap<String, String>) {
    let path = exports.get("RegistryConfigPath");
    let discard = exports
        .get("DiscardUnpackedLayers")
        .and_then(|v| v.parse::<bool>().ok());
    if path.is_some() || discard.is_some() {
        facts.registry_config_path = path.cloned();
        facts.discard_unpacked_layers = discard;
        facts.cri_source = CriSource::PluginExports;
    }
}

/// The 1.x CRI `Status` verbose `config` JSON: `registry.configPath` and
/// `containerd.discardUnpackedLayers`. 2.x's JSON has neither key and changes nothing.
fn apply_cri_config(facts: &mut NodeFacts, json: &str) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        tracing::debug!("CRI status config is not JSON");
        return;
    };
    let path = v
        .pointer("/registry/configPath")
        .and_then(|p| p.as_str())
        .map(str::to_owned);
    let discard = v
        .pointer("/containerd/discardUnpackedLayers")
        .and_then(serde_json::Value::as_bool);
    if path.is_some() || discard.is_some() {
        facts.registry_config_path = path;
        facts.discard_unpacked_layers = discard;
        facts.cri_source = CriSource::CriStatus;
    }
}

/// CRI `runtime.v1.RuntimeService/Status`, the two fields needed (prost skips the rest).
#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {
    #[prost(bool, tag = "1")]
    verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(map = "string, string", tag = "2")]
    info: HashMap<String, String>,
}

/// CRI's verbose status `config` info, `None` when absent. Called on containerd's socket: the
/// CRI plugin serves there.
async fn cri_status_config(channel: &Channel) -> Result<Option<String>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(CRI_STATUS_PATH);
        grpc.unary(
            tonic::Request::new(StatusRequest { verbose: true }),
            path,
            tonic_prost::ProstCodec::<StatusRequest, StatusResponse>::default(),
        )
        .await
    };
    let resp = bounded(call).await?;
    Ok(resp.into_inner().info.remove("config"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(path: Option<&str>, discard: Option<bool>) -> NodeFacts {
        NodeFacts {
            version: "v2.4.2".into(),
            content_root: Some("/var/lib/containerd/io.containerd.content.v1.content".into()),
            registry_config_path: path.map(str::to_owned),
            discard_unpacked_layers: discard,
            cri_source: CriSource::PluginExports,
        }
    }

    #[test]
    fn findings_table() {
        let certs = Path::new("/etc/containerd/certs.d");
        let labels = |f: &NodeFacts, visible| -> Vec<&'static str> {
            findings(f, certs, visible)
                .iter()
                .map(Finding::label)
                .collect()
        };
        let cases: Vec<(&str, NodeFacts, bool, Vec<&str>)> = vec![
            (
                "all good",
                facts(Some("/etc/containerd/certs.d"), Some(false)),
                true,
                vec![],
            ),
            (
                "trailing slash",
                facts(Some("/etc/containerd/certs.d/"), Some(false)),
                true,
                vec![],
            ),
            (
                "one of a list",
                facts(
                    Some("/etc/docker/certs.d:/etc/containerd/certs.d"),
                    Some(false),
                ),
                true,
                vec![],
            ),
            (
                "not set",
                facts(Some(""), Some(false)),
                true,
                vec!["hosts_dir_not_set"],
            ),
            (
                "other dir",
                facts(Some("/etc/other"), Some(false)),
                true,
                vec!["hosts_dir_differs"],
            ),
            (
                "unknown",
                facts(None, None),
                true,
                vec!["hosts_dir_unknown"],
            ),
            (
                "discard",
                facts(Some("/etc/containerd/certs.d"), Some(true)),
                true,
                vec!["layers_discarded"],
            ),
            (
                "root not mounted",
                facts(Some("/etc/containerd/certs.d"), Some(false)),
                false,
                vec!["content_root_not_visible"],
            ),
        ];
        for (name, f, visible, want) in cases {
            assert_eq!(labels(&f, visible), want, "{name}");
        }
    }

    #[test]
    fn messages_name_the_key_of_the_config_version() {
        let certs = Path::new("/etc/containerd/certs.d");
        let v2 = Finding::HostsDirNotSet.message(2, certs);
        assert!(
            v2.contains(r#"[plugins."io.containerd.grpc.v1.cri".registry] config_path"#),
            "{v2}"
        );
        let v3 = Finding::LayersDiscarded.message(3, certs);
        assert!(
            v3.contains(r#"[plugins."io.containerd.cri.v1.images"] discard_unpacked_layers"#),
            "{v3}"
        );
        for (v, want) in [("1.6.20~ds1", 2), ("v1.7.35", 2), ("v2.3.7", 3), ("", 3)] {
            let f = NodeFacts {
                version: v.into(),
                ..NodeFacts::default()
            };
            assert_eq!(f.config_version(), want, "{v}");
        }
    }

    #[test]
    fn cri_config_json_of_1x_is_read_and_2x_json_changes_nothing() {
        let mut f = NodeFacts::default();
        apply_cri_config(
            &mut f,
            r#"{"containerd":{"snapshotter":"overlayfs","discardUnpackedLayers":true},"registry":{"configPath":"/x"}}"#,
        );
        assert_eq!(f.registry_config_path.as_deref(), Some("/x"));
        assert_eq!(f.discard_unpacked_layers, Some(true));
        assert_eq!(f.cri_source, CriSource::CriStatus);
        let mut g = NodeFacts::default();
        apply_cri_config(
            &mut g,
            r#"{"containerdRootDir":"/var/lib/containerd","enableSelinux":false}"#,
        );
        assert_eq!(g, NodeFacts::default());
        apply_cri_config(&mut g, "not json");
        assert_eq!(g, NodeFacts::default());
    }
}
