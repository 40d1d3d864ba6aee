//! Policy benchmark (`cargo xtask bench policy`), each figure with a baseline from the same run:
//!
//! 1. Admission decision latency with regorus (the embedded bundle's constraints for a complete
//!    production review), p50/p99/p99.9 over single evaluations; baselines: the same engine
//!    evaluating a constant rule, and two kinds of work as long as the admission's median —
//!    register arithmetic and allocating map work — whose tails show what the machine alone
//!    adds to work of that length and kind in the same run.
//! 2. Kernel policy decision via `BPF_PROG_TEST_RUN` with repeat on the XDP program: an allowed
//!    and a denied cross-quadrant packet, and as baseline a packet that takes every step up to
//!    the decision (parse, both identity lookups) and is then refused as spoofed; an ARP frame
//!    shows the cost of the run itself. The kernel reports the mean time per run of a batch; the
//!    packets take turns batch by batch, and the decision is each batch's time minus the
//!    baseline's batch of the same round.

use std::{collections::BTreeMap, time::Instant};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use dataplane_common::Quadrant;
use hdrhistogram::Histogram;
use quadrant::{
    admission::{Admission, Prepared},
    config::Config,
    loader::Dataplane,
    policy::PolicyBundle,
};
use serde_json::json;

const EVALS: usize = 20_000;
const WARMUP: usize = 1_000;
const BATCHES: usize = 200;
const REPEAT: u32 = 10_000;

struct Summary {
    p50: u64,
    p99: u64,
    p999: u64,
    samples: u64,
}

fn summary(h: &Histogram<u64>) -> Summary {
    Summary {
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        samples: h.len(),
    }
}

fn time_ns(f: impl FnMut()) -> Histogram<u64> {
    let [h] = taking_turns([Box::new(f)]);
    h
}

