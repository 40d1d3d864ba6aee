//! PX scaling benchmark (`cargo xtask bench scale`): what a service VIP costs at `connect()`
//! and how evenly it spreads connections over PX's instances.
//!
//! The orchestrator starts a real agent (instance `qscale`) whose PX runs four instances behind
//! service `api` (VIP `.100` of PX's prefix, port 8080), with this binary serving in each
//! instance (`serve`: every connection is answered with the instance's address and held until
//! the client closes it). The measuring workload runs in PG.
//!
//! `connect()`: in alternating sessions (five each) the workload connects 5,000 times (after
//! 500 warm-up connects) to the VIP and to instance 0's own address; with the kernel's program
//! statistics on (`BPF_ENABLE_STATS`) the orchestrator reads the pinned `connect4` program's
//! run time per run around each session, and the workload reports the `connect()` latency it
//! sees. The difference between the two is what translating the VIP costs (a connect to an
//! instance's address pays the one `LB_SERVICES` lookup that finds nothing).
//!
//! Paired: the workload then connects to the VIP and to the instances' own addresses (each in
//! turn, the same mix the VIP spreads over) alternately, 5,000 times each, and reports the
//! median of the pairs' differences — each pair shares the moment, so the machine's drift
//! between sessions cancels out.
//!
//! Capacity (SC-005): each instance limited to 0.2 CPU (`cpu.max` 2000 10000), a second
//! service whose server spends 200 µs of CPU on each 8-byte request; an open-loop generator in
//! PG sends at a fixed rate over 16 connections through the VIP and measures each request from
//! when it was due. X(N) is the highest rate whose p99 stays within twice the unloaded p99 (the
//! median of three 7-s runs at 100/s) with every request answered (bisection; each rate judged
//! from at least 2,000 requests — 3 s, longer below 667/s; a failed rate is run twice more and
//! holds if both pass; the bound found must then pass twice in a row, else it is lowered by 5 %
//! and retested), with N of the four instances taking
//! connections (the others drained); S(N) = X(N) / (N · X(1)). The whole search (N = 1, 2, 4
//! over both transports) runs three times in turn and each X(N) is the median of its three. The
//! generator's own reach is
//! checked at 1.5 × X(4) against a server without work on PG's loopback. The same search runs
//! over lanes: 16 lanes from PG to lane service `work` (the same 200 µs a request) that every
//! instance offers, spread by the broker over the instances taking lanes, each lane's requests
//! sent when due (or as soon as the previous answer is in) and timed from when they were due.
//!
//! Each instance's servers are kept on one CPU (`on-cpu`), the instances taking the CPUs in
//! turn. `scale capacity` runs this part alone.
//!
//! Share: 4,000 connections to the VIP one after another (each closed before the next) and 400
//! held open at once; the answers tell which instance took each, and the report gives every
//! instance's share and the largest deviation from an even share.
//!
//! Outside: the orchestrator itself, on the host in no quadrant, connects to the VIP (its packets
//! translated per packet in tc) and to instance 0's address in alternating sessions, reading the
//! tc egress program's run time per run around each, then in pairs as above.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use benches::{Agent, histogram, ns, per_run, stats, us};
use dataplane_common::Quadrant;
use quadrant::config::{Config, InstanceRef, ServiceConfig};
use serde::{Deserialize, Serialize};

const STATE_DIR: &str = "/run/quadrant-scalebench";
const PORT: u16 = 8080;
const INSTANCES: u8 = 4;
const CONNECTS: u32 = 5000;
const WARMUP: u32 = 500;
const SESSIONS: usize = 5;
const SEQUENTIAL: u32 = 4000;
const HELD: u32 = 400;
/// The capacity run's service: each request costs this much CPU in the instance.
const WORK_PORT: u16 = 8081;
const WORK_US: u64 = 200;
/// Each instance's CPU limit in the capacity run.
const INSTANCE_CPU: f64 = 0.2;
/// Connections the generator spreads its requests over (least connections: 4 per instance at 4).
const LOAD_CONNS: usize = 16;
const LOAD_SECS: f64 = 3.0;
/// The capacity run keeps each instance on one CPU, the instances taking the CPUs in turn
/// (instance 0 on CPU 1, 1 on CPU 0, …): an instance's quota is then spent on one CPU (spread
/// over two, the kernel hands each CPU a part of the period's quota, and a thread that moves
/// can find its CPU's part spent while the other's lies unused), and N instances load the CPUs
/// evenly. The generator runs where the scheduler puts it.
fn instance_cpu(k: u8) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (1 + usize::from(k)) % cpus
}

