//! Running a chaos experiment: an echo in every quadrant (this binary, `quadrant chaos echo`,
//! started with `quadrant exec`), fixed-rate UDP probes from the host to each, the faults armed
//! for the fault window (they end with it by themselves, whatever happens to this process), the
//! safeguards checked every second, and per quadrant and window: sent, answered, availability,
//! p50/p99/p99.9. Verdict: every non-target quadrant keeps its availability and p99 during the
//! fault (a breach is a cascade), every fault hit traffic, and the targets answer every request
//! again within the recovery bound.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::BufRead as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use serde::{Deserialize, Serialize};

use super::{Action, ChaosError, Experiment, FaultSpec, FaultStatus, Faults};
use crate::{breakers::monotonic_ns, config::Config};

/// The UDP port of the echoes the experiment starts in the quadrants.
pub const ECHO_PORT: u16 = 7_391;
/// The workload (cgroup) an experiment's echo runs as.
const ECHO_WORKLOAD: &str = "chaos-echo";
/// The most requests per second each lane probe sends (18 of them run: four quadrants to their
/// own service and two gateways to their backends, three transports each).
const LANE_PROBE_RATE: u32 = 20;
/// The fewest answered requests in a window (baseline and fault) whose p99 is judged.
const MIN_P99_ANSWERS: u64 = 100;
/// The lanes probed across quadrants, client then service: each gateway to the quadrant behind
/// it, as the default lane rules allow.
const CROSS_LANES: [(Quadrant, Quadrant); 2] =
    [(Quadrant::Dg, Quadrant::Dx), (Quadrant::Pg, Quadrant::Px)];

/// One window of one quadrant's probes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WindowStats {
    /// Requests sent.
    pub sent: u64,
    /// Answered within the timeout.
    pub answered: u64,
    /// answered / sent.
    pub availability: f64,
    /// Round trips of the answered ones, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
}

/// One quadrant in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuadrantReport {
    /// Its name.
    pub quadrant: String,
    /// A target of the faults.
    pub target: bool,
    /// Before the faults.
    pub baseline: WindowStats,
    /// With them.
    pub fault: WindowStats,
    /// After them.
    pub recovery: WindowStats,
    /// For a target: seconds from the faults' end to the first second it answered every request
    /// (none: not within the recovery window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_after_secs: Option<f64>,
    /// Requests over one TCP connection from the host to its echo (opened again after a
    /// failure), at the lane probes' rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Windows3>,
    /// Its lane probes: requests over each lane transport to its own lane service and, for a
    /// gateway, to the lane service of the quadrant behind it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<LaneReport>,
    /// What it breached, if anything.
    pub breaches: Vec<String>,
}

/// A probe's three windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Windows3 {
    /// Before the faults.
    pub baseline: WindowStats,
    /// With them.
    pub fault: WindowStats,
    /// After them.
    pub recovery: WindowStats,
}

impl Windows3 {
    fn of(samples: &[(u64, Option<u64>)], spans: &Spans) -> Self {
        let (baseline, fault, recovery) = spans.windows(samples);
        Self {
            baseline,
            fault,
            recovery,
        }
    }
}

/// A run's three windows on the monotonic clock, ns, each `[from, to)`. The milliseconds in
/// which the faults are being armed or removed belong to none: a request sent then meets a fault
/// that is only half there.
#[derive(Debug, Clone, Copy)]
struct Spans {
    baseline: (u64, u64),
    fault: (u64, u64),
    recovery: (u64, u64),
}

impl Spans {
    fn windows(&self, samples: &[(u64, Option<u64>)]) -> (WindowStats, WindowStats, WindowStats) {
        let w = |(from, to): (u64, u64)| window(samples, from, to);
        (w(self.baseline), w(self.fault), w(self.recovery))
    }
}

/// What the probes saw: the host's UDP samples, each quadrant's lanes and its TCP probe.
type Observed<'a> = (
    &'a BTreeMap<Quadrant, Samples>,
    BTreeMap<Quadrant, Vec<LaneReport>>,
    BTreeMap<Quadrant, Windows3>,
);

/// One quadrant's lane probe over one transport, per window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LaneReport {
    /// `shm`, `uds` or `tcp`.
    pub transport: String,
    /// The quadrant whose lane service it calls: its own, or (from a gateway) the quadrant
    /// behind it. A lane to a target is the fault's effect on its callers, reported but not
    /// judged.
    pub service: String,
    /// Before the faults.
    pub baseline: WindowStats,
    /// With them.
    pub fault: WindowStats,
    /// After them.
    pub recovery: WindowStats,
}

impl LaneReport {
    /// How a breach or the table names it: `lanes over shm: `, `lanes to dx over shm: `.
    fn what(&self, from: Quadrant) -> String {
        if self.service == from.name() {
            format!("lanes over {}: ", self.transport)
        } else {
            format!("lanes to {} over {}: ", self.service, self.transport)
        }
    }
}

/// A fault's measured effect: probes from its source quadrant to the echo of its destination
/// (or, for `any`, the quadrant paired with the source: dx with dg, px with pg), one new socket
/// per request so that refused connects count too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EffectReport {
    /// Probing quadrant.
    pub from: String,
    /// Probed quadrant.
    pub to: String,
    /// Before the faults.
    pub baseline: WindowStats,
    /// With them.
    pub fault: WindowStats,
    /// After them.
    pub recovery: WindowStats,
}

/// `quadrant chaos run`'s report (schema: `manifests/schemas/chaos-report.schema.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Report {
    /// The experiment's title.
    pub title: String,
    /// `passed`, `failed` or `aborted`.
    pub verdict: String,
    /// Why, one line each.
    pub reasons: Vec<String>,
    /// Non-target quadrants that breached their tolerances during the fault (0 allowed).
    pub cascades: u32,
    /// Per quadrant.
    pub quadrants: Vec<QuadrantReport>,
    /// The faults' measured effects.
    pub effects: Vec<EffectReport>,
    /// The faults as the dataplane counted them at the end of the fault window.
    pub faults: Vec<FaultStatus>,
    /// With `kill_agent`: milliseconds from the kill until the next agent answered on its
    /// control socket (absent when a service manager restarts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_back_after_ms: Option<f64>,
    /// The experiment's rollbacks, in the order taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollbacks: Vec<super::rollback::RollbackReport>,
}

