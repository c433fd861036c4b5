//! Log output (text or JSON lines on stdout, filtered by `KAPROXY_LOG`) and,
//! in [`metrics`], the Prometheus series everything records into.

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Environment variable holding the filter (tracing EnvFilter syntax).
pub const LOG_ENV: &str = "KAPROXY_LOG";

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, event fields at the top level.
    Json,
}

/// Installs the global subscriber. Fails on a filter that does not parse, so a
/// typo in `KAPROXY_LOG` is reported instead of silently logging nothing.
pub fn init(format: LogFormat) -> Result<(), String> {
    let filter = match std::env::var(LOG_ENV) {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v)
            .map_err(|e| format!("{LOG_ENV}={v:?} is not a valid log filter: {e}"))?,
        _ => EnvFilter::new("info"),
    };
    // Colour only on a terminal: container log collectors would store the escapes.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))
}