/// Times each of `works` `EVALS` times after `WARMUP` runs, the works taking turns sample by
/// sample so that a slower stretch of the shared machine falls on all of them alike.
fn taking_turns<const N: usize>(mut works: [Box<dyn FnMut() + '_>; N]) -> [Histogram<u64>; N] {
    for _ in 0..WARMUP {
        for f in &mut works {
            f();
        }
    }
    let mut hs = std::array::from_fn(|_| {
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram")
    });
    for _ in 0..EVALS {
        for (f, h) in works.iter_mut().zip(&mut hs) {
            let t = Instant::now();
            f();
            h.record(
                u64::try_from(t.elapsed().as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .expect("record");
        }
    }
    hs
}

/// `work(n)` with `n` chosen so that it takes about `ns` (from the fastest of 50 probes).
fn calibrated(ns: u64, probe: u64, work: impl Fn(u64)) -> impl FnMut() {
    let fastest = (0..50)
        .map(|_| {
            let t = Instant::now();
            work(probe);
            t.elapsed().as_nanos()
        })
        .min()
        .unwrap_or(1)
        .max(1);
    let n = u64::try_from(u128::from(ns) * u128::from(probe) / fastest).unwrap_or(probe);
    move || work(n)
}

/// Register arithmetic taking about `ns`: one dependency chain, no memory, no allocation, no
/// branch the predictor can miss. Its tail is what interruptions alone (timer ticks, the
/// hypervisor taking the virtual CPU) add to work that long.
fn arithmetic(ns: u64) -> impl FnMut() {
    calibrated(ns, 100_000, |n| {
        let mut x = 1u64;
        for i in 0..n {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::hint::black_box(x);
    })
}

/// Allocating and pointer-chasing work taking about `ns`, shaped like an evaluation: small
/// string-keyed ordered maps built, searched and dropped. Its tail is what the machine does
/// to work of that kind (a busy sibling hardware thread or neighbour slows it for
/// milliseconds at a time where it leaves the arithmetic alone).
fn allocating(ns: u64) -> impl FnMut() {
    calibrated(ns, 200, |n| {
        for round in 0..n {
            let map: BTreeMap<String, Vec<u64>> = (0..8u64)
                .map(|i| (format!("key-{round}-{i}"), vec![i; 4]))
                .collect();
            std::hint::black_box(map.get("key-0-3"));
        }
    })
}

fn frame(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(40_000, dport, 1, 1024)
        .syn();
    let mut out = Vec::with_capacity(b.size(8));
    b.write(&mut out, b"quadrant").expect("frame");
    out
}

fn udp_frame(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(40_000, dport);
    let mut out = Vec::with_capacity(b.size(8));
    b.write(&mut out, b"quadrant").expect("frame");
    out
}

fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[
        2, 0, 0, 0, 0, 1, 10, 240, 0, 2, 0, 0, 0, 0, 0, 0, 10, 240, 0, 1,
    ]);
    out
}

/// Runs each packet through the XDP program `REPEAT` times per batch, the packets taking turns
/// batch by batch so that a slower stretch of the shared machine falls on all of them alike.
/// Returns the kernel's mean time per run of every batch, per packet.
fn kernel(dp: &mut Dataplane, packets: &[&[u8]]) -> anyhow::Result<Vec<Vec<u64>>> {
    let repeat = REPEAT;
    let prog: &mut Xdp = dp
        .ebpf_mut()
        .program_mut(quadrant::loader::programs::XDP)
        .expect("xdp")
        .try_into()?;
    let mut out = vec![Vec::with_capacity(BATCHES); packets.len()];
    for _ in 0..BATCHES {
        for (packet, times) in packets.iter().zip(&mut out) {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..TestRunOptions::default()
            })?;
            times.push(u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(out)
}

/// Runs per batch in the flow-event comparison: fewer than the ring holds (8,192 records), so
/// the ring, emptied after every batch, never refuses one.
const TRACED_REPEAT: u32 = 4_000;

/// What flow events cost a refused packet, in one loop taking turns batch by batch: the allowed
/// packet (never an event) and the refused SYN with flow events off, with every refusal written
/// (a budget it never reaches), and over its budget (one event a second: each refusal checks
/// the budget and is counted lost, as in a flood); the ring drained after every batch as the
/// agent drains it. Returns [allowed, refused off, refused written, refused over budget].
fn traced_figures(
    dp: &mut Dataplane,
    allowed: &[u8],
    denied: &[u8],
) -> anyhow::Result<[Summary; 4]> {
    let mut ring = dp.take_trace()?;
    // What the earlier measurements wrote (within the configuration's budget) is not counted.
    while ring.next().is_some() {}
    let mut times: [Vec<u64>; 4] = Default::default();
    let mut records = 0u64;
    for _ in 0..BATCHES {
        for (limit, at) in [((0, 0), 1), ((u32::MAX, u32::MAX), 2), ((1, 1), 3)] {
            dp.set_events_limit(limit.0, limit.1)?;
            let prog: &mut Xdp = dp
                .ebpf_mut()
                .program_mut(quadrant::loader::programs::XDP)
                .expect("xdp")
                .try_into()?;
            let packets: &[(&[u8], usize)] = if at == 1 {
                &[(allowed, 0), (denied, 1)]
            } else {
                &[(denied, at)]
            };
            for (packet, series) in packets {
                let r = prog.test_run(TestRunOptions {
                    data_in: Some(packet),
                    repeat: TRACED_REPEAT,
                    ..TestRunOptions::default()
                })?;
                times[*series].push(u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX));
                while ring.next().is_some() {
                    records += 1;
                }
            }
        }
    }
    // Each switch to the budget of one a second starts it full: one more event per batch (and
    // one a second besides).
    let batches = u64::try_from(BATCHES).unwrap_or(0);
    let expected = batches * u64::from(TRACED_REPEAT);
    anyhow::ensure!(
        (expected..=expected + batches + 100).contains(&records),
        "{records} flow events written for {expected} refused packets within the budget"
    );
    let mut out = times
        .iter()
        .map(|t| histogram(t.iter().copied()).map(|h| summary(&h)));
    let mut next = || {
        out.next()
            .unwrap_or_else(|| Err(anyhow::anyhow!("four series")))
    };
    Ok([next()?, next()?, next()?, next()?])
}

fn histogram(values: impl IntoIterator<Item = u64>) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3)?;
    for v in values {
        h.record(v.max(1))?;
    }
    Ok(h)
}

/// Per batch, how much longer `path` took than `baseline` in the same round.
fn over(path: &[u64], baseline: &[u64]) -> anyhow::Result<Summary> {
    Ok(summary(&histogram(
        path.iter().zip(baseline).map(|(p, b)| p.saturating_sub(*b)),
    )?))
}

/// The kernel figures: whole-packet times, baselines and the paired decision times.
struct Kernel {
    /// Allowed, and refused SYN with flow events off, written, over budget, taking turns.
    trace: [Summary; 4],
    allowed: Summary,
    denied: Summary,
    denied_udp: Summary,
    classified: Summary,
    arp_only: Summary,
    decision_hit: Summary,
    decision_miss: Summary,
    decision_miss_udp: Summary,
    decision_miss_reply: Summary,
}