/// One probe: when it was sent (monotonic ns) and its round trip if answered.
type Samples = Arc<Mutex<Vec<(u64, Option<u64>)>>>;

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `quadrant chaos echo`: answers every datagram on `ECHO_PORT` (inside a quadrant).
///
/// # Errors
/// When the port cannot be bound.
pub fn echo() -> std::io::Result<()> {
    if !tied_to_parent() {
        return Ok(());
    }
    let s = UdpSocket::bind(("0.0.0.0", ECHO_PORT))?;
    let tcp = TcpListener::bind(("0.0.0.0", ECHO_PORT))?;
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 8];
                while conn.read_exact(&mut buf).is_ok() && conn.write_all(&buf).is_ok() {}
            });
        }
    });
    super::lane_probe::offer();
    println!("listening");
    let mut buf = [0u8; 64];
    loop {
        let (n, peer) = s.recv_from(&mut buf)?;
        let _ = s.send_to(&buf[..n], peer);
    }
}

/// `quadrant chaos probe`: from inside a quadrant, a request to `to` every `1/rate` s, each on
/// a new socket and awaited up to `timeout`; one line per request, `SENT_NS RTT_NS` or
/// `SENT_NS -` (monotonic clock), until killed.
///
/// # Errors
/// When standard output is gone.
pub fn probe_lines(to: SocketAddr, rate: u32, timeout: Duration) -> std::io::Result<()> {
    if !tied_to_parent() {
        return Ok(());
    }
    let period = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    for n in 0u32.. {
        std::thread::sleep((start + period * n).saturating_duration_since(Instant::now()));
        let sent = monotonic_ns();
        let answered = (|| -> std::io::Result<bool> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            s.set_read_timeout(Some(timeout))?;
            s.send(&n.to_ne_bytes())?;
            let mut buf = [0u8; 8];
            let got = s.recv(&mut buf)?;
            Ok(buf[..got] == n.to_ne_bytes())
        })()
        .unwrap_or(false);
        if answered {
            writeln!(out, "{sent} {}", monotonic_ns() - sent)?;
        } else {
            writeln!(out, "{sent} -")?;
        }
        out.flush()?;
    }
    Ok(())
}

/// The quadrant a fault from `q` to `any` is probed against: its environment's other one.
fn partner(q: Quadrant) -> Quadrant {
    match q {
        Quadrant::Dx => Quadrant::Dg,
        Quadrant::Dg => Quadrant::Dx,
        Quadrant::Px => Quadrant::Pg,
        Quadrant::Pg => Quadrant::Px,
    }
}

/// What an effect probe asks: another quadrant's echo, or its own quadrant's Workload API.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Probed {
    Echo(Quadrant),
    Identity,
    /// The lane service of a quadrant (its own, or across) over a transport.
    Lanes(Quadrant, &'static str),
    /// Its own lane service, a new Unix-socket lane for each request (every request asks the
    /// broker for a decision).
    LaneOpens,
}

impl Probed {
    fn name(self) -> &'static str {
        match self {
            Self::Echo(q) => q.name(),
            Self::Identity => "identity",
            Self::Lanes(_, t) => t,
            Self::LaneOpens => "lane-opens",
        }
    }
}

/// An effect probe: the child prober and what it reported.
struct EffectProbe {
    from: Quadrant,
    to: Probed,
    samples: Samples,
    child: Child,
}

fn start_effect_probe(
    config: &Config,
    config_path: Option<&std::path::Path>,
    (from, to): (Quadrant, Probed),
    (rate, timeout_ms): (u32, u32),
) -> Result<EffectProbe, ChaosError> {
    let me = std::env::current_exe().map_err(|e| ChaosError::Sys(e.to_string()))?;
    let mut c = Command::new(&me);
    if let Some(p) = config_path {
        c.arg("--config").arg(p);
    }
    c.args(["exec", from.name(), "--workload", "chaos-probe", "--"])
        .arg(&me)
        .arg("chaos");
    match to {
        Probed::Echo(q) => {
            c.arg("probe")
                .arg(SocketAddr::from((config.addrs(q).workload, ECHO_PORT)).to_string());
        }
        Probed::Identity => {
            c.arg("identity-probe");
        }
        Probed::Lanes(service, t) => {
            c.args(["lane-probe", service.name(), t]);
        }
        Probed::LaneOpens => {
            c.args(["lane-probe", "--fresh", from.name(), "uds"]);
        }
    }
    let mut child = c
        .args([&rate.to_string(), &timeout_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| ChaosError::Sys(format!("cannot start the probe in {}: {e}", from.name())))?;
    let samples: Samples = Arc::default();
    if let Some(stdout) = child.stdout.take() {
        let samples = Arc::clone(&samples);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut parts = line.split(' ');
                let (Some(Ok(sent)), Some(rtt)) =
                    (parts.next().map(str::parse::<u64>), parts.next())
                else {
                    continue;
                };
                locked(&samples).push((sent, rtt.parse().ok()));
            }
        });
    }
    Ok(EffectProbe {
        from,
        to,
        samples,
        child,
    })
}

/// Makes this process (an experiment's echo or probe, `quadrant exec` having become it) die
/// with the controller that started it, so a killed controller leaves none behind; `false` if
/// the controller is gone already.
fn tied_to_parent() -> bool {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    nix::unistd::getppid() != nix::unistd::Pid::from_raw(1)
}

/// The echoes, killed when dropped.
struct Echoes(Vec<Child>);

impl Drop for Echoes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_echoes(config_path: Option<&std::path::Path>) -> Result<Echoes, ChaosError> {
    let mut echoes = Echoes(Vec::new());
    for q in Quadrant::ALL {
        echoes.0.push(start_echo(config_path, q)?);
    }
    Ok(echoes)
}

/// The echo of quadrant `q`, once it listens.
fn start_echo(config_path: Option<&std::path::Path>, q: Quadrant) -> Result<Child, ChaosError> {
    let me = std::env::current_exe().map_err(|e| ChaosError::Sys(e.to_string()))?;
    let mut c = Command::new(&me);
    if let Some(p) = config_path {
        c.arg("--config").arg(p);
    }
    let mut child = c
        .args(["exec", q.name(), "--workload", ECHO_WORKLOAD, "--"])
        .arg(&me)
        .args(["chaos", "echo"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| ChaosError::Sys(format!("cannot start the echo in {}: {e}", q.name())))?;
    let mut line = String::new();
    child
        .stdout
        .take()
        .map(std::io::BufReader::new)
        .and_then(|mut r| r.read_line(&mut line).ok());
    if line.trim() != "listening" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ChaosError::Sys(format!(
            "the echo in {} did not start (port {ECHO_PORT} taken?)",
            q.name()
        )));
    }
    Ok(child)
}

