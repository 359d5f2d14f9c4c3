//! Media types of manifests and indexes, detection of a blob's media type from its JSON, and
//! the list of children a manifest or index references.
//!
//! containerd's content store keeps no media type for blobs, so a daemon serving
//! `/manifests/<digest>` must recover it from the bytes (image-spec "Image Manifest" and
//! "Image Index"; docker "Image Manifest V2, Schema 2").

use super::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Blobs larger than this are never parsed as JSON when detecting a media type.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// True for the media types that are served from `/manifests/`.
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST
    )
}

/// True for indexes (manifest lists), whose children are manifests.
pub fn is_index_type(media_type: &str) -> bool {
    matches!(media_type, OCI_INDEX | DOCKER_LIST)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    schema_version: Option<serde_json::Value>,
    #[serde(default)]
    manifests: Option<Vec<ChildDescriptor>>,
    // An image config also has a `config` key (the container config, not a descriptor);
    // it must not make the whole probe fail, or real configs are never detected.
    #[serde(default, deserialize_with = "descriptor_or_none")]
    config: Option<ChildDescriptor>,
    #[serde(default)]
    layers: Option<Vec<ChildDescriptor>>,
    #[serde(default)]
    blobs: Option<Vec<ChildDescriptor>>,
    #[serde(default)]
    subject: Option<ChildDescriptor>,
    #[serde(default)]
    rootfs: Option<serde_json::Value>,
}

fn descriptor_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ChildDescriptor>, D::Error> {
    let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// A descriptor inside a manifest or index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChildDescriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// Detects the media type of a blob from its first bytes and, for JSON, its structure.
/// Returns `application/octet-stream` for anything that is not a recognised JSON document.
pub fn detect(bytes: &[u8]) -> &'static str {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return OCTET_STREAM;
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(bytes) else {
        return OCTET_STREAM;
    };
    match probe.media_type.as_deref() {
        Some(OCI_MANIFEST) => return OCI_MANIFEST,
        Some(OCI_INDEX) => return OCI_INDEX,
        Some(DOCKER_MANIFEST) => return DOCKER_MANIFEST,
        Some(DOCKER_LIST) => return DOCKER_LIST,
        _ => {}
    }
    // The OCI spec makes `mediaType` optional in manifests and indexes; recognise them by
    // shape (schemaVersion 2 plus `manifests`, or plus `config` and `layers`).
    let v2 = probe.schema_version.as_ref().and_then(|v| v.as_u64()) == Some(2);
    if v2 && probe.manifests.is_some() {
        OCI_INDEX
    } else if v2 && probe.config.is_some() && probe.layers.is_some() {
        OCI_MANIFEST
    } else if probe.rootfs.is_some() {
        OCI_CONFIG
    } else {
        OCTET_STREAM
    }
}

/// The digests a manifest or index references directly (for an index: its manifests; for a
/// manifest: config, layers, blobs and subject). Unparseable input yields no children.
pub fn children(bytes: &[u8]) -> Vec<ChildDescriptor> {
    let Ok(p) = serde_json::from_slice::<Probe>(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    out.extend(p.manifests.unwrap_or_default());
    out.extend(p.config);
    out.extend(p.layers.unwrap_or_default());
    out.extend(p.blobs.unwrap_or_default());
    out.extend(p.subject);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn detect_table() {
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "oci manifest",
                format!(r#"{{"mediaType":"{OCI_MANIFEST}"}}"#),
                OCI_MANIFEST,
            ),
            (
                "docker list",
                format!(r#"{{"mediaType":"{DOCKER_LIST}"}}"#),
                DOCKER_LIST,
            ),
            (
                "index by shape",
                r#"{"schemaVersion":2,"manifests":[]}"#.to_string(),
                OCI_INDEX,
            ),
            (
                "manifest by shape",
                format!(
                    r#"{{"schemaVersion":2,"config":{{"digest":"{D}","size":1}},"layers":[]}}"#
                ),
                OCI_MANIFEST,
            ),
            (
                "config",
                r#"{"architecture":"amd64","rootfs":{"type":"layers"}}"#.into(),
                OCI_CONFIG,
            ),
            (
                "config with container config",
                r#"{"architecture":"amd64","config":{"Cmd":["sh"]},"rootfs":{"type":"layers"}}"#
                    .into(),
                OCI_CONFIG,
            ),
            (
                "leading whitespace",
                format!(" \n{{\"mediaType\":\"{OCI_INDEX}\"}}"),
                OCI_INDEX,
            ),
            ("gzip", "\u{1f}\u{8b}\u{8}".into(), OCTET_STREAM),
            ("other json", r#"{"a":1}"#.into(), OCTET_STREAM),
            ("broken json", "{".into(), OCTET_STREAM),
            ("empty", String::new(), OCTET_STREAM),
            (
                "schema 1 shape",
                r#"{"schemaVersion":1,"manifests":[]}"#.into(),
                OCTET_STREAM,
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(detect(input.as_bytes()), want, "{name}");
        }
    }

    #[test]
    fn children_of_manifest_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"c","digest":"{D}","size":3}},"layers":[{{"mediaType":"l","digest":"{D}","size":5}}]}}"#
        );
        let kids = children(m.as_bytes());
        assert_eq!(kids.len(), 2);
        assert_eq!(kids[1].size, 5);
        let i = format!(r#"{{"manifests":[{{"mediaType":"m","digest":"{D}","size":7}}]}}"#);
        assert_eq!(children(i.as_bytes()).len(), 1);
        assert!(children(b"not json").is_empty());
        assert!(children(br#"{"layers":[{"digest":"md5:x","size":1}]}"#).is_empty());
    }
}
