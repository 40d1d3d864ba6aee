//! Datapath benchmark (`cargo xtask bench datapath`), measured against its baselines in one run:
//!
//! 1. Drop rate of denied cross-quadrant packets (DX → PX, UDP) arriving on DX's host-side veth:
//!    quadrant's XDP + tcx programs versus one nftables rule dropping the same packets at the
//!    earliest nftables hook (netdev ingress) on the same veth.
//! 2. Allowed TCP throughput DX → DG (iperf3) with the programs attached versus without.
//!
//! Rounds alternate between the configurations so drift on this shared machine hits both. The
//! sender is a raw socket in DX's namespace (sendmmsg, batches of 64), bounded in time; all
//! traffic stays inside namespaces this benchmark creates and removes.

use std::{
    io::Write as _,
    mem,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use dataplane_common::{Hook, Quadrant, Reason};
use etherparse::PacketBuilder;
use quadrant::{
    config::{Config, QuadrantConfig, XdpAttachMode},
    daemon::{QUADRANT_CGROUP_LEVEL, teardown},
    loader::Dataplane,
    quadrants::{self, QuadrantHandle},
    sys,
};

const ROUNDS: usize = 3;
const FLOOD: Duration = Duration::from_secs(3);
const IPERF_SECS: &str = "3";
const BATCH: usize = 64;
const NFT_TABLE: &str = "qbench";

fn bench_config() -> anyhow::Result<Config> {
    let mut c = Config::embedded();
    c.instance = "qbench".into();
    c.interface_prefix = "qb".into();
    c.state_dir = "/run/quadrant-bench".into();
    c.cgroup2 = "/run/quadrant-bench/cgroup2".into();
    for (i, q) in Quadrant::ALL.iter().enumerate() {
        c.quadrants.insert(
            q.name().into(),
            QuadrantConfig::new(format!("10.242.{i}.0/24").parse()?),
        );
    }
    c.validate()?;
    Ok(c)
}

fn main() -> anyhow::Result<()> {
    quadrant::daemon::require_root("bench")?;
    let config = bench_config()?;
    teardown(&config, false)?;
    sys::ensure_bpffs(&config.bpffs)?;
    let mounted = sys::ensure_cgroup2(&config.cgroup2)?;
    std::fs::create_dir_all(config.cgroup_parent())?;
    let result = (|| {
        let dx = quadrants::create(&config, Quadrant::Dx)?;
        let dg = quadrants::create(&config, Quadrant::Dg)?;
        let mut dp = Dataplane::load(Some(&config.bpffs_dir()))?;
        let policy = quadrant::policy::PolicyBundle::embedded().compile(&config)?;
        dp.write_config(&config, QUADRANT_CGROUP_LEVEL)?;
        dp.apply_policy(&quadrant::policy::KernelPolicy::quadrant_wide(policy))?;
        run(&config, &mut dp, &dx, &dg)
    })();
    let _ = Command::new("nft")
        .args(["delete", "table", "netdev", NFT_TABLE])
        .stderr(Stdio::null())
        .status();
    teardown(&config, mounted)?;
    result
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const MODES: [XdpAttachMode; 3] = [
    XdpAttachMode::Generic,
    XdpAttachMode::Native,
    XdpAttachMode::Off,
];

fn mode_name(m: XdpAttachMode) -> &'static str {
    match m {
        XdpAttachMode::Generic => "XDP generic + tc",
        XdpAttachMode::Native => "XDP native + tc",
        XdpAttachMode::Off => "tc only",
    }
}

#[expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52")]
fn per_sec(n: u64) -> f64 {
    n as f64 / FLOOD.as_secs_f64()
}

/// Drops counted by the programs (XDP first, tc ingress for what XDP passed or when it is off).
fn dropped(dp: &Dataplane) -> anyhow::Result<u64> {
    let q = Quadrant::Dx as u32;
    Ok(dp.counter(Hook::Xdp, q, Reason::DenyPolicy)?
        + dp.counter(Hook::TcIngress, q, Reason::DenyPolicy)?)
}

/// Attaches with `mode`, retrying while the kernel still releases the links a previous
/// `detach_all` unpinned (link release after unpinning is deferred).
fn attach(
    dp: &mut Dataplane,
    config: &Config,
    mode: XdpAttachMode,
    q: &QuadrantHandle,
) -> anyhow::Result<()> {
    let mut c = config.clone();
    c.xdp_mode = mode;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match dp.attach(&c, q) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline && format!("{e:?}").contains("AlreadyExists") => {
                dp.detach_all()?;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn run(
    config: &Config,
    dp: &mut Dataplane,
    dx: &QuadrantHandle,
    dg: &QuadrantHandle,
) -> anyhow::Result<()> {
    let dx_if = config.host_iface(Quadrant::Dx);
    let mut nft_drop = vec![];
    let mut prog_drop: Vec<Vec<f64>> = vec![vec![]; MODES.len()];
    println!(
        "datapath benchmark: {ROUNDS} rounds of {FLOOD:?} floods DX -> PX (denied) on {dx_if}"
    );
    for round in 1..=ROUNDS {
        let (sent, dropped_pps) = nft_round(config, &dx_if)?;
        println!(
            "  round {round} {:<28} sent {sent:>9.0} pps, dropped {dropped_pps:>9.0} pps",
            "nftables netdev ingress"
        );
        nft_drop.push(dropped_pps);
        for (i, mode) in MODES.iter().enumerate() {
            attach(dp, config, *mode, dx)?;
            let before = dropped(dp)?;
            let sent = flood(config)?;
            let after = dropped(dp)?;
            dp.detach_all()?;
            let (sent, d) = (per_sec(sent), per_sec(after - before));
            println!(
                "  round {round} {:<28} sent {sent:>9.0} pps, dropped {d:>9.0} pps",
                mode_name(*mode)
            );
            prog_drop[i].push(d);
        }
    }

    let server = config.addrs(Quadrant::Dg).workload.to_string();
    let mut base_bps = vec![];
    let mut prog_bps: Vec<Vec<f64>> = vec![vec![]; MODES.len()];
    println!("allowed TCP DX -> DG (iperf3, {IPERF_SECS} s per run)");
    for round in 1..=ROUNDS {
        let base = iperf(config, &server)?;
        println!(
            "  round {round} {:<28} {:>8.2} Gbit/s",
            "no programs",
            base / 1e9
        );
        base_bps.push(base);
        for (i, mode) in MODES.iter().enumerate() {
            attach(dp, config, *mode, dx)?;
            attach(dp, config, *mode, dg)?;
            let with = iperf(config, &server)?;
            dp.detach_all()?;
            println!(
                "  round {round} {:<28} {:>8.2} Gbit/s",
                mode_name(*mode),
                with / 1e9
            );
            prog_bps[i].push(with);
        }
    }

    let nd = median(nft_drop);
    let b = median(base_bps);
    println!(
        "\nresult (medians of {ROUNDS} rounds; one raw-socket sender, 2 cores shared by sender and receiver):"
    );
    println!(
        "  nftables netdev ingress drop: {nd:.0} pps; no-program TCP: {:.2} Gbit/s",
        b / 1e9
    );
    let mut json_modes = serde_json::Map::new();
    for (i, mode) in MODES.iter().enumerate() {
        let d = median(prog_drop[i].clone());
        let p = median(prog_bps[i].clone());
        println!(
            "  {:<18} drop {d:>9.0} pps = {:.2}x nftables (target >= 2.0); allowed TCP {:.2} Gbit/s = {:.3}x baseline (target >= 0.95)",
            mode_name(*mode),
            d / nd,
            p / 1e9,
            p / b
        );
        json_modes.insert(
            mode_name(*mode).into(),
            serde_json::json!({ "drop_pps": d, "drop_ratio": d / nd, "tcp_bps": p, "tcp_ratio": p / b }),
        );
    }
    let json = serde_json::json!({
        "benchmark": "datapath",
        "rounds": ROUNDS,
        "nftables_drop_pps": nd,
        "baseline_tcp_bps": b,
        "modes": json_modes,
    });
    println!("{json}");
    Ok(())
}

/// One nftables round: a netdev ingress rule on DX's veth dropping DX -> PX, then a flood.
/// Returns (sent pps, dropped pps).
fn nft_round(config: &Config, iface: &str) -> anyhow::Result<(f64, f64)> {
    let px = config.addrs(Quadrant::Px).prefix;
    let rules = format!(
        "table netdev {NFT_TABLE} {{\n chain ingress {{\n  type filter hook ingress device \"{iface}\" priority 0; policy accept;\n  ip daddr {px} counter drop\n }}\n}}\n"
    );
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("nft (install nftables)")?;
    nft.stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    if !nft.wait()?.success() {
        bail!("nft rejected the benchmark rule");
    }
    let sent = flood(config)?;
    let out = Command::new("nft")
        .args(["-j", "list", "table", "netdev", NFT_TABLE])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j output")?;
    let dropped = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["rule"]["expr"].as_array())
        .flatten()
        .find_map(|x| x["counter"]["packets"].as_u64())
        .context("no counter in nft output")?;
    let _ = Command::new("nft")
        .args(["delete", "table", "netdev", NFT_TABLE])
        .status();
    #[expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52")]
    Ok((
        sent as f64 / FLOOD.as_secs_f64(),
        dropped as f64 / FLOOD.as_secs_f64(),
    ))
}

/// Sends denied UDP packets DX -> PX from DX's namespace through a raw socket for [`FLOOD`].
/// Returns how many the sender handed to the kernel.
fn flood(config: &Config) -> anyhow::Result<u64> {
    let ns = Path::new(sys::NETNS_RUN_DIR).join(config.netns(Quadrant::Dx));
    let src = config.addrs(Quadrant::Dx).workload;
    let dst = config.addrs(Quadrant::Px).workload;
    let ns_file = std::fs::File::open(&ns).with_context(|| format!("open {}", ns.display()))?;
    thread::spawn(move || -> anyhow::Result<u64> {
        nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        send_loop(src, dst)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}

fn send_loop(src: Ipv4Addr, dst: Ipv4Addr) -> anyhow::Result<u64> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(40_000, 9);
    let payload = [0u8; 18];
    let mut pkt = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut pkt, &payload)?;
    // SAFETY: plain socket(2); ownership is taken at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::sa_family_t::try_from(libc::AF_INET)?;
    sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    let mut iov = libc::iovec {
        iov_base: pkt.as_mut_ptr().cast(),
        iov_len: pkt.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: all-zero is a valid mmsghdr; the pointers are set right below.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_name = (&raw mut sa).cast();
            m.msg_hdr.msg_namelen =
                libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(16);
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let deadline = Instant::now() + FLOOD;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        // SAFETY: msgs, iov, sa and pkt outlive the call.
        let n =
            unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), u32::try_from(BATCH)?, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock
            {
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        sent += u64::try_from(n)?;
    }
    Ok(sent)
}

/// One iperf3 run DX -> `server` (in DG); returns received bits per second.
fn iperf(config: &Config, server: &str) -> anyhow::Result<f64> {
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            &config.netns(Quadrant::Dg),
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("iperf3 server (install iperf3)")?;
    thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &config.netns(Quadrant::Dx),
            "timeout",
            "20",
            "iperf3",
            "-c",
            server,
            "-p",
            "5201",
            "-t",
            IPERF_SECS,
            "-J",
        ])
        .output()
        .context("iperf3 client")?;
    // A client that could not connect leaves the server waiting.
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| {
            format!(
                "no throughput in iperf3 output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}
