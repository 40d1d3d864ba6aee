//! `cargo xtask bench chaos`: what chaos faults cost and how fast they act.
//!
//! - The armed check on the hot path: the tc egress program's kernel time per packet (BPF run-time
//!   statistics) and the round trips of UDP requests from DX to DG, with no fault in the
//!   dataplane (the programs read `CHAOS_ARMED` and stop) and with one armed that this traffic
//!   does not match (they also look up three `CHAOS_FAULTS` keys) — rounds alternating in the
//!   same run.
//! - Reaction: requests from the host to DG every 200 µs while `quadrant chaos inject drop --for
//!   1` runs: from the command's start to the first request lost, and from the fault's expiry
//!   (its `expires_ns`) to the first request answered again.
//! - Delay accuracy: measured against the configured delay where the kernel has the fq qdisc.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use benches::{Agent, per_run, stats};
use dataplane_common::Quadrant;
use quadrant::{breakers::monotonic_ns, config::Config, loader::programs};
use serde::{Deserialize, Serialize};

const STATE_DIR: &str = "/run/quadrant-chaosbench";
const PORT: u16 = 7000;
const ROUNDS: usize = 6;
const REQUESTS: u32 = 4000;

fn bench_config() -> anyhow::Result<Config> {
    let c = benches::isolated_config("qchaos", "qch", STATE_DIR, 247)?;
    c.validate()?;
    Ok(c)
}

/// Round trips of one probe run.
#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    answered: u32,
    p50_us: f64,
    p99_us: f64,
}

/// Echoes datagrams (in DG).
fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let s = UdpSocket::bind(addr)?;
    println!("listening");
    let mut buf = [0u8; 64];
    loop {
        let (n, peer) = s.recv_from(&mut buf)?;
        let _ = s.send_to(&buf[..n], peer);
    }
}

/// `count` requests one at a time (in DX), each waiting up to 100 ms.
fn probe(addr: SocketAddr, count: u32) -> anyhow::Result<Probe> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 8];
    for i in 0..count {
        let start = Instant::now();
        s.send(&i.to_ne_bytes())?;
        if let Ok(n) = s.recv(&mut buf)
            && buf[..n] == i.to_ne_bytes()
        {
            rtts.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into the sorted round trips"
        )]
        let i = (q * (rtts.len().saturating_sub(1)) as f64) as usize;
        rtts.get(i).copied().unwrap_or(0.0)
    };
    Ok(Probe {
        answered: u32::try_from(rtts.len()).unwrap_or(u32::MAX),
        p50_us: at(0.50),
        p99_us: at(0.99),
    })
}

