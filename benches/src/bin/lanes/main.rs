//! RTT lane benchmark (`cargo xtask bench lanes`): round trips at 64 B, 4 KiB, 64 KiB and 1 MiB
//! on every lane transport, back to back and paced (gaps of 100 µs, 1 ms and 10 ms after each
//! answer — and 50 ms for the shared-memory and Unix-socket lanes —, and Poisson arrivals at
//! 1,000/s, latency counted from the intended send time),
//! against baselines measured the same way in the same run, plus the control-plane latency of
//! opening a lane.
//!
//! The orchestrator starts a real agent (instance `qlane`), an echo service in DG (`lane-echo
//! serve`, which also takes TCP + mTLS lanes) and a bare TCP echo in DG, then runs the measuring
//! client as a workload in DX (`measure`), so every lane is attested, authorized by the policy
//! and, for TCP, carried through the eBPF datapath between the two quadrants. In DX the client
//! also starts, one at a time, the bare baselines: a Unix-socket echo, a TCP loopback echo and an
//! iceoryx2 request-response server (a real shared-memory IPC peer), busy-polling and then
//! waiting for its events.
//!
//! Client and server are separate processes, not pinned, on this 2-core machine. A
//! shared-memory lane end polls for at most `QUADRANT_LANE_SPIN_US` (default 50 µs) while its
//! peer runs on another CPU, then sleeps.
//!
//! `lanes control` measures lane opens alone; `lanes shm-uds` the shared-memory and Unix-socket
//! lanes' rows and their comparison, then lane opens (about a minute: for A/B runs).

mod baselines;
mod measure;

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use baselines::{IceWait, bare_round_trip, bare_server, ice_client, ice_server};
use benches::{Agent, sibling};
use dataplane_common::Quadrant;
use measure::{LANE_PACINGS, PACINGS, Pacing, Row, SIZES, histogram, measure, precise_sleeps};
use quadrant::{
    config::{Config, TcpAcceleration},
    lanes::{LaneClient, TransportChoice},
};
use serde::{Deserialize, Serialize};

const STATE_DIR: &str = "/run/quadrant-lbench";
const LANE_TCP_PORT: u16 = 7300;
const BARE_TCP_PORT: u16 = 7301;
const LOOPBACK_PORT: u16 = 7302;
const OPENS: usize = 2000;
/// Lane opens timed one at a time, [`OPEN_GAP`] apart.
const PACED_OPENS: usize = 1000;
/// The pause between paced opens: long enough for every thread of the open to sleep.
const OPEN_GAP: Duration = Duration::from_millis(5);
/// How long a server may take to start listening.
const READY_PATIENCE: Duration = Duration::from_secs(30);

/// What the measuring workload reports.
#[derive(Debug, Serialize, Deserialize)]
struct Results {
    rows: Vec<Row>,
    open: Row,
    /// Lane opens [`OPEN_GAP`] apart.
    paced_open: Row,
    /// A refused open (no such service): the broker round trip with schema validation and the
    /// decision, without building a lane.
    refused: Row,
}

impl Results {
    fn new(rows: Vec<Row>, opens: Opens) -> Self {
        Self {
            rows,
            open: opens.open,
            paced_open: opens.paced,
            refused: opens.refused,
        }
    }
}

// ---- the measuring workload (runs in DX) ----

