//! Integration tests in real network namespaces: four quadrants up through the `quadrant` binary,
//! traffic between them from processes inside them, and clean teardown. Needs root.
//!
//! Each test runs its own agent instance (own names and prefixes), so they run in parallel.

use quadrant_tests::bounded::Bounded as _;
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::mpsc::Receiver,
    time::Duration,
};

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, copy_of_policies, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const TCP_PORT: &str = "7000";
const UDP_PORT: &str = "7001";
/// How long a probe waits for an answer that a dropped packet never brings.
const DROP_WAIT_MS: &str = "400";

/// The default matrix: inside a quadrant, DX <-> DG and PX <-> PG.
fn allowed_by_default(src: Quadrant, dst: Quadrant) -> bool {
    src == dst || src.is_production() == dst.is_production()
}

fn start_servers(inst: &mut Instance) -> Vec<(Quadrant, Receiver<String>)> {
    let mut udp = Vec::new();
    for q in Quadrant::ALL {
        let _tcp = inst.serve(q, &["tcp-echo", &format!("0.0.0.0:{TCP_PORT}")]);
        udp.push((
            q,
            inst.serve(q, &["udp-echo", &format!("0.0.0.0:{UDP_PORT}")]),
        ));
    }
    udp
}

fn received(rx: &Receiver<String>, needle: &str, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn every_ordered_pair_over_tcp_udp_and_icmp() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _servers = start_servers(&mut inst);
    let mut blocked = 0;
    let mut allowed = 0;
    for src in Quadrant::ALL {
        for dst in Quadrant::ALL {
            let addr = inst.addr(dst);
            let tcp = inst.probe(src, &["tcp-connect", &format!("{addr}:{TCP_PORT}"), "2000"]);
            let udp = inst.probe(src, &["udp-send", &format!("{addr}:{UDP_PORT}"), "2000"]);
            let icmp_wait = if allowed_by_default(src, dst) {
                "2000"
            } else {
                DROP_WAIT_MS
            };
            let icmp = inst.probe(src, &["icmp-echo", &addr, icmp_wait]);
            let pair = format!("{} -> {}", src.name(), dst.name());
            if allowed_by_default(src, dst) {
                assert_eq!(tcp, (true, "ok hello".into()), "{pair} tcp");
                assert_eq!(udp, (true, "ok hello".into()), "{pair} udp");
                assert_eq!(icmp, (true, format!("ok reply from {addr}")), "{pair} icmp");
                allowed += 3;
            } else {
                assert_eq!(
                    tcp,
                    (false, "err EPERM".into()),
                    "{pair} tcp must fail at connect()"
                );
                assert_eq!(
                    udp,
                    (false, "err EPERM".into()),
                    "{pair} udp must fail at sendto()"
                );
                assert_eq!(
                    icmp,
                    (false, "err timeout".into()),
                    "{pair} icmp must be dropped"
                );
                blocked += 3;
            }
        }
    }
    println!("pair matrix: {allowed} allowed attempts passed, {blocked} denied attempts blocked");
    assert_eq!((allowed, blocked), (24, 24));
    // Every denied ICMP was dropped by XDP on the sender's veth; TCP and UDP never left.
    for q in Quadrant::ALL {
        assert_eq!(
            inst.counter("xdp", q, "deny_policy"),
            2,
            "{} xdp deny_policy",
            q.name()
        );
        assert_eq!(
            inst.counter("connect4", q, "deny_policy"),
            2,
            "{} connect4 deny_policy",
            q.name()
        );
        assert_eq!(
            inst.counter("sendmsg4", q, "deny_policy"),
            2,
            "{} sendmsg4 deny_policy",
            q.name()
        );
        assert_eq!(
            inst.counter("tc_ingress", q, "deny_policy"),
            0,
            "{} nothing denied got past XDP",
            q.name()
        );
    }
}

