//! The `kaproxy` binary: parse the command line, set up logging, dispatch.
//! Exit codes: 0 ok, 64 usage or configuration error (EX_USAGE), 1 runtime failure.

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use kaproxy::app::App;
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

    let config = match cli.command {
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
        Command::Run { config } => match Config::load(&config) {
            Ok(cfg) => cfg,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Command::Forward(args) => (*args).into_config(),
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
    match runtime.block_on(serve(config, cli.workers)) {
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

async fn serve(config: Config, workers: usize) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let app = App::start(config, workers).await?;

    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
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
