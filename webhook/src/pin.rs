//! Offline mode for GitOps: `speculum-webhook pin FILE|-` pins the images of Kubernetes YAML
//! (multi-document, `kind: List` too) exactly as the webhook would, before it reaches a cluster.
//!
//! The rewrite is textual where possible, so comments, key order and quoting survive: in each
//! document, `image:`/`reference:` lines whose value is a pinned image get the pinned value.
//! The result is then parsed again and compared with the patched object; if they differ
//! (flow style, JSON, an image written twice but pinned once) the document is re-serialised
//! instead. Documents that are not workloads pass through byte for byte.

use serde_json::Value;

use crate::admit::{Admitter, Context};
use crate::mutate::{self, PatchOp};

/// What happened to one input.
#[derive(Debug, Default)]
pub struct Report {
    pub output: String,
    pub pinned: usize,
    /// Images that could not be pinned (`--strict` turns them into a failure).
    pub unresolved: Vec<String>,
    /// Policy denials; always a failure.
    pub denied: Vec<String>,
    /// Documents that could not be read; left unchanged.
    pub problems: Vec<String>,
}

/// Splits YAML text into documents, keeping each separator line with the document it opens.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        // `---` alone, or followed by whitespace (a comment or, in flow style, content).
        let is_sep =
            line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace);
        if is_sep && pos > start {
            docs.push(&text[start..pos]);
            start = pos;
        }
        pos += line.len();
    }
    if start < text.len() {
        docs.push(&text[start..]);
    }
    docs
}

/// Pins every document of `text`.
pub async fn pin_text(admitter: &Admitter, text: &str) -> Report {
    let mut report = Report::default();
    for (n, doc) in split_documents(text).into_iter().enumerate() {
        let out = pin_document(admitter, doc, n, &mut report).await;
        report.output.push_str(&out);
    }
    report
}

async fn pin_document(admitter: &Admitter, doc: &str, n: usize, report: &mut Report) -> String {
    let value: Value = match yaml_serde::from_str::<Option<Value>>(doc) {
        Ok(Some(v)) => v,
        Ok(None) => return doc.to_owned(),
        Err(e) => {
            report.problems.push(format!("document {n}: {e}"));
            return doc.to_owned();
        }
    };
    let mut ops: Vec<PatchOp> = Vec::new();
    let mut objects: Vec<(String, &Value)> = vec![(String::new(), &value)];
    if value.get("kind").and_then(Value::as_str) == Some("List")
        && let Some(items) = value.get("items").and_then(Value::as_array)
    {
        objects = items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("/items/{i}"), v))
            .collect();
    }
    for (prefix, obj) in objects {
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        if mutate::pod_spec_pointer(kind).is_none() {
            continue;
        }
        let meta = |f: &str| {
            obj.pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let ctx = Context {
            namespace: meta("namespace"),
            kind: kind.to_owned(),
            name: meta("name"),
            operation: "CREATE".into(),
            ..Context::default()
        };
        match admitter.pin_object(&ctx, obj, None).await {
            Ok(outcome) => {
                let label = format!("{kind}/{}", ctx.name);
                report
                    .denied
                    .extend(outcome.denials.iter().map(|d| format!("{label}: {d}")));
                report.unresolved.extend(
                    outcome
                        .lines
                        .iter()
                        .filter(|l| l.decision == "unresolved")
                        .map(|l| format!("{label}: {}", l.reason)),
                );
                ops.extend(outcome.ops.into_iter().map(|mut o| {
                    o.path = format!("{prefix}{}", o.path);
                    o
                }));
            }
            Err(e) => report.problems.push(format!("document {n} ({kind}): {e}")),
        }
    }
    if ops.is_empty() {
        return doc.to_owned();
    }
    let mut want = value.clone();
    if let Err(e) = mutate::apply(&mut want, &ops) {
        report.problems.push(format!("document {n}: {e}"));
        return doc.to_owned();
    }
    report.pinned += ops.len();
    let mut pairs: Vec<(String, String)> = Vec::new();
    for op in &ops {
        if let Some(Value::String(before)) = value.pointer(&op.path) {
            pairs.push((before.clone(), op.value.clone()));
        }
    }
    let text = rewrite_lines(doc, &pairs);
    if yaml_serde::from_str::<Value>(&text).ok().as_ref() == Some(&want) {
        return text;
    }
    // Keep the separator line, re-serialise the body.
    // The separator line may carry content (`--- {...}`); write a bare one.
    let sep = if doc.starts_with("---") { "---\n" } else { "" };
    match yaml_serde::to_string(&want) {
        Ok(body) => format!("{sep}{body}"),
        Err(e) => {
            report
                .problems
                .push(format!("document {n}: cannot write YAML: {e}"));
            doc.to_owned()
        }
    }
}