#[test]
fn raw_sockets_bypassing_the_cgroup_hooks_are_dropped_in_the_datapath() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let servers = start_servers(&mut inst);
    let sink = |q: Quadrant| &servers.iter().find(|(s, _)| *s == q).expect("server").1;
    let dx = inst.addr(Quadrant::Dx);
    let dg = inst.addr(Quadrant::Dg);
    let px = inst.addr(Quadrant::Px);
    let wait = Duration::from_millis(500);

    // Control: an allowed raw datagram arrives, so a missing one below means a drop.
    let (ok, _) = inst.probe(
        Quadrant::Dx,
        &["raw-udp", &dx, &format!("{dg}:{UDP_PORT}"), "raw-allowed"],
    );
    assert!(ok);
    assert!(
        received(sink(Quadrant::Dg), "raw-allowed", Duration::from_secs(2)),
        "allowed raw datagram lost"
    );

    let before = inst.counter("xdp", Quadrant::Dx, "deny_policy");
    let (ok, _) = inst.probe(
        Quadrant::Dx,
        &["raw-udp", &dx, &format!("{px}:{UDP_PORT}"), "raw-denied"],
    );
    assert!(ok, "the raw send itself succeeds: no cgroup hook sees it");
    assert!(
        !received(sink(Quadrant::Px), "raw-denied", wait),
        "DX reached PX through a raw socket"
    );
    let (ok, _) = inst.probe(Quadrant::Dx, &["raw-icmp", &dx, &px]);
    assert!(ok);
    assert_eq!(
        inst.counter("xdp", Quadrant::Dx, "deny_policy"),
        before + 2,
        "both raw packets dropped by XDP"
    );

    let spoofed = inst.counter("xdp", Quadrant::Dx, "deny_spoofed");
    let (ok, _) = inst.probe(
        Quadrant::Dx,
        &["raw-udp", &dg, &format!("{dg}:{UDP_PORT}"), "raw-spoofed"],
    );
    assert!(ok);
    assert!(
        !received(sink(Quadrant::Dg), "raw-spoofed", wait),
        "spoofed datagram delivered"
    );
    let gw = inst.config.addrs(Quadrant::Dx).gateway.to_string();
    let (ok, _) = inst.probe(
        Quadrant::Dx,
        &[
            "raw-udp",
            &gw,
            &format!("{dg}:{UDP_PORT}"),
            "raw-spoofed-host",
        ],
    );
    assert!(ok);
    assert!(
        !received(sink(Quadrant::Dg), "raw-spoofed-host", wait),
        "datagram with the host's source delivered"
    );
    assert_eq!(
        inst.counter("xdp", Quadrant::Dx, "deny_spoofed"),
        spoofed + 2
    );
}

fn host_view() -> BTreeSet<String> {
    let mut lines = BTreeSet::new();
    for args in [
        &["-o", "addr", "show"][..],
        &["route", "show", "table", "all"][..],
        &["-o", "link", "show"][..],
    ] {
        let out = Command::new("ip").args(args).output_bounded();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // Other tests' instances come and go in parallel; judge only the host's own state.
            if !line.contains("qt") && !line.contains("10.241.") {
                // Link lines carry counters and flags that change with traffic; keep the name.
                let line = if args[1] == "link" {
                    line.split(':').take(2).collect::<Vec<_>>().join(":")
                } else {
                    line.to_owned()
                };
                lines.insert(line);
            }
        }
    }
    lines.insert(format!(
        "ip_forward={}",
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap_or_default()
            .trim()
    ));
    lines
}

