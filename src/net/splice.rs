//! Zero-copy relaying with splice(2) through a pipe: socket → pipe → socket moves
//! page references inside the kernel instead of copying every byte out to user
//! space and back, which is what lets a proxy keep up with a direct connection
//! on bulk transfers (HAProxy does the same on Linux).
//!
//! A pipe exists only while a direction is moving bulk data; it is closed as soon
//! as the source has nothing more to read, so idle pairs hold no pipe.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// Linux's pipe capacity when F_SETPIPE_SZ is not granted (16 pages).
const DEFAULT_PIPE_CAPACITY: usize = 64 * 1024;

/// Pipe capacity asked for: fewer, larger splices per burst. The kernel may
/// grant less (pipe-user-pages limits); the capacity it reports is used.
const PIPE_CAPACITY: usize = 1024 * 1024;

/// A non-blocking pipe and how many bytes sit in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    pub queued: usize,
    capacity: usize,
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

impl Pipe {
    /// A fresh empty pipe (O_NONBLOCK, O_CLOEXEC).
    pub fn new() -> io::Result<Pipe> {
        let (read, write) =
            nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // Best effort: a pipe of the default 64 KiB still works, just with more calls.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY as i32))
            .ok()
            .and_then(|c| usize::try_from(c).ok())
            .unwrap_or(DEFAULT_PIPE_CAPACITY);
        Ok(Pipe {
            read,
            write,
            queued: 0,
            capacity,
        })
    }

    /// Moves up to the pipe's free capacity from `socket` into the pipe; `Ok(0)` is end of stream.
    /// WouldBlock when the socket has nothing to read.
    pub fn fill_from<S: AsFd>(&mut self, socket: &S) -> io::Result<usize> {
        let n = splice(
            socket.as_fd(),
            None,
            self.write.as_fd(),
            None,
            self.capacity - self.queued,
            flags(),
        )
        .map_err(io::Error::from)?;
        self.queued += n;
        Ok(n)
    }

    /// Moves queued bytes from the pipe to `socket`; WouldBlock when its send buffer is full.
    pub fn drain_to<S: AsFd>(&mut self, socket: &S) -> io::Result<usize> {
        let n = splice(
            self.read.as_fd(),
            None,
            socket.as_fd(),
            None,
            self.queued,
            flags(),
        )
        .map_err(io::Error::from)?;
        self.queued -= n;
        Ok(n)
    }
}

/// splice(2) answers EINVAL for descriptors it cannot move data between; the
/// caller then copies through a buffer instead.
pub fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32)
}
