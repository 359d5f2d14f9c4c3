//! The page itself: an HTML shell, its stylesheet and its script, all compiled into the binary
//! (`assets/`), and the one escape used server-side (the node name in the title).
//!
//! The script fetches `/status/api` once a second and builds every table cell with
//! `textContent`, never `innerHTML`: whatever a client put into a repository name is shown as
//! the characters it is.

/// The page's script (`/status/status.js`).
pub(crate) const SCRIPT: &str = include_str!("assets/status.js");
/// The page's stylesheet (`/status/status.css`).
pub(crate) const STYLE: &str = include_str!("assets/status.css");
const INDEX: &str = include_str!("assets/index.html");

/// The HTML shell for node `node`.
pub fn index(node: &str) -> String {
    INDEX.replace("{{NODE}}", &escape_html(node))
}

/// Escapes text for an HTML element body or a quoted attribute value.
pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_table() {
        // (name, input, want)
        let cases = [
            ("plain", "n1", "n1"),
            ("empty", "", ""),
            (
                "script",
                "<script>alert(1)</script>",
                "&lt;script&gt;alert(1)&lt;/script&gt;",
            ),
            (
                "attribute break",
                "\" onload='x'",
                "&quot; onload=&#39;x&#39;",
            ),
            ("entity", "a&amp;b", "a&amp;amp;b"),
            ("unicode", "nœud-é", "nœud-é"),
        ];
        for (name, input, want) in cases {
            assert_eq!(escape_html(input), want, "{name}");
        }
    }

    #[test]
    fn the_shell_escapes_the_node_name_and_has_no_inline_script() {
        let html = index("<img src=x onerror=alert(1)>");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(!html.contains("{{NODE}}"));
        // The CSP allows only script-src 'self': every script must be a src, never inline.
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..html[i..].find('>').map_or(html.len(), |e| i + e)];
            assert!(
                tag.contains("src=\"/status/status.js\""),
                "inline script: {tag}"
            );
        }
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external assets"
        );
    }

    #[test]
    fn the_script_never_writes_html() {
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(forbidden), "status.js uses {forbidden}");
        }
        assert!(SCRIPT.contains("textContent"));
    }
}
