//! `cargo xtask bench chaos`: what chaos faults cost and how fast they act.
//!
//! - The armed check on the hot path, against a dataplane loaded with chaos off
//!   (`chaos.enabled: false`: the verifier removed every check), in the same run: the kernel's
//!   time for tc egress delivering a datagram into DX (`BPF_PROG_TEST_RUN` with repeat, batches
//!   taking turns), and end to end, two agents — one with chaos on, one with it off — and UDP
//!   round trips DX → DG in rounds taking turns: tc egress time per packet (BPF run-time
//!   statistics), p50, and p99 per round and over every round trip of a mode; modes: chaos off,
//!   no fault (the programs read `CHAOS_ARMED` and stop), a fault ended a moment ago, one armed
//!   that this traffic does not match (they also look up three `CHAOS_FAULTS` keys).
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
const OFF_STATE_DIR: &str = "/run/quadrant-chaosbench-off";
const PORT: u16 = 7000;
const ROUNDS: usize = 8;
const REQUESTS: u32 = 4000;
/// `BPF_PROG_TEST_RUN` batches per dataplane and runs per batch.
const BATCHES: usize = 100;
const REPEAT: u32 = 10_000;

fn bench_config() -> anyhow::Result<Config> {
    let c = benches::isolated_config("qchaos", "qch", STATE_DIR, 247)?;
    c.validate()?;
    Ok(c)
}

/// The second agent's: chaos off.
fn off_config() -> anyhow::Result<Config> {
    let mut c = benches::isolated_config("qchaosoff", "qco", OFF_STATE_DIR, 248)?;
    c.chaos.enabled = false;
    c.validate()?;
    Ok(c)
}

/// Round trips of one probe run.
#[derive(Debug, Serialize, Deserialize)]
struct Probe {
    answered: u32,
    p50_us: f64,
    p99_us: f64,
    /// Every answered round trip, µs.
    rtts_us: Vec<f64>,
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
    Ok(Probe {
        answered: u32::try_from(rtts.len()).unwrap_or(u32::MAX),
        p50_us: quantile(&rtts, 0.50),
        p99_us: quantile(&rtts, 0.99),
        rtts_us: rtts,
    })
}

/// The `q` quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into the sorted values"
    )]
    let i = (q * (sorted.len().saturating_sub(1)) as f64) as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

/// Per round: tc egress ns/run, p50 and p99 round trip (µs); and every round trip (µs).
type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

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

/// The modes of the end-to-end rounds, in turn.
const MODES: [&str; 4] = [
    "chaos off",
    "no fault",
    "ended fault",
    "armed, not matching",
];

