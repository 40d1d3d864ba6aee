//! Policy benchmark (`cargo xtask bench policy`), each figure with a baseline from the same run:
//!
//! 1. Admission decision latency with regorus (the embedded bundle's constraints for a complete
//!    production review), p50/p99/p99.9 over single evaluations; baseline: the same engine
//!    evaluating a constant rule.
//! 2. Kernel policy decision via `BPF_PROG_TEST_RUN` with repeat on the XDP program: an allowed
//!    and a denied cross-quadrant packet (parse, two LPM lookups, two conntrack lookups, one policy
//!    lookup); baseline: an ARP frame (parse only). The kernel reports the mean time per run;
//!    percentiles are over repeated batches.

use std::time::Instant;

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

fn time_ns(mut f: impl FnMut()) -> Histogram<u64> {
    for _ in 0..WARMUP {
        f();
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    for _ in 0..EVALS {
        let t = Instant::now();
        f();
        h.record(
            u64::try_from(t.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
        )
        .expect("record");
    }
    h
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

fn arp() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[
        2, 0, 0, 0, 0, 1, 10, 240, 0, 2, 0, 0, 0, 0, 0, 0, 10, 240, 0, 1,
    ]);
    out
}

fn kernel(dp: &mut Dataplane, packet: &[u8]) -> anyhow::Result<Histogram<u64>> {
    let prog: &mut Xdp = dp
        .ebpf_mut()
        .program_mut(quadrant::loader::programs::XDP)
        .expect("xdp")
        .try_into()?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3)?;
    for _ in 0..BATCHES {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat: REPEAT,
            ..TestRunOptions::default()
        })?;
        h.record(
            u64::try_from(r.duration.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
        )?;
    }
    Ok(h)
}

fn main() -> anyhow::Result<()> {
    quadrant::app::require_root("bench")?;
    let config = Config::embedded();
    let bundle = PolicyBundle::embedded();

    // 1. Admission.
    let admission = Admission::new(
        Prepared::new(&bundle).map_err(|e| e.to_string()),
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
    let adm = summary(&time_ns(|| {
        let _ = admission.evaluate(&review);
    }));
    let mut engine = bundle.engine(&config.policy)?;
    let base = summary(&time_ns(|| {
        let _ = engine.eval_rule("data.quadrant.runtime.all_quadrants".into());
    }));

    // 2. Kernel decision.
    let mut dp = Dataplane::load(None)?;
    dp.write_config(&config, 2, &bundle.compile(&config)?)?;
    dp.register_iface(nix::net::if_::if_nametoindex("lo")?, Quadrant::Dx)?;
    let allowed = summary(&kernel(
        &mut dp,
        &frame([10, 240, 0, 2], [10, 240, 1, 2], 443),
    )?);
    let denied = summary(&kernel(
        &mut dp,
        &frame([10, 240, 0, 2], [10, 240, 2, 2], 443),
    )?);
    let arp_only = summary(&kernel(&mut dp, &arp())?);

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
    row("admission decision (regorus, 4 constraints)", &adm, "ns");
    row("  baseline: constant rule, same engine", &base, "ns");
    row("kernel: XDP allowed DX->DG (policy hit)", &allowed, "ns");
    row("kernel: XDP denied DX->PX (policy miss)", &denied, "ns");
    row("  baseline: XDP ARP frame (parse only)", &arp_only, "ns");
    println!(
        "admission p99 {}.{} us (target <= 15 us); kernel decision p99 {} ns per packet, {} ns over the parse-only baseline (target <= 50 ns)",
        adm.p99 / 1000,
        adm.p99 % 1000 / 100,
        allowed.p99.max(denied.p99),
        allowed.p99.max(denied.p99).saturating_sub(arp_only.p50)
    );
    let j = |s: &Summary| json!({"p50_ns": s.p50, "p99_ns": s.p99, "p999_ns": s.p999, "samples": s.samples});
    println!(
        "{}",
        json!({
            "benchmark": "policy",
            "admission": j(&adm), "admission_baseline_constant_rule": j(&base),
            "kernel_allowed": j(&allowed), "kernel_denied": j(&denied), "kernel_baseline_arp": j(&arp_only),
            "kernel_repeat_per_sample": REPEAT,
        })
    );
    Ok(())
}
