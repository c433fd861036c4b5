//! Man pages and shell completions, generated from the clap definitions in
//! [`super::Cli`] so that they never drift from the real command line.
//! `cargo run --example generate -- OUT_DIR` writes them (scripts/build-deb.sh
//! does, for the Debian package); the binary itself carries no such command,
//! which its own completions would then offer:
//!
//! - `OUT_DIR/man/kaproxy.1`, and one page per subcommand (`kaproxy-run.1`, ...);
//! - `OUT_DIR/completions/kaproxy.bash`, `_kaproxy` (zsh), `kaproxy.fish`.
//!
//! Only the top page gets sections clap does not know about (environment,
//! files, exit status), built from the same constants the code uses.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

use super::{Cli, DEFAULT_CONFIG_PATH};

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes every man page and completion file under `out_dir`; returns their paths.
pub fn write_all(out_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = write_man_pages(&out_dir.join("man"))?;
    written.extend(write_completions(&out_dir.join("completions"))?);
    Ok(written)
}

/// `kaproxy.1` and a page for each visible subcommand.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Fills in each subcommand's display name ("kaproxy-run") and the propagated version.
    cmd.build();
    let mut written = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(Man::new(sub.clone()).generate_to(dir)?);
    }
    let path = dir.join("kaproxy.1");
    std::fs::write(&path, top_page(cmd)?)?;
    written.push(path);
    Ok(written)
}

/// The completion scripts, under the names clap_complete gives them.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    SHELLS
        .iter()
        .map(|&shell| clap_complete::generate_to(shell, &mut Cli::command(), "kaproxy", dir))
        .collect()
}

/// clap_mangen's page for the whole command, with ENVIRONMENT, FILES, EXIT
/// STATUS and SEE ALSO before its VERSION section.
fn top_page(cmd: clap::Command) -> io::Result<String> {
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("kaproxy-{}(1)", s.get_name()))
        .collect();
    let mut page = Vec::new();
    Man::new(cmd).render(&mut page)?;
    let page = String::from_utf8(page).map_err(io::Error::other)?;

    let mut extra = Roff::new();
    extra.control("SH", ["ENVIRONMENT"]);
    for (name, text) in [
        (
            "KAPROXY_CONFIG",
            format!("Configuration file of run, check and healthcheck when -c is not given (default {DEFAULT_CONFIG_PATH})."),
        ),
        (
            "KAPROXY_LOG",
            "Log filter in tracing EnvFilter syntax (default info), e.g. kaproxy=debug.".to_string(),
        ),
        (
            "KAPROXY_WORKERS",
            "Worker threads, as --workers.".to_string(),
        ),
    ] {
        extra.control("TP", [] as [&str; 0]);
        extra.text([bold(name)]);
        extra.text([roman(text)]);
    }
    extra.control("SH", ["FILES"]);
    extra.control("TP", [] as [&str; 0]);
    extra.text([bold(DEFAULT_CONFIG_PATH)]);
    extra.text([roman(
        "The configuration file (TOML). Validate it with kaproxy check before a restart or reload.",
    )]);
    extra.control("SH", ["EXIT STATUS"]);
    for (code, text) in [
        (
            "0",
            "Success; run: stopped by SIGTERM or SIGINT after draining.",
        ),
        ("1", "A runtime failure, such as a listen address in use."),
        (
            "64",
            "A usage or configuration error (EX_USAGE); the message names file, line and field.",
        ),
    ] {
        extra.control("TP", [] as [&str; 0]);
        extra.text([bold(code)]);
        extra.text([roman(text)]);
    }
    extra.control("SH", ["SEE ALSO"]);
    extra.text([roman(format!("{}, systemctl(1)", subcommands.join(", ")))]);
    let extra = extra.render();
    // Both renderings open with the same apostrophe preamble: keep the page's.
    let extra = &extra[extra.find(".SH").unwrap_or(0)..];

    Ok(match page.find("\n.SH VERSION") {
        Some(at) => format!("{}\n{extra}{}", &page[..at], &page[at + 1..]),
        None => format!("{page}{extra}"),
    })
}