#[test]
fn the_host_keeps_its_networking_and_reaches_every_quadrant() {
    let before = host_view();
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _servers = start_servers(&mut inst);

    // The host's own loopback traffic is untouched.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect loopback");
    let (mut s, _) = l.accept().expect("accept");
    c.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("read");

    // The host may open flows to every quadrant, and the replies come back (UDP replies are
    // sent with sendto(), so the sendmsg4 hook must recognise them as replies).
    for q in Quadrant::ALL {
        let addr = inst.addr(q);
        let run = |args: &[&str]| {
            let out = Command::new(QPROBE).args(args).output_bounded();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(
            run(&["tcp-connect", &format!("{addr}:{TCP_PORT}"), "2000"]),
            "ok hello",
            "host -> {} tcp",
            q.name()
        );
        assert_eq!(
            run(&["udp-send", &format!("{addr}:{UDP_PORT}"), "2000"]),
            "ok hello",
            "host -> {} udp",
            q.name()
        );
        assert_eq!(
            run(&["icmp-echo", &addr, "2000"]),
            format!("ok reply from {addr}"),
            "host -> {} icmp",
            q.name()
        );
        // Quadrants may ping the host but not open TCP to it.
        let gw = inst.config.addrs(q).gateway.to_string();
        assert_eq!(
            inst.probe(q, &["icmp-echo", &gw, "2000"]),
            (true, format!("ok reply from {gw}"))
        );
        assert_eq!(
            inst.probe(q, &["tcp-connect", &format!("{gw}:22"), "2000"]),
            (false, "err EPERM".into())
        );
        assert!(
            inst.counter("sendmsg4", q, "allow_established") >= 1,
            "{} udp reply via conntrack",
            q.name()
        );
    }
    let down = inst.down();
    assert!(
        down.status.success(),
        "down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(
        before,
        host_view(),
        "host addresses, routes, links or ip_forward changed"
    );
}

fn leftovers(inst: &Instance) -> Vec<String> {
    let c = &inst.config;
    let mut left = Vec::new();
    for q in Quadrant::ALL {
        if Path::new("/run/netns").join(c.netns(q)).exists() {
            left.push(format!("netns {}", c.netns(q)));
        }
        if Path::new("/sys/class/net").join(c.host_iface(q)).exists() {
            left.push(format!("link {}", c.host_iface(q)));
        }
        if c.cgroup_dir(q).exists() {
            left.push(format!("cgroup {}", c.cgroup_dir(q).display()));
        }
    }
    for p in [c.bpffs_dir(), c.socket_path(), c.state_path()] {
        if p.exists() {
            left.push(p.display().to_string());
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts.contains(&c.cgroup2.display().to_string()) {
        left.push(format!("mount {}", c.cgroup2.display()));
    }
    left
}

#[test]
fn down_removes_everything_and_is_safe_to_repeat() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    assert_eq!(
        leftovers(&inst).len(),
        4 * 3 + 3 + 1,
        "everything exists while up: {:?}",
        leftovers(&inst)
    );
    let out = inst.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed quadrant dx"));
    assert_eq!(leftovers(&inst), Vec::<String>::new());
    let again = inst.quadrant(&["down"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
}

#[test]
fn a_crashed_agent_stays_closed_and_down_cleans_up_after_it() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let mut servers = start_servers(&mut inst);
    inst.crash();
    // Pinned links keep the programs attached: isolation holds without the agent.
    let px = inst.addr(Quadrant::Px);
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{px}:{TCP_PORT}"), "1000"]
        ),
        (false, "err EPERM".into())
    );
    assert!(!leftovers(&inst).is_empty());
    servers.clear();
    let out = inst.quadrant(&["down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leftovers(&inst), Vec::<String>::new());

    // Up again after a crash that left everything behind: the stale pieces are replaced.
    let config = inst.config.clone();
    drop(inst);
    let mut inst = Instance::up(config.clone(), QPROBE);
    inst.crash();
    let mut inst = Instance::up(config, QPROBE);
    let dg = inst.addr(Quadrant::Dg);
    let _s = inst.serve(Quadrant::Dg, &["tcp-echo", &format!("0.0.0.0:{TCP_PORT}")]);
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:{TCP_PORT}"), "2000"]
        ),
        (true, "ok hello".into())
    );
    assert!(inst.down().status.success());
    assert_eq!(leftovers(&inst), Vec::<String>::new());
}

#[test]
fn status_lists_quadrants_programs_and_counters() {
    let inst = Instance::up(test_config(None), QPROBE);
    let s = inst.status();
    assert_eq!(s.instance, inst.config.instance);
    assert_eq!(s.quadrants.len(), 4);
    for (q, st) in Quadrant::ALL.iter().zip(&s.quadrants) {
        assert_eq!(st.name, q.name());
        assert_eq!(st.address, inst.addr(*q));
        let ifindex: u32 =
            std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", st.host_interface))
                .expect("ifindex")
                .trim()
                .parse()
                .expect("number");
        assert_eq!(st.host_ifindex, ifindex);
        let hooks: Vec<&str> = st.programs.iter().map(|p| p.hook.as_str()).collect();
        assert_eq!(
            hooks,
            [
                "xdp",
                "tc_ingress",
                "tc_egress",
                "connect4",
                "connect6",
                "sendmsg4",
                "sendmsg6",
                "sock_create",
                "sock_ops",
                "getpeername4",
                "recvmsg4",
                "sock_release",
                "post_bind4"
            ]
        );
        assert!(
            st.programs
                .iter()
                .all(|p| p.program_id > 0 && p.link_pin.exists())
        );
    }
    let text = inst.quadrant(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("{}-dx", inst.config.instance)) && text.contains("xdp="),
        "{text}"
    );
    // A denied connect shows up as a counter.
    let px = inst.addr(Quadrant::Px);
    assert_eq!(
        inst.probe(Quadrant::Dg, &["tcp-connect", &format!("{px}:1"), "500"]),
        (false, "err EPERM".into())
    );
    assert_eq!(inst.counter("connect4", Quadrant::Dg, "deny_policy"), 1);
}