fn kernel_figures(config: &Config, bundle: &PolicyBundle) -> anyhow::Result<Kernel> {
    let mut dp = Dataplane::load(None)?;
    dp.write_config(config, 2)?;
    dp.apply_policy(&quadrant::policy::KernelPolicy::quadrant_wide(
        bundle.compile(config)?,
    ))?;
    dp.register_iface(nix::net::if_::if_nametoindex("lo")?, Quadrant::Dx)?;
    // DX's address to DG's: allowed by the embedded policy (tcp 443).
    let allowed = frame([10, 240, 0, 2], [10, 240, 1, 2], 443);
    // DX's address to PX's: no rule allows it. A TCP SYN opens a connection, so the policy
    // alone decides it; a UDP datagram might answer a tracked flow, so the policy is asked
    // about the way back too (PX to DX: refused as well, so no tracked flow could let it pass).
    let denied = frame([10, 240, 0, 2], [10, 240, 2, 2], 443);
    let denied_udp = udp_frame([10, 240, 0, 2], [10, 240, 2, 2], 443);
    // DX to the host's gateway address: refused (DX may only send ICMP there), but the host
    // may open flows into DX, so this could be a reply and the flow table is looked up too.
    let denied_reply = udp_frame([10, 240, 0, 2], [10, 240, 0, 1], 53);
    // DG's address sent from DX's veth: refused as spoofed after both identity lookups, right
    // before the policy — every step of the allowed packet but the decision.
    let classified = frame([10, 240, 1, 2], [10, 240, 2, 2], 443);
    let arp = arp();
    let (allowed_frame, denied_frame) = (allowed.clone(), denied.clone());
    let times = kernel(
        &mut dp,
        &[
            &allowed,
            &denied,
            &denied_udp,
            &denied_reply,
            &classified,
            &arp,
        ],
    )?;
    let [
        t_allowed,
        t_denied,
        t_denied_udp,
        t_denied_reply,
        t_classified,
        t_arp,
    ] = &times[..]
    else {
        unreachable!("six packets")
    };
    let allowed = summary(&histogram(t_allowed.iter().copied())?);
    let denied = summary(&histogram(t_denied.iter().copied())?);
    let denied_udp = summary(&histogram(t_denied_udp.iter().copied())?);
    let classified = summary(&histogram(t_classified.iter().copied())?);
    let arp_only = summary(&histogram(t_arp.iter().copied())?);
    let decision_hit = over(t_allowed, t_classified)?;
    let decision_miss = over(t_denied, t_classified)?;
    let decision_miss_udp = over(t_denied_udp, t_classified)?;
    let decision_miss_reply = over(t_denied_reply, t_classified)?;
    let trace = traced_figures(&mut dp, &allowed_frame, &denied_frame)?;
    Ok(Kernel {
        trace,
        allowed,
        denied,
        denied_udp,
        classified,
        arp_only,
        decision_hit,
        decision_miss,
        decision_miss_udp,
        decision_miss_reply,
    })
}

struct AdmissionFigures {
    decision: Summary,
    constant_rule: Summary,
    arithmetic: Summary,
    allocating: Summary,
}

/// Admission decisions and their baselines: a constant rule in the same engine, and work of
/// two kinds as long as the admission's median.
fn admission_figures(config: &Config, bundle: &PolicyBundle) -> anyhow::Result<AdmissionFigures> {
    let admission = Admission::new(
        Prepared::new(bundle).map_err(|e| e.to_string()),
        Err("not used".into()),
    );
    let digest = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let review = json!({"review": {"object": {
        "quadrant": "px", "workload": "api", "spiffe_id": "spiffe://quadrant.local/quadrant/px/workload/api",
        "labels": {"app": "api", "owner": "payments"}, "artifacts": [format!("api@sha256:{digest}")],
        "resources": {"cpu": "500m", "memory": "256Mi", "pids": 64},
    }}});
    assert!(
        admission
            .evaluate(&review)
            .map_err(anyhow::Error::msg)?
            .is_empty(),
        "the benchmark review must be admitted"
    );
    // The median first, to size the baselines; then the decision and the baselines taking
    // turns.
    let median = time_ns(|| {
        let _ = admission.evaluate(&review);
    })
    .value_at_quantile(0.5);
    let [adm, arithmetic, allocating] = taking_turns([
        Box::new(|| {
            let _ = admission.evaluate(&review);
        }),
        Box::new(arithmetic(median)),
        Box::new(allocating(median)),
    ]);
    let mut engine = bundle.engine(&config.policy)?;
    let base = summary(&time_ns(|| {
        let _ = engine.eval_rule("data.quadrant.runtime.all_quadrants".into());
    }));

    Ok(AdmissionFigures {
        decision: summary(&adm),
        constant_rule: base,
        arithmetic: summary(&arithmetic),
        allocating: summary(&allocating),
    })
}