/// Sends to `to` at `rate` per second until `stop`, recording every request.
fn probe(
    to: SocketAddr,
    rate: u32,
    timeout: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<(Samples, Vec<std::thread::JoinHandle<()>>), ChaosError> {
    let s = Arc::new(UdpSocket::bind("0.0.0.0:0").map_err(|e| ChaosError::Sys(e.to_string()))?);
    s.connect(to).map_err(|e| ChaosError::Sys(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| ChaosError::Sys(e.to_string()))?;
    let samples: Samples = Arc::default();
    let receiver = {
        let (s, samples, stop) = (Arc::clone(&s), Arc::clone(&samples), Arc::clone(stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            // Answers arriving after the timeout count as lost; the sender stops first.
            while !stop.load(Ordering::Relaxed) {
                if let Ok(8) = s.recv(&mut buf) {
                    let now = monotonic_ns();
                    let i = usize::try_from(u64::from_ne_bytes(buf)).unwrap_or(usize::MAX);
                    if let Some(entry) = locked(&samples).get_mut(i) {
                        let rtt = now.saturating_sub(entry.0);
                        if rtt <= u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX) {
                            entry.1 = Some(rtt);
                        }
                    }
                }
            }
        })
    };
    let sender = {
        let (samples, stop) = (Arc::clone(&samples), Arc::clone(stop));
        let period = Duration::from_secs(1) / rate.max(1);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n: u32 = 0;
            while !stop.load(Ordering::Relaxed) {
                let due = start + period * n;
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let i = {
                    let mut log = locked(&samples);
                    log.push((monotonic_ns(), None));
                    log.len() as u64 - 1
                };
                let _ = s.send(&i.to_ne_bytes());
                n += 1;
            }
        })
    };
    Ok((samples, vec![sender, receiver]))
}

/// A request every `1/rate` s over one TCP connection to `to` (connected again at the next
/// request after any failure), each awaited up to `timeout`.
fn tcp_probe(
    to: SocketAddr,
    rate: u32,
    timeout: Duration,
    stop: &Arc<AtomicBool>,
) -> (Samples, std::thread::JoinHandle<()>) {
    let samples: Samples = Arc::default();
    let thread = {
        let (samples, stop) = (Arc::clone(&samples), Arc::clone(stop));
        let period = Duration::from_secs(1) / rate.max(1);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut conn: Option<TcpStream> = None;
            let limit = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            for n in 0u32.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep((start + period * n).saturating_duration_since(Instant::now()));
                let sent = monotonic_ns();
                let i = {
                    let mut log = locked(&samples);
                    log.push((sent, None));
                    log.len() - 1
                };
                if conn.is_none() {
                    conn = TcpStream::connect_timeout(&to, timeout).ok().filter(|c| {
                        c.set_nodelay(true).is_ok() && c.set_read_timeout(Some(timeout)).is_ok()
                    });
                }
                let msg = u64::from(n).to_ne_bytes();
                let mut reply = [0u8; 8];
                let answered = conn.as_mut().is_some_and(|c| {
                    c.write_all(&msg).is_ok() && c.read_exact(&mut reply).is_ok() && reply == msg
                });
                let rtt = monotonic_ns().saturating_sub(sent);
                if answered && rtt <= limit {
                    locked(&samples)[i].1 = Some(rtt);
                } else {
                    // A late answer would be read as the next one's: start over.
                    conn = None;
                }
            }
        })
    };
    (samples, thread)
}

fn window(samples: &[(u64, Option<u64>)], from: u64, to: u64) -> WindowStats {
    let mut rtts: Vec<u64> = Vec::new();
    let mut sent = 0;
    for (_, rtt) in samples.iter().filter(|(at, _)| (from..to).contains(at)) {
        sent += 1;
        if let Some(r) = rtt {
            rtts.push(*r);
        }
    }
    rtts.sort_unstable();
    #[expect(clippy::cast_precision_loss, reason = "ratios and milliseconds")]
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "an index into the sorted round trips"
        )]
        let i = (q * rtts.len().saturating_sub(1) as f64).round() as usize;
        rtts.get(i).map_or(0.0, |r| *r as f64 / 1e6)
    };
    #[expect(clippy::cast_precision_loss, reason = "a ratio")]
    let availability = if sent == 0 {
        0.0
    } else {
        rtts.len() as f64 / sent as f64
    };
    WindowStats {
        sent,
        answered: rtts.len() as u64,
        availability,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
    }
}

/// The first second (from `from`, stepping 100 ms) whose requests were all answered: seconds
/// after `from`.
fn recovered(samples: &[(u64, Option<u64>)], from: u64, until: u64) -> Option<f64> {
    let mut t = from;
    while t + 1_000_000_000 <= until {
        let w: Vec<_> = samples
            .iter()
            .filter(|(at, _)| (t..t + 1_000_000_000).contains(at))
            .collect();
        if !w.is_empty() && w.iter().all(|(_, r)| r.is_some()) {
            #[expect(clippy::cast_precision_loss, reason = "seconds")]
            return Some((t - from) as f64 / 1e9);
        }
        t += 100_000_000;
    }
    None
}

