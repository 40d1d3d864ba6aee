//! `lanes.tcp_acceleration: auto`: whether `sk_msg` wins on this host, measured when the agent
//! starts.
//!
//! A helper process (`quadrant accel-probe`, started by the agent inside a probe cgroup where
//! `sock_ops` runs) opens two loopback TCP connections. `sock_ops` records all four sockets in
//! `LANE_SOCKS`; the agent takes the second connection's two out again, so its messages never
//! meet `sk_msg` — the plain stack, the same path as with the acceleration off. The helper then
//! makes echo round trips on both, taking turns, so that a slower stretch of the machine falls
//! on both alike, and reports their medians and 99th percentiles. One thread holds both ends
//! of each connection, so no round trip waits for a wake-up. The acceleration stays on
//! only where it wins as `../shared/performance.md` requires: p50 at most 0.9× and p99 at most
//! 1.0× the stack's.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Round trips per connection.
pub const ROUNDS: u32 = 2000;
/// Round trips per connection before the measured ones.
const WARMUP: u32 = 200;
/// Bytes per message: a lane frame of a small request.
pub const BYTES: u32 = 1024;

/// Why the probe measured nothing (the acceleration then stays off).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

impl From<String> for ProbeError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// What the probe measured, and the decision.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct ProbeFigures {
    /// Measured round trips per connection.
    pub rounds: u32,
    /// Bytes per message each way.
    pub bytes: u32,
    /// Median round trip redirected by `sk_msg`, in nanoseconds.
    pub redirected_p50_ns: u64,
    /// 99th percentile redirected by `sk_msg`.
    pub redirected_p99_ns: u64,
    /// Median round trip through the TCP/IP stack.
    pub stack_p50_ns: u64,
    /// 99th percentile through the TCP/IP stack.
    pub stack_p99_ns: u64,
    /// Whether the acceleration was turned on.
    pub on: bool,
}

/// Whether redirected round trips win over the stack's: p50 at most 0.9×, p99 at most 1.0×
/// (and the stack was measured at all).
#[must_use]
pub const fn wins(
    redirected_p50: u64,
    redirected_p99: u64,
    stack_p50: u64,
    stack_p99: u64,
) -> bool {
    stack_p50 > 0
        && redirected_p50.saturating_mul(10) <= stack_p50.saturating_mul(9)
        && redirected_p99 <= stack_p99
}

/// The ports of the helper's two connections (client end, server end).
#[derive(Debug, Serialize, Deserialize)]
struct ProbePorts {
    /// The connection left in `LANE_SOCKS`.
    redirected: (u16, u16),
    /// The connection taken out of it.
    stack: (u16, u16),
}

/// The helper's answer, in nanoseconds.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeTimes {
    redirected_p50: u64,
    redirected_p99: u64,
    stack_p50: u64,
    stack_p99: u64,
}