fn main() -> anyhow::Result<()> {
    quadrant::daemon::require_root("bench")?;
    let config = Config::embedded();
    let bundle = PolicyBundle::embedded();

    // 1. Admission.
    let a = admission_figures(&config, &bundle)?;

    // 2. Kernel decision.
    let k = kernel_figures(&config, &bundle)?;

    print_table(&a, &k);
    println!(
        "admission p99 {}.{} us (target <= 15 us); kernel policy decision over the classified baseline, median batch: {} ns allowed, {} ns refused SYN, {} ns refused UDP, {} ns refused UDP that could be a reply (+ flow lookup) (target <= 50 ns)",
        a.decision.p99 / 1000,
        a.decision.p99 % 1000 / 100,
        k.decision_hit.p50,
        k.decision_miss.p50,
        k.decision_miss_udp.p50,
        k.decision_miss_reply.p50,
    );
    let j = |s: &Summary| json!({"p50_ns": s.p50, "p99_ns": s.p99, "p999_ns": s.p999, "samples": s.samples});
    println!(
        "{}",
        json!({
            "benchmark": "policy",
            "admission": j(&a.decision), "admission_baseline_constant_rule": j(&a.constant_rule),
            "admission_baseline_arithmetic_same_p50": j(&a.arithmetic),
            "admission_baseline_allocating_same_p50": j(&a.allocating),
            "kernel_allowed": j(&k.allowed), "kernel_denied_syn": j(&k.denied), "kernel_denied_udp": j(&k.denied_udp),
            "kernel_baseline_classified": j(&k.classified), "kernel_baseline_arp": j(&k.arp_only),
            "kernel_decision_allowed": j(&k.decision_hit), "kernel_decision_refused_syn": j(&k.decision_miss),
            "kernel_decision_refused_udp": j(&k.decision_miss_udp),
            "kernel_decision_refused_udp_flow_lookup": j(&k.decision_miss_reply),
            "flow_events_allowed": j(&k.trace[0]), "flow_events_off_refused_syn": j(&k.trace[1]),
            "flow_event_written_refused_syn": j(&k.trace[2]),
            "flow_event_over_budget_refused_syn": j(&k.trace[3]),
            "kernel_traced_repeat_per_sample": TRACED_REPEAT,
            "kernel_repeat_per_sample": REPEAT,
        })
    );
    Ok(())
}

/// The human-readable table.
fn print_table(a: &AdmissionFigures, k: &Kernel) {
    println!("policy benchmark");
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>8}",
        "what", "p50", "p99", "p99.9", "samples"
    );
    let row = |what: &str, s: &Summary, unit: &str| {
        println!(
            "{what:<44} {:>7}{unit} {:>7}{unit} {:>7}{unit} {:>8}",
            s.p50, s.p99, s.p999, s.samples
        );
    };
    row(
        "admission decision (regorus, 4 constraints)",
        &a.decision,
        "ns",
    );
    row(
        "  baseline: constant rule, same engine",
        &a.constant_rule,
        "ns",
    );
    row(
        "  baseline: arithmetic, admission's p50 long",
        &a.arithmetic,
        "ns",
    );
    row(
        "  baseline: allocating, admission's p50 long",
        &a.allocating,
        "ns",
    );
    row(
        "kernel: XDP, allowed DX->DG (whole packet)",
        &k.allowed,
        "ns",
    );
    row(
        "kernel: XDP, denied SYN DX->PX (whole packet)",
        &k.denied,
        "ns",
    );
    row(
        "kernel: XDP, denied UDP DX->PX (whole packet)",
        &k.denied_udp,
        "ns",
    );
    row(
        "  baseline: parsed and classified, no decision",
        &k.classified,
        "ns",
    );
    row("  baseline: ARP frame (parse only)", &k.arp_only, "ns");
    row("kernel policy decision: allowed", &k.decision_hit, "ns");
    row(
        "kernel policy decision: refused SYN",
        &k.decision_miss,
        "ns",
    );
    row(
        "kernel policy decision: refused UDP",
        &k.decision_miss_udp,
        "ns",
    );
    row(
        "kernel policy decision: refused UDP (+ flow)",
        &k.decision_miss_reply,
        "ns",
    );
    let [allowed, off, written, over] = &k.trace;
    row("flow events: allowed (never one)", allowed, "ns");
    row("flow events off: refused SYN", off, "ns");
    row("flow event written: refused SYN", written, "ns");
    row("flow event over budget: refused SYN", over, "ns");
}
