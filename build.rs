//! Build script: the git commit for `kaproxy --version` and the build_info metric.
//!
//! Sets `KAPROXY_GIT_COMMIT` to the short commit hash, from the first of:
//! 1. the `KAPROXY_GIT_COMMIT` environment variable (a build without `.git`,
//!    such as a container build whose context leaves it out, can pass it in);
//! 2. `git rev-parse --short HEAD`, when the package is the top of a git work
//!    tree (a linked worktree too). Uncommitted changes are not marked: telling
//!    them would take a rerun on every file change;
//! 3. `.cargo_vcs_info.json`, which `cargo package` writes into a crate tarball;
//! 4. `unknown`.
//!
//! It asks cargo to run it again only when HEAD moves: the files git changes
//! then (HEAD, the branch's ref, packed-refs), wherever the git directory is.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=KAPROXY_GIT_COMMIT");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = std::env::var("KAPROXY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().to_string())
        .or_else(|| from_git(&manifest_dir))
        .or_else(|| from_vcs_info(&manifest_dir))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=KAPROXY_GIT_COMMIT={commit}");
}

/// Runs git in `dir`; its trimmed stdout when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn from_git(dir: &Path) -> Option<String> {
    // A crate unpacked inside some other repository (a vendor directory) is
    // not that repository's commit: only the work tree whose top is this package counts.
    let top = PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--short", "HEAD"])?;
    // --git-path resolves a linked worktree's own HEAD and the shared refs.
    let mut watch = vec![git(dir, &["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(dir, &["rev-parse", "--git-path", &branch]));
    }
    watch.push(git(dir, &["rev-parse", "--git-path", "packed-refs"]));
    for path in watch.into_iter().flatten() {
        let path = dir.join(path);
        // A path that does not exist would make cargo rerun this script on every build.
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}

/// `{"git": {"sha1": "<40 hex>"}, ...}`, written by `cargo package`.
fn from_vcs_info(dir: &Path) -> Option<String> {
    let path = dir.join(".cargo_vcs_info.json");
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.find("\"sha1\"")? + "\"sha1\"".len()..];
    let start = rest.find('"')? + 1;
    let sha: String = rest[start..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    (sha.len() >= 7).then(|| sha[..7].to_string())
}