#[test]
fn a_bad_config_is_refused_before_anything_is_created() {
    let config = test_config(None);
    let path = Path::new(quadrant_tests::harness::TEST_STATE_DIR)
        .join(format!("{}-bad.yaml", config.instance));
    std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
    let yaml = serde_yaml::to_string(&config)
        .expect("yaml")
        .replace("policy: []", "policy:\n- { from: dx, to: production }");
    assert!(yaml.contains("production"));
    std::fs::write(&path, yaml).expect("write");
    let bin = quadrant_tests::harness::sibling_binary(QPROBE, "quadrant");
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&path)
        .arg("up")
        .output_bounded();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown identity \"production\""), "{err}");
    for q in Quadrant::ALL {
        assert!(!Path::new("/run/netns").join(config.netns(q)).exists());
    }
}

#[test]
fn every_xdp_mode_enforces_the_same_policy() {
    use quadrant::config::XdpAttachMode;
    for (mode, drop_hook) in [
        (XdpAttachMode::Native, "xdp"),
        (XdpAttachMode::Off, "tc_ingress"),
    ] {
        let mut config = test_config(None);
        config.xdp_mode = mode;
        let mut inst = Instance::up(config, QPROBE);
        let _servers = start_servers(&mut inst);
        let (dg, px) = (inst.addr(Quadrant::Dg), inst.addr(Quadrant::Px));
        assert_eq!(
            inst.probe(
                Quadrant::Dx,
                &["tcp-connect", &format!("{dg}:{TCP_PORT}"), "2000"]
            ),
            (true, "ok hello".into()),
            "{mode:?}"
        );
        assert_eq!(
            inst.probe(Quadrant::Dx, &["icmp-echo", &px, DROP_WAIT_MS]),
            (false, "err timeout".into()),
            "{mode:?}"
        );
        assert_eq!(
            inst.counter(drop_hook, Quadrant::Dx, "deny_policy"),
            1,
            "{mode:?} drops at {drop_hook}"
        );
        let hooks = inst.status().quadrants[0]
            .programs
            .iter()
            .filter(|p| p.hook == "xdp")
            .count();
        assert_eq!(hooks, usize::from(mode != XdpAttachMode::Off), "{mode:?}");
        assert!(inst.down().status.success());
    }
}

#[test]
fn a_policy_that_cannot_be_evaluated_leaves_the_quadrants_in_deny_all() {
    let mut config = test_config(None);
    let dir = std::path::PathBuf::from(quadrant_tests::harness::TEST_STATE_DIR)
        .join(format!("{}-broken-policies", config.instance));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("broken.rego"),
        "package quadrant.runtime\n\nflows contains f if {\n",
    )
    .expect("write");
    config.policy_dir = Some(dir);
    let mut inst = Instance::up(config, QPROBE);
    let status = inst.status();
    assert!(
        status.policy.starts_with("deny-all: policy broken.rego:"),
        "{}",
        status.policy
    );
    let _servers = start_servers(&mut inst);
    let (dg, dx) = (inst.addr(Quadrant::Dg), inst.addr(Quadrant::Dx));
    // Normally allowed flows are refused: nothing is open while MCP-Core cannot decide.
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:{TCP_PORT}"), "1000"]
        ),
        (false, "err EPERM".into())
    );
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dx}:{TCP_PORT}"), "1000"]
        ),
        (false, "err EPERM".into())
    );
    assert_eq!(
        inst.probe(Quadrant::Dx, &["icmp-echo", &dg, DROP_WAIT_MS]),
        (false, "err timeout".into())
    );
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("127.0.0.1:{TCP_PORT}"), "1000"]
        ),
        (true, "ok hello".into()),
        "loopback stays usable"
    );
    assert!(inst.down().status.success());
}