/// Per round: tc egress ns/run, p50 and p99 round trip (µs).
type Samples = (Vec<f64>, Vec<f64>, Vec<f64>);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn chaos(agent: &Agent, args: &[&str]) -> anyhow::Result<()> {
    let out = agent
        .quadrant()
        .arg("chaos")
        .args(args)
        .stdout(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "quadrant chaos {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Alternating rounds without and with an armed fault that does not match the traffic.
fn armed_check(agent: &Agent, config: &Config, dg: SocketAddr) -> anyhow::Result<()> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let mut rows: BTreeMap<&str, Samples> = BTreeMap::new();
    let dg_arg = dg.to_string();
    let count = REQUESTS.to_string();
    for round in 0..ROUNDS * 3 {
        let mode = ["no fault", "ended fault", "armed, not matching"][round % 3];
        chaos(agent, &["recover", "--all"])?;
        let fault = |secs: &str| {
            chaos(
                agent,
                &[
                    "inject",
                    "drop",
                    "--from",
                    "pg",
                    "--to",
                    "px",
                    "--for",
                    secs,
                    "--allow-production",
                ],
            )
        };
        match round % 3 {
            1 => {
                // Armed until a moment ago: the programs read the clock and stop.
                fault("1")?;
                std::thread::sleep(Duration::from_millis(1_100));
            }
            2 => fault("120")?,
            _ => {}
        }
        let before = stats(config, programs::TC_EGRESS)?;
        let p: Probe = agent.measure("dx", &["probe", &dg_arg, &count])?;
        let after = stats(config, programs::TC_EGRESS)?;
        anyhow::ensure!(p.answered == REQUESTS, "requests lost: {p:?}");
        let (ns, _, _) = per_run(before, after, 1);
        let row = rows.entry(mode).or_default();
        row.0.push(ns);
        row.1.push(p.p50_us);
        row.2.push(p.p99_us);
    }
    chaos(agent, &["recover", "--all"])?;
    println!(
        "armed check ({ROUNDS} rounds each, in turn; {REQUESTS} UDP round trips DX -> DG per round; medians):"
    );
    println!(
        "  {:<22} {:>16} {:>10} {:>10}",
        "dataplane", "tc egress ns/run", "p50 us", "p99 us"
    );
    let mut medians = BTreeMap::new();
    for (name, (ns, p50, p99)) in rows {
        let m = (median(ns), median(p50), median(p99));
        println!("  {name:<22} {:>16.1} {:>10.1} {:>10.1}", m.0, m.1, m.2);
        medians.insert(name, m);
    }
    let off = medians.get("no fault").copied().unwrap_or_default();
    for name in ["ended fault", "armed, not matching"] {
        if let Some(on) = medians.get(name) {
            println!(
                "  {name} vs no fault: {:+.1} ns per packet, p50 {:+.1} %, p99 {:+.1} %",
                on.0 - off.0,
                (on.1 / off.1 - 1.0) * 100.0,
                (on.2 / off.2 - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

/// Requests from the host every 200 µs while a one-second drop fault comes and goes.
fn reaction(agent: &Agent, dg: SocketAddr) -> anyhow::Result<()> {
    let s = Arc::new(UdpSocket::bind("0.0.0.0:0")?);
    s.connect(dg)?;
    s.set_read_timeout(Some(Duration::from_millis(10)))?;
    let sent: Arc<Mutex<Vec<u64>>> = Arc::default();
    let answered: Arc<Mutex<Vec<bool>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let (s, answered, stop) = (Arc::clone(&s), Arc::clone(&answered), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(8) = s.recv(&mut buf) {
                    let i = usize::try_from(u64::from_ne_bytes(buf)).unwrap_or(usize::MAX);
                    let mut a = answered
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if i < a.len() {
                        a[i] = true;
                    }
                }
            }
        })
    };
    let send_for = |d: Duration| -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let mut log = sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let i = log.len() as u64;
            log.push(monotonic_ns());
            answered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(false);
            drop(log);
            let _ = s.send(&i.to_ne_bytes());
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    };
    let sender = std::thread::scope(|scope| -> anyhow::Result<(u64, u64)> {
        let h = scope.spawn(|| send_for(Duration::from_millis(2_500)));
        std::thread::sleep(Duration::from_millis(300));
        let started = monotonic_ns();
        chaos(
            agent,
            &[
                "inject", "drop", "--from", "host", "--to", "dg", "--for", "1",
            ],
        )?;
        let out = agent
            .quadrant()
            .args(["chaos", "status", "--output", "json"])
            .output()?;
        let faults: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let expires = faults[0]["expires_ns"].as_u64().context("expires_ns")?;
        h.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok((started, expires))
    })?;
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = receiver.join();
    let (started, expires) = sender;
    let sent = sent
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let answered = answered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let first_lost = sent
        .iter()
        .zip(answered.iter())
        .find(|(t, a)| **t >= started && !**a)
        .map(|(t, _)| *t);
    let healed = sent
        .iter()
        .zip(answered.iter())
        .find(|(t, a)| **t >= expires && **a)
        .map(|(t, _)| *t);
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let ms = |a: Option<u64>, from: u64| {
        a.map_or_else(
            || "never".to_owned(),
            |t| format!("{:.2} ms", (t as f64 - from as f64) / 1e6),
        )
    };
    println!(
        "reaction (requests host -> DG every 200 us, drop for 1 s): command start to first loss {}, \
         expiry to first answer {}",
        ms(first_lost, started),
        ms(healed, expires)
    );
    chaos(agent, &["recover", "--all"])?;
    Ok(())
}

fn delay_accuracy(agent: &Agent, dg: SocketAddr) -> anyhow::Result<()> {
    if !quadrant::chaos::fq_available() {
        println!(
            "delay accuracy: not measurable on this kernel (no fq qdisc, CONFIG_NET_SCH_FQ unset); \
             the departure times the program sets are checked by the test_run fixture"
        );
        return Ok(());
    }
    let dg_arg = dg.to_string();
    for (delay, jitter) in [(1, 0), (10, 1), (100, 10)] {
        chaos(
            agent,
            &[
                "inject",
                "delay",
                "--from",
                "dx",
                "--to",
                "dg",
                "--delay-ms",
                &delay.to_string(),
                "--jitter-ms",
                &jitter.to_string(),
                "--for",
                "60",
            ],
        )?;
        let p: Probe = agent.measure("dx", &["probe", &dg_arg, "200"])?;
        chaos(agent, &["recover", "--all"])?;
        println!(
            "delay {delay} ms ± {jitter} ms: measured p50 {:.2} ms, p99 {:.2} ms",
            p.p50_us / 1000.0,
            p.p99_us / 1000.0
        );
    }
    Ok(())
}

fn orchestrate() -> anyhow::Result<()> {
    let config = bench_config()?;
    let mut agent = Agent::start(&config, STATE_DIR, "qchaos")?;
    let dg: SocketAddr = format!("{}:{PORT}", config.addrs(Quadrant::Dg).workload).parse()?;
    agent.serve_on("dg", 0, "echo", &["serve", &format!("0.0.0.0:{PORT}")])?;
    armed_check(&agent, &config, dg)?;
    reaction(&agent, dg)?;
    delay_accuracy(&agent, dg)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let at =
        |i: usize| -> anyhow::Result<SocketAddr> { Ok(args.get(i).context("ADDR:PORT")?.parse()?) };
    match args.get(1).map(String::as_str) {
        None => orchestrate(),
        Some("serve") => serve(at(2)?),
        Some("probe") => {
            let count = args.get(3).context("probe ADDR:PORT COUNT")?.parse()?;
            println!("{}", serde_json::to_string(&probe(at(2)?, count)?)?);
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown mode {other:?}"),
    }
}
