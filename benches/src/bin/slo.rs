//! Circuit breaker benchmark (`cargo xtask bench slo`): what a closed breaker adds to `connect()`,
//! and how soon after a kernel-counted trip the kernel refuses.
//!
//! The orchestrator starts a real agent (instance `qslo`) with breakers on and then off, taking
//! turns (three sessions each), and runs the measuring workload in DX. With the kernel's program
//! statistics on (`BPF_ENABLE_STATS`), it reads the pinned `connect4` and breaker `sock_ops`
//! programs' run time and run count around each session: the same programs, with the breaker
//! lookup (on) and without it (off, `breakers.enabled: false`: one array read), so the
//! difference is the closed breaker's cost. The workload connects to a listener on DX's own
//! address (a destination the policy allows, whose breaker entry exists and is closed: one
//! connect failed before the listener started) and reports the `connect()` latency it sees.
//!
//! Trips: for each of 200 ports, the workload makes `consecutive_failures` connects that nothing
//! answers (refused by the peer), starts a listener on that port and connects again at once; the
//! kernel must refuse that connect (its breaker opened in `sock_ops` when the last failure was
//! seen). It reports how many were refused and the time from the last failure's return to the
//! refusal.
//!
//! Agent-computed trips: 20 lane services in DG (`lane-echo serve --drop-after 0`: every lane's
//! first request is taken and the lane closed unanswered, each service also taking TCP lanes on
//! its own port). For each, the workload makes `min_calls` failing requests over shared-memory
//! lanes and then connects to the service's TCP port every 0.2 ms until the kernel refuses it
//! (the agent judged the failure ratio and wrote the breaker into the kernel's map); it reports
//! the time from the last failure to the first refusal.
//!
//! SC-007 (`slo sc007`): twelve lane services (six in DG called from DX, six in PX called from
//! PG), each with an availability and a latency SLO (99 %, 99 % within 10 ms), under a steady
//! load of a request every 10 ms per service for 20 s from clients that reopen their lane
//! after a failure. Five seconds in, one service's process is killed (the fault) and stays
//! down. At the end it reads `quadrant slo` and reports the share of configured SLOs held
//! (budget left, or no data), over all of them and over those of the services the fault did
//! not touch.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use benches::{Agent, histogram, ns, per_run, sibling, stats, us};
use dataplane_common::Quadrant;
use quadrant::config::Config;
use serde::{Deserialize, Serialize};

const STATE_DIR: &str = "/run/quadrant-slobench";
const CONNECTS: u32 = 20_000;
const WARMUP: u32 = 1000;
const TRIPS: u16 = 200;
const CONNECT_PORT: u16 = 7600;
const TRIP_PORTS: u16 = 7700;
const SESSIONS: usize = 3;
const SERVICES: u16 = 20;
const SERVICE_PORTS: u16 = 7800;
const MIN_CALLS: u32 = 10;
const SC007_PER_SIDE: u16 = 6;
const SC007_SECONDS: u64 = 20;
const SC007_INTERVAL_MS: u64 = 10;
const SC007_FAULT_AFTER: Duration = Duration::from_secs(5);

/// What one steady client saw.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Steady {
    sent: u64,
    answered: u64,
    failed: u64,
    refused_opens: u64,
}

/// Requests to `service` in `quadrant` every `interval` until `seconds` have passed, paced
/// from the intended send times; a failed lane is opened again (a refused open waits one
/// interval).
fn steady(
    quadrant: &str,
    service: &str,
    seconds: u64,
    interval: Duration,
) -> anyhow::Result<Steady> {
    use quadrant::lanes::{LaneClient, TransportChoice};
    let mut client = LaneClient::connect(None)?;
    let mut out = Steady::default();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let msg = [7u8; 64];
    let mut reply = Vec::with_capacity(64);
    let mut lane = None;
    let mut next = start;
    while next < end {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        if lane.is_none() {
            if let Ok(l) = client.open(quadrant, service, TransportChoice::Auto) {
                lane = Some(l);
            } else {
                out.refused_opens += 1;
                continue;
            }
        }
        let Some(l) = lane.as_mut() else { continue };
        out.sent += 1;
        if l.request(&msg, &mut reply).is_ok() {
            out.answered += 1;
        } else {
            out.failed += 1;
            lane = None;
        }
    }
    Ok(out)
}

