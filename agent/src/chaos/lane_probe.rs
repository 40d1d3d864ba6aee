//! The steady state over RTT lanes: every quadrant's experiment echo also offers the lane
//! service `chaos-echo` (and accepts TCP + mTLS lanes on [`LANE_TCP_PORT`]); a prober in the
//! same quadrant keeps one lane open per transport — shared memory, Unix socket, TCP + mTLS —
//! and sends a request on it at a fixed rate, each awaited up to the timeout. A lane that
//! failed or timed out is dropped and opened again at the next request, so an outage shows as
//! unanswered requests and recovery as answered ones.

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use quadrant_lanes::{Lane, LaneClient, LaneListener, TransportChoice, Workers};

use crate::breakers::monotonic_ns;

/// The lane service every experiment echo offers.
pub const LANE_SERVICE: &str = "chaos-echo";
/// Its TCP + mTLS port.
pub const LANE_TCP_PORT: u16 = 7_392;
/// The transports probed.
pub const TRANSPORTS: [(&str, TransportChoice); 3] = [
    ("shm", TransportChoice::Shm),
    ("uds", TransportChoice::Uds),
    ("tcp", TransportChoice::Tcp),
];

/// Offers [`LANE_SERVICE`] in this process's quadrant and echoes every message of every lane,
/// one thread per lane. A broker that refuses the service (no lanes for this quadrant) is
/// reported on stderr; the datagram echo goes on.
pub fn offer() {
    let mut listener = match LaneListener::listen(None, LANE_SERVICE, Some(LANE_TCP_PORT)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("quadrant chaos echo: no lane service: {e}");
            return;
        }
    };
    std::thread::spawn(move || {
        // A thread whose lane ended serves the next one (the probes open lanes all the time).
        let workers = Workers::new("lane-echo", Duration::from_secs(10));
        while let Ok(mut lane) = listener.accept() {
            let served = workers.spawn(move || {
                let mut buf = Vec::new();
                while lane.recv(&mut buf).unwrap_or(false) {
                    if lane.send(&buf).is_err() {
                        break;
                    }
                }
            });
            if let Err(e) = served {
                eprintln!("quadrant chaos echo: cannot serve a lane: {e}");
            }
        }
    });
}

/// One request on `lane`, answered (and the same bytes) before `deadline`.
fn round_trip(lane: &mut Lane, n: u64, deadline: Instant) -> bool {
    let msg = n.to_ne_bytes();
    let mut reply = Vec::new();
    lane.send(&msg).is_ok()
        && lane.recv_until(&mut reply, deadline).unwrap_or(false)
        && reply == msg
}

/// `quadrant chaos lane-probe [--fresh] Q TRANSPORT RATE TIMEOUT_MS` (inside quadrant `q`): a
/// request on a lane of `transport` to `q`'s [`LANE_SERVICE`] every `1/rate` s, printing
/// `SENT_NS RTT_NS` or `SENT_NS -`, until killed; with `fresh`, on a new lane each time (each
/// request then includes the broker's decision).
///
/// # Errors
/// An unknown transport, or standard output gone.
pub fn probe_lines(
    (q, transport, fresh): (&str, &str, bool),
    rate: u32,
    timeout: Duration,
) -> std::io::Result<()> {
    let choice = TRANSPORTS
        .iter()
        .find(|(name, _)| *name == transport)
        .map(|(_, c)| *c)
        .ok_or_else(|| std::io::Error::other(format!("unknown transport {transport:?}")))?;
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let period = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut client = LaneClient::connect(None).ok();
    // The first lane opened before the first request: the baseline is the lane's round trip,
    // not its opening; a lane opened again after a failure counts in its request's time.
    let mut lane = client
        .as_mut()
        .and_then(|c| c.open(q, LANE_SERVICE, choice).ok());
    for n in 0u32.. {
        std::thread::sleep((start + period * n).saturating_duration_since(Instant::now()));
        let sent = monotonic_ns();
        let deadline = Instant::now() + timeout;
        if lane.is_none() {
            if client.is_none() {
                client = LaneClient::connect(None).ok();
            }
            lane = client
                .as_mut()
                .and_then(|c| c.open(q, LANE_SERVICE, choice).ok());
            if lane.is_none() {
                client = None;
            }
        }
        let ok = lane
            .as_mut()
            .is_some_and(|l| round_trip(l, u64::from(n), deadline))
            && Instant::now() <= deadline;
        if fresh {
            lane = None;
        }
        if ok {
            writeln!(out, "{sent} {}", monotonic_ns() - sent)?;
        } else {
            lane = None;
            writeln!(out, "{sent} -")?;
        }
        out.flush()?;
    }
    Ok(())
}