#[test]
fn a_policy_reload_takes_effect_and_a_broken_one_changes_nothing() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    config.policy_dir = Some(dir.clone());
    let mut inst = Instance::up(config, QPROBE);
    let _servers = start_servers(&mut inst);
    let dg = inst.addr(Quadrant::Dg);
    let connect = |inst: &Instance| {
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:{TCP_PORT}"), "1000"],
        )
    };
    assert_eq!(connect(&inst), (true, "ok hello".into()));

    // A global deny between DX and DG, then a reload: the flow is refused at once.
    let global = dir.join("runtime/global.rego");
    let mut rego = std::fs::read_to_string(&global).expect("read");
    rego.push_str(
        "\ndeny contains {\"from\": \"dx\", \"to\": \"dg\", \"reason\": \"maintenance\"}\n",
    );
    std::fs::write(&global, &rego).expect("write");
    let out = inst.quadrant(&["policy", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("live slot 1"));
    assert_eq!(connect(&inst), (false, "err EPERM".into()));

    // A broken bundle is refused and the live policy stays.
    std::fs::write(
        dir.join("runtime/broken.rego"),
        "package quadrant.broken\n\nallow if {\n",
    )
    .expect("write");
    let out = inst.quadrant(&["policy", "reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the previous one stays live"));
    assert_eq!(connect(&inst), (false, "err EPERM".into()));
    assert!(inst.status().policy.starts_with("enforced:"));

    // Fixed again and reloaded with SIGHUP.
    std::fs::remove_file(dir.join("runtime/broken.rego")).expect("rm");
    std::fs::write(
        &global,
        rego.replace(
            "deny contains {\"from\": \"dx\", \"to\": \"dg\", \"reason\": \"maintenance\"}",
            "",
        ),
    )
    .expect("write");
    let pid = inst.status().pid;
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !connect(&inst).0 {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP reload did not take effect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(inst.down().status.success());
}

#[test]
fn a_watched_policy_directory_reloads_by_itself() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    config.policy_dir = Some(dir.clone());
    config.watch_policy_dir = true;
    let mut inst = Instance::up(config, QPROBE);
    let _tcp = inst.serve(Quadrant::Dg, &["tcp-echo", &format!("0.0.0.0:{TCP_PORT}")]);
    let dg = inst.addr(Quadrant::Dg);
    let connect = |inst: &Instance| {
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:{TCP_PORT}"), "1000"],
        )
    };
    let wait_for = |inst: &Instance, allowed: bool, what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while connect(inst).0 != allowed {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {}",
                inst.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(connect(&inst), (true, "ok hello".into()));

    // Editing the global layer is enough: no reload command, no signal.
    let global = dir.join("runtime/global.rego");
    let rego = std::fs::read_to_string(&global).expect("read");
    let deny = "\ndeny contains {\"from\": \"dx\", \"to\": \"dg\", \"reason\": \"maintenance\"}\n";
    std::fs::write(&global, format!("{rego}{deny}")).expect("write");
    wait_for(&inst, false, "the watched change did not take effect");
    assert_eq!(connect(&inst), (false, "err EPERM".into()));

    // A broken file is refused; the live policy stays.
    std::fs::write(
        dir.join("runtime/broken.rego"),
        "package quadrant.broken\n\nallow if {\n",
    )
    .expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !inst.agent_log().contains("policy reload failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed reload logged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(connect(&inst), (false, "err EPERM".into()));
    assert!(inst.status().policy.starts_with("enforced:"));

    // Fixed: the next change reloads again.
    std::fs::remove_file(dir.join("runtime/broken.rego")).expect("rm");
    std::fs::write(&global, rego).expect("write");
    wait_for(&inst, true, "the fixed bundle did not take effect");
    assert!(inst.down().status.success());
}

/// Replies live only as long as the flow they answer: the host opens a UDP flow into DG (host ->
/// DG allowed, DG -> host only ICMP), DG answers it every 100 ms; after a reload that denies
/// host -> DG, DG's next answer is refused at `sendmsg` with `EPERM` (without the policy check
/// of tracked replies the datagram would still be sent) and nothing more arrives.
#[test]
fn revoking_a_flow_ends_its_replies() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    config.policy_dir = Some(dir.clone());
    let mut inst = Instance::up(config, QPROBE);
    let dg = inst.addr(Quadrant::Dg);
    let push = inst.serve(Quadrant::Dg, &["udp-push", "0.0.0.0:7103"]);
    let host = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    host.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    host.send_to(b"start", format!("{dg}:7103")).expect("send");
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        let n = host
            .recv(&mut buf)
            .expect("a tick while host -> DG is allowed");
        assert!(buf[..n].starts_with(b"tick "));
    }

    inst.deny_and_reload(&dir, "host", "dg");
    let stopped = push
        .recv_timeout(Duration::from_secs(3))
        .expect("no refused answer after the revocation (DG still sends)");
    assert!(stopped.ends_with(": EPERM"), "{stopped}");
    // Whatever was on its way before the refusal arrives within a few ticks; then nothing.
    host.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let late = (0..10).take_while(|_| host.recv(&mut buf).is_ok()).count();
    assert!(late < 10, "DG's datagrams kept arriving after the refusal");
}