/// The SC-007 run (see the module).
fn sc007() -> anyhow::Result<()> {
    let mut config = bench_config(true)?;
    let services: Vec<(&str, &str, String)> = (0..SC007_PER_SIDE * 2)
        .map(|i| {
            let (server, client) = if i < SC007_PER_SIDE {
                ("dg", "dx")
            } else {
                ("px", "pg")
            };
            (server, client, format!("svc{i}"))
        })
        .collect();
    let mut slos = String::from("[");
    for (q, _, name) in &services {
        let _ = write!(
            slos,
            "{{name: {name}-up, quadrant: {q}, service: {name}, indicator: availability, \
             objectives: [{{target: 0.99}}], timeWindow: [{{duration: 1h}}]}}, \
             {{name: {name}-fast, quadrant: {q}, service: {name}, indicator: latency, \
             objectives: [{{target: 0.99, value: 10}}], timeWindow: [{{duration: 1h}}]}},"
        );
    }
    slos.push(']');
    config.slos = serde_yaml::from_str(&slos)?;
    config.validate()?;
    let mut agent = Agent::start(&config, STATE_DIR, "qslo")?;
    for (q, _, name) in &services {
        start_service(&mut agent, q, name, &[])?;
    }
    let me = std::env::current_exe()?.display().to_string();
    let (secs, interval) = (SC007_SECONDS.to_string(), SC007_INTERVAL_MS.to_string());
    let clients = services
        .iter()
        .map(|(q, from, name)| {
            agent
                .exec(from, "client", &[&me, "steady", q, name, &secs, &interval])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(SC007_FAULT_AFTER);
    // The fault: the first service's process is killed and stays down.
    let faulted = &services[0].2;
    // (`quadrant exec` execs the service, so this is its process.)
    agent.servers[0].kill()?;
    let seen: Vec<Steady> = clients
        .into_iter()
        .map(|c| Ok(serde_json::from_slice(&c.wait_with_output()?.stdout)?))
        .collect::<anyhow::Result<_>>()?;
    // One SLO tick for the last requests.
    std::thread::sleep(Duration::from_millis(1500));
    let out = agent
        .quadrant()
        .args(["slo", "--output", "json"])
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    print_sc007(&services, &seen, &report, faulted)
}

/// What the measuring workload reports for its connect loop.
#[derive(Debug, Serialize, Deserialize)]
struct Connects {
    count: u32,
    p50_ns: u64,
    p99_ns: u64,
}

/// What the measuring workload reports for its trips.
#[derive(Debug, Serialize, Deserialize)]
struct Trips {
    tried: u16,
    refused_at_once: u16,
    p50_ns: u64,
    p99_ns: u64,
    max_ns: u64,
}

// ---- the measuring workload (runs in DX) ----

fn connects(addr: Ipv4Addr) -> anyhow::Result<Connects> {
    let at = SocketAddr::from((addr, CONNECT_PORT));
    // One failure first, so this destination's breaker entry exists (closed) in the "on" runs.
    if TcpStream::connect(at).is_ok() {
        bail!("something already listens on {at}");
    }
    let listener = TcpListener::bind(at)?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut h = histogram()?;
    for i in 0..WARMUP + CONNECTS {
        let start = Instant::now();
        let s = TcpStream::connect(at).with_context(|| format!("connect {i} to {at}"))?;
        let took = start.elapsed();
        drop(s);
        if i >= WARMUP {
            h.record(ns(took).max(1))?;
        }
    }
    Ok(Connects {
        count: CONNECTS,
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
    })
}

fn trips(addr: Ipv4Addr, failures: u32) -> anyhow::Result<Trips> {
    let mut h = histogram()?;
    let mut refused = 0;
    let mut listeners = Vec::new();
    for i in 0..TRIPS {
        let at = SocketAddr::from((addr, TRIP_PORTS + i));
        let mut crossed = Instant::now();
        for _ in 0..failures {
            match TcpStream::connect(at) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                other => bail!("{at}: expected a refusal by the peer, got {other:?}"),
            }
            crossed = Instant::now();
        }
        // Now something listens: only the breaker can refuse.
        listeners.push(TcpListener::bind(at)?);
        let outcome = TcpStream::connect(at);
        let took = crossed.elapsed();
        if matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused) {
            refused += 1;
            h.record(ns(took).max(1))?;
        }
    }
    Ok(Trips {
        tried: TRIPS,
        refused_at_once: refused,
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
        max_ns: h.max(),
    })
}

