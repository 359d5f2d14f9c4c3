//! `speculum audit FILE…`: read audit files (rotated `FILE.N` siblings included), filter them
//! and print records or a summary, as a table or JSON lines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use speculum::audit::reader;

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Audit files (JSON lines).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Only records whose image (registry/repository), reference or digest contains this.
    #[arg(long)]
    image: Option<String>,
    /// Only records for pods of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only `allow` or `deny` decisions.
    #[arg(long)]
    decision: Option<String>,
    /// Only records at or after this time (RFC 3339, e.g. 2026-11-23T17:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only records at or before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Requests and bytes by image, decision and source instead of single records.
    #[arg(long)]
    summary: bool,
    /// `table` or `json`.
    #[arg(long, default_value = "table")]
    output: String,
}

/// `speculum audit`.
pub fn run(a: &AuditArgs) -> ExitCode {
    let time = |s: &Option<String>, flag: &str| -> Result<Option<std::time::SystemTime>, String> {
        s.as_deref()
            .map(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')))
            .transpose()
            .map_err(|e| format!("--{flag}: {e}"))
    };
    let filter = match (time(&a.since, "since"), time(&a.until, "until")) {
        (Ok(since), Ok(until)) => reader::Filter {
            image: a.image.clone(),
            namespace: a.namespace.clone(),
            decision: a.decision.clone(),
            since,
            until,
        },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("speculum: {e}");
            return ExitCode::from(2);
        }
    };
    if !matches!(a.output.as_str(), "table" | "json") {
        eprintln!("speculum: --output must be table or json");
        return ExitCode::from(2);
    }
    let paths: Vec<PathBuf> = a
        .files
        .iter()
        .flat_map(|f| reader::with_rotated(f))
        .collect();
    let (records, bad) = match reader::read(&paths, &filter) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("speculum: {e}");
            return ExitCode::from(2);
        }
    };
    if bad > 0 {
        eprintln!("speculum: skipped {bad} lines that are not audit records");
    }
    let json = a.output == "json";
    let out = if a.summary {
        let rows = reader::summarise(&records);
        if json {
            rows.iter()
                .filter_map(|r| serde_json::to_string(r).ok())
                .map(|l| l + "\n")
                .collect()
        } else {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.image.clone(),
                        r.decision.clone(),
                        r.served_from.clone(),
                        r.requests.to_string(),
                        r.bytes.to_string(),
                    ]
                })
                .collect();
            reader::table(&["IMAGE", "DECISION", "FROM", "REQUESTS", "BYTES"], &cells)
        }
    } else if json {
        records
            .iter()
            .filter_map(|r| serde_json::to_string(r).ok())
            .map(|l| l + "\n")
            .collect()
    } else {
        let (header, rows) = reader::record_rows(&records);
        reader::table(&header, &rows)
    };
    print!("{out}");
    ExitCode::SUCCESS
}
