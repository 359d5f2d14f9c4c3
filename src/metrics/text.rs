//! Reading the text exposition back, one job: find samples by name and labels in what
//! `/metrics` serves (prometheus-client writes OpenMetrics text). `speculum doctor` and the
//! status page read the daemon's own numbers this way, through the stable metric names
//! rather than internal handles, so what they show is what Prometheus sees.

/// The content type of [`super::Metrics::encode`]'s output, served on `/metrics` by the
/// daemon and the webhook alike.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// What is between the braces, unparsed (`""` without labels).
    pub labels: &'a str,
    pub value: f64,
}

impl Sample<'_> {
    /// Whether the sample carries `key="value"` (exact, quote to quote).
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        label_pairs(self.labels).any(|(k, v)| k == key && v == value)
    }
}

/// Every sample of `text`; comments, blank lines and lines that do not parse are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_line)
}

/// The sum of every sample of `name` carrying all of `labels`; `None` when there is none.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.has_label(k, v)))
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

fn parse_line(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let body = &line[name_end + 1..];
        let close = closing_brace(body)?;
        (&body[..close], &body[close + 1..])
    } else {
        ("", &line[name_end..])
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Index of the `}` closing a label set, skipping braces inside quoted values.
fn closing_brace(body: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// `key="value"` pairs of a label set (values unescaped only as far as `\"`).
fn label_pairs(labels: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut rest = labels;
    std::iter::from_fn(move || {
        let (key, after) = rest.trim_start_matches([',', ' ']).split_once("=\"")?;
        let mut escaped = false;
        let end = after.char_indices().find_map(|(i, c)| match c {
            _ if escaped => {
                escaped = false;
                None
            }
            '\\' => {
                escaped = true;
                None
            }
            '"' => Some(i),
            _ => None,
        })?;
        rest = &after[end + 1..];
        Some((key.trim(), &after[..end]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP speculum_routing_peers Connected DHT peers.\n\
        # TYPE speculum_routing_peers gauge\n\
        speculum_routing_peers 2\n\
        speculum_served_bytes_total{handler=\"mirror\",source=\"local\"} 10\n\
        speculum_served_bytes_total{handler=\"mirror\",source=\"peer\"} 5 1700000000000\n\
        speculum_served_bytes_total{handler=\"peer\",source=\"local\"} 7\n\
        odd{reason=\"a } b, c=\\\"d\\\"\"} 1.5\n\
        broken{x=\"y\" 3\n\
        nan_is_a_value NaN\n\
        # EOF\n";

    #[test]
    fn sums_by_name_and_labels() {
        // (what, name, labels, want)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<f64>);
        let cases: &[Case] = &[
            ("unlabelled", "speculum_routing_peers", &[], Some(2.0)),
            ("all series", "speculum_served_bytes_total", &[], Some(22.0)),
            (
                "one label",
                "speculum_served_bytes_total",
                &[("handler", "mirror")],
                Some(15.0),
            ),
            (
                "two labels, timestamp ignored",
                "speculum_served_bytes_total",
                &[("handler", "mirror"), ("source", "peer")],
                Some(5.0),
            ),
            (
                "no such label value",
                "speculum_served_bytes_total",
                &[("handler", "x")],
                None,
            ),
            (
                "a prefix is not the name",
                "speculum_served_bytes",
                &[],
                None,
            ),
            (
                "brace and quotes inside a value",
                "odd",
                &[("reason", "a } b, c=\\\"d\\\"")],
                Some(1.5),
            ),
            ("an unclosed label set is skipped", "broken", &[], None),
            ("missing", "speculum_nothing", &[], None),
        ];
        for (what, name, labels, want) in cases {
            assert_eq!(sum(PAGE, name, labels), *want, "{what}");
        }
        assert!(sum(PAGE, "nan_is_a_value", &[]).is_some_and(f64::is_nan));
    }

    #[test]
    fn reads_what_the_registry_encodes() {
        let metrics = super::super::Metrics::new();
        let text = metrics.encode();
        assert_eq!(sum(&text, "speculum_ready", &[]), Some(0.0), "{text}");
        assert!(samples(&text).count() > 10, "{text}");
    }
}