/// Failing calls to each service, then TCP connects until the kernel refuses.
fn agent_trips(addr: Ipv4Addr) -> anyhow::Result<Trips> {
    let mut client = quadrant::lanes::LaneClient::connect(None)?;
    let mut h = histogram()?;
    let mut refused = 0;
    for i in 0..SERVICES {
        let service = format!("trip{i}");
        for _ in 0..MIN_CALLS {
            let mut lane = client.open("dg", &service, quadrant::lanes::TransportChoice::Shm)?;
            let mut reply = Vec::new();
            if lane.request(b"ping", &mut reply).is_ok() {
                bail!("{service} answered");
            }
        }
        let crossed = Instant::now();
        let at = SocketAddr::from((addr, SERVICE_PORTS + i));
        while crossed.elapsed() < Duration::from_secs(2) {
            match TcpStream::connect(at) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refused += 1;
                    h.record(ns(crossed.elapsed()).max(1))?;
                    break;
                }
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }
    Ok(Trips {
        tried: SERVICES,
        refused_at_once: refused,
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
        max_ns: h.max(),
    })
}

// ---- the orchestrator (host) ----

fn bench_config(enabled: bool) -> anyhow::Result<Config> {
    let mut c = benches::isolated_config("qslo", "qs", STATE_DIR, 244)?;
    c.breakers.enabled = enabled;
    c.breakers.min_calls = MIN_CALLS;
    c.breakers.base_ejection_ms = 60_000;
    c.validate()?;
    Ok(c)
}