#[test]
fn policy_bundle_revisions_only_move_forward() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    let manifest = dir.join("manifest.json");
    let revision = |n: u64| {
        std::fs::write(
            &manifest,
            format!("{{\"bundle\": {{\"revision\": {n}}}}}\n"),
        )
        .expect("write");
    };
    revision(2);
    config.policy_dir = Some(dir.clone());
    let _ = std::fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let mut inst = Instance::up(config.clone(), QPROBE);
    assert!(
        inst.status().policy.starts_with("enforced:"),
        "{}",
        inst.status().policy
    );
    let reload = |inst: &Instance| {
        let out = inst.quadrant(&["policy", "reload"]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The same bundle again is fine.
    assert!(reload(&inst).0);

    // An older revision, and the same revision with other content, are refused; the live
    // policy stays.
    revision(1);
    let (ok, err) = reload(&inst);
    assert!(
        !ok && err.contains("revision 1 is older than revision 2"),
        "{err}"
    );
    revision(2);
    let extra = dir.join("runtime/quadrants/dx.rego");
    let mut rego = std::fs::read_to_string(&extra).expect("read");
    rego.push_str(
        "\nallow contains {\"from\": \"dx\", \"to\": \"dx\", \"protocols\": [\"udp\"]}\n",
    );
    std::fs::write(&extra, &rego).expect("write");
    let (ok, err) = reload(&inst);
    assert!(
        !ok && err.contains("a changed bundle needs a new revision"),
        "{err}"
    );
    assert!(inst.status().policy.starts_with("enforced:"));

    // A new revision is accepted.
    revision(3);
    let (ok, err) = reload(&inst);
    assert!(ok, "{err}");

    // After a restart an older bundle leaves the quadrants in deny-all (fail closed).
    assert!(inst.down().status.success());
    revision(2);
    let inst = Instance::up(config, QPROBE);
    let policy = inst.status().policy;
    assert!(
        policy.starts_with("deny-all:") && policy.contains("revision 2 is older than revision 3"),
        "{policy}"
    );
    let dg = inst.addr(Quadrant::Dg);
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:{TCP_PORT}"), "1000"]
        ),
        (false, "err EPERM".into())
    );
}

/// Runs `qprobe ARGS…` in quadrant `q` the way a process that joins it by hand would (its
/// cgroup, then `ip netns exec`), not through the agent; returns the outcome line.
fn by_hand(inst: &Instance, q: Quadrant, args: &[&str]) -> String {
    let procs = inst.config.cgroup_dir(q).join("cgroup.procs");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec ip netns exec {} \"$@\"",
            procs.display(),
            inst.config.netns(q)
        ))
        .arg("sh")
        .arg(QPROBE)
        .args(args)
        .output_bounded();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A `qprobe` server on the host (root namespace), killed when dropped.
