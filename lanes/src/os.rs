//! The operating-system pieces of a lane: sealed memfd mappings, eventfds, the shared-memory
//! lane's wake-ups and `SOCK_SEQPACKET` messages carrying file descriptors.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

/// Most descriptors one control message carries.
pub const MAX_FDS: usize = 4;
/// Largest control message.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

fn last_os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A new memfd of `len` bytes whose size is sealed: neither side can shrink it under the other's
/// mapping (which would turn reads into SIGBUS) or grow it.
pub fn sealed_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid C string; flags are constants.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(last_os_error("memfd_create"));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: plain syscalls on an owned descriptor.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), size) != 0 {
            return Err(last_os_error("ftruncate of the lane memory"));
        }
        if libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        ) != 0
        {
            return Err(last_os_error("sealing the lane memory"));
        }
    }
    Ok(fd)
}

/// A shared mapping of a lane memfd (memmap2's raw mapping: the peer writes the same memory
/// concurrently, so it is only ever reached through raw pointers, never as a Rust slice).
#[derive(Debug)]
pub struct Mapping {
    map: memmap2::MmapRaw,
}

impl Mapping {
    /// Maps `fd`, which must be a memfd of exactly `len` bytes sealed against shrinking.
    pub fn new(fd: &OwnedFd, len: usize, writable: bool) -> io::Result<Self> {
        // SAFETY: fstat/fcntl on a valid descriptor into a zeroed struct.
        let (size, seals) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &raw mut st) != 0 {
                return Err(last_os_error("fstat of the lane memory"));
            }
            (st.st_size, libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS))
        };
        if usize::try_from(size).ok() != Some(len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lane memory is {size} bytes, expected {len}"),
            ));
        }
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "lane memory is not sealed against shrinking",
            ));
        }
        // A shared mapping of a descriptor whose size was just checked and sealed.
        let options = {
            let mut o = memmap2::MmapOptions::new();
            o.len(len);
            o
        };
        let map = if writable {
            options.map_raw(fd.as_raw_fd())
        } else {
            options.map_raw_read_only(fd.as_raw_fd())
        }
        .map_err(|e| io::Error::new(e.kind(), format!("mmap of the lane memory: {e}")))?;
        Ok(Self { map })
    }

    /// Start of the mapping (page-aligned).
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }
}

/// A new eventfd (blocking reads, close-on-exec).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(last_os_error("eventfd"));
    }
    // SAFETY: fd was just created.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd, waking whoever sleeps on it.
pub fn notify(fd: RawFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer.
    let n = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(last_os_error("waking the lane peer"))
    }
}

/// Sleeps while the futex word `word` — in memory shared with other processes, so not a
/// private futex — holds `val`, at most `timeout`. `Ok(true)` if the time ran out; `Ok(false)`
/// if it was woken, interrupted, or the word held another value already.
pub fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    val: u32,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: the word is a live, aligned u32; the timespec outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            val,
            &raw const ts,
            0usize,
            0u32,
        )
    };
    if r == 0 {
        return Ok(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ETIMEDOUT) => Ok(true),
        Some(libc::EAGAIN | libc::EINTR) => Ok(false),
        _ => Err(last_os_error("sleeping on the lane's bell")),
    }
}

/// Wakes every process sleeping on the futex word `word` (shared memory).
pub fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: the word is a live, aligned u32; FUTEX_WAKE only reads its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// Marks side `side` of a lane gone and rings its peer's bell, so that a peer asleep on it
/// wakes and finds out (the broker, when the side's process ends or the lane is cut).
pub fn ring_gone(region: &crate::ring::Region, side: usize) {
    use std::sync::atomic::Ordering;
    region.gone(side).store(1, Ordering::SeqCst);
    let bell = region.bell(1 - side);
    bell.fetch_add(1, Ordering::SeqCst);
    futex_wake(bell);
}

/// Waits up to `timeout` for `sock` to accept a message; false on timeout.
pub fn wait_writable(sock: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one live pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How long a lane client waiting for the broker's answer stays on the CPU, yielding, before it
/// sleeps in the kernel (see [`yield_until_readable`]): `QUADRANT_LANE_CONTROL_YIELD_US`,
/// 300 µs unless set (0: sleep at once).
pub fn control_yield() -> std::time::Duration {
    static YIELD: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *YIELD.get_or_init(|| {
        let us = std::env::var("QUADRANT_LANE_CONTROL_YIELD_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        std::time::Duration::from_micros(us)
    })
}

/// Waits up to `budget` for `sock` to be readable (or hung up) by polling it without sleeping
/// and yielding the CPU in between: other runnable threads run, but the CPU never goes idle, so
/// an answer arriving within the budget costs no wake-up of an idle CPU (tens of microseconds on
/// a virtual machine). The caller then reads (sleeping in its blocking read if the budget ran
/// out first).
pub fn yield_until_readable(sock: RawFd, budget: std::time::Duration) {
    let start = std::time::Instant::now();
    let mut pfd = libc::pollfd {
        fd: sock,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one live pollfd, no waiting.
        if unsafe { libc::poll(&raw mut pfd, 1, 0) } != 0 || start.elapsed() >= budget {
            return;
        }
        std::thread::yield_now();
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| io::Error::other(format!("socketpair: {e}")))
}

/// A connected pair of `SOCK_STREAM` Unix sockets.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| io::Error::other(format!("socketpair: {e}")))
}

/// Sends one message with `fds` attached.
pub fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_with_fds_flags(sock, bytes, fds, false)
}

