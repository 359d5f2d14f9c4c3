//! The flags that name the configuration: `--config`, `--set SECTION.KEY=VALUE`, and the
//! shortcut flags, each `--set` for one key. Every shortcut is declared once, in the
//! `shortcuts!` table below (its field, flag type, `section.key` and help), which generates
//! both the clap field and its mapping to the key: adding a shortcut is adding one line there.

use std::path::PathBuf;

use clap::Args;
use speculum::config::{self, Config};

/// Settings shared by every command. Each flag is a shortcut for one `--set section.key=`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long, env = "SPECULUM_CONFIG")]
    config: Option<PathBuf>,
    /// Any setting as SECTION.KEY=VALUE (lists comma-separated); repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    shortcuts: Shortcuts,
}

impl ConfigArgs {
    /// The flags as `section.key=value` overrides: the shortcuts, then `--set` in its order
    /// (so `--set` wins over a shortcut for the same key).
    fn overrides(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = self.shortcuts.overrides();
        for s in &self.set {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set {s:?}: expected SECTION.KEY=VALUE"))?;
            out.push((k.to_owned(), v.to_owned()));
        }
        Ok(out)
    }

    /// Defaults → `--config` file → `SPECULUM_*` environment → these flags.
    pub fn load(&self) -> Result<Config, String> {
        let overrides = self.overrides()?;
        config::load(self.config.as_deref(), std::env::vars(), &overrides)
            .map_err(|e| e.to_string())
    }
}

/// What a shortcut flag's value becomes in `section.key=value`, by the field's type.
trait Shortcut {
    /// Values go first, then lists, then switches: the order the flags were applied in
    /// before this table existed (keys are distinct, so it only orders error lines).
    const ORDER: u8;
    fn value(&self) -> Option<String>;
}

impl Shortcut for Option<String> {
    const ORDER: u8 = 0;
    fn value(&self) -> Option<String> {
        self.clone()
    }
}

/// A repeatable flag: its values comma-separated, as `--set` takes a list.
impl Shortcut for Vec<String> {
    const ORDER: u8 = 1;
    fn value(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.join(","))
    }
}

/// A switch: present is `true`, absent leaves the key alone.
impl Shortcut for bool {
    const ORDER: u8 = 2;
    fn value(&self) -> Option<String> {
        self.then(|| "true".to_owned())
    }
}

/// `field("long-name")?: Type = "section.key", "help";` → a clap field `--field-name` (or
/// `--long-name`) whose help ends in `(section.key)`, and its row in [`Shortcuts::TABLE`].
macro_rules! shortcuts {
    ($( $field:ident $(($long:literal))? : $ty:ty = $key:literal, $help:literal; )*) => {
        /// The shortcut flags (see the module docs).
        #[derive(Debug, Args)]
        pub struct Shortcuts {
            $(
                #[arg(long $(= $long)?, help = concat!($help, " (", $key, ")"))]
                $field: $ty,
            )*
        }

        impl Shortcuts {
            /// Every shortcut as (clap argument id = field name, `section.key`).
            #[cfg(test)]
            pub const TABLE: &'static [(&'static str, &'static str)] =
                &[$((stringify!($field), $key)),*];

            /// The flags given, as `section.key=value`.
            fn overrides(&self) -> Vec<(String, String)> {
                let mut out: Vec<(u8, &str, String)> = Vec::new();
                $(
                    if let Some(v) = Shortcut::value(&self.$field) {
                        out.push((<$ty as Shortcut>::ORDER, $key, v));
                    }
                )*
                out.sort_by_key(|(order, _, _)| *order); // stable: table order within a kind
                out.into_iter().map(|(_, k, v)| (k.to_owned(), v)).collect()
            }
        }
    };
}

