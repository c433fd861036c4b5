//! The `kaproxy` binary: parse the command line, set up logging, dispatch.
//! Exit codes: 0 ok, 64 usage or configuration error (EX_USAGE), 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kaproxy::app::{App, ReloadError};
use kaproxy::cli::{Cli, Command};
use kaproxy::config::Config;
use kaproxy::telemetry;

const EXIT_USAGE: u8 = 64;
const EXIT_RUNTIME: u8 = 1;

/// Prints to stdout; a closed stdout (`kaproxy check | head`) is not an error
/// worth a panic, so a failed write is ignored, as other command-line tools do.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// As [`outln!`], without the newline.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };

    let (config, watch) = match cli.command {
        Command::Check { config } => {
            return match Config::load(&config) {
                Ok(cfg) => {
                    out!("{}", cfg.describe());
                    let workers = kaproxy::workers::resolve_count(cli.workers);
                    match kaproxy::fdlimit::budget(&cfg, workers) {
                        Ok(budget) => {
                            outln!("\n{}", budget.describe());
                            if let Some(warning) = budget.warning() {
                                outln!("warning: {warning}");
                            }
                        }
                        Err(e) => outln!(
                            "\nwarning: cannot read the descriptor limit (RLIMIT_NOFILE): {e}"
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
        Command::Run { config, watch } => match Config::load(&config) {
            Ok(cfg) => (cfg, watch.then_some(config)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Command::Forward(args) => ((*args).into_config(), None),
        Command::Healthcheck { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            return match kaproxy::admin::status::healthcheck(&cfg) {
                Ok(text) => {
                    outln!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            };
        }
        Command::Probe(args) => return probe(&args),
        Command::Status { admin } => {
            return match kaproxy::admin::status::render(admin) {
                Ok(text) => {
                    out!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            };
        }
    };

    // Held to the end of main: dropping it flushes the queued log lines.
    let _log = match telemetry::init(cli.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    // Pairs run on the worker threads (kaproxy::workers); this thread only
    // starts them and serves signals, health checks and the admin endpoint.
    let runtime = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(serve(config, cli.workers, watch)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "kaproxy stopped");
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// A single-threaded runtime for this thread, or the exit code after saying why not.
fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(EXIT_RUNTIME)
        })
}

/// `kaproxy probe`: no logging set up, the output is the report itself.
fn probe(args: &kaproxy::cli::ProbeArgs) -> ExitCode {
    use kaproxy::probe::report;
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mut progress = report::StderrProgress::new(args.json);
    match runtime.block_on(kaproxy::probe::run(&args.server, settings, &mut progress)) {
        Ok(r) => {
            if args.json {
                outln!("{}", report::json(&r));
            } else {
                out!("{}", report::human(&r));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Changes to the watched file within this make one reload.
const WATCH_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(500);
/// A reload comes at most this long after the first change, however busy the
/// directory: another file written there all the time must not hold it off.
const WATCH_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve(config: Config, workers: usize, watch: Option<PathBuf>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut changes = match &watch {
        Some(path) => Some(
            kaproxy::watch::spawn(path)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", path.display()))?,
        ),
        None => None,
    };
    // What the file held at the last load: a watch event on an unchanged
    // file (a touch, an unrelated file in the directory) reloads nothing.
    let read = |p: &PathBuf| std::fs::read(p).ok();
    let mut last_seen = watch.as_ref().and_then(read);
    let mut app = App::start(config, workers).await?;
    // When to look at the file: the debounce's end, and the latest moment.
    let mut due: Option<(tokio::time::Instant, tokio::time::Instant)> = None;

    let name = loop {
        let debounce = async {
            match due {
                Some((at, latest)) => tokio::time::sleep_until(at.min(latest)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                let _ = app.reload("SIGHUP").await;
                last_seen = watch.as_ref().and_then(read);
            }
            event = async {
                match changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match event {
                Some(()) => {
                    let now = tokio::time::Instant::now();
                    let latest = due.map_or(now + WATCH_MAX_DELAY, |(_, latest)| latest);
                    due = Some((now + WATCH_DEBOUNCE, latest));
                }
                // The watch thread said why it stopped.
                None => changes = None,
            },
            () = debounce => {
                due = None;
                let now = watch.as_ref().and_then(read);
                // A file that is missing for a moment (mid-swap) is not a change.
                if now.is_some() && now != last_seen {
                    // A file that cannot be applied as it is waits for its next
                    // change; a reload that failed for another reason (an
                    // address in use) is tried again at the next event.
                    match app.reload("watch").await {
                        Ok(()) | Err(ReloadError::Config(_)) => last_seen = now,
                        Err(_) => {}
                    }
                }
            }
        }
    };
    tracing::info!(
        signal = name,
        "shutting down: no new connections; a second signal exits at once"
    );
    let second = tokio::select! {
        drained = app.shutdown() => {
            tracing::info!(drained, "kaproxy exited");
            return Ok(());
        }
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::warn!(
        signal = second,
        "second signal: closing every live pair now"
    );
    let all_closed = app.close_now().await;
    anyhow::bail!(
        "interrupted during drain by a second {second}{}",
        if all_closed {
            ""
        } else {
            "; some pairs did not close in time"
        }
    )
}

/// mimalloc instead of glibc's malloc: per-thread free lists without chunk
/// headers cut the RSS of an idle pair from 1,643 to 1,398 bytes (7,500 pairs,
/// `KAPROXY_BENCH_ONLY=idle`), and the relay's small allocations stay on their
/// worker thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