/// Requests a p99 is judged from at least (the run lasts longer at low rates): the p99 of 300
/// requests is their third-slowest, which the VM's noise moves more than the load does.
const P99_SAMPLES: f64 = 2000.0;
/// Whole capacity searches (N = 1, 2, 4 over both transports), taken in turn: each X(N) is
/// the median of its rounds, so that one noisy search — a run near the edge either keeps up or
/// falls behind for good, and which it does at the same rate changes from run to run — moves
/// no S(N) on its own, and drift over the run touches every N alike.
const ROUNDS: usize = 3;
/// Each of the three unloaded runs (100/s): the unloaded p99 is their median.
const UNLOADED_SECS: f64 = 7.0;

fn bench_config() -> anyhow::Result<Config> {
    let mut c = benches::isolated_config("qscale", "qsc", STATE_DIR, 245)?;
    c.quadrants.get_mut("px").context("px")?.instances = INSTANCES;
    c.quadrants.get_mut("px").context("px")?.capacity.cpu = Some(INSTANCE_CPU);
    c.services = vec![
        ServiceConfig {
            name: "api".into(),
            quadrant: "px".into(),
            port: PORT,
            vip: "10.245.2.100".parse()?,
            protocol: "tcp".into(),
            affinity: "none".into(),
            internal_traffic_policy: "cluster".into(),
            kubernetes_service: None,
        },
        ServiceConfig {
            name: "work".into(),
            quadrant: "px".into(),
            port: WORK_PORT,
            vip: "10.245.2.101".parse()?,
            protocol: "tcp".into(),
            affinity: "none".into(),
            internal_traffic_policy: "cluster".into(),
            kubernetes_service: None,
        },
    ];
    c.validate()?;
    Ok(c)
}

// ---- the server (runs in each PX instance) ----

fn serve(at: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(at)?;
    println!("listening");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let me = conn
                .local_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            if conn.write_all(format!("{me}\n").as_bytes()).is_ok() {
                let mut buf = [0u8; 64];
                while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
        });
    }
    Ok(())
}