/// Starts a server and waits until it prints its first line, "listening …". What it prints
/// goes to `<STATE_DIR>/<name>.out` (kept for a run that fails): a file wakes no one, where a
/// pipe read by a thread of this process woke that thread for every line `lane-echo` prints
/// per lane — a fourth party on the two CPUs in the middle of the lane-open measurement.
fn spawn_ready(cmd: &mut Command, name: &str) -> anyhow::Result<Child> {
    let path = Path::new(STATE_DIR).join(format!("{name}.out"));
    let mut child = cmd
        .stdout(std::fs::File::create(&path)?)
        .stdin(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + READY_PATIENCE;
    loop {
        let out = std::fs::read_to_string(&path)?;
        if let Some((line, _)) = out.split_once('\n') {
            if line.starts_with("listening") {
                return Ok(child);
            }
            stop(child);
            bail!("{name} did not start: {line:?}");
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited before it was listening ({status})");
        }
        if Instant::now() > deadline {
            stop(child);
            bail!(
                "{name} was not listening within {} s",
                READY_PATIENCE.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Times `count` calls of `op` after a tenth as many unrecorded, `gap` apart (none: back to
/// back); what it returns (the lane) is dropped, closing it, after the clock stops.
fn time_opens<T>(
    name: &str,
    (count, gap): (usize, Duration),
    mut op: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Row> {
    let mut h = histogram()?;
    let start = Instant::now();
    for i in 0..count + count / 10 {
        let t = Instant::now();
        let done = op()?;
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        drop(done);
        if i >= count / 10 {
            h.record(ns)?;
        }
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    let pacing = if gap.is_zero() {
        Pacing::BackToBack
    } else {
        Pacing::Gap(u64::try_from(gap.as_micros()).unwrap_or(u64::MAX))
    };
    let r = measure::row(name, false, (pacing, 0), (&h, &h), start.elapsed());
    eprintln!(
        "  {name}: p50 {} us, p99 {} us, p99.9 {} us",
        r.p50_us, r.p99_us, r.p999_us
    );
    Ok(r)
}

/// The control plane's rows.
struct Opens {
    /// Opens back to back.
    open: Row,
    /// Opens [`OPEN_GAP`] apart: the broker's and the service's threads asleep when one comes.
    paced: Row,
    /// Refused opens back to back.
    refused: Row,
}

/// Control plane: an open (attestation happened at connect; schema, policy, limits, memory,
/// descriptors, the service told, the opener answered and mapping its end), then its close —
/// back to back and [`OPEN_GAP`] apart; and a refused open.
fn control_plane(client: &mut LaneClient) -> anyhow::Result<Opens> {
    let back_to_back = (OPENS, Duration::ZERO);
    let open = time_opens("lane open (uds)", back_to_back, || {
        Ok(client.open("dg", "echo", TransportChoice::Uds)?)
    })?;
    let paced = time_opens("lane open (uds), paced", (PACED_OPENS, OPEN_GAP), || {
        Ok(client.open("dg", "echo", TransportChoice::Uds)?)
    })?;
    let refused = time_opens("refused open", back_to_back, || {
        match client.open("dg", "nope", TransportChoice::Uds) {
            Err(quadrant::lanes::LaneError::Refused { .. }) => Ok(()),
            other => bail!("expected a refusal, got {other:?}"),
        }
    })?;
    Ok(Opens {
        open,
        paced,
        refused,
    })
}

/// A lane's rows: every pacing and size, on one lane, in `pacings`.
fn lane_rows(
    client: &mut LaneClient,
    (name, choice): (&str, TransportChoice),
    pacings: &[Pacing],
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mut lane = client.open("dg", "echo", choice)?;
    for &pacing in pacings {
        for size in SIZES {
            rows.push(measure(name, false, (pacing, size), |msg, reply| {
                lane.send(msg)?;
                if !lane.recv(reply)? {
                    bail!("lane closed");
                }
                Ok(())
            })?);
        }
    }
    lane.close()?;
    Ok(())
}

fn bare_rows<S: Read + Write>(
    name: &str,
    mut s: S,
    pacings: &[Pacing],
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for &pacing in pacings {
        for size in SIZES {
            rows.push(measure(name, true, (pacing, size), |m, r| {
                bare_round_trip(&mut s, m, r)
            })?);
        }
    }
    Ok(())
}

/// The measuring workload. `mode`: `all`; `control` (lane opens only); `tcp` (the TCP lane and
/// the bare TCP echo in DG only, back to back, for the run with kernel acceleration).
fn measure_all(dg_addr: &str, mode: &str) -> anyhow::Result<Results> {
    precise_sleeps();
    let me = std::env::current_exe()?;
    let mut rows = Vec::new();
    let mut client = LaneClient::connect(None)?;
    if mode == "control" {
        let opens = control_plane(&mut client)?;
        return Ok(Results::new(rows, opens));
    }
    let pacings: &[Pacing] = if mode == "tcp" {
        &[Pacing::BackToBack]
    } else {
        &PACINGS
    };
    if mode != "tcp" {
        lane_rows(
            &mut client,
            ("shm lane", TransportChoice::Shm),
            &LANE_PACINGS,
            &mut rows,
        )?;
        lane_rows(
            &mut client,
            ("uds lane", TransportChoice::Uds),
            &LANE_PACINGS,
            &mut rows,
        )?;
    }
    if mode == "shm-uds" {
        let opens = control_plane(&mut client)?;
        return Ok(Results::new(rows, opens));
    }
    let tcp = ("tcp+mtls lane dx->dg", TransportChoice::Tcp);
    lane_rows(&mut client, tcp, pacings, &mut rows)?;
    let dg = TcpStream::connect(format!("{dg_addr}:{BARE_TCP_PORT}"))?;
    dg.set_nodelay(true)?;
    bare_rows("bare tcp dx->dg", dg, pacings, &mut rows)?;
    let opens = control_plane(&mut client)?;
    if mode == "tcp" {
        return Ok(Results::new(rows, opens));
    }

    let uds_path = Path::new(STATE_DIR).join("bare.sock");
    let server = spawn_ready(
        Command::new(&me).args(["bare-server", "uds", &uds_path.display().to_string()]),
        "bare-uds",
    )?;
    let uds = UnixStream::connect(&uds_path)?;
    let result = bare_rows("bare uds echo", uds, pacings, &mut rows);
    stop(server);
    result?;

    let loopback = format!("127.0.0.1:{LOOPBACK_PORT}");
    let server = spawn_ready(
        Command::new(&me).args(["bare-server", "tcp", &loopback]),
        "bare-loopback",
    )?;
    let s = TcpStream::connect(&loopback)?;
    s.set_nodelay(true)?;
    let result = bare_rows("bare tcp loopback", s, pacings, &mut rows);
    stop(server);
    result?;

    for (wait, arg) in [(IceWait::Poll, "poll"), (IceWait::Event, "event")] {
        let server = spawn_ready(
            Command::new(&me).args(["ice-server", arg]),
            &format!("ice-{arg}"),
        )?;
        let result = ice_client(wait, &mut rows);
        stop(server);
        result?;
    }
    Ok(Results::new(rows, opens))
}

// ---- the orchestrator ----

fn bench_config() -> anyhow::Result<Config> {
    let c = benches::isolated_config("qlane", "ql", STATE_DIR, 243)?;
    c.validate()?;
    Ok(c)
}

/// The back-to-back row of `transport` at `size`.
fn p<'a>(rows: &'a [Row], transport: &str, size: usize) -> Option<&'a Row> {
    at(rows, transport, Pacing::BackToBack, size)
}

fn at<'a>(rows: &'a [Row], transport: &str, pacing: Pacing, size: usize) -> Option<&'a Row> {
    let name = pacing.name();
    rows.iter()
        .find(|r| r.transport == transport && r.pacing == name && r.size == size)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// One agent with its services in DG and the measuring workload in DX, in `mode` (`all`,
/// `control` or `tcp`).
fn session(config: &Config, mode: &str) -> anyhow::Result<Results> {
    let me = std::env::current_exe()?;
    let mut agent = Agent::start(config, STATE_DIR, "qlane")?;
    let echo = sibling("lane-echo")?;
    let port = LANE_TCP_PORT.to_string();
    let echo_s = echo.display().to_string();
    let me_s = me.display().to_string();
    let bare_at = format!("0.0.0.0:{BARE_TCP_PORT}");
    agent.servers.push(spawn_ready(
        &mut agent.exec(
            "dg",
            "echo",
            &[&echo_s, "serve", "echo", "--tcp-port", &port],
        ),
        "lane-echo",
    )?);
    agent.servers.push(spawn_ready(
        &mut agent.exec("dg", "bare", &[&me_s, "bare-server", "tcp", &bare_at]),
        "bare-dg",
    )?);
    let dg_addr = config.addrs(Quadrant::Dg).workload.to_string();
    let out = agent
        .exec("dx", "bench", &[&me_s, "measure", &dg_addr, mode])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the measuring workload failed");
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `mode`: `all` (the whole benchmark), `control` (lane opens only) or `shm-uds` (the
/// shared-memory and Unix-socket lanes' rows and their comparison, then lane opens).
fn orchestrate(mode: &str) -> anyhow::Result<()> {
    quadrant::daemon::require_root("bench lanes")?;
    let mut config = bench_config()?;
    eprintln!(
        "measuring (client in DX, services in DG; the whole benchmark takes about eight minutes)"
    );
    let mut results = session(&config, mode)?;
    if mode == "all" {
        eprintln!("again with lanes.tcp_acceleration: sk_msg");
        config.lanes.tcp_acceleration = TcpAcceleration::SkMsg;
        let accel = session(&config, "tcp")?;
        results.rows.extend(accel.rows.into_iter().map(|mut r| {
            r.transport.push_str(" +sk_msg");
            r
        }));
    }

    print_table(&results);
    if mode == "control" {
        return Ok(());
    }
    if mode == "shm-uds" {
        print_pacing_targets(&results.rows);
        return Ok(());
    }
    print_targets(&results);
    print_pacing_targets(&results.rows);
    print_acceleration(&results.rows);
    println!("json: {}", serde_json::to_string(&results)?);
    Ok(())
}

/// Every row, then the control plane's figures.
fn print_table(results: &Results) {
    let spin = std::env::var("QUADRANT_LANE_SPIN_US").unwrap_or_else(|_| "50".into());
    println!(
        "lane benchmark: request-response round trips, client in DX, servers in DG (lanes, bare tcp dx->dg) or DX (other baselines); 2 cores, not pinned; shm spin {spin} us"
    );
    println!(
        "latency from the intended send time (paced: the client's own timer lateness and queueing included); 'send p99' from the actual send"
    );
    println!(
        "{:<22} {:<14} {:>8} {:>7} {:>10} {:>10} {:>10} {:>11} {:>10}",
        "transport",
        "pacing",
        "size",
        "samples",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "send p99 us",
        "MiB/s"
    );
    for r in &results.rows {
        println!(
            "{:<22} {:<14} {:>8} {:>7} {:>10.2} {:>10.2} {:>10.2} {:>11.2} {:>10.1}{}",
            r.transport,
            r.pacing,
            r.size,
            r.samples,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.p99_send_us,
            r.mib_per_s,
            if r.baseline { "  (baseline)" } else { "" }
        );
    }
    let o = &results.open;
    println!(
        "control plane: lane open (attested connection -> policy -> limits -> memfd/eventfd/socket pair -> fd passing -> mapped) p50 {} us, p99 {} us, p99.9 {} us over {} opens",
        o.p50_us, o.p99_us, o.p999_us, o.samples
    );

    let o = &results.paced_open;
    println!(
        "control plane: lane open {} ms apart (the broker and the service asleep when it comes) p50 {} us, p99 {} us, p99.9 {} us over {} opens",
        OPEN_GAP.as_millis(),
        o.p50_us,
        o.p99_us,
        o.p999_us,
        o.samples
    );

    let r = &results.refused;
    println!(
        "control plane: refused open (schema, decision, answer; no lane built) p50 {} us, p99 {} us, p99.9 {} us",
        r.p50_us, r.p99_us, r.p999_us
    );
}

/// The performance targets P1–P3 against this run's baselines.
fn print_targets(results: &Results) {
    let (o, rows) = (&results.open, &results.rows);
    let get = |t: &str, s: usize| p(rows, t, s).map_or(f64::NAN, |r| r.p99_us);
    let uds64 = get("bare uds echo", 64);
    println!(
        "P1 control-plane p99 {:.1} us: <= 50 us {}; <= 4x bare UDS echo p99 ({:.1} us -> {:.2}x) {}",
        o.p99_us,
        verdict(o.p99_us <= 50.0),
        uds64,
        o.p99_us / uds64,
        verdict(o.p99_us <= 4.0 * uds64)
    );
    let paced = results.paced_open.p99_us;
    println!(
        "P1 control-plane p99 with opens {} ms apart {paced:.1} us: <= 300 us (spec) {}; <= 100 us (issue 14) {}",
        OPEN_GAP.as_millis(),
        verdict(paced <= 300.0),
        verdict(paced <= 100.0)
    );
    let k64 = 64 * 1024;
    let (shm, uds, ice) = (
        get("shm lane", k64),
        get("bare uds echo", k64),
        get("iceoryx2 busy-poll", k64),
    );
    println!(
        "P2 shm lane 64 KiB p99 {shm:.1} us: {:.2}x bare UDS ({uds:.1} us), target <= 0.25x {}; {:.2}x iceoryx2 ({ice:.1} us), target <= 1.0x {}",
        shm / uds,
        verdict(shm <= 0.25 * uds),
        shm / ice,
        verdict(shm <= ice)
    );
    for t in ["shm lane", "uds lane", "tcp+mtls lane dx->dg"] {
        let v = get(t, k64);
        println!(
            "P3 {t} 64 KiB p99 {v:.1} us: <= 1500 us {}",
            verdict(v <= 1500.0)
        );
    }
    let bulk = |t: &str| p(rows, t, 1 << 20).map_or(f64::NAN, |r| r.mib_per_s);
    let (tls, plain) = (bulk("tcp+mtls lane dx->dg"), bulk("bare tcp dx->dg"));
    println!(
        "P3 tcp+mtls bulk (1 MiB request-response) {tls:.0} MiB/s = {:.2}x plain tcp dx->dg ({plain:.0} MiB/s), target >= 0.5x {}",
        tls / plain,
        verdict(tls >= 0.5 * plain)
    );
}

/// The wake-up targets: the shared-memory lane no slower than the Unix-socket lane at every
/// pacing and size (p50 and p99), and no slower at p99 than iceoryx2 waiting the same way
/// (busy-polling back to back, its events when paced) at 64 KiB and 1 MiB.
fn print_pacing_targets(rows: &[Row]) {
    let (mut met, mut cases) = (0, 0);
    for pacing in LANE_PACINGS {
        for size in SIZES {
            let (Some(shm), Some(uds)) = (
                at(rows, "shm lane", pacing, size),
                at(rows, "uds lane", pacing, size),
            ) else {
                continue;
            };
            let ok = shm.p50_us <= uds.p50_us && shm.p99_us <= uds.p99_us;
            cases += 1;
            met += usize::from(ok);
            println!(
                "shm <= uds lane, {:<14} {:>8} B: p50 {:.1} vs {:.1} us, p99 {:.1} vs {:.1} us {}",
                pacing.name(),
                size,
                shm.p50_us,
                uds.p50_us,
                shm.p99_us,
                uds.p99_us,
                verdict(ok)
            );
        }
    }
    println!("shm <= uds lane at p50 and p99: {met} of {cases} pacings and sizes");
    for pacing in PACINGS {
        let ice = if pacing == Pacing::BackToBack {
            "iceoryx2 busy-poll"
        } else {
            "iceoryx2 event"
        };
        for size in [64 * 1024, 1 << 20] {
            let (Some(shm), Some(i)) = (
                at(rows, "shm lane", pacing, size),
                at(rows, ice, pacing, size),
            ) else {
                continue;
            };
            println!(
                "shm <= {ice}, {:<14} {:>8} B: p99 {:.1} vs {:.1} us {}",
                pacing.name(),
                size,
                shm.p99_us,
                i.p99_us,
                verdict(shm.p99_us <= i.p99_us)
            );
        }
    }
}

/// Whether the `sk_msg` acceleration wins over the same path without it (it is kept only where
/// it does: p50 <= 0.9x and p99 <= 1.0x), and how it compares with plain loopback TCP.
fn print_acceleration(rows: &[Row]) {
    let get = |t: &str, s: usize| p(rows, t, s).map_or(f64::NAN, |r| r.p99_us);
    let p50 = |t: &str, size: usize| p(rows, t, size).map_or(f64::NAN, |r| r.p50_us);
    let mut wins = 0;
    for size in SIZES {
        for t in ["bare tcp dx->dg", "tcp+mtls lane dx->dg"] {
            let accel = format!("{t} +sk_msg");
            let (a50, a99, b50, b99) = (
                p50(&accel, size),
                get(&accel, size),
                p50(t, size),
                get(t, size),
            );
            let win = a50 <= 0.9 * b50 && a99 <= b99;
            wins += usize::from(win);
            println!(
                "sk_msg {t} {size} B: p50 {:.2}x, p99 {:.2}x plain -> {}",
                a50 / b50,
                a99 / b99,
                if win { "wins" } else { "does not win" }
            );
        }
    }
    for size in SIZES {
        let (a50, a99) = (
            p50("bare tcp dx->dg +sk_msg", size),
            get("bare tcp dx->dg +sk_msg", size),
        );
        let (l50, l99) = (
            p50("bare tcp loopback", size),
            get("bare tcp loopback", size),
        );
        println!(
            "sk_msg bare tcp dx->dg {size} B vs plain loopback tcp: p50 {:.2}x, p99 {:.2}x",
            a50 / l50,
            a99 / l99
        );
    }
    println!(
        "sk_msg acceleration wins in {wins} of {} cases over the same path without it",
        SIZES.len() * 2
    );
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None => orchestrate("all"),
        Some(mode @ ("control" | "shm-uds")) => orchestrate(mode),
        Some("measure") => {
            let mode = args.get(3).map_or("all", String::as_str);
            let results = measure_all(args.get(2).context("measure DG_ADDR MODE")?, mode)?;
            println!("{}", serde_json::to_string(&results)?);
            Ok(())
        }
        Some("bare-server") => bare_server(
            args.get(2).context("bare-server uds|tcp AT")?,
            args.get(3).context("bare-server uds|tcp AT")?,
        ),
        Some("ice-server") => {
            ice_server(IceWait::parse(args.get(2).map_or("poll", String::as_str))?)
        }
        Some(other) => bail!("unknown mode {other}"),
    }
}