/// Sends one message with `fds` attached; with `dont_wait`, fails with `WouldBlock` instead of
/// waiting for room in the receiver's queue.
pub fn send_with_fds_flags(
    sock: RawFd,
    bytes: &[u8],
    fds: &[RawFd],
    dont_wait: bool,
) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if dont_wait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let n = sendmsg::<()>(sock, &iov, cmsgs, flags, None)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    if n == bytes.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "control message sent {n} of {} bytes",
            bytes.len()
        )))
    }
}

/// Receives one message and the descriptors attached to it. `Ok(None)` at end of stream.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => {}
            other => break other.map_err(|e| io::Error::from_raw_os_error(e as i32))?,
        }
    };
    let mut fds = Vec::new();
    for c in msg
        .cmsgs()
        .map_err(|e| io::Error::from_raw_os_error(e as i32))?
    {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control message carried more than {MAX_FDS} descriptors"),
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control message longer than {} bytes", buf.len()),
        ));
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((msg.bytes, fds)))
}

/// How the two ends of a shared-memory lane wake each other: through the lane's `SOCK_SEQPACKET`
/// pair (a one-byte message) for a peer that sleeps on it ([`crate::ring::FEATURE_DOORBELL`]),
/// or through the peer's eventfd for an end built before. A sleeping end waits in one `poll` on
/// its end of the pair and its own eventfd, which also reports the peer's hang-up.
///
/// The socket is the point: a Unix socket wakes its reader as a *synchronous* wake-up (the
/// waker is about to wait), so the scheduler runs the woken end on the waker's CPU at once, as
/// it does for a Unix-socket lane; an eventfd or `io_uring` completion wakes it as an ordinary
/// one, which may preempt the waker or rouse an idle CPU. (An `io_uring` sleeper — eventfd read
/// and hang-up poll in one `io_uring_enter` — was measured against this `poll`: no faster at
/// any pacing, so the lane does without it.) Ends that both ring bells ([`futex_wait`],
/// [`crate::ring::FEATURE_BELL`]) sleep on the bell first and come here only after it: in
/// alternating runs a futex woke the sleeping end sooner than this socket did.
#[derive(Debug)]
pub struct Waker {
    sock: OwnedFd,
    own_efd: OwnedFd,
    peer_efd: OwnedFd,
    peer_gone: bool,
}

impl Waker {
    /// The waker on this end's socket `sock`, eventfd `own_efd`, and the peer's `peer_efd`.
    #[must_use]
    pub fn new(sock: OwnedFd, own_efd: OwnedFd, peer_efd: OwnedFd) -> Self {
        Self {
            sock,
            own_efd,
            peer_efd,
            peer_gone: false,
        }
    }

    /// Whether the peer's end hung up.
    #[must_use]
    pub fn peer_gone(&self) -> bool {
        self.peer_gone
    }

    /// Wakes the peer: by the doorbell if it sleeps on the socket, else by its eventfd. A full
    /// socket means wake-ups are pending already; a peer that is gone is found by the next
    /// [`Self::sleep`].
    pub fn wake(&self, doorbell: bool) -> io::Result<()> {
        if !doorbell {
            return notify(self.peer_efd.as_raw_fd());
        }
        // SAFETY: sends one byte from a live buffer.
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                [1u8].as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN | libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) => Ok(()),
            _ => Err(last_os_error("waking the lane peer")),
        }
    }

    /// Sleeps until woken (either way), the peer hangs up or `timeout` passes (`None`: no
    /// limit). `doorbell`: the peer wakes this end only through the socket
    /// ([`crate::ring::FEATURE_DOORBELL`]); with no timeout too, the sleep is one `recv` that
    /// takes one ring, else a `poll` on both after which every pending wake-up is taken.
    pub fn sleep(
        &mut self,
        timeout: Option<std::time::Duration>,
        doorbell: bool,
    ) -> io::Result<()> {
        if self.peer_gone {
            return Ok(());
        }
        if doorbell && timeout.is_none() {
            return self.sleep_on_socket();
        }
        let mut fds = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: self.own_efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // Rounded up, so a short timeout sleeps rather than spins.
            let ms = timeout.map_or(-1, |t| {
                i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            });
            // SAFETY: two live pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            self.peer_gone = true;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            self.drain_socket();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut count = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer; the eventfd is readable (POLLIN), so
            // this does not block.
            let _ = unsafe { libc::read(self.own_efd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        }
        Ok(())
    }

    /// Sleeps in one `recv` on the socket, which takes the ring that ends it (a ring left
    /// over from an earlier wake-up ends the next sleep at once: a spurious wake-up, the ring
    /// being the truth) or sees the peer's hang-up — a syscall where `poll` then `recv` take
    /// two or three.
    fn sleep_on_socket(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: receives into a live buffer.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                return Ok(());
            }
            if n == 0 {
                self.peer_gone = true;
                return Ok(());
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN) => {
                    self.peer_gone = true;
                    return Ok(());
                }
                _ => return Err(last_os_error("sleeping on the lane")),
            }
        }
    }

    /// Takes every pending doorbell ring without waiting.
    fn drain_socket(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: receives into a live buffer.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
        }
    }
}