shortcuts! {
    node_name: Option<String> = "node.name", "Kubernetes node name";
    mirror_listen: Option<String> = "registry.mirror_listen", "containerd-facing mirror endpoint";
    peer_listen: Option<String> = "registry.peer_listen", "Endpoint other daemons fetch from";
    metrics_listen: Option<String> = "metrics.listen", "Metrics and health endpoint";
    containerd_socket: Option<String> = "containerd.socket", "containerd socket";
    containerd_namespace: Option<String> = "containerd.namespace", "containerd namespace";
    content_dir: Option<String> = "containerd.content_dir",
        "containerd content store directory for the fast path";
    p2p_listen: Option<String> = "routing.listen", "libp2p listen multiaddr";
    data_dir: Option<String> = "routing.data_dir", "Directory for the peer identity";
    bootstrap_peers("bootstrap-peer"): Vec<String> = "routing.bootstrap.peers",
        "Bootstrap peer multiaddr; repeatable";
    bootstrap_dns: Option<String> = "routing.bootstrap.dns", "Bootstrap DNS name host:port";
    registry_port: Option<String> = "routing.registry_port", "Port of every node's peer endpoint";
    resolve_timeout: Option<String> = "mirror.resolve_timeout",
        "Wait for the first peer of a lookup";
    mirror_attempts: Option<String> = "mirror.attempts", "Peers tried per request";
    mirrored_registries("mirrored-registry"): Vec<String> = "hosts.mirrored_registries",
        "Registry to mirror, as a URL; repeatable";
    certs_dir: Option<String> = "hosts.certs_dir", "containerd's hosts directory";
    mirror_endpoint: Option<String> = "hosts.mirror_endpoint",
        "URL containerd uses to reach this daemon";
    prepend_existing: bool = "hosts.prepend_existing",
        "Keep existing hosts.toml mirrors after ours";
    runtime: Option<String> = "hosts.runtime",
        "Runtime configure/cleanup write for, containerd|cri-o";
    log_format: Option<String> = "log.format", "Log format json|text";
    log_level: Option<String> = "log.level", "Log filter, e.g. info";
    policy_bundle: Option<String> = "policy.bundle", "Rego bundle directory";
    resolve_tags: Option<String> = "policy.resolve_tags",
        "Let the cluster resolve tags, true|false";
    resolve_latest_tag: Option<String> = "policy.resolve_latest_tag",
        "Let the cluster resolve `latest`, true|false";
    audit_file: Option<String> = "audit.file", "Append audit lines to this file";
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::cli::Cli;

    /// The `speculum config` command as clap sees it.
    fn config_command() -> clap::Command {
        match Cli::command().find_subcommand("config") {
            Some(c) => c.clone(),
            None => panic!("no config subcommand"),
        }
    }

    #[test]
    fn every_shortcut_names_a_setting_that_config_accepts() {
        assert_eq!(Shortcuts::TABLE.len(), 25, "shortcuts added or lost");
        let mut keys = HashSet::new();
        for (field, key) in Shortcuts::TABLE {
            assert!(keys.insert(key), "{key}: two shortcuts for one key");
            // What `speculum config --set KEY=…` answers for an unknown key; any other
            // complaint (the value "x" is not a valid address, say) means the key exists.
            let errors =
                match config::load(None, std::iter::empty(), &[(key.to_string(), "x".into())]) {
                    Ok(_) => String::new(),
                    Err(e) => e.to_string(),
                };
            assert!(
                !errors.contains("no such setting"),
                "shortcut {field} maps to {key}, which `speculum config` refuses: {errors}"
            );
        }
    }

    #[test]
    fn every_shortcut_flag_sets_its_key() {
        let command = config_command();
        for (field, key) in Shortcuts::TABLE {
            let Some(arg) = command.get_arguments().find(|a| a.get_id() == *field) else {
                panic!("{field}: no such clap argument");
            };
            let Some(long) = arg.get_long() else {
                panic!("{field}: no long flag");
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.ends_with(&format!("({key})")),
                "--{long}: help {help:?}"
            );
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            let mut argv = vec![
                "speculum".to_owned(),
                "config".to_owned(),
                format!("--{long}"),
            ];
            if !switch {
                argv.push("v1".to_owned());
            }
            let want = if switch { "true" } else { "v1" };
            let cli = match Cli::try_parse_from(&argv) {
                Ok(c) => c,
                Err(e) => panic!("{argv:?}: {e}"),
            };
            let crate::cli::Command::Config(args) = cli.command else {
                panic!("{argv:?}: not the config command");
            };
            assert_eq!(
                args.overrides(),
                Ok(vec![(key.to_string(), want.to_owned())]),
                "{argv:?}"
            );
        }
    }

    #[test]
    fn flags_apply_in_a_fixed_order_and_set_comes_last() {
        type Case = (
            &'static str,
            &'static [&'static str],
            Result<Vec<(&'static str, &'static str)>, &'static str>,
        );
        let cases: &[Case] = &[
            ("none", &[], Ok(vec![])),
            (
                "values, then lists, then switches, then --set",
                &[
                    "--set",
                    "log.level=debug",
                    "--prepend-existing",
                    "--mirrored-registry",
                    "https://a",
                    "--mirrored-registry",
                    "https://b",
                    "--log-level",
                    "info",
                    "--node-name",
                    "n1",
                ],
                Ok(vec![
                    ("node.name", "n1"),
                    ("log.level", "info"),
                    ("hosts.mirrored_registries", "https://a,https://b"),
                    ("hosts.prepend_existing", "true"),
                    ("log.level", "debug"),
                ]),
            ),
            (
                "set without =",
                &["--set", "log.level"],
                Err("--set \"log.level\": expected SECTION.KEY=VALUE"),
            ),
        ];
        for (name, flags, want) in cases {
            let argv = ["speculum", "config"].iter().chain(flags.iter());
            let cli = match Cli::try_parse_from(argv) {
                Ok(c) => c,
                Err(e) => panic!("{name}: {e}"),
            };
            let crate::cli::Command::Config(args) = cli.command else {
                panic!("{name}: not the config command");
            };
            let want = want
                .clone()
                .map(|v| {
                    v.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .map_err(str::to_owned);
            assert_eq!(args.overrides(), want, "{name}");
        }
    }
}
