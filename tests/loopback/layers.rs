//! The layer rule of `src/` (docs: `/work/shared/design/architecture.md` §2.0, and the map in
//! `src/lib.rs`), one job: read every `crate::…` path in the daemon's production code, map each
//! file to its layer with [`LAYERS`], and fail on an import from a higher layer. Rust does not
//! forbid module cycles the way Go forbids package cycles; this test does, for the daemon.
//!
//! The rule: a file imports only from its own rank or lower. L0 pure → L1 bytes on the wire →
//! L2 seams (`store` below the others) → L3 services (`cache` < `advertise` < `registry`) →
//! the top (`metrics`, `config`, `app`), which nobody below imports. Test code (`tests.rs`,
//! `#[cfg(test)] mod …` at a file's end) may reach up: it wires a whole app to test a part.

use std::collections::BTreeSet;
use std::path::Path;

/// `(top-level module of src/, rank)`. A new module must be placed here.
const LAYERS: &[(&str, u8)] = &[
    // L0 pure
    ("oci", 0),
    ("readiness", 0),
    ("shutdown", 0),
    // L1 bytes on the wire: knows no store, policy or router
    ("wire", 1),
    ("server", 1),
    // L2 seams, `store` below the others
    ("store", 2),
    ("routing", 3),
    ("policy", 3),
    ("audit", 3),
    ("tenancy", 3),
    ("hosts", 3),
    // L3 services that combine seams
    ("cache", 4),
    ("advertise", 5),
    ("registry", 6),
    // the top: aggregator, config, composition root
    ("metrics", 7),
    ("config", 7),
    ("app", 7),
    // diagnostics over everything: `speculum doctor`, the node status page
    ("doctor", 7),
    ("status", 7),
    ("lib", 8),
    ("main", 8),
    ("cli", 8),
];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The `crate::X` modules named by production lines of `text` (comments and a trailing
/// `#[cfg(test)] mod …` left out).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        for (i, _) in t.match_indices("crate::") {
            let rest = &t[i + 7..];
            // `crate::{a::X, b}`: each first segment; a group over several lines is reported
            // as an unknown module, so it cannot slip through.
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => match group.split_once('}') {
                    Some((inner, _)) => inner.split(',').map(str::trim).collect(),
                    None => vec!["{multi-line group}"],
                },
                None => vec![rest],
            };
            for n in names {
                let name: String = n
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == '{')
                    .collect();
                if !name.is_empty() {
                    out.insert(if name.starts_with('{') {
                        n.to_owned()
                    } else {
                        name
                    });
                }
            }
        }
    }
    out
}

/// Every upward edge `file: from -> to` of the `.rs` files under `dir`.
fn violations(src: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "tests") {
                violations(src, &path, out);
            }
            continue;
        }
        let rel = path.strip_prefix(src).expect("under src");
        if path.extension().is_none_or(|e| e != "rs") || rel.ends_with("tests.rs") {
            continue;
        }
        let first = rel.components().next().expect("a path").as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_owned();
        let Some(from) = rank(&module) else {
            out.push(format!(
                "{}: module {module} is not in LAYERS",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("read file");
        for to in imports(&text).into_iter().filter(|m| *m != module) {
            match rank(&to) {
                Some(r) if r <= from => {}
                Some(r) => out.push(format!(
                    "{}: {module} ({from}) -> {to} ({r})",
                    rel.display()
                )),
                None => out.push(format!("{}: imports unknown module {to}", rel.display())),
            }
        }
    }
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    violations(&src, &src, &mut found);
    assert!(found.is_empty(), "upward imports:\n{}", found.join("\n"));
}

#[test]
fn the_reader_sees_what_the_rule_needs() {
    let cases = [
        ("use", "use crate::registry::Handler;\n", &["registry"][..]),
        ("path", "let x = crate::wire::HOP_HEADER;\n", &["wire"][..]),
        (
            "group",
            "use crate::{oci::Digest, store::Store};\n",
            &["oci", "store"][..],
        ),
        ("open group", "use crate::{\n", &["{multi-line group}"][..]),
        ("comment", "//! see [`crate::metrics`]\n", &[][..]),
        (
            "test module",
            "use crate::oci::Digest;\n#[cfg(test)]\nmod tests {\n    use crate::app;\n}\n",
            &["oci"][..],
        ),
    ];
    for (name, text, want) in cases {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(imports(text), want, "{name}");
    }
    assert!(rank("cache") < rank("registry") && rank("store") < rank("policy"));
}