/// The effect probes of `exp`'s faults: from each fault's source quadrant to its destination
/// (or the source's partner for `any`), and back for `both_ways`.
fn start_effect_probes(
    config: &Config,
    config_path: Option<&std::path::Path>,
    exp: &Experiment,
) -> Result<Vec<EffectProbe>, ChaosError> {
    let ss = exp.steady_state;
    let mut effects: Vec<EffectProbe> = Vec::new();
    for m in &exp.method {
        let own = match m.action {
            Action::IdentityOutage => Some(Probed::Identity),
            Action::PolicyOutage => Some(Probed::LaneOpens),
            _ => None,
        };
        if let Some(probed) = own
            && let Some(q) = Quadrant::from_name(&m.to)
        {
            effects.push(start_effect_probe(
                config,
                config_path,
                (q, probed),
                (ss.rate_per_sec.min(LANE_PROBE_RATE), ss.timeout_ms),
            )?);
            continue;
        }
        let Some(from) = Quadrant::from_name(&m.from) else {
            continue;
        };
        let to = Quadrant::from_name(&m.to).unwrap_or_else(|| partner(from));
        let mut pairs = vec![(from, Probed::Echo(to)), (to, Probed::Echo(from))];
        if !m.both_ways {
            pairs.pop();
        }
        for pair in pairs {
            if !effects.iter().any(|e| (e.from, e.to) == pair) {
                effects.push(start_effect_probe(
                    config,
                    config_path,
                    pair,
                    (ss.rate_per_sec, ss.timeout_ms),
                )?);
            }
        }
    }
    Ok(effects)
}

/// Checks the safeguards every 200 ms until `fault_end`: the last whole second of each
/// non-target quadrant (its answers have had the timeout to arrive). Why it aborted, if it did.
fn watch_safeguards(
    exp: &Experiment,
    targets: &[Quadrant],
    probes: &BTreeMap<Quadrant, Samples>,
    (t1, fault_end): (u64, u64),
    timeout: Duration,
) -> Option<String> {
    while monotonic_ns() < fault_end {
        std::thread::sleep(Duration::from_millis(200).min(Duration::from_nanos(
            fault_end.saturating_sub(monotonic_ns()),
        )));
        let now = monotonic_ns();
        let until = now.saturating_sub(u64::try_from(timeout.as_nanos()).unwrap_or(0));
        if until < t1 + 1_000_000_000 {
            continue;
        }
        for q in Quadrant::ALL.iter().filter(|q| !targets.contains(q)) {
            let w = window(&locked(&probes[q]), until - 1_000_000_000, until);
            if w.sent > 0 && w.availability < exp.safeguards.abort_below_availability {
                return Some(format!(
                    "safeguard: {} answered {:.1} % of the last second's requests (abort below \
                     {:.1} %); every fault removed",
                    q.name(),
                    w.availability * 100.0,
                    exp.safeguards.abort_below_availability * 100.0
                ));
            }
        }
    }
    None
}

/// Runs `exp` against `config`'s dataplane (`config_path`: the file the echoes' `quadrant exec`
/// is given). With `dry_run`, validates and prints the plan only.
///
/// # Errors
/// The maps, the echoes, or arming a fault; a failed verdict is a report, not an error.
pub fn run(
    config: &Config,
    config_path: Option<&std::path::Path>,
    exp: &Experiment,
) -> Result<Report, ChaosError> {
    let targets = exp.target_quadrants()?;
    super::require_enabled(config)?;
    let mut faults = Faults::open(&config.bpffs_dir())?;
    let mut echoes = start_echoes(config_path)?;
    let ss = exp.steady_state;
    let timeout = Duration::from_millis(u64::from(ss.timeout_ms));
    let stop = Arc::new(AtomicBool::new(false));
    let (probes, tcp_probes, threads) = start_host_probes(config, &ss, timeout, &stop)?;
    let effects = start_effect_probes(config, config_path, exp)?;
    let lane_probes = start_lane_probes(config, config_path, &ss)?;
    wait_for_probes([&probes, &tcp_probes], [&effects, &lane_probes]);
    let secs = |s: u64| Duration::from_secs(s);
    let t0 = monotonic_ns();
    std::thread::sleep(secs(exp.windows.baseline_secs));
    // Armed for exactly the fault window: they end by themselves if this process dies.
    let t1 = monotonic_ns();
    let mut entries = Vec::new();
    for f in exp.faults() {
        entries.extend(f.entries(true, t1)?);
    }
    super::require_reset_support(config, &entries)?;
    for f in exp.faults() {
        super::prepare_delay(config, &f)?;
    }
    faults.arm(&entries, t1)?;
    let mut process = ProcessFaults::arm(config, config_path, exp)?;
    let armed = monotonic_ns();
    let fault_end = t1 + exp.windows.fault_secs * 1_000_000_000;
    let aborted = watch_safeguards(exp, &targets, &probes, (t1, fault_end), timeout);
    let now = monotonic_ns();
    let disarmed = now.min(fault_end);
    let mut fault_status = faults.status(now);
    // Removed now (they would end by themselves at fault_end anyway).
    for (k, _) in &entries {
        faults.remove(k)?;
    }
    fault_status.extend(process.end(config, now)?);
    // A killed quadrant's echo (this run's stand-in for its service) comes back at the end of
    // the fault window.
    for t in &process.killed {
        if t.workload.as_deref().is_some_and(|w| w != ECHO_WORKLOAD) {
            continue;
        }
        let i = Quadrant::ALL
            .iter()
            .position(|a| *a == t.quadrant)
            .unwrap_or(0);
        let _ = echoes.0[i].wait();
        echoes.0[i] = start_echo(config_path, t.quadrant)?;
    }
    let t2 = monotonic_ns().min(fault_end);
    let rollbacks: Vec<_> = exp
        .rollbacks
        .iter()
        .map(|r| r.run(config, config_path))
        .collect();
    std::thread::sleep(secs(exp.windows.recovery_secs) + timeout);
    let t3 = t2 + exp.windows.recovery_secs * 1_000_000_000;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let spans = Spans {
        baseline: (t0, t1),
        fault: (armed.min(disarmed), disarmed),
        recovery: (t2, t3),
    };
    let effects = effect_reports(effects, &spans);
    let lanes = lane_reports(lane_probes, &spans);
    let tcp = tcp_probes
        .into_iter()
        .map(|(q, samples)| (q, Windows3::of(&locked(&samples), &spans)))
        .collect();
    let mut report = judge(
        exp,
        &targets,
        (&probes, lanes, tcp),
        &spans,
        fault_status,
        aborted,
    );
    report.effects = effects;
    report.agent_back_after_ms = process.agent.and_then(|k| k.back_after_ms);
    for (i, r) in rollbacks.iter().enumerate().filter(|(_, r)| !r.ok) {
        report.reasons.push(format!(
            "rollbacks[{i}] ({}) failed: {}",
            r.rollback, r.detail
        ));
        if report.verdict == "passed" {
            "failed".clone_into(&mut report.verdict);
        }
    }
    report.rollbacks = rollbacks;
    Ok(report)
}

