//! Writes kaproxy's man pages and bash, zsh and fish completions, generated from
//! its clap definitions, into OUT_DIR/man and OUT_DIR/completions:
//!
//! ```text
//! cargo run --example generate -- target/assets
//! ```
//!
//! scripts/build-deb.sh runs it before `cargo deb`, which packages the files.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out_dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example generate -- OUT_DIR");
        return ExitCode::from(64);
    };
    let out_dir = std::path::PathBuf::from(out_dir);
    match kaproxy::cli::generate::write_all(&out_dir) {
        Ok(paths) => {
            for path in paths {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot write into {}: {e}", out_dir.display());
            ExitCode::FAILURE
        }
    }
}
