//! Logging for the daemon: a tracing subscriber on stderr, JSON lines or text, filtered by
//! `log.level`. (`LogConfig` itself stays in `speculum::config`: `Config` holds it, and the
//! library does not see this binary-private module.)

use speculum::config::LogConfig;

/// Installs the global subscriber. A filter that does not parse falls back to `info`.
pub fn init_logging(cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}