/// Rounds taking turns between the agent with chaos off and modes of the one with chaos on.
fn armed_check(
    (agent, config): (&Agent, &Config),
    (off, off_config): (&Agent, &Config),
) -> anyhow::Result<()> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let mut rows: BTreeMap<&str, Samples> = BTreeMap::new();
    let dg = |c: &Config| SocketAddr::from((c.addrs(Quadrant::Dg).workload, PORT)).to_string();
    let count = REQUESTS.to_string();
    for round in 0..ROUNDS * MODES.len() {
        let mode = MODES[round % MODES.len()];
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
        match mode {
            "ended fault" => {
                // Armed until a moment ago: the programs read the clock and stop.
                fault("1")?;
                std::thread::sleep(Duration::from_millis(1_100));
            }
            "armed, not matching" => fault("120")?,
            _ => {}
        }
        let (a, c) = if mode == "chaos off" {
            (off, off_config)
        } else {
            (agent, config)
        };
        let before = stats(c, programs::TC_EGRESS)?;
        let p: Probe = a.measure("dx", &["probe", &dg(c), &count])?;
        let after = stats(c, programs::TC_EGRESS)?;
        anyhow::ensure!(p.answered == REQUESTS, "requests lost: {}", p.answered);
        let (ns, _, _) = per_run(before, after, 1);
        let row = rows.entry(mode).or_default();
        row.0.push(ns);
        row.1.push(p.p50_us);
        row.2.push(p.p99_us);
        row.3.extend(p.rtts_us);
    }
    chaos(agent, &["recover", "--all"])?;
    println!(
        "armed check end to end ({ROUNDS} rounds each, in turn; {REQUESTS} UDP round trips \
         DX -> DG per round; medians of the rounds, and p99 over all {} round trips of a mode):",
        ROUNDS * usize::try_from(REQUESTS).unwrap_or(0)
    );
    println!(
        "  {:<22} {:>16} {:>10} {:>14} {:>14}",
        "dataplane", "tc egress ns/run", "p50 us", "p99 us rounds", "p99 us all"
    );
    let mut medians = BTreeMap::new();
    for mode in MODES {
        let Some((ns, p50, p99, mut all)) = rows.remove(mode) else {
            continue;
        };
        all.sort_by(f64::total_cmp);
        let m = (median(ns), median(p50), median(p99), quantile(&all, 0.99));
        println!(
            "  {mode:<22} {:>16.1} {:>10.1} {:>14.1} {:>14.1}",
            m.0, m.1, m.2, m.3
        );
        medians.insert(mode, m);
    }
    let base = medians.get("chaos off").copied().unwrap_or_default();
    for mode in &MODES[1..] {
        if let Some(on) = medians.get(mode) {
            // A round trip crosses tc egress twice (into DG, and the answer into DX).
            let bound = 2.0 * (on.0 - base.0).abs() / 1000.0 / base.3 * 100.0;
            println!(
                "  {mode} vs chaos off: {:+.1} ns per packet (a round trip's two packets: \
                 {bound:.3} % of the p99); p50 {:+.1} %, p99 {:+.1} % (rounds) {:+.1} % (all)",
                on.0 - base.0,
                (on.1 / base.1 - 1.0) * 100.0,
                (on.2 / base.2 - 1.0) * 100.0,
                (on.3 / base.3 - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

/// A DG → DX datagram through tc egress (delivered into DX) of three dataplanes loaded here —
/// chaos off, chaos on with nothing armed, chaos on with a fault armed that does not match —
/// `REPEAT` runs per batch, the dataplanes taking turns batch by batch.
fn kernel_check() -> anyhow::Result<()> {
    use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
    use dataplane_common::chaos::{CHAOS_ARMED, CHAOS_FAULTS, Fault, FaultKey};
    use quadrant::loader::Dataplane;
    let config = Config::embedded();
    let policy = quadrant::policy::PolicyBundle::embedded().compile(&config)?;
    let load = |chaos: bool| -> anyhow::Result<Dataplane> {
        let mut dp = Dataplane::load_with(None, chaos)?;
        dp.write_config(&config, 2)?;
        dp.apply_policy(&quadrant::policy::KernelPolicy::quadrant_wide(
            policy.clone(),
        ))?;
        dp.register_iface(nix::net::if_::if_nametoindex("lo")?, Quadrant::Dx)?;
        Ok(dp)
    };
    let mut dps = [load(false)?, load(true)?, load(true)?];
    // The third: a drop fault from PG into PX, armed for the run.
    let now = monotonic_ns();
    let spec = quadrant::chaos::FaultSpec {
        action: quadrant::chaos::Action::Drop,
        from: "pg".into(),
        to: "px".into(),
        percent: 100.0,
        delay_ms: 0,
        jitter_ms: 0,
        both_ways: false,
        seconds: 3_600,
        headroom_mib: quadrant::chaos::DEFAULT_HEADROOM_MIB,
        headroom_pids: quadrant::chaos::DEFAULT_HEADROOM_PIDS,
        restart_agent: false,
        workload: None,
    };
    {
        let ebpf = dps[2].ebpf_mut();
        let mut faults: aya::maps::HashMap<_, FaultKey, Fault> =
            aya::maps::HashMap::try_from(ebpf.map_mut(CHAOS_FAULTS).context("CHAOS_FAULTS")?)?;
        for (k, f) in spec.entries(true, now)? {
            faults.insert(k, f, 0)?;
        }
        let mut armed: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(ebpf.map_mut(CHAOS_ARMED).context("CHAOS_ARMED")?)?;
        armed.set(0, now + 3_600_000_000_000, 0)?;
    }
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 240, 1, 2], [10, 240, 0, 2], 64)
        .udp(40_000, 53);
    let mut packet = Vec::with_capacity(b.size(8));
    b.write(&mut packet, b"quadrant")?;
    let mut times: [Vec<f64>; 3] = Default::default();
    for _ in 0..BATCHES {
        for (dp, t) in dps.iter_mut().zip(&mut times) {
            let prog: &mut SchedClassifier = dp
                .ebpf_mut()
                .program_mut(programs::TC_EGRESS)
                .context("tc egress")?
                .try_into()?;
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&packet),
                repeat: REPEAT,
                ..TestRunOptions::default()
            })?;
            anyhow::ensure!(r.return_value == 0, "the datagram was not delivered");
            t.push(r.duration.as_secs_f64() * 1e9);
        }
    }
    let [off, on, armed] = times.map(median);
    println!(
        "armed check in the kernel (tc egress delivering a DG -> DX datagram, BPF_PROG_TEST_RUN, \
         {BATCHES} batches of {REPEAT} runs each, in turn; median ns per run):"
    );
    println!("  chaos off (checks removed by the verifier) {off:>8.1}");
    println!(
        "  chaos on, nothing armed                    {on:>8.1} ({:+.1} ns)",
        on - off
    );
    println!(
        "  chaos on, armed, not matching              {armed:>8.1} ({:+.1} ns)",
        armed - off
    );
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
    kernel_check()?;
    let config = bench_config()?;
    let mut agent = Agent::start(&config, STATE_DIR, "qchaos")?;
    let dg: SocketAddr = format!("{}:{PORT}", config.addrs(Quadrant::Dg).workload).parse()?;
    agent.serve_on("dg", 0, "echo", &["serve", &format!("0.0.0.0:{PORT}")])?;
    let off_config = off_config()?;
    let mut off = Agent::start(&off_config, OFF_STATE_DIR, "qchaosoff")?;
    off.serve_on("dg", 0, "echo", &["serve", &format!("0.0.0.0:{PORT}")])?;
    armed_check((&agent, &config), (&off, &off_config))?;
    drop(off);
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
