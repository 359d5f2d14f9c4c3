//! The two CRI settings that decide whether a node can be mirrored, read from containerd's
//! config file: where it reads `hosts.toml` (`registry.config_path`) and whether it deletes
//! layers after unpacking them (`discard_unpacked_layers`). Pure: text in, settings out.
//!
//! Needed because containerd 2.0–2.3 say neither over their API (`store::introspect` asks
//! first; this is the fallback). The tables differ per config version (containerd
//! `docs/cri/config.md`; `docs/containerd.md` here):
//! - version 3 (containerd 2.x): `[plugins."io.containerd.cri.v1.images"]` and its `.registry`;
//! - version 2 (1.x, still read and converted by 2.x): `[plugins."io.containerd.grpc.v1.cri"]`,
//!   `.containerd` and `.registry`;
//! - version 1 (no `version` key, 1.x only): the same under the short name `[plugins.cri]`.
//!
//! Files named by `imports` are not followed; the finding says so when there are any.

use crate::store::introspect::CriKeys;

/// What 2.x uses when `config_path` is not set (verified on 2.4, `docs/containerd.md`); 1.x
/// reads no hosts directory at all then.
pub(crate) const DEFAULT_CONFIG_PATH_2X: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";

/// The settings as the file writes them; `None` where the file does not set them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileSettings {
    /// The file's `version` (1 when absent, as containerd reads it).
    pub version: u32,
    pub config_path: Option<String>,
    pub discard_unpacked_layers: Option<bool>,
    /// `imports = [...]`: other files that may override these settings.
    pub imports: Vec<String>,
}

impl FileSettings {
    /// `config_path` as containerd of major version `major` uses it: the file's value, else
    /// the default of that version (empty: none read).
    pub fn effective_config_path(&self, major: Option<u32>) -> String {
        match &self.config_path {
            Some(p) => p.clone(),
            None if major.unwrap_or(2) >= 2 => DEFAULT_CONFIG_PATH_2X.to_owned(),
            None => String::new(),
        }
    }

    /// `discard_unpacked_layers` as containerd uses it (default `false`).
    pub fn effective_discard(&self) -> bool {
        self.discard_unpacked_layers.unwrap_or(false)
    }

    /// The tables to edit in this file (version 1 files are edited as version 2).
    pub fn keys(&self) -> CriKeys {
        CriKeys::of(self.version.max(2))
    }
}

/// Reads the CRI settings out of a containerd config file's text.
pub fn parse(text: &str) -> Result<FileSettings, String> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // The message names line and column; the whole span text is not needed.
        e.message().to_owned()
    })?;
    let version = match doc.get("version") {
        None => 1,
        Some(toml::Value::Integer(v @ 1..=3)) => *v as u32,
        Some(other) => return Err(format!("`version` is {other}, containerd reads 1, 2 or 3")),
    };
    let imports = match doc.get("imports") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => return Err("`imports` is not a list".to_owned()),
    };
    let plugins = doc.get("plugins").and_then(toml::Value::as_table);
    let plugin = |name: &str| plugins.and_then(|p| p.get(name)).and_then(|v| v.as_table());
    fn sub<'a>(t: Option<&'a toml::Table>, name: &str) -> Option<&'a toml::Table> {
        t.and_then(|t| t.get(name)).and_then(toml::Value::as_table)
    }
    let (registry, discard_table) = match version {
        3 => {
            let images = plugin("io.containerd.cri.v1.images");
            (sub(images, "registry"), images)
        }
        2 => {
            let cri = plugin("io.containerd.grpc.v1.cri");
            (sub(cri, "registry"), sub(cri, "containerd"))
        }
        _ => {
            let cri = plugin("cri");
            (sub(cri, "registry"), sub(cri, "containerd"))
        }
    };
    let config_path = match registry.and_then(|r| r.get("config_path")) {
        None => None,
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`config_path` is not a string".to_owned()),
    };
    let discard_unpacked_layers = match discard_table.and_then(|t| t.get("discard_unpacked_layers"))
    {
        None => None,
        Some(toml::Value::Boolean(b)) => Some(*b),
        Some(_) => return Err("`discard_unpacked_layers` is not true or false".to_owned()),
    };
    Ok(FileSettings {
        version,
        config_path,
        discard_unpacked_layers,
        imports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let v3 = r#"
version = 3
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  discard_unpacked_layers = true
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
"#;
        let v2 = r#"
version = 2
imports = ["/etc/containerd/conf.d/*.toml"]
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = false
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/x:/y"
"#;
        // A version 3 file that writes the settings where version 2 keeps them: 2.x does not
        // read them there, so they count as unset.
        let v3_with_v2_tables = r#"
version = 3
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"#;
        let v1 = r#"
[plugins.cri.registry]
  config_path = "/old"
"#;
        let cases: Vec<(&str, &str, Result<FileSettings, &str>)> = vec![
            (
                "v3",
                v3,
                Ok(FileSettings {
                    version: 3,
                    config_path: Some("/etc/containerd/certs.d".into()),
                    discard_unpacked_layers: Some(true),
                    imports: vec![],
                }),
            ),
            (
                "v2 with imports",
                v2,
                Ok(FileSettings {
                    version: 2,
                    config_path: Some("/x:/y".into()),
                    discard_unpacked_layers: Some(false),
                    imports: vec!["/etc/containerd/conf.d/*.toml".into()],
                }),
            ),
            (
                "v3 file, v2 tables",
                v3_with_v2_tables,
                Ok(FileSettings {
                    version: 3,
                    ..FileSettings::default()
                }),
            ),
            (
                "v1",
                v1,
                Ok(FileSettings {
                    version: 1,
                    config_path: Some("/old".into()),
                    ..FileSettings::default()
                }),
            ),
            (
                "empty file",
                "",
                Ok(FileSettings {
                    version: 1,
                    ..FileSettings::default()
                }),
            ),
            ("not toml", "version = ", Err("")),
            ("bad version", "version = 7", Err("`version` is 7")),
            (
                "bad type",
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndiscard_unpacked_layers = \"yes\"\n",
                Err("discard_unpacked_layers"),
            ),
        ];
        for (name, text, want) in cases {
            match (parse(text), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{name}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{name}: {got}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn effective_values_follow_the_containerd_version() {
        let unset = FileSettings {
            version: 3,
            ..FileSettings::default()
        };
        assert_eq!(unset.effective_config_path(Some(2)), DEFAULT_CONFIG_PATH_2X);
        assert_eq!(unset.effective_config_path(Some(1)), "");
        assert!(!unset.effective_discard());
        assert_eq!(
            FileSettings {
                version: 1,
                ..FileSettings::default()
            }
            .keys()
            .registry_table,
            r#"plugins."io.containerd.grpc.v1.cri".registry"#
        );
    }
}