struct HostServer(std::process::Child);

impl HostServer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(QPROBE)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("host server");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
            &mut line,
        )
        .expect("read");
        assert_eq!(line.trim(), "listening", "{args:?}");
        Self(child)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_rule_naming_one_workload_admits_only_that_workload() {
    let mut config = test_config(None);
    // DX may only ping the host; one rule lets DX's workload `api` (and nothing else in DX)
    // reach the host's port 7310 over TCP and UDP.
    let policies = copy_of_policies(&config.instance);
    let dx_rego = policies.join("runtime/quadrants/dx.rego");
    let original = std::fs::read_to_string(&dx_rego).expect("dx.rego");
    std::fs::write(
        &dx_rego,
        format!(
            "{original}\nallow contains {{\"from\": \"spiffe://quadrant.local/quadrant/dx/workload/api\", \"to\": \"host\", \"protocols\": [\"tcp\", \"udp\"], \"ports\": [\"7310\"]}}\n"
        ),
    )
    .expect("write dx.rego");
    config.policy_dir = Some(policies);
    let inst = Instance::up(config, QPROBE);
    let _tcp = HostServer::start(&["tcp-echo", "0.0.0.0:7310"]);
    let _udp = HostServer::start(&["udp-echo", "0.0.0.0:7310"]);
    let gw = |q: Quadrant| format!("{}:7310", inst.config.addrs(q).gateway);
    let tcp = |q: Quadrant, workload: Option<&str>| {
        inst.probe_as(q, workload, &["tcp-connect", &gw(q), "2000"])
    };
    let udp = |q: Quadrant, workload: Option<&str>| {
        inst.probe_as(q, workload, &["udp-send", &gw(q), "2000"])
    };
    assert!(
        inst.status().policy.contains("for single workloads"),
        "{}",
        inst.status().policy
    );
    assert_eq!(tcp(Quadrant::Dx, Some("api")), (true, "ok hello".into()));
    assert_eq!(udp(Quadrant::Dx, Some("api")), (true, "ok hello".into()));
    let mut refused = 0;
    for (q, workload) in [
        (Quadrant::Dx, Some("web")),
        (Quadrant::Dx, None),
        (Quadrant::Dg, Some("api")),
        (Quadrant::Px, Some("api")),
    ] {
        assert_eq!(
            tcp(q, workload),
            (false, "err EPERM".into()),
            "{q:?} {workload:?}"
        );
        assert_eq!(
            udp(q, workload),
            (false, "err EPERM".into()),
            "{q:?} {workload:?}"
        );
        refused += 2;
    }
    // Nor can a process of DX forge what only `api` may send: raw IP sockets are refused in DX
    // (its policy names a single workload), not in DG; packet sockets, which the kernel hook
    // does not see, are out of reach because processes started in DX lack CAP_NET_RAW.
    let host_gw = inst.config.addrs(Quadrant::Dx).gateway.to_string();
    let forge = |q: Quadrant, workload: Option<&str>| {
        let src = inst.addr(q);
        [
            inst.probe_as(q, workload, &["raw-udp", &src, &gw(q), "forged"]),
            inst.probe_as(q, workload, &["raw-icmp", &src, &host_gw]),
            inst.probe_as(q, workload, &["packet-socket"]),
        ]
    };
    for workload in [None, Some("web"), Some("api")] {
        for outcome in forge(Quadrant::Dx, workload) {
            assert_eq!(outcome, (false, "err EPERM".into()), "DX {workload:?}");
            refused += 1;
        }
    }
    for outcome in forge(Quadrant::Dg, None) {
        assert!(outcome.0, "DG: {outcome:?}");
    }
    // A process that joins DX by hand, not through the agent, keeps CAP_NET_RAW: the kernel's
    // sock_create hook still refuses its raw IP sockets.
    let dx = inst.addr(Quadrant::Dx);
    assert_eq!(
        by_hand(
            &inst,
            Quadrant::Dx,
            &["raw-udp", &dx, &gw(Quadrant::Dx), "forged"]
        ),
        "err EPERM"
    );
    assert_eq!(
        by_hand(&inst, Quadrant::Dx, &["raw-icmp", &dx, &host_gw]),
        "err EPERM"
    );
    refused += 2;
    assert_eq!(
        inst.counter("sock_create", Quadrant::Dx, "deny_raw_socket"),
        2
    );
    assert!(inst.counter("connect4", Quadrant::Dx, "allow_workload_policy") >= 1);
    assert!(inst.counter("sendmsg4", Quadrant::Dx, "allow_workload_policy") >= 1);
    println!("workload rule: 2 allowed, {refused} refused");

    // Without the rule, `api` is refused too.
    std::fs::write(&dx_rego, &original).expect("restore dx.rego");
    let out = inst.quadrant(&["policy", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcp(Quadrant::Dx, Some("api")), (false, "err EPERM".into()));
    assert_eq!(udp(Quadrant::Dx, Some("api")), (false, "err EPERM".into()));
    for outcome in forge(Quadrant::Dx, None) {
        assert!(outcome.0, "DX without workload rules: {outcome:?}");
    }
}

/// Waits up to two seconds for an agent log line of the verdict trace containing `needle`.
fn traced(inst: &Instance, needle: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if inst
            .agent_log()
            .lines()
            .any(|l| l.contains("quadrant::trace") && l.contains(needle))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn trace_lines(inst: &Instance) -> usize {
    inst.agent_log()
        .lines()
        .filter(|l| l.contains("quadrant::trace"))
        .count()
}

#[test]
fn the_verdict_trace_reports_what_it_is_asked_for() {
    let inst = Instance::up(test_config(None), QPROBE);
    let (dx, dg, px) = (
        inst.addr(Quadrant::Dx),
        inst.addr(Quadrant::Dg),
        inst.addr(Quadrant::Px),
    );
    let refused = |inst: &Instance| {
        let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{px}:80"), "300"]);
        assert!(!ok && line == "err EPERM", "{line}");
    };
    let set = |mode: &str| {
        let out = inst.quadrant(&["trace", mode]);
        assert!(out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&format!("verdict trace: {mode}")),
            "{out:?}"
        );
    };

    // Off (the default): verdicts are counted, never traced.
    refused(&inst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(trace_lines(&inst), 0, "{}", inst.agent_log());

    set("drops");
    refused(&inst);
    assert!(
        traced(
            &inst,
            &format!("connect4 dx drop deny_policy tcp -> {px}:80")
        ),
        "{}",
        inst.agent_log()
    );
    // A spoofed datagram, dropped by XDP, is traced with its 5-tuple.
    let (ok, _) = inst.probe(
        Quadrant::Dx,
        &["raw-udp", &dg, &format!("{dg}:{UDP_PORT}"), "spoofed"],
    );
    assert!(ok);
    assert!(
        traced(
            &inst,
            &format!("xdp dx drop deny_spoofed udp {dg}:40000 -> {dg}:{UDP_PORT}")
        ),
        "{}",
        inst.agent_log()
    );
    // Allowed operations are not drops.
    let (_, _) = inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{dg}:9"), "300"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !inst
            .agent_log()
            .lines()
            .any(|l| l.contains("quadrant::trace") && l.contains(" pass ")),
        "{}",
        inst.agent_log()
    );

    set("all");
    let (_, _) = inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{dg}:9"), "300"]);
    assert!(
        traced(
            &inst,
            &format!("connect4 dx pass allow_policy tcp -> {dg}:9")
        ),
        "{}",
        inst.agent_log()
    );
    assert!(
        traced(&inst, &format!("tc_ingress dx pass allow_policy tcp {dx}:")),
        "{}",
        inst.agent_log()
    );

    // The log goes to a pipe here: plain text, no colour codes.
    assert!(!inst.agent_log().contains('\u{1b}'), "{}", inst.agent_log());

    set("off");
    std::thread::sleep(Duration::from_millis(300));
    let before = trace_lines(&inst);
    refused(&inst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(trace_lines(&inst), before, "{}", inst.agent_log());
}
