//! The only unsafe code in kaproxy: TCP_INFO has no safe wrapper in socket2,
//! the registry refers to live sockets by descriptor number (a pair owns its
//! sockets and lends the registry nothing it could keep open), socket2 peeks
//! only into uninitialized buffers, and has no accept4 with SOCK_NONBLOCK;
//! tokio's AsyncFd registration.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};

/// A descriptor number the caller keeps open while this value is in use.
pub struct Borrowed(pub RawFd);

impl AsFd for Borrowed {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `Borrowed` is only made by `snapshot`, `addresses` and
        // `retune_fd`, whose caller (the pair registry) holds the pair's entry lock for the whole
        // call with the number still set; the pair clears it under that lock
        // before closing the socket, so the descriptor stays open and the
        // pair's own while this borrow lives.
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

/// recv(2) into `buf` with `flags`.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which is initialized
    // and outlives the call; the kernel writes at most `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// AsyncFd::register of a listener (tokio made it unsafe: the descriptor
/// must stay the registered one until the AsyncFd is dropped).
pub fn register(
    listener: std::net::TcpListener,
) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the AsyncFd takes ownership of the listener, which owns its
    // descriptor; nothing replaces or closes it while registered (the
    // accept loop only borrows it, and dropping the AsyncFd deregisters
    // before the listener closes).
    unsafe { tokio::io::unix::AsyncFd::register(listener) }.map_err(|e| e.into())
}

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC.
pub fn accept4(fd: RawFd) -> io::Result<(socket2::Socket, socket2::SockAddr)> {
    use std::os::fd::FromRawFd;
    // SAFETY: try_init hands accept4 storage and a length that describe a
    // sockaddr_storage; accept4 writes at most that length and updates it.
    let (new_fd, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let new_fd = libc::accept4(
                fd,
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if new_fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(new_fd)
            }
        })?
    };
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok((unsafe { socket2::Socket::from_raw_fd(new_fd) }, addr))
}

/// TCP_INFO and how many bytes of it the kernel filled in (older kernels fill less).
pub fn tcp_info(fd: RawFd) -> io::Result<(libc::tcp_info, usize)> {
    // SAFETY: tcp_info is plain old data; zeroes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the call;
    // the kernel writes at most `len` bytes. `fd` is open and the pair's own
    // (see `Borrowed`); a wrong number could only fail or read another
    // socket's counters, never write memory.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info, len as usize))
}
