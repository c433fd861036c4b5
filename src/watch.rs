//! `kaproxy run --watch`: notices that the configuration file changed.
//!
//! Watches directories, not the file: an editor that saves by writing a new
//! file and renaming it over the old one, and the symlink swap of a mounted
//! Kubernetes ConfigMap (`..data` renamed to point at a new directory), both
//! replace the file, and a watch on the old file would see neither. The
//! directory of the path as given catches those; the directory the path
//! resolves to (through symlinks) catches an in-place write to the real file.
//! Any event there only says "look again": the caller compares the contents.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc;

/// Starts a thread that sends `()` whenever something may have changed the
/// file at `path`. The thread ends when the receiver is dropped.
pub fn spawn(path: &Path) -> io::Result<mpsc::Receiver<()>> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(io::Error::from)?;
    let mut watched = HashSet::new();
    let given = path.to_path_buf();
    add_watches(&inotify, &given, &mut watched)?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("kaproxy-watch".into())
        .spawn(move || loop {
            match inotify.read_events() {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "watching the configuration file failed; --watch no longer reloads (SIGHUP still does)");
                    return;
                }
            }
            // A swap may have moved the real file to another directory.
            if let Err(e) = add_watches(&inotify, &given, &mut watched) {
                tracing::warn!(error = %e, "cannot watch the configuration file's directory");
            }
            match tx.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        })?;
    Ok(rx)
}

/// Watches the directory of `path`, of what it resolves to, and of every
/// symlink on the way (a release directory swapped by a symlink, as
/// `/etc/kaproxy/current -> releases/7`, is replaced in the directory that
/// holds the link), once each.
fn add_watches(inotify: &Inotify, path: &Path, watched: &mut HashSet<PathBuf>) -> io::Result<()> {
    let mut dirs = vec![parent(path)];
    for ancestor in path.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        if std::fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            dirs.push(parent(ancestor));
        }
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        dirs.push(parent(&real));
    }
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    // The kernel drops the watch of a deleted directory (an old ConfigMap version).
    watched.retain(|d| d.exists());
    for dir in dirs {
        if watched.contains(&dir) {
            continue;
        }
        inotify.add_watch(&dir, flags).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display()))
        })?;
        watched.insert(dir);
    }
    Ok(())
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