/// Starts `lane-echo serve NAME ARGS…` as workload `name` in quadrant `q` and waits until it
/// listens; the agent stops it when it goes down.
fn start_service(agent: &mut Agent, q: &str, name: &str, args: &[&str]) -> anyhow::Result<()> {
    let echo = sibling("lane-echo")?.display().to_string();
    let mut child = agent
        .exec(q, name, &[&echo, "serve", name])
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    if !line.starts_with("listening") {
        bail!("{name} did not start: {line:?}");
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    agent.servers.push(child);
    Ok(())
}

/// Starts the failing lane services in DG and waits until each listens.
fn start_failing_services(agent: &mut Agent) -> anyhow::Result<()> {
    for i in 0..SERVICES {
        let (name, port) = (format!("trip{i}"), (SERVICE_PORTS + i).to_string());
        start_service(
            agent,
            "dg",
            &name,
            &["--tcp-port", &port, "--drop-after", "0"],
        )?;
    }
    Ok(())
}

/// Runs this benchmark's `args` as a workload in DX and parses what it prints.
fn workload<T: for<'de> Deserialize<'de>>(agent: &Agent, args: &[&str]) -> anyhow::Result<T> {
    agent.measure("dx", args)
}

#[derive(Debug, Default)]
struct Session {
    connect4_ns: f64,
    sockops_ns_per_connection: f64,
    sockops_runs_per_connection: f64,
    connect: Option<Connects>,
    trips: Option<Trips>,
    agent_trips: Option<Trips>,
}

fn session(enabled: bool) -> anyhow::Result<Session> {
    let config = bench_config(enabled)?;
    let mut agent = Agent::start(&config, STATE_DIR, "qslo")?;
    let dx = config.addrs(Quadrant::Dx).workload.to_string();
    let (c4, so) = ("quadrant_connect4", "quadrant_breaker_sockops");
    let (c4_before, so_before) = (stats(&config, c4)?, stats(&config, so)?);
    let connect: Connects = workload(&agent, &["connects", &dx])?;
    let (c4_after, so_after) = (stats(&config, c4)?, stats(&config, so)?);
    let connections = connect.count + WARMUP + 1;
    let (connect4_ns, _, _) = per_run(c4_before, c4_after, connections);
    let (_, sockops_ns_per_connection, sockops_runs_per_connection) =
        per_run(so_before, so_after, connections);
    let (trips, agent_trips) = if enabled {
        let failures = config.breakers.consecutive_failures.to_string();
        let trips = workload(&agent, &["trips", &dx, &failures])?;
        start_failing_services(&mut agent)?;
        let dg = config.addrs(Quadrant::Dg).workload.to_string();
        (Some(trips), Some(workload(&agent, &["agent-trips", &dg])?))
    } else {
        (None, None)
    };
    Ok(Session {
        connect4_ns,
        sockops_ns_per_connection,
        sockops_runs_per_connection,
        connect: Some(connect),
        trips,
        agent_trips,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn orchestrate() -> anyhow::Result<()> {
    quadrant::daemon::require_root("bench slo")?;
    // Program run time is counted while this descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let mut on = Vec::new();
    let mut off = Vec::new();
    for round in 0..SESSIONS {
        eprintln!("session {}/{SESSIONS}: breakers on, then off", round + 1);
        on.push(session(true)?);
        off.push(session(false)?);
    }
    println!(
        "closed breaker on connect() (DX -> DX's own address, {CONNECTS} connects a session, kernel program statistics)"
    );
    println!(
        "{:<8} {:>12} {:>22} {:>14} {:>12} {:>12}",
        "breakers",
        "connect4 ns",
        "sock_ops ns/connection",
        "sock_ops runs",
        "connect p50",
        "connect p99"
    );
    for (name, runs) in [("on", &on), ("off", &off)] {
        for s in runs {
            let c = s.connect.as_ref();
            println!(
                "{name:<8} {:>12.1} {:>22.1} {:>14.1} {:>9.1} µs {:>9.1} µs",
                s.connect4_ns,
                s.sockops_ns_per_connection,
                s.sockops_runs_per_connection,
                c.map_or(0.0, |c| us(c.p50_ns)),
                c.map_or(0.0, |c| us(c.p99_ns)),
            );
        }
    }
    let added = median(on.iter().map(|s| s.connect4_ns).collect())
        - median(off.iter().map(|s| s.connect4_ns).collect());
    let sockops = median(on.iter().map(|s| s.sockops_ns_per_connection).collect())
        - median(off.iter().map(|s| s.sockops_ns_per_connection).collect());
    println!(
        "closed breaker adds {added:.1} ns to connect4 (median of {SESSIONS} sessions on minus off; target <= 30 ns: {})",
        if added <= 30.0 { "met" } else { "NOT met" }
    );
    println!(
        "and {sockops:.1} ns of breaker sock_ops per connection (its callbacks: connect, established, state changes)"
    );
    println!("kernel-counted trips (threshold crossing -> first connect refused):");
    for t in on.iter().filter_map(|s| s.trips.as_ref()) {
        println!(
            "  {}/{} refused at once; p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs after the last failure returned (target <= 1 ms: {})",
            t.refused_at_once,
            t.tried,
            us(t.p50_ns),
            us(t.p99_ns),
            us(t.max_ns),
            if t.refused_at_once == t.tried && t.max_ns <= 1_000_000 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    println!(
        "agent-computed trips ({MIN_CALLS} failed lane requests -> first TCP connect the kernel refuses):"
    );
    for t in on.iter().filter_map(|s| s.agent_trips.as_ref()) {
        println!(
            "  {}/{} refused; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms after the last failure (target <= 100 ms: {})",
            t.refused_at_once,
            t.tried,
            us(t.p50_ns) / 1000.0,
            us(t.p99_ns) / 1000.0,
            us(t.max_ns) / 1000.0,
            if t.refused_at_once == t.tried && t.max_ns <= 100_000_000 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    sc007()
}

/// Prints the SC-007 table: each SLO, whether it held, and the shares.
fn print_sc007(
    services: &[(&str, &str, String)],
    seen: &[Steady],
    report: &serde_json::Value,
    faulted: &str,
) -> anyhow::Result<()> {
    println!(
        "SC-007: {} lane services, a request every {SC007_INTERVAL_MS} ms each for {SC007_SECONDS} s; {faulted} killed after {} s",
        services.len(),
        SC007_FAULT_AFTER.as_secs()
    );
    println!(
        "{:<10} {:>8} {:>9} {:>7} {:>14}",
        "service", "sent", "answered", "failed", "refused opens"
    );
    for ((q, _, name), s) in services.iter().zip(seen) {
        println!(
            "{:<10} {:>8} {:>9} {:>7} {:>14}",
            format!("{q}/{name}"),
            s.sent,
            s.answered,
            s.failed,
            s.refused_opens
        );
    }
    let slos = report["slos"].as_array().context("slos")?;
    println!(
        "{:<14} {:>10} {:>9} {:>12} {:>6}",
        "SLO", "good/total", "SLI", "budget left", "held"
    );
    let (mut held, mut held_others, mut others) = (0, 0, 0);
    for s in slos {
        let name = s["name"].as_str().unwrap_or_default();
        let budget = s["budget_remaining"].as_f64();
        // No data never counts against an SLO (and never gates); a budget left is held.
        let ok = budget.is_none_or(|b| b > 0.0);
        let touched = s["service"] == faulted;
        held += usize::from(ok);
        if !touched {
            others += 1;
            held_others += usize::from(ok);
        }
        println!(
            "{:<14} {:>10} {:>9} {:>12} {:>6}",
            name,
            format!("{}/{}", s["events"]["good"], s["events"]["total"]),
            s["sli"]
                .as_f64()
                .map_or_else(|| "-".into(), |v| format!("{v:.4}")),
            budget.map_or_else(|| "-".into(), |b| format!("{:.1} %", b * 100.0)),
            if ok { "yes" } else { "NO" }
        );
    }
    #[expect(clippy::cast_precision_loss, reason = "a few dozen SLOs")]
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    println!(
        "SLOs held: {held}/{} ({:.1} %) in all; {held_others}/{others} ({:.1} %) of the services the fault did not touch (target >= 99.5 %: {})",
        slos.len(),
        pct(held, slos.len()),
        pct(held_others, others),
        if pct(held_others, others) >= 99.5 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = |i: usize| -> anyhow::Result<Ipv4Addr> { Ok(args.get(i).context("ADDR")?.parse()?) };
    match args.get(1).map(String::as_str) {
        None => orchestrate(),
        Some("connects") => {
            println!("{}", serde_json::to_string(&connects(addr(2)?)?)?);
            Ok(())
        }
        Some("agent-trips") => {
            println!("{}", serde_json::to_string(&agent_trips(addr(2)?)?)?);
            Ok(())
        }
        Some("sc007") => sc007(),
        Some("steady") => {
            let arg = |i: usize| {
                args.get(i)
                    .context("steady QUADRANT SERVICE SECONDS INTERVAL_MS")
            };
            let seen = steady(
                arg(2)?,
                arg(3)?,
                arg(4)?.parse()?,
                Duration::from_millis(arg(5)?.parse()?),
            )?;
            println!("{}", serde_json::to_string(&seen)?);
            Ok(())
        }
        Some("trips") => {
            let failures = args.get(3).context("trips ADDR FAILURES")?.parse()?;
            println!("{}", serde_json::to_string(&trips(addr(2)?, failures)?)?);
            Ok(())
        }
        Some(other) => bail!("unknown mode {other}"),
    }
}