fn pair(listener: &TcpListener) -> std::io::Result<(TcpStream, TcpStream)> {
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

fn port(addr: std::io::Result<SocketAddr>) -> std::io::Result<u16> {
    addr.map(|a| a.port())
}

/// One round trip on a connection whose both ends this thread holds: the message to the server
/// end and back. No thread waits for another, so the time is the two paths' own cost — what
/// differs between `sk_msg` and the stack — and not where the scheduler wakes a thread up
/// (which both pay alike in use, and which on a virtual machine varies by tens of
/// microseconds from one wake-up to the next).
fn round_trip(
    (client, server): &mut (TcpStream, TcpStream),
    buf: &mut [u8],
) -> std::io::Result<u64> {
    let t = Instant::now();
    client.write_all(buf)?;
    server.read_exact(buf)?;
    server.write_all(buf)?;
    client.read_exact(buf)?;
    Ok(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

fn percentile(sorted: &[u64], q: usize) -> u64 {
    sorted
        .get((sorted.len() * q / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The helper (`quadrant accel-probe`): prints its ports, waits for a line on stdin, measures,
/// prints the times. Runs inside the probe cgroup.
///
/// # Errors
/// A socket or the pipe to the agent failed.
pub fn run_helper() -> std::io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut redirected = pair(&listener)?;
    let mut stack = pair(&listener)?;
    let ports = ProbePorts {
        redirected: (
            port(redirected.0.local_addr())?,
            port(redirected.0.peer_addr())?,
        ),
        stack: (port(stack.0.local_addr())?, port(stack.0.peer_addr())?),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &ports).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()?;
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go)?;
    if go.trim() != "go" {
        return Err(std::io::Error::other(format!(
            "expected \"go\" from the agent, got {go:?}"
        )));
    }
    let mut buf = vec![0x5au8; BYTES as usize];
    let mut times = [
        Vec::with_capacity(ROUNDS as usize),
        Vec::with_capacity(ROUNDS as usize),
    ];
    for i in 0..WARMUP + ROUNDS {
        for (conn, t) in [&mut redirected, &mut stack].into_iter().zip(&mut times) {
            let ns = round_trip(conn, &mut buf)?;
            if i >= WARMUP {
                t.push(ns);
            }
        }
    }
    drop((redirected, stack));
    for t in &mut times {
        t.sort_unstable();
    }
    let [r, s] = &times;
    let result = ProbeTimes {
        redirected_p50: percentile(r, 50),
        redirected_p99: percentile(r, 99),
        stack_p50: percentile(s, 50),
        stack_p99: percentile(s, 99),
    };
    serde_json::to_writer(&mut out, &result).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// How long the helper may take in all.
const HELPER_PATIENCE: Duration = Duration::from_secs(30);

/// Runs the helper `bin accel-probe` in `cgroup` (where `sock_ops` runs). `lane_socks(ports,
/// remove)` says whether both ends of the loopback connection between `ports` (client, server)
/// are in `LANE_SOCKS`, and with `remove` takes them out.
///
/// # Errors
/// The helper could not run, `sock_ops` did not record its sockets, or its answer was not
/// understood; the message says which.
pub fn measure(
    bin: &Path,
    cgroup: &Path,
    mut lane_socks: impl FnMut((u16, u16), bool) -> Result<bool, ProbeError>,
) -> Result<ProbeFigures, ProbeError> {
    use std::os::unix::process::CommandExt as _;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(|e| format!("cannot open {}/cgroup.procs: {e}", cgroup.display()))?;
    let procs_fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    let mut cmd = Command::new(bin);
    cmd.arg("accel-probe")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs between fork and exec and only writes to a descriptor opened
    // before the fork (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process into the cgroup, before it opens any socket.
            if libc::write(procs_fd, c"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} accel-probe: {e}", bin.display()))?;
    drop(procs);
    let deadline = Instant::now() + HELPER_PATIENCE;
    let stdout = child.stdout.take();
    let (tx, rx) = std::sync::mpsc::channel();
    // A reader thread, so that a helper that hangs is given up on at the deadline.
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for l in BufReader::new(out).lines() {
                if tx.send(l).is_err() {
                    return;
                }
            }
        }
    });
    let result = (|| {
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| ProbeError("no stdin to the probe".into()))?;
        let line = || -> Result<String, ProbeError> {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => l.map_err(|e| format!("cannot read the probe: {e}").into()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(ProbeError(format!(
                    "the probe did not answer within {} s",
                    HELPER_PATIENCE.as_secs()
                ))),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    Err(ProbeError("the probe ended without an answer".to_owned()))
                }
            }
        };
        let ports: ProbePorts = serde_json::from_str(&line()?)
            .map_err(|e| format!("the probe's ports are not understood: {e}"))?;
        if !lane_socks(ports.redirected, false)? {
            return Err(ProbeError(
                "sock_ops did not record the probe's sockets in LANE_SOCKS".to_owned(),
            ));
        }
        if !lane_socks(ports.stack, true)? {
            return Err(ProbeError(
                "sock_ops did not record the probe's stack connection in LANE_SOCKS".to_owned(),
            ));
        }
        stdin
            .write_all(b"go\n")
            .map_err(|e| format!("cannot start the probe's round trips: {e}"))?;
        let times: ProbeTimes = serde_json::from_str(&line()?)
            .map_err(|e| format!("the probe's times are not understood: {e}"))?;
        Ok(times)
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for the probe: {e}"))?;
    let times = result?;
    if !status.success() {
        return Err(ProbeError(format!("the probe failed: {status}")));
    }
    Ok(ProbeFigures {
        rounds: ROUNDS,
        bytes: BYTES,
        on: wins(
            times.redirected_p50,
            times.redirected_p99,
            times.stack_p50,
            times.stack_p99,
        ),
        redirected_p50_ns: times.redirected_p50,
        redirected_p99_ns: times.redirected_p99,
        stack_p50_ns: times.stack_p50,
        stack_p99_ns: times.stack_p99,
    })
}

#[cfg(test)]
mod tests {
    use super::wins;

    #[test]
    fn the_acceleration_must_win_at_the_median_and_not_lose_at_the_tail() {
        // p50 0.9× and p99 1.0×: just enough.
        assert!(wins(900, 2000, 1000, 2000));
        // p50 0.91×.
        assert!(!wins(910, 1000, 1000, 2000));
        // Faster median, slower tail.
        assert!(!wins(500, 2001, 1000, 2000));
        // No measurement is no win.
        assert!(!wins(0, 0, 0, 0));
    }
}