/// Replaces the value of `image:`/`reference:` lines (block style, plain or quoted scalars,
/// optional trailing comment) whose value equals a `before`.
fn rewrite_lines(doc: &str, pairs: &[(String, String)]) -> String {
    let mut out = String::with_capacity(doc.len() + pairs.len() * 72);
    for line in doc.split_inclusive('\n') {
        out.push_str(&rewrite_line(line, pairs).unwrap_or_else(|| line.to_owned()));
    }
    out
}

fn rewrite_line(line: &str, pairs: &[(String, String)]) -> Option<String> {
    let body = line.trim_end_matches(['\n', '\r']);
    let eol = &line[body.len()..];
    let trimmed = body.trim_start().trim_start_matches("- ").trim_start();
    let key = ["image:", "reference:"]
        .into_iter()
        .find(|k| trimmed.starts_with(k))?;
    let key_at = body.find(key)?;
    let value_part = &body[key_at + key.len()..];
    let lead = value_part.len() - value_part.trim_start().len();
    let v = value_part.trim_start();
    let (quote, inner, rest) = match v.chars().next()? {
        q @ ('"' | '\'') => {
            let end = v[1..].find(q)? + 1;
            (q.to_string(), &v[1..end], &v[end + 1..])
        }
        _ => {
            let end = v.find(" #").unwrap_or(v.len());
            (
                "".to_owned(),
                v[..end].trim_end(),
                &v[v[..end].trim_end().len()..],
            )
        }
    };
    let (_, after) = pairs.iter().find(|(b, _)| b == inner)?;
    Some(format!(
        "{}{}{quote}{after}{quote}{rest}{eol}",
        &body[..key_at + key.len()],
        &value_part[..lead]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_table() {
        let cases: [(&str, Vec<&str>); 5] = [
            ("a: 1\n", vec!["a: 1\n"]),
            ("---\na: 1\n---\nb: 2\n", vec!["---\na: 1\n", "---\nb: 2\n"]),
            ("a: 1\n--- # two\nb: 2", vec!["a: 1\n", "--- # two\nb: 2"]),
            ("a: '---x'\n----\n", vec!["a: '---x'\n----\n"]),
            ("a: 1\n--- {b: 2}\n", vec!["a: 1\n", "--- {b: 2}\n"]),
        ];
        for (input, want) in cases {
            assert_eq!(split_documents(input), want, "{input:?}");
        }
    }

    #[test]
    fn rewrite_table() {
        let pairs = vec![("r.io/a:1".to_owned(), "r.io/a:1@sha256:d".to_owned())];
        let cases = [
            (
                "      image: r.io/a:1\n",
                Some("      image: r.io/a:1@sha256:d\n"),
            ),
            (
                "  - image: \"r.io/a:1\"  # app\n",
                Some("  - image: \"r.io/a:1@sha256:d\"  # app\n"),
            ),
            (
                "    reference: 'r.io/a:1'\r\n",
                Some("    reference: 'r.io/a:1@sha256:d'\r\n"),
            ),
            (
                "    image: r.io/a:1 # c\n",
                Some("    image: r.io/a:1@sha256:d # c\n"),
            ),
            ("    image: r.io/a:10\n", None),
            ("    name: r.io/a:1\n", None),
            ("    image: \"unterminated\n", None),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite_line(input, &pairs).as_deref(), want, "{input:?}");
        }
    }
}