/// The UDP and TCP probes from the host to every quadrant's echo: their samples and threads.
#[expect(
    clippy::type_complexity,
    reason = "two maps of samples and the threads filling them"
)]
fn start_host_probes(
    config: &Config,
    ss: &super::SteadyState,
    timeout: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<
    (
        BTreeMap<Quadrant, Samples>,
        BTreeMap<Quadrant, Samples>,
        Vec<std::thread::JoinHandle<()>>,
    ),
    ChaosError,
> {
    let (mut udp, mut tcp, mut threads) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
    for q in Quadrant::ALL {
        let to = SocketAddr::from((config.addrs(q).workload, ECHO_PORT));
        let (samples, t) = probe(to, ss.rate_per_sec, timeout, stop)?;
        udp.insert(q, samples);
        threads.extend(t);
        let (samples, t) = tcp_probe(to, ss.rate_per_sec.min(LANE_PROBE_RATE), timeout, stop);
        tcp.insert(q, samples);
        threads.push(t);
    }
    Ok((udp, tcp, threads))
}

/// How long the baseline waits for every probe's first result.
const PROBES_READY: Duration = Duration::from_secs(10);

/// Waits, at most [`PROBES_READY`], until every probe has a first result. The probes start
/// together, most as processes of their own (`quadrant exec`, then the probe), and their
/// start-up is this run's own load on the machine, not the steady state: the baseline window
/// opens once they all run.
fn wait_for_probes(host: [&BTreeMap<Quadrant, Samples>; 2], spawned: [&[EffectProbe]; 2]) {
    let probes: Vec<&Samples> = host
        .into_iter()
        .flat_map(BTreeMap::values)
        .chain(spawned.into_iter().flatten().map(|p| &p.samples))
        .collect();
    let deadline = Instant::now() + PROBES_READY;
    while Instant::now() < deadline && probes.iter().any(|s| locked(s).is_empty()) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A lane probe per transport from every quadrant to its own service and from each gateway to
/// the quadrant behind it.
fn start_lane_probes(
    config: &Config,
    config_path: Option<&std::path::Path>,
    ss: &super::SteadyState,
) -> Result<Vec<EffectProbe>, ChaosError> {
    let mut out = Vec::new();
    let routes = Quadrant::ALL.into_iter().map(|q| (q, q)).chain(CROSS_LANES);
    for (q, service) in routes {
        for (t, _) in super::lane_probe::TRANSPORTS {
            out.push(start_effect_probe(
                config,
                config_path,
                (q, Probed::Lanes(service, t)),
                (ss.rate_per_sec.min(LANE_PROBE_RATE), ss.timeout_ms),
            )?);
        }
    }
    Ok(out)
}

/// The effect probes stopped and summed up per window.
fn effect_reports(probes: Vec<EffectProbe>, spans: &Spans) -> Vec<EffectReport> {
    probes
        .into_iter()
        .map(|mut e| {
            let _ = e.child.kill();
            let _ = e.child.wait();
            let (baseline, fault, recovery) = spans.windows(&locked(&e.samples));
            EffectReport {
                from: e.from.name().to_owned(),
                to: e.to.name().to_owned(),
                baseline,
                fault,
                recovery,
            }
        })
        .collect()
}

/// The lane probes stopped and summed up per quadrant and window.
fn lane_reports(probes: Vec<EffectProbe>, spans: &Spans) -> BTreeMap<Quadrant, Vec<LaneReport>> {
    let mut lanes: BTreeMap<Quadrant, Vec<LaneReport>> = BTreeMap::new();
    for mut p in probes {
        let _ = p.child.kill();
        let _ = p.child.wait();
        let (baseline, fault, recovery) = spans.windows(&locked(&p.samples));
        let service = match p.to {
            Probed::Lanes(service, _) => service,
            _ => p.from,
        };
        lanes.entry(p.from).or_default().push(LaneReport {
            transport: p.to.name().to_owned(),
            service: service.name().to_owned(),
            baseline,
            fault,
            recovery,
        });
    }
    lanes
}

/// The faults of an experiment on processes rather than packets: freezes, kills, resource
/// pressure.
struct ProcessFaults {
    frozen: Vec<super::freeze::Target>,
    killed: Vec<super::freeze::Target>,
    pressed: Vec<(Quadrant, super::pressure::Resource)>,
    agent: Option<super::agent::Killed>,
    identity: Vec<Quadrant>,
    policy: Vec<Quadrant>,
    hogs: Vec<(Quadrant, super::lanes::Hog)>,
}

impl ProcessFaults {
    /// Freezes, kills and presses what `exp` names, each for the fault window.
    fn arm(
        config: &Config,
        config_path: Option<&std::path::Path>,
        exp: &Experiment,
    ) -> Result<Self, ChaosError> {
        let faults = exp.faults();
        let this = Self {
            frozen: faults.iter().filter_map(FaultSpec::frozen).collect(),
            killed: faults.iter().filter_map(FaultSpec::killed).collect(),
            pressed: faults.iter().filter_map(FaultSpec::pressed).collect(),
            agent: None,
            identity: faults
                .iter()
                .filter_map(FaultSpec::identity_outage_of)
                .collect(),
            policy: faults
                .iter()
                .filter_map(FaultSpec::policy_outage_of)
                .collect(),
            hogs: Vec::new(),
        };
        let mut this = this;
        for t in &this.frozen {
            super::freeze::freeze(config, config_path, t, exp.windows.fault_secs)?;
        }
        for t in &this.killed {
            super::freeze::kill(config, t)?;
        }
        for f in &faults {
            if let Some((q, r)) = f.pressed() {
                super::pressure::start(config, config_path, q, r, f.amount(), f.seconds)?;
            }
        }
        for q in &this.identity {
            super::identity_outage(config, *q, exp.windows.fault_secs * 1000)?;
        }
        for q in &this.policy {
            super::policy_outage(config, *q, exp.windows.fault_secs * 1000)?;
        }
        for q in faults.iter().filter_map(FaultSpec::lanes_exhausted_of) {
            let hog =
                super::lanes::start((config, config_path), q, exp.windows.fault_secs + 5, false)?;
            this.hogs.push((q, hog));
        }
        if let Some(f) = faults.iter().find(|f| f.action == Action::KillAgent) {
            this.agent = Some(super::agent::kill_agent(
                config,
                config_path,
                f.restart_agent,
            )?);
        }
        Ok(this)
    }

    /// Thaws and ends what it armed; returns the status of the faults on processes and
    /// services as they ended (their effect).
    fn end(&mut self, config: &Config, now: u64) -> Result<Vec<FaultStatus>, ChaosError> {
        let mut status: Vec<FaultStatus> = super::pressure::leases(config)
            .iter()
            .filter(|l| {
                self.pressed
                    .iter()
                    .any(|(q, r)| l.quadrant == q.name() && l.resource == *r)
            })
            .map(|l| l.status(now))
            .collect();
        if self.agent.is_some() {
            status.push(ended(Action::KillAgent, "agent", 1));
        }
        for (q, r) in &self.pressed {
            super::pressure::end(config, *q, *r)?;
        }
        for (q, mut hog) in self.hogs.drain(..) {
            let refused = hog.refused();
            let _ = hog.child.kill();
            let _ = hog.child.wait();
            status.push(ended(Action::LaneExhaustion, q.name(), refused));
        }
        for q in &self.policy {
            let refused = super::policy_outage(config, *q, 0)?;
            status.push(ended(Action::PolicyOutage, q.name(), refused));
        }
        for q in &self.identity {
            let refused = super::identity_outage(config, *q, 0)?;
            status.push(ended(Action::IdentityOutage, q.name(), refused));
        }
        for t in &self.frozen {
            super::freeze::set_frozen(config, t, false)?;
        }
        Ok(status)
    }
}

/// The status of a fault on processes or services that ended with `effect` (what it refused or
/// did).
fn ended(action: Action, to: &str, effect: u64) -> FaultStatus {
    FaultStatus {
        action,
        from: "any".into(),
        to: to.into(),
        percent: 100.0,
        delay_ms: 0.0,
        jitter_ms: 0.0,
        left_ms: 0,
        expires_ns: 0,
        matched: effect,
        dropped: effect,
    }
}

/// A non-target's breaches of the steady state in the fault window (`what` prefixes each).
fn out_of_tolerance(
    ss: &super::SteadyState,
    what: &str,
    baseline: &WindowStats,
    fault: &WindowStats,
) -> Vec<String> {
    let mut out = Vec::new();
    if fault.availability < ss.min_availability {
        out.push(format!(
            "{what}availability {:.2} % during the fault, below {:.2} %",
            fault.availability * 100.0,
            ss.min_availability * 100.0
        ));
    }
    // A p99 of fewer than 100 answers is the slowest of them: one scheduling hiccup, not a
    // percentile. Such a window is judged by its availability only.
    let judged = baseline.answered.min(fault.answered) >= MIN_P99_ANSWERS;
    if judged && fault.p99_ms > baseline.p99_ms * ss.max_p99_ratio && fault.p99_ms > ss.max_p99_ms {
        out.push(format!(
            "{what}p99 {:.3} ms during the fault: more than {}x its baseline {:.3} ms and over {} \
             ms",
            fault.p99_ms, ss.max_p99_ratio, baseline.p99_ms, ss.max_p99_ms
        ));
    }
    out
}

fn judge(
    exp: &Experiment,
    targets: &[Quadrant],
    (probes, mut lanes, mut tcp): Observed<'_>,
    spans: &Spans,
    faults: Vec<FaultStatus>,
    aborted: Option<String>,
) -> Report {
    let ss = exp.steady_state;
    let mut reasons = Vec::new();
    let mut cascades = 0;
    let mut quadrants = Vec::new();
    for q in Quadrant::ALL {
        let samples = locked(&probes[&q]);
        let target = targets.contains(&q);
        let (baseline, fault, recovery) = spans.windows(&samples);
        let mut breaches = Vec::new();
        let mut recovered_after_secs = None;
        if target {
            recovered_after_secs = recovered(&samples, spans.recovery.0, spans.recovery.1);
            match recovered_after_secs {
                Some(s)
                    if s <= f64::from(
                        u32::try_from(ss.recovery_within_secs).unwrap_or(u32::MAX),
                    ) => {}
                other => breaches.push(format!(
                    "not back to steady state within {} s of the faults' end ({})",
                    ss.recovery_within_secs,
                    other.map_or_else(
                        || "not within the recovery window".to_owned(),
                        |s| format!("{s:.1} s")
                    )
                )),
            }
        } else {
            breaches.extend(out_of_tolerance(&ss, "", &baseline, &fault));
            if let Some(t) = tcp.get(&q) {
                breaches.extend(out_of_tolerance(&ss, "tcp: ", &t.baseline, &t.fault));
            }
            // A lane to a target's service fails with its target: that is the fault's
            // effect on the caller, not a cascade into it.
            for l in lanes
                .get(&q)
                .into_iter()
                .flatten()
                .filter(|l| !targets.iter().any(|t| t.name() == l.service))
            {
                breaches.extend(out_of_tolerance(&ss, &l.what(q), &l.baseline, &l.fault));
            }
            if !breaches.is_empty() {
                cascades += 1;
            }
        }
        for b in &breaches {
            reasons.push(format!("{}: {b}", q.name()));
        }
        let lanes = lanes.remove(&q).unwrap_or_default();
        quadrants.push(QuadrantReport {
            quadrant: q.name().to_owned(),
            target,
            baseline,
            fault,
            recovery,
            recovered_after_secs,
            tcp: tcp.remove(&q),
            lanes,
            breaches,
        });
    }
    for f in faults.iter().filter(|f| f.matched == 0) {
        reasons.push(match super::pressure::Resource::of(f.action) {
            Some(r) => format!(
                "the fault {} on {} had no effect: no {} counted (a fault without effect fails \
                 the run)",
                f.action.name(),
                f.to,
                r.effect()
            ),
            None => format!(
                "the fault {} {} -> {} never hit traffic (a fault without effect fails the run)",
                f.action.name(),
                f.from,
                f.to
            ),
        });
    }
    let verdict = if let Some(a) = aborted {
        reasons.insert(0, a);
        "aborted"
    } else if reasons.is_empty() {
        "passed"
    } else {
        "failed"
    };
    Report {
        title: exp.title.clone(),
        verdict: verdict.to_owned(),
        reasons,
        cascades,
        quadrants,
        effects: Vec::new(),
        faults,
        agent_back_after_ms: None,
        rollbacks: Vec::new(),
    }
}

/// A probe's three windows in one line of the table.
fn three(baseline: &WindowStats, fault: &WindowStats, recovery: &WindowStats) -> String {
    format!(
        "answered {:.1} / {:.1} / {:.1} %, p99 {:.3} / {:.3} / {:.3} ms (baseline / fault / \
         recovery)",
        baseline.availability * 100.0,
        fault.availability * 100.0,
        recovery.availability * 100.0,
        baseline.p99_ms,
        fault.p99_ms,
        recovery.p99_ms
    )
}

/// The text form of a report.
#[must_use]
pub fn render(r: &Report) -> String {
    let mut out = format!("{}: {}\n", r.title, r.verdict.to_uppercase());
    out.push_str(
        "QUAD  TARGET  WINDOW     SENT    ANSWERED  AVAIL %   P50 ms   P99 ms   P99.9 ms\n",
    );
    for q in &r.quadrants {
        for (name, w) in [
            ("baseline", &q.baseline),
            ("fault", &q.fault),
            ("recovery", &q.recovery),
        ] {
            let _ = writeln!(
                out,
                "{:<5} {:<7} {:<10} {:<7} {:<9} {:<9.3} {:<8.3} {:<8.3} {:.3}",
                q.quadrant,
                if q.target { "yes" } else { "no" },
                name,
                w.sent,
                w.answered,
                w.availability * 100.0,
                w.p50_ms,
                w.p99_ms,
                w.p999_ms
            );
        }
        if let Some(t) = &q.tcp {
            let _ = writeln!(
                out,
                "{:<5} tcp: {}",
                q.quadrant,
                three(&t.baseline, &t.fault, &t.recovery)
            );
        }
        for l in &q.lanes {
            let _ = writeln!(
                out,
                "{:<5} {}{}",
                q.quadrant,
                Quadrant::from_name(&q.quadrant).map_or_else(String::new, |me| l.what(me)),
                three(&l.baseline, &l.fault, &l.recovery)
            );
        }
        if let Some(s) = q.recovered_after_secs {
            let _ = writeln!(
                out,
                "{:<5} recovered {s:.1} s after the faults ended",
                q.quadrant
            );
        }
    }
    for e in &r.effects {
        let _ = writeln!(
            out,
            "effect {} -> {}: answered {:.1} % / {:.1} % / {:.1} % (baseline / fault / recovery), \
             p50 {:.3} / {:.3} / {:.3} ms",
            e.from,
            e.to,
            e.baseline.availability * 100.0,
            e.fault.availability * 100.0,
            e.recovery.availability * 100.0,
            e.baseline.p50_ms,
            e.fault.p50_ms,
            e.recovery.p50_ms
        );
    }
    for f in &r.faults {
        let _ = writeln!(
            out,
            "fault {} {} -> {}: matched {}, dropped {}",
            f.action.name(),
            f.from,
            f.to,
            f.matched,
            f.dropped
        );
    }
    if let Some(ms) = r.agent_back_after_ms {
        let _ = writeln!(
            out,
            "agent: the next one took over and answered {ms:.0} ms after the kill"
        );
    }
    for b in &r.rollbacks {
        let _ = writeln!(
            out,
            "rollback {}: {} in {:.0} ms{}",
            b.rollback,
            if b.ok { "done" } else { "FAILED" },
            b.millis,
            if b.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", b.detail.replace('\n', " / "))
            }
        );
    }
    let _ = writeln!(out, "cascades: {}", r.cascades);
    for reason in &r.reasons {
        let _ = writeln!(out, "- {reason}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// 100 requests a second over [0, 9 s): baseline [0, 3), fault [3, 6), recovery [6, 9);
    /// `lost(q, t)` says which are unanswered; answered ones took `rtt(q, t)` ns.
    fn probes(
        lost: impl Fn(Quadrant, u64) -> bool,
        rtt: impl Fn(Quadrant, u64) -> u64,
    ) -> BTreeMap<Quadrant, Samples> {
        Quadrant::ALL
            .iter()
            .map(|&q| {
                let v: Vec<(u64, Option<u64>)> = (0..900u64)
                    .map(|i| {
                        let t = i * S / 100;
                        (t, (!lost(q, t)).then(|| rtt(q, t)))
                    })
                    .collect();
                (q, Arc::new(Mutex::new(v)))
            })
            .collect()
    }

    fn experiment() -> Experiment {
        Experiment::parse(
            "title: t\ntargets: [dx]\nmethod:\n  - { action: drop, from: dx, to: any }\n",
        )
        .expect("valid")
    }

    fn hit() -> Vec<FaultStatus> {
        vec![FaultStatus {
            action: Action::Drop,
            from: "dx".into(),
            to: "any".into(),
            percent: 100.0,
            delay_ms: 0.0,
            jitter_ms: 0.0,
            left_ms: 0,
            expires_ns: 6 * S,
            matched: 10,
            dropped: 10,
        }]
    }

    const WINDOWS: &Spans = &Spans {
        baseline: (0, 3 * S),
        fault: (3 * S, 6 * S),
        recovery: (6 * S, 9 * S),
    };

    #[test]
    fn a_request_sent_while_the_faults_are_armed_counts_in_no_window() {
        // Armed 40 ms into the fault window, removed 30 ms before its end.
        let spans = Spans {
            baseline: (0, 3 * S),
            fault: (3 * S + 40_000_000, 6 * S - 30_000_000),
            recovery: (6 * S, 9 * S),
        };
        let samples = [
            (S, Some(1_000)),
            (3 * S + 10_000_000, Some(1_000)),
            (3 * S + 50_000_000, None),
            (6 * S - 10_000_000, Some(1_000)),
            (7 * S, Some(1_000)),
        ];
        let (baseline, fault, recovery) = spans.windows(&samples);
        assert_eq!((baseline.sent, fault.sent, recovery.sent), (1, 1, 1));
        assert!(fault.availability < f64::EPSILON, "{fault:?}");
    }

    #[test]
    fn a_target_down_during_the_fault_and_back_after_it_passes() {
        let p = probes(
            |q, t| q == Quadrant::Dx && (3 * S..6 * S).contains(&t),
            |_, _| 200_000,
        );
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), BTreeMap::new()),
            WINDOWS,
            hit(),
            None,
        );
        assert_eq!(r.verdict, "passed", "{:?}", r.reasons);
        let dx = &r.quadrants[0];
        assert!(dx.fault.availability.abs() < 1e-9);
        assert_eq!(dx.recovered_after_secs, Some(0.0));
        assert!((r.quadrants[1].fault.availability - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_non_target_that_breaches_is_a_cascade() {
        // DG loses a tenth of its requests during the fault: below 99.9 %.
        let p = probes(
            |q, t| q == Quadrant::Dg && (3 * S..6 * S).contains(&t) && t % (S / 10) == 0,
            |_, _| 200_000,
        );
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), BTreeMap::new()),
            WINDOWS,
            hit(),
            None,
        );
        assert_eq!(
            (r.verdict.as_str(), r.cascades),
            ("failed", 1),
            "{:?}",
            r.reasons
        );
        assert!(
            r.reasons[0].starts_with("dg: availability 90.00 %"),
            "{:?}",
            r.reasons
        );
        // Or gets slow: p99 from 0.2 ms to 3 ms (over 1.5x and over 1.5 ms).
        let p = probes(
            |_, _| false,
            |q, t| {
                if q == Quadrant::Pg && (3 * S..6 * S).contains(&t) {
                    3_000_000
                } else {
                    200_000
                }
            },
        );
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), BTreeMap::new()),
            WINDOWS,
            hit(),
            None,
        );
        assert_eq!(r.cascades, 1, "{:?}", r.reasons);
        assert!(
            r.reasons[0].starts_with("pg: p99 3.000 ms"),
            "{:?}",
            r.reasons
        );
    }

    #[test]
    fn a_target_that_stays_down_or_a_fault_that_hit_nothing_fails() {
        let p = probes(|q, t| q == Quadrant::Dx && t >= 3 * S, |_, _| 200_000);
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), BTreeMap::new()),
            WINDOWS,
            hit(),
            None,
        );
        assert_eq!(r.verdict, "failed");
        assert!(
            r.reasons[0].contains("not back to steady state"),
            "{:?}",
            r.reasons
        );
        let p = probes(|_, _| false, |_, _| 200_000);
        let mut idle = hit();
        idle[0].matched = 0;
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), BTreeMap::new()),
            WINDOWS,
            idle,
            None,
        );
        assert_eq!(r.verdict, "failed");
        assert!(
            r.reasons[0].contains("never hit traffic"),
            "{:?}",
            r.reasons
        );
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), BTreeMap::new()),
            WINDOWS,
            hit(),
            Some("safeguard: …".into()),
        );
        assert_eq!(r.verdict, "aborted");
    }

    #[test]
    fn a_non_target_whose_tcp_probe_fails_is_a_cascade_and_a_targets_is_not() {
        let p = probes(|_, _| false, |_, _| 200_000);
        let stats = |answered: u64| WindowStats {
            sent: 200,
            answered,
            availability: f64::from(u32::try_from(answered).unwrap_or(0)) / 200.0,
            p50_ms: 0.1,
            p99_ms: 0.2,
            p999_ms: 0.3,
        };
        let down = Windows3 {
            baseline: stats(200),
            fault: stats(150),
            recovery: stats(200),
        };
        let tcp = BTreeMap::from([(Quadrant::Dx, down.clone()), (Quadrant::Px, down)]);
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, BTreeMap::new(), tcp),
            WINDOWS,
            hit(),
            None,
        );
        assert_eq!((r.verdict.as_str(), r.cascades), ("failed", 1));
        assert_eq!(
            r.reasons,
            ["px: tcp: availability 75.00 % during the fault, below 99.90 %"]
        );
        assert!(r.quadrants[0].tcp.is_some(), "reported for the target too");
        assert!(
            render(&r).contains("px    tcp: answered 100.0 / 75.0 / 100.0 %"),
            "{}",
            render(&r)
        );
    }

    #[test]
    fn a_non_target_whose_lanes_fail_during_the_fault_is_a_cascade() {
        let p = probes(|_, _| false, |_, _| 200_000);
        let stats = |answered: u64| WindowStats {
            sent: 100,
            answered,
            availability: f64::from(u32::try_from(answered).unwrap_or(0)) / 100.0,
            p50_ms: 0.1,
            p99_ms: 0.2,
            p999_ms: 0.3,
        };
        let lane = |t: &str, service: Quadrant, fault: u64| LaneReport {
            transport: t.into(),
            service: service.name().into(),
            baseline: stats(100),
            fault: stats(fault),
            recovery: stats(100),
        };
        let lanes = BTreeMap::from([
            (Quadrant::Dx, vec![lane("shm", Quadrant::Dx, 0)]),
            // DG's lanes into the target fail with it: its callers' loss, not a cascade.
            (Quadrant::Dg, vec![lane("uds", Quadrant::Dx, 0)]),
            (
                Quadrant::Pg,
                vec![
                    lane("shm", Quadrant::Pg, 100),
                    lane("tcp", Quadrant::Pg, 97),
                    lane("uds", Quadrant::Px, 0),
                ],
            ),
            // 40 answers, the slowest 4 ms: the slowest of 40 is no p99, not judged.
            (
                Quadrant::Px,
                vec![LaneReport {
                    fault: WindowStats {
                        sent: 40,
                        answered: 40,
                        availability: 1.0,
                        p99_ms: 4.0,
                        ..stats(100)
                    },
                    ..lane("shm", Quadrant::Px, 100)
                }],
            ),
        ]);
        let r = judge(
            &experiment(),
            &[Quadrant::Dx],
            (&p, lanes, BTreeMap::new()),
            WINDOWS,
            hit(),
            None,
        );
        assert_eq!(
            (r.verdict.as_str(), r.cascades),
            ("failed", 1),
            "{:?}",
            r.reasons
        );
        assert_eq!(
            r.reasons,
            [
                "pg: lanes over tcp: availability 97.00 % during the fault, below 99.90 %",
                "pg: lanes to px over uds: availability 0.00 % during the fault, below 99.90 %"
            ],
            "the target's lanes, and lanes into it, may fail"
        );
        assert_eq!(r.quadrants[3].lanes.len(), 3);
        assert!(
            render(&r).contains("dg    lanes to dx over uds: answered 100.0 / 0.0 / 100.0 %"),
            "{}",
            render(&r)
        );
    }
}
