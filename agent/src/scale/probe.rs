//! Readiness probes: a TCP connect to each instance's address and service port, made from
//! inside the instance's own namespace (so neither the veth programs nor the quadrant's policy
//! decide it: the probe asks only whether something listens), all of a round at once with one
//! deadline. A UDP service is ready while its instance exists.

use std::{
    fs,
    net::SocketAddrV4,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sched::{CloneFlags, setns},
    sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, connect, getsockopt, socket, sockopt,
    },
};

use super::Instances;
use crate::{
    config::{Config, InstanceRef},
    loader::Dataplane,
};

/// How long a probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(100);

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The connect succeeded.
    Up,
    /// Refused (nothing listens) or failed otherwise.
    Refused,
    /// No answer within [`PROBE_TIMEOUT`].
    TimedOut,
}

/// The probe thread could not return to the host's network namespace: it must stop probing
/// (every later socket would be made in the wrong namespace).
#[derive(Debug)]
pub struct Stranded(Errno);

impl std::fmt::Display for Stranded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot return to the host's network namespace: {}",
            self.0
        )
    }
}

/// A non-blocking TCP socket made in instance `i`'s namespace, connecting to `to` (`None`: it
/// could not be made or the connect failed at once).
fn start(
    config: &Config,
    host_ns: &fs::File,
    i: InstanceRef,
    to: SocketAddrV4,
) -> Result<Option<OwnedFd>, Stranded> {
    let Ok(ns) = fs::File::open(format!("/run/netns/{}", config.instance_netns(i))) else {
        return Ok(None);
    };
    if setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
        return Ok(None);
    }
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    );
    // Back to the host's namespace before anything else: the socket stays in the instance's.
    setns(host_ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(Stranded)?;
    let Ok(fd) = fd else { return Ok(None) };
    Ok(match connect(fd.as_raw_fd(), &SockaddrIn::from(to)) {
        Ok(()) | Err(Errno::EINPROGRESS) => Some(fd),
        Err(_) => None,
    })
}

/// Probes every (service, instance) once and rewrites the load-balancing maps if any instance's
/// readiness changed. Runs on a thread of its own (it enters the instances' namespaces); an
/// error means that thread must stop.
pub fn probe_round(
    config: &Config,
    instances: &Instances,
    dataplane: &Mutex<Dataplane>,
) -> Result<(), Stranded> {
    let Ok(host_ns) = fs::File::open("/proc/thread-self/ns/net") else {
        return Ok(());
    };
    if let Ok(weights) = crate::daemon::locked(dataplane).lb_weights() {
        instances.reconcile(config, &weights);
    }
    let mut pending = Vec::new();
    let mut changed = false;
    for (n, s) in config.services.iter().enumerate() {
        let q = s.quadrant();
        for k in 0..instances.count(q) {
            let i = InstanceRef::new(q, k);
            if s.proto() != dataplane_common::policy::PROTO_TCP {
                changed |= instances.observe(n, i, Outcome::Up);
                continue;
            }
            let to = SocketAddrV4::new(config.instance_addr(i), s.port);
            match start(config, &host_ns, i, to)? {
                Some(fd) => pending.push((n, i, fd)),
                None => changed |= instances.observe(n, i, Outcome::Refused),
            }
        }
    }
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds: Vec<PollFd<'_>> = pending
            .iter()
            .map(|(_, _, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLOUT))
            .collect();
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let ready = poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0);
        let done: Vec<bool> = fds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready <= 0 {
            for (n, i, _) in pending.drain(..) {
                changed |= instances.observe(n, i, Outcome::TimedOut);
            }
            break;
        }
        let mut still = Vec::new();
        for ((n, i, fd), finished) in pending.into_iter().zip(done) {
            if !finished {
                still.push((n, i, fd));
                continue;
            }
            let outcome = match getsockopt(&fd, sockopt::SocketError) {
                Ok(0) => Outcome::Up,
                _ => Outcome::Refused,
            };
            changed |= instances.observe(n, i, outcome);
        }
        pending = still;
    }
    if changed {
        let mut dp = crate::daemon::locked(dataplane);
        if let Err(e) = instances.write_lb(config, &mut dp) {
            tracing::warn!(error = %e, "cannot write the load-balancing maps");
        }
    }
    Ok(())
}
