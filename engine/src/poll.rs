//! Readiness primitives for the reactors and their tasks.
//!
//! - [`Epoll`]: a front end's reactor task drives its sockets with epoll in edge-triggered
//!   mode, waited on with a zero timeout from the reactor's loop (never blocking). One
//!   `epoll_wait` per loop iteration serves every socket of the reactor, so the system call is
//!   paid per batch of ready sockets, not per request. An idle reactor sleeps on the epoll
//!   descriptor itself, which is readable when any socket is.
//! - [`EventFd`]: a counter other threads bump to wake a sleeping reactor or hand a task work.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Readiness of one registered file descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
    /// Hang-up or error: the peer is gone or the socket failed; reading tells which.
    pub closed: bool,
}

/// An epoll instance. Registered descriptors are reported edge-triggered: a readiness is
/// reported once, and the owner reads or writes until `WouldBlock` before it is reported
/// again.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// An epoll instance reporting at most `capacity` events per wait.
    pub fn new(capacity: usize) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a negative return is an error.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
        })
    }

    fn control(&self, op: libc::c_int, fd: RawFd, token: u64, writable: bool) -> io::Result<()> {
        let mut flags = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
        if writable {
            flags |= libc::EPOLLOUT;
        }
        let mut event = libc::epoll_event {
            events: flags as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event for the duration of the call; the kernel
        // checks `fd` and reports a bad one as an error.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for reading (and writing when `writable`), reported with `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, writable: bool) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token, writable)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, false)
    }

    /// Collects the ready descriptors without waiting (`timeout_ms` 0) or up to `timeout_ms`.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<impl Iterator<Item = Event> + '_> {
        // SAFETY: `events` has `len` initialised entries the kernel may overwrite.
        let count = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                timeout_ms,
            )
        };
        let count = if count < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
            0
        } else {
            count as usize
        };
        Ok(self.events[..count].iter().map(|event| {
            let flags = event.events as libc::c_int;
            Event {
                token: event.u64,
                readable: flags & libc::EPOLLIN != 0,
                writable: flags & libc::EPOLLOUT != 0,
                closed: flags & (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) != 0,
            }
        }))
    }
}

impl AsFd for Epoll {
    /// Readable when any registered descriptor is ready: a sleeping reactor polls it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A counter other threads bump to wake a task (`eventfd`, non-blocking).
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a negative return is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Makes the descriptor readable (from any thread).
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) already wakes the
        // reader, so the result does not matter.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter after a wake-up.
    pub fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64; EAGAIN (nothing pending) is fine.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn reports_readable_sockets_and_eventfd_wakeups() {
        let mut epoll = Epoll::new(8).unwrap();
        let wake = EventFd::new().unwrap();
        epoll.add(wake.as_fd(), 7, false).unwrap();
        assert_eq!(epoll.wait(0).unwrap().count(), 0);
        wake.notify();
        let events: Vec<Event> = epoll.wait(0).unwrap().collect();
        assert_eq!(events.len(), 1);
        assert!(events[0].readable && events[0].token == 7);
        wake.clear();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        epoll.add(server.as_fd(), 42, true).unwrap();
        client.write_all(b"hello").unwrap();
        let events: Vec<Event> = epoll.wait(1000).unwrap().collect();
        assert!(events
            .iter()
            .any(|e| e.token == 42 && e.readable && e.writable));
        drop(client);
        let events: Vec<Event> = epoll.wait(1000).unwrap().collect();
        assert!(events.iter().any(|e| e.token == 42 && e.closed));
        epoll.delete(server.as_fd()).unwrap();
    }
}
