//! Log output (text or JSON lines on stdout, filtered by `KAPROXY_LOG`) and,
//! in [`metrics`], the Prometheus series everything records into.

pub mod metrics;

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
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

/// Log lines that may wait for the writer thread. A burst past this (stdout
/// blocked by a slow log collector) drops lines rather than stall a pair.
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// Lines dropped because the queue was full, once logging is set up.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because stdout could not keep up.
pub fn dropped_log_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log writer thread; dropping it flushes what is queued (for up to a second).
#[derive(Debug)]
pub struct LogGuard {
    _worker: WorkerGuard,
}

/// Installs the global subscriber. Fails on a filter that does not parse, so a
/// typo in `KAPROXY_LOG` is reported instead of silently logging nothing.
///
/// Lines are formatted where the event happens and written to stdout by a
/// thread of their own through a bounded queue, so a close event never waits
/// on stdout; keep the returned guard until exit.
pub fn init(format: LogFormat) -> Result<LogGuard, String> {
    let filter = match std::env::var(LOG_ENV) {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v)
            .map_err(|e| format!("{LOG_ENV}={v:?} is not a valid log filter: {e}"))?,
        _ => EnvFilter::new("info"),
    };
    // Colour only on a terminal: container log collectors would store the escapes.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("kaproxy-log")
        .finish(std::io::stdout());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    Ok(LogGuard { _worker: worker })
}