/// Spends `us` microseconds of this thread's CPU time (not of the clock: a thread that waits
/// for its CPU meanwhile still does all of its work).
fn spend_cpu(us: u64) {
    let cpu = || {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
            .ok()
            .map(Duration::from)
    };
    let work = Duration::from_micros(us);
    if let Some(start) = cpu() {
        while cpu().is_some_and(|t| t < start + work) {
            std::hint::spin_loop();
        }
    } else {
        // No thread clock: the clock's time instead.
        let until = Instant::now() + work;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

/// Answers each 8-byte request after spending `work_us` of CPU on it.
fn serve_work(at: SocketAddr, work_us: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(at)?;
    println!("listening");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        std::thread::spawn(move || {
            let mut req = [0u8; 8];
            while conn.read_exact(&mut req).is_ok() {
                spend_cpu(work_us);
                if conn.write_all(&req).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Offers lane service `work` and answers every request on every lane after `work_us` of CPU.
fn serve_lane_work(work_us: u64) -> anyhow::Result<()> {
    let mut listener = quadrant::lanes::LaneListener::listen(None, "work", None)?;
    println!("listening");
    std::io::stdout().flush()?;
    loop {
        let mut lane = listener.accept()?;
        std::thread::spawn(move || {
            while lane
                .respond_with(
                    |r| {
                        spend_cpu(work_us);
                        r.len()
                    },
                    |r, out| out.copy_from_slice(r),
                )
                .unwrap_or(false)
            {}
        });
    }
}

// ---- the measuring workload (runs in PG) ----

/// An open-loop run's schedule: how many requests `rate` makes in `secs`, and when the first is
/// due (a moment from now, once every connection is set up).
fn schedule(rate: f64, secs: f64) -> (u64, Instant) {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "rates and durations of a benchmark"
    )]
    let total = (rate * secs) as u64;
    (total, Instant::now() + Duration::from_millis(20))
}

/// The open-loop generator over lanes: `lanes` lanes to PX's `work` (the broker spreads them
/// over the instances taking lanes), request `i` due at `start + i / rate` on lane `i % lanes`;
/// each lane's thread sends its requests when due (or as soon as the previous answer is in) and
/// counts latency from when each was due.
fn lane_load(rate: f64, secs: f64, lanes: usize) -> anyhow::Result<Load> {
    let mut client = quadrant::lanes::LaneClient::connect(None)?;
    let opened = (0..lanes)
        .map(|_| client.open("px", "work", quadrant::lanes::TransportChoice::Auto))
        .collect::<Result<Vec<_>, _>>()?;
    let mut lanes_on = BTreeMap::new();
    for lane in &opened {
        *lanes_on.entry(lane.instance()).or_default() += 1;
    }
    let (total, start) = schedule(rate, secs);
    let threads: Vec<_> = opened
        .into_iter()
        .enumerate()
        .map(|(k, mut lane)| {
            std::thread::spawn(
                move || -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>)> {
                    let mut h = histogram()?;
                    let (mut sent, mut got) = (0u64, 0u64);
                    let mut reply = Vec::new();
                    let mut id = k as u64;
                    while id < total {
                        #[expect(clippy::cast_precision_loss, reason = "ids far below 2^52")]
                        let due = start + Duration::from_secs_f64(id as f64 / rate);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        sent += 1;
                        if lane.request(&id.to_le_bytes(), &mut reply).is_ok() {
                            got += 1;
                            h.record(ns(due.elapsed()).max(1))?;
                        }
                        id += lanes as u64;
                    }
                    Ok((sent, got, h))
                },
            )
        })
        .collect();
    let (mut sent, mut received, mut all) = (0, 0, histogram()?);
    for t in threads {
        let (s, g, h) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a lane thread panicked"))??;
        sent += s;
        received += g;
        all.add(&h)?;
    }
    Ok(Load {
        rate,
        sent,
        received,
        p50_ns: all.value_at_quantile(0.50),
        p99_ns: all.value_at_quantile(0.99),
        lanes_on,
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct Load {
    rate: f64,
    sent: u64,
    received: u64,
    p50_ns: u64,
    p99_ns: u64,
    /// Over lanes: how many of the lanes each instance took, by instance index.
    #[serde(default)]
    lanes_on: BTreeMap<u8, u32>,
}

/// An open-loop generator: request `i` is due at `start + i / rate` whatever the answers do,
/// goes on connection `i % conns`, and its latency runs from when it was due (so a late sender
/// or a queue at the server shows, rather than slowing the generator down).
fn load(at: SocketAddr, rate: f64, secs: f64, conns: usize) -> anyhow::Result<Load> {
    let streams = (0..conns)
        .map(|_| {
            let s = TcpStream::connect(at)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (total, start) = schedule(rate, secs);
    let due = move |id: u64| {
        #[expect(clippy::cast_precision_loss, reason = "ids far below 2^52")]
        let at = id as f64 / rate;
        start + Duration::from_secs_f64(at)
    };
    let receivers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let mut s = s.try_clone()?;
            let expect = (total + (conns - 1 - k) as u64) / conns as u64;
            Ok(std::thread::spawn(
                move || -> anyhow::Result<(u64, hdrhistogram::Histogram<u64>)> {
                    let mut h = histogram()?;
                    let mut got = 0;
                    let mut reply = [0u8; 8];
                    while got < expect && s.read_exact(&mut reply).is_ok() {
                        let id = u64::from_le_bytes(reply);
                        h.record(ns(Instant::now().saturating_duration_since(due(id))).max(1))?;
                        got += 1;
                    }
                    Ok((got, h))
                },
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut writers = streams;
    for id in 0..total {
        let when = due(id);
        let now = Instant::now();
        if when > now {
            std::thread::sleep(when - now);
        }
        let k = usize::try_from(id).unwrap_or(0) % conns;
        writers[k].write_all(&id.to_le_bytes())?;
    }
    let mut all = histogram()?;
    let mut received = 0;
    for r in receivers {
        let (got, h) = r
            .join()
            .map_err(|_| anyhow::anyhow!("a receiver panicked"))??;
        received += got;
        all.add(h)?;
    }
    Ok(Load {
        rate,
        sent: total,
        received,
        p50_ns: all.value_at_quantile(0.5),
        p99_ns: all.value_at_quantile(0.99),
        lanes_on: BTreeMap::new(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct Connects {
    count: u32,
    p50_ns: u64,
    p99_ns: u64,
}

fn connects(at: SocketAddr) -> anyhow::Result<Connects> {
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

#[derive(Debug, Serialize, Deserialize)]
struct Paired {
    count: u32,
    a_p50_ns: u64,
    b_p50_ns: u64,
    a_p99_ns: u64,
    b_p99_ns: u64,
    /// Median of (a − b) over the pairs.
    diff_p50_ns: i64,
}

/// Connects to `a` and to one of `bs` (each in turn) alternately, `CONNECTS` times each: every
/// pair shares the moment, so the difference of a pair is the destination's alone.
fn paired(a: SocketAddr, bs: &[SocketAddr]) -> anyhow::Result<Paired> {
    let (mut ha, mut hb) = (histogram()?, histogram()?);
    let mut diffs = Vec::new();
    let time = |at: SocketAddr| -> anyhow::Result<u64> {
        let start = Instant::now();
        let s = TcpStream::connect(at).with_context(|| format!("connect to {at}"))?;
        let took = ns(start.elapsed()).max(1);
        drop(s);
        Ok(took)
    };
    for i in 0..WARMUP + CONNECTS {
        let b = bs[usize::try_from(i).unwrap_or(0) % bs.len().max(1)];
        // Alternate which goes first, so neither always follows the other.
        let (ta, tb) = if i % 2 == 0 {
            let ta = time(a)?;
            (ta, time(b)?)
        } else {
            let tb = time(b)?;
            (time(a)?, tb)
        };
        if i >= WARMUP {
            ha.record(ta)?;
            hb.record(tb)?;
            diffs.push(i64::try_from(ta).unwrap_or(i64::MAX) - i64::try_from(tb).unwrap_or(0));
        }
    }
    diffs.sort_unstable();
    Ok(Paired {
        count: CONNECTS,
        a_p50_ns: ha.value_at_quantile(0.5),
        b_p50_ns: hb.value_at_quantile(0.5),
        a_p99_ns: ha.value_at_quantile(0.99),
        b_p99_ns: hb.value_at_quantile(0.99),
        diff_p50_ns: diffs.get(diffs.len() / 2).copied().unwrap_or_default(),
    })
}

fn answer(s: &TcpStream) -> anyhow::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// Connections to `at`, one after another (`held` false: each closed before the next) or all
/// held open; how many each instance answered.
fn share(at: SocketAddr, n: u32, held: bool) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut counts = BTreeMap::new();
    let mut open = Vec::new();
    for _ in 0..n {
        let s = TcpStream::connect(at)?;
        *counts.entry(answer(&s)?).or_default() += 1;
        if held {
            open.push(s);
        }
    }
    Ok(counts)
}

// ---- the orchestrator ----

fn workload<T: for<'de> Deserialize<'de>>(agent: &Agent, args: &[&str]) -> anyhow::Result<T> {
    agent.measure("pg", args)
}

fn start_servers(agent: &mut Agent) -> anyhow::Result<()> {
    let listen = format!("0.0.0.0:{PORT}");
    for k in 0..INSTANCES {
        agent.serve_on("px", k, "api", &["serve", &listen])?;
    }
    wait_ready(agent, "api")
}

/// Waits until every instance is ready for `service` (the agent probes every 100 ms).
fn wait_ready(agent: &Agent, service: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = agent
            .quadrant()
            .args(["instances", "--output", "json"])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ready = v["instances"]
            .as_array()
            .context("instances")?
            .iter()
            .filter(|i| i["quadrant"] == "px" && i["services"][service] == true)
            .count();
        if ready == usize::from(INSTANCES) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {INSTANCES} instances became ready for {service}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Largest deviation of any instance's share from an even one, in percent of the even share.
fn deviation(counts: &BTreeMap<String, u32>, total: u32) -> f64 {
    let even = f64::from(total) / f64::from(INSTANCES);
    (0..INSTANCES)
        .map(|k| {
            let n = counts.values().nth(usize::from(k)).copied().unwrap_or(0);
            (f64::from(n) - even).abs() / even * 100.0
        })
        .fold(0.0, f64::max)
        .max(if counts.len() < usize::from(INSTANCES) {
            100.0
        } else {
            0.0
        })
}

/// Starts `scale serve-work` in every instance of PX, and in PG on loopback for the
/// generator's own check.
fn start_work_servers(agent: &mut Agent) -> anyhow::Result<()> {
    let work = WORK_US.to_string();
    let listen = format!("0.0.0.0:{WORK_PORT}");
    for k in 0..INSTANCES {
        for (workload, command) in [
            ("work", vec!["serve-work", &listen, &work]),
            ("lanework", vec!["serve-lane-work", &work]),
        ] {
            let args = pinned(&command, instance_cpu(k));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            agent.serve_on("px", k, workload, &args)?;
        }
    }
    // The generator's check server stands where instance 0 does.
    let loopback = format!("127.0.0.1:{WORK_PORT}");
    let args = pinned(&["serve-work", &loopback, "0"], instance_cpu(0));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.serve_on("pg", 0, "work", &args)?;
    wait_ready(agent, "work")
}

fn run_lane_load(agent: &Agent, rate: f64, secs: f64) -> anyhow::Result<Load> {
    workload(
        agent,
        &[
            "lane-load",
            &format!("{rate:.0}"),
            &secs.to_string(),
            &LOAD_CONNS.to_string(),
        ],
    )
}

/// How long a run at `rate` lasts: [`LOAD_SECS`], or long enough for [`P99_SAMPLES`] requests.
fn secs_for(rate: f64) -> f64 {
    LOAD_SECS.max(P99_SAMPLES / rate).ceil()
}

fn run_load(agent: &Agent, target: &str, rate: f64, secs: f64) -> anyhow::Result<Load> {
    workload(
        agent,
        &[
            "load",
            target,
            &format!("{rate:.0}"),
            &secs.to_string(),
            &LOAD_CONNS.to_string(),
        ],
    )
}

/// The highest rate whose p99 stays within twice the unloaded p99 with every request answered,
/// by bisection between an unloaded rate and `hi`.
fn highest_rate(
    run: impl Fn(f64, f64) -> anyhow::Result<Load>,
    unloaded_p99: u64,
    hi: f64,
) -> anyhow::Result<f64> {
    let ok = |l: &Load| l.received == l.sent && l.p99_ns <= 2 * unloaded_p99;
    let judge = |rate: f64| -> anyhow::Result<bool> {
        let l = run(rate, secs_for(rate))?;
        let on = if l.lanes_on.is_empty() {
            String::new()
        } else {
            format!(", lanes on the instances {:?}", l.lanes_on)
        };
        eprintln!(
            "  {rate:.0}/s: p50 {:.0} µs p99 {:.0} µs, {} of {} answered{on}",
            us(l.p50_ns),
            us(l.p99_ns),
            l.received,
            l.sent
        );
        Ok(ok(&l))
    };
    // A rate holds if it passes once, or, after a failure, two of three runs: a single noisy
    // run on the shared machine does not set the bound low.
    let holds = |rate: f64| -> anyhow::Result<bool> {
        if judge(rate)? {
            return Ok(true);
        }
        Ok(judge(rate)? && judge(rate)?)
    };
    let (mut lo, mut hi) = (100.0_f64, hi);
    for _ in 0..7 {
        let mid = f64::midpoint(lo, hi);
        if holds(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // The bound is retested: it must pass twice more in a row, or it is lowered by 5 % and
    // retested (a lucky run does not set it high either).
    for _ in 0..6 {
        if judge(lo)? && judge(lo)? {
            eprintln!("  bound {lo:.0}/s confirmed");
            return Ok(lo);
        }
        lo *= 0.95;
    }
    eprintln!("  bound {lo:.0}/s after six retests");
    Ok(lo)
}

/// A load run at a rate.
type Runner<'a> = dyn Fn(f64, f64) -> anyhow::Result<Load> + 'a;

/// X(N) and the unloaded p99 it was judged against, by transport and N.
type Capacities = BTreeMap<(&'static str, u8), (f64, u64)>;

/// One search of X(N) for N = 1, 2, 4 instances (the others drained) over TCP and lanes.
fn capacity_round(agent: &mut Agent, per_instance: f64) -> anyhow::Result<Capacities> {
    let vip = format!("10.245.2.101:{WORK_PORT}");
    let mut x = BTreeMap::new();
    for n in [1u8, 2, 4] {
        for k in 1..INSTANCES {
            let verb = if k < n { "--resume" } else { "" };
            let mut cmd = agent.quadrant();
            cmd.args(["drain", "px", &k.to_string()]);
            if !verb.is_empty() {
                cmd.arg(verb);
            }
            if !cmd.stdout(Stdio::null()).status()?.success() {
                bail!("cannot drain px {k}");
            }
        }
        let top = per_instance * f64::from(n) * 1.5;
        let tcp = |rate, secs| run_load(agent, &vip, rate, secs);
        let lanes = |rate, secs| run_lane_load(agent, rate, secs);
        let runners: [(&'static str, &Runner<'_>); 2] = [("tcp", &tcp), ("lanes", &lanes)];
        for (how, run) in runners {
            // The unloaded p99: the median of three runs at 100/s (700 requests each), so that
            // one stall of the machine does not set the bound.
            let mut p99s = (0..3)
                .map(|_| Ok(run(100.0, UNLOADED_SECS)?.p99_ns))
                .collect::<anyhow::Result<Vec<_>>>()?;
            p99s.sort_unstable();
            let unloaded = p99s[1];
            eprintln!(
                "N = {n} over {how}: unloaded p99 {:.0} µs (median of {:.0} / {:.0} / {:.0} µs \
                 at 100/s); searching up to {top:.0}/s",
                us(unloaded),
                us(p99s[0]),
                us(p99s[1]),
                us(p99s[2]),
            );
            let r = highest_rate(run, unloaded, top)?;
            x.insert((how, n), (r, unloaded));
        }
    }
    Ok(x)
}

/// SC-005: X(N) for N = 1, 2, 4 instances, S(N) = X(N) / (N · X(1)), from [`ROUNDS`] whole
/// searches taking turns (N = 1, 2, 4, then again), X(N) the median of its rounds.
fn capacity(agent: &mut Agent) -> anyhow::Result<()> {
    start_work_servers(agent)?;
    // One instance's capacity: INSTANCE_CPU / WORK_US.
    let per_instance = INSTANCE_CPU * 1e6 / f64::from(u32::try_from(WORK_US).unwrap_or(1));
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS {
        eprintln!("capacity round {round} of {ROUNDS}");
        rounds.push(capacity_round(agent, per_instance)?);
    }
    let mut x = Capacities::new();
    for key in rounds[0].keys() {
        let mut p99s: Vec<u64> = rounds.iter().map(|r| r[key].1).collect();
        p99s.sort_unstable();
        let unloaded = p99s[p99s.len() / 2];
        x.insert(
            *key,
            (median(rounds.iter().map(|r| r[key].0).collect()), unloaded),
        );
    }
    let x4 = x.get(&("tcp", 4)).map_or(0.0, |v| v.0);
    let check = run_load(
        agent,
        &format!("127.0.0.1:{WORK_PORT}"),
        1.5 * x4,
        secs_for(1.5 * x4),
    )?;
    println!(
        "generator alone (PG loopback, no work) at 1.5 × X(4) = {:.0}/s: {} of {} answered, p99 \
         {:.0} µs",
        1.5 * x4,
        check.received,
        check.sent,
        us(check.p99_ns)
    );
    println!(
        "capacity: instances of {INSTANCE_CPU} CPU (cpu.max 2000 10000), each on one CPU, \
         {WORK_US} µs of CPU a request, open loop over {LOAD_CONNS} connections through the VIP, \
         {LOAD_SECS} s a rate; X(N) the median of {ROUNDS} rounds"
    );
    println!(
        "{:<6} {:<3} {:>16} {:>16} {:>8}   rounds: X(N) req/s (S(N))",
        "over", "N", "unloaded p99 µs", "X(N) req/s", "S(N)"
    );
    let s = |x: &Capacities, how: &str, n: u8| {
        let x1 = x.get(&(how, 1)).map_or(1.0, |v| v.0);
        x.get(&(how, n)).map_or(0.0, |v| v.0) / (f64::from(n) * x1)
    };
    for ((how, n), (r, p99)) in &x {
        let each: Vec<String> = rounds
            .iter()
            .map(|round| format!("{:.0} ({:.2})", round[&(*how, *n)].0, s(round, how, *n)))
            .collect();
        println!(
            "{how:<6} {n:<3} {:>16.0} {r:>16.0} {:>8.2}   {}",
            us(*p99),
            s(&x, how, *n),
            each.join(", ")
        );
    }
    Ok(())
}

fn orchestrate() -> anyhow::Result<()> {
    quadrant::daemon::require_root("bench scale")?;
    // Program run time is counted while this descriptor is open.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let config = bench_config()?;
    let mut agent = Agent::start(&config, STATE_DIR, "qscale")?;
    start_servers(&mut agent)?;
    let vip = format!("10.245.2.100:{PORT}");
    let direct = format!(
        "{}:{PORT}",
        config.instance_addr(InstanceRef::new(Quadrant::Px, 0))
    );
    let mut rows: BTreeMap<&str, Vec<(f64, Connects)>> = BTreeMap::new();
    for round in 0..SESSIONS {
        eprintln!("session {}/{SESSIONS}: VIP, then instance 0", round + 1);
        for (name, target) in [("vip", &vip), ("instance", &direct)] {
            let before = stats(&config, "quadrant_connect4")?;
            let c: Connects = workload(&agent, &["connects", target])?;
            let after = stats(&config, "quadrant_connect4")?;
            let (per, _, _) = per_run(before, after, WARMUP + CONNECTS);
            rows.entry(name).or_default().push((per, c));
        }
    }
    println!(
        "connect() from PG, {CONNECTS} connects a session, {SESSIONS} sessions each, taking turns"
    );
    println!(
        "{:<10} {:>14} {:>16} {:>16}",
        "target", "connect4 ns", "connect p50 µs", "connect p99 µs"
    );
    let mut kernel = BTreeMap::new();
    for (name, sessions) in &rows {
        let k = median(sessions.iter().map(|(p, _)| *p).collect());
        let p50 = median(sessions.iter().map(|(_, c)| us(c.p50_ns)).collect());
        let p99 = median(sessions.iter().map(|(_, c)| us(c.p99_ns)).collect());
        println!("{name:<10} {k:>14.1} {p50:>16.2} {p99:>16.2}");
        for (i, (p, c)) in sessions.iter().enumerate() {
            println!(
                "  session {}: {p:.1} ns, p50 {:.2} µs, p99 {:.2} µs",
                i + 1,
                us(c.p50_ns),
                us(c.p99_ns)
            );
        }
        kernel.insert(*name, (k, p50));
    }
    let (kv, pv) = kernel.get("vip").copied().unwrap_or_default();
    let (ki, pi) = kernel.get("instance").copied().unwrap_or_default();
    println!(
        "VIP translation: connect4 +{:.1} ns a run (target ≤ 1 µs), connect() p50 {:+.2} µs \
         across sessions",
        kv - ki,
        pv - pi
    );
    // The VIP against the instances' own addresses in turn: the same mix of destinations (the
    // VIP's connections spread over all four), so only the translation differs.
    let addrs: Vec<String> = (0..INSTANCES)
        .map(|k| {
            format!(
                "{}:{PORT}",
                config.instance_addr(InstanceRef::new(Quadrant::Px, k))
            )
        })
        .collect();
    let mut args = vec!["paired", vip.as_str()];
    args.extend(addrs.iter().map(String::as_str));
    let p: Paired = workload(&agent, &args)?;
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds far below 2^52")]
    let diff_us = p.diff_p50_ns as f64 / 1000.0;
    println!(
        "paired, {} connects to each taking turns: VIP p50 {:.2} µs p99 {:.2} µs, the instances' \
         own addresses in turn p50 {:.2} µs p99 {:.2} µs; median of the pairs' differences \
         {diff_us:+.2} µs (target ≤ 1 µs)",
        p.count,
        us(p.a_p50_ns),
        us(p.a_p99_ns),
        us(p.b_p50_ns),
        us(p.b_p99_ns),
    );
    for (what, n, held) in [
        ("one after another", SEQUENTIAL, false),
        ("held at once", HELD, true),
    ] {
        let counts: BTreeMap<String, u32> = workload(
            &agent,
            &[
                "share",
                &vip,
                &n.to_string(),
                if held { "held" } else { "closed" },
            ],
        )?;
        println!(
            "share, {n} connections {what}: {} — largest deviation from even {:.1} % (target ≤ 5 %)",
            counts
                .iter()
                .map(|(a, c)| format!("{a} {c}"))
                .collect::<Vec<_>>()
                .join(", "),
            deviation(&counts, n)
        );
    }
    outside(&config, &vip, &addrs)?;
    capacity(&mut agent)
}

/// Connections from outside the quadrants: this process (on the host, in no quadrant) connects
/// to the VIP, whose packets tc translates, and to the instances' own addresses, alternating
/// sessions with the tc egress program's run time read around each; then paired connects.
fn outside(config: &Config, vip: &str, addrs: &[String]) -> anyhow::Result<()> {
    let vip: SocketAddr = vip.parse()?;
    let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let mut rows: BTreeMap<&str, Vec<(f64, f64, Connects)>> = BTreeMap::new();
    for round in 0..SESSIONS {
        eprintln!(
            "outside session {}/{SESSIONS}: VIP, then instance 0",
            round + 1
        );
        for (name, target) in [("vip", vip), ("instance", addrs[0])] {
            let before = stats(config, "quadrant_tc_egress")?;
            let c = connects(target)?;
            let after = stats(config, "quadrant_tc_egress")?;
            let (per, _, runs) = per_run(before, after, WARMUP + CONNECTS);
            rows.entry(name).or_default().push((per, runs, c));
        }
    }
    println!(
        "connect() from the host (translated in tc), {CONNECTS} connects a session, {SESSIONS} \
         sessions each"
    );
    println!(
        "{:<10} {:>16} {:>16} {:>16} {:>16}",
        "target", "tc egress ns/run", "runs/connect", "connect p50 µs", "connect p99 µs"
    );
    let mut figures = BTreeMap::new();
    for (name, sessions) in &rows {
        let k = median(sessions.iter().map(|(p, _, _)| *p).collect());
        let runs = median(sessions.iter().map(|(_, r, _)| *r).collect());
        let p50 = median(sessions.iter().map(|(_, _, c)| us(c.p50_ns)).collect());
        let p99 = median(sessions.iter().map(|(_, _, c)| us(c.p99_ns)).collect());
        println!("{name:<10} {k:>16.1} {runs:>16.2} {p50:>16.2} {p99:>16.2}");
        figures.insert(*name, (k, p50));
    }
    let (kv, pv) = figures.get("vip").copied().unwrap_or_default();
    let (ki, pi) = figures.get("instance").copied().unwrap_or_default();
    println!(
        "outside translation: tc egress {:+.1} ns a run, connect() p50 {:+.2} µs across sessions",
        kv - ki,
        pv - pi
    );
    let p = paired(vip, &addrs)?;
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds far below 2^52")]
    let diff_us = p.diff_p50_ns as f64 / 1000.0;
    println!(
        "paired from the host, {} connects to each: VIP p50 {:.2} µs p99 {:.2} µs, the \
         instances' own addresses p50 {:.2} µs p99 {:.2} µs; median of the pairs' differences \
         {diff_us:+.2} µs",
        p.count,
        us(p.a_p50_ns),
        us(p.a_p99_ns),
        us(p.b_p50_ns),
        us(p.b_p99_ns),
    );
    Ok(())
}

/// Keeps this process (and the threads it starts) on one CPU.
fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("keeping the process on CPU {cpu}"))
}

/// `on-cpu K ARGS…`: runs ARGS on CPU K.
fn pinned(args: &[&str], cpu: usize) -> Vec<String> {
    let mut v = vec!["on-cpu".to_owned(), cpu.to_string()];
    v.extend(args.iter().map(|a| (*a).to_owned()));
    v
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "on-cpu") {
        pin(args.get(2).context("on-cpu CPU COMMAND…")?.parse()?)?;
        args.drain(1..3);
    }
    let at =
        |i: usize| -> anyhow::Result<SocketAddr> { Ok(args.get(i).context("ADDR:PORT")?.parse()?) };
    match args.get(1).map(String::as_str) {
        None => orchestrate(),
        Some("capacity") => {
            quadrant::daemon::require_root("bench scale capacity")?;
            let mut agent = Agent::start(&bench_config()?, STATE_DIR, "qscale")?;
            capacity(&mut agent)
        }
        Some("serve") => serve(at(2)?),
        Some("connects") => {
            println!("{}", serde_json::to_string(&connects(at(2)?)?)?);
            Ok(())
        }
        Some("paired") => {
            let bs = (3..args.len())
                .map(at)
                .collect::<anyhow::Result<Vec<_>>>()?;
            println!("{}", serde_json::to_string(&paired(at(2)?, &bs)?)?);
            Ok(())
        }
        Some("serve-work") => serve_work(
            at(2)?,
            args.get(3)
                .context("serve-work ADDR:PORT WORK_US")?
                .parse()?,
        ),
        Some("load") => {
            let arg = |i: usize| args.get(i).context("load ADDR:PORT RATE SECS CONNS");
            let l = load(at(2)?, arg(3)?.parse()?, arg(4)?.parse()?, arg(5)?.parse()?)?;
            println!("{}", serde_json::to_string(&l)?);
            Ok(())
        }
        Some("serve-lane-work") => {
            serve_lane_work(args.get(2).context("serve-lane-work WORK_US")?.parse()?)
        }
        Some("lane-load") => {
            let arg = |i: usize| args.get(i).context("lane-load RATE SECS LANES");
            let l = lane_load(arg(2)?.parse()?, arg(3)?.parse()?, arg(4)?.parse()?)?;
            println!("{}", serde_json::to_string(&l)?);
            Ok(())
        }
        Some("share") => {
            let n = args
                .get(3)
                .context("share ADDR:PORT N held|closed")?
                .parse()?;
            let held = args.get(4).is_some_and(|h| h == "held");
            println!("{}", serde_json::to_string(&share(at(2)?, n, held)?)?);
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}"),
    }
}
