//! `BPF_PROG_TEST_RUN` fixture tables: packet → expected verdict and counter delta, for the XDP
//! and both tcx programs, through aya's `test_run`.
//!
//! Each table runs against a freshly loaded dataplane whose maps hold a configuration; the
//! interface under test is the loopback device (ifindex of `lo`), which `test_run` uses as the
//! packet's device, registered as DX's host-side veth. Needs root (`BPF_PROG_LOAD`).

use std::{net::Ipv4Addr, thread, time::Duration};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use dataplane_common::{
    Hook, Quadrant, Reason, Verdict,
    chaos::{CHAOS_ARMED, CHAOS_FAULTS, Fault, FaultKey},
    maps::{EVENT_FLOW_CLOSE, EVENT_FLOW_OPEN, EVENT_VERDICT, TRACE_PACKET, TraceRecord},
    reason::UNATTRIBUTED_SLOT,
};
use quadrant::{
    chaos::{Action, FaultSpec},
    config::{Config, PolicyRule},
    loader::{Dataplane, programs},
    policy::{CompiledPolicy, KernelPolicy, PolicyBundle},
};
use quadrant_tests::packets::{
    self, arp, ipv6_udp, lldp, ping, pong, port_unreachable, tcp, tcp_ack, tcp_fin, truncated, udp,
    vlan_udp, with_frag, with_ihl, with_total_len, with_version,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const DX: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);
const DX_GW: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 1);
const DG: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 2);
const PX: Ipv4Addr = Ipv4Addr::new(10, 240, 2, 2);
const PG: Ipv4Addr = Ipv4Addr::new(10, 240, 3, 2);
const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

struct Case {
    what: &'static str,
    packet: Vec<u8>,
    reason: Reason,
    /// The kernel's skb `test_run` refuses (EINVAL) IPv4 frames shorter than an IPv4 header, so
    /// such cases run through XDP only; the tc programs share the same parser.
    skb_test_run: bool,
}

fn case(what: &'static str, packet: Vec<u8>, reason: Reason) -> Case {
    Case {
        what,
        packet,
        reason,
        skb_test_run: true,
    }
}

fn xdp_only(what: &'static str, packet: Vec<u8>, reason: Reason) -> Case {
    Case {
        what,
        packet,
        reason,
        skb_test_run: false,
    }
}

/// The embedded configuration with `rules` (a YAML list) as its local rules.
fn with_policy(rules: &str) -> Config {
    let mut config = Config::embedded();
    config.policy = serde_yaml::from_str::<Vec<PolicyRule>>(rules).expect("rules");
    config.validate().expect("valid config");
    config
}

fn lo_ifindex() -> u32 {
    nix::net::if_::if_nametoindex("lo").expect("lo exists")
}

/// A dataplane loaded with `config` and the embedded Rego bundle's flows, with `lo` registered
/// as DX's veth when `register`.
fn dataplane(config: &Config, register: bool) -> Dataplane {
    let policy = PolicyBundle::embedded()
        .compile(config)
        .expect("embedded policy");
    dataplane_with(config, &policy, register)
}

/// A dataplane whose policy map holds exactly the configuration's own rules.
fn dataplane_with_only_local_rules(config: &Config) -> Dataplane {
    dataplane_with(config, &config.compile_policy().expect("rules"), true)
}

fn dataplane_with(config: &Config, policy: &CompiledPolicy, register: bool) -> Dataplane {
    let mut dp = Dataplane::load(None).expect("load dataplane (needs root)");
    dp.write_config(config, 2).expect("write config");
    dp.apply_policy(&KernelPolicy::quadrant_wide(policy.clone()))
        .expect("policy");
    if register {
        dp.register_iface(lo_ifindex(), Quadrant::Dx)
            .expect("register lo as DX");
    }
    dp
}

fn total(dp: &Dataplane) -> u64 {
    dp.counters()
        .expect("counters")
        .iter()
        .map(|c| c.count)
        .sum()
}

/// Runs `packet` through the program of `hook` and returns its return value.
fn run(dp: &mut Dataplane, hook: Hook, packet: &[u8], what: &str) -> u32 {
    let name = match hook {
        Hook::Xdp => programs::XDP,
        Hook::TcIngress => programs::TC_INGRESS,
        Hook::TcEgress => programs::TC_EGRESS,
        other => panic!("{other:?} has no test_run"),
    };
    let prog = dp.ebpf_mut().program_mut(name).expect("program");
    let opts = TestRunOptions {
        data_in: Some(packet),
        ..TestRunOptions::default()
    };
    let result = if hook == Hook::Xdp {
        let p: &mut Xdp = prog.try_into().expect("xdp");
        p.test_run(opts)
    } else {
        let p: &mut SchedClassifier = prog.try_into().expect("classifier");
        p.test_run(opts)
    };
    result
        .unwrap_or_else(|e| panic!("test_run {name} ({what}, {} bytes): {e:?}", packet.len()))
        .return_value
}

fn expected_code(hook: Hook, reason: Reason) -> u32 {
    match (hook, reason.verdict()) {
        (Hook::Xdp, Verdict::Pass) => XDP_PASS,
        (Hook::Xdp, Verdict::Drop) => XDP_DROP,
        (_, Verdict::Pass) => TC_ACT_OK,
        (_, Verdict::Drop) => TC_ACT_SHOT,
    }
}

/// Runs one case and checks the return code, that exactly the counter of (hook, slot, reason)
/// went up by one, and that no other counter moved.
fn check(dp: &mut Dataplane, hook: Hook, slot: u32, c: &Case) {
    let before = dp.counter(hook, slot, c.reason).expect("counter");
    let before_total = total(dp);
    let ret = run(dp, hook, &c.packet, c.what);
    assert_eq!(
        ret,
        expected_code(hook, c.reason),
        "{:?}: {}: return code",
        hook,
        c.what
    );
    assert_eq!(
        dp.counter(hook, slot, c.reason).expect("counter"),
        before + 1,
        "{hook:?}: {}: counter of {:?}",
        c.what,
        c.reason
    );
    assert_eq!(
        total(dp),
        before_total + 1,
        "{hook:?}: {}: some other counter moved",
        c.what
    );
}

/// Packets a quadrant (DX) sends: the table both XDP and tc ingress must agree on.
fn from_dx_table() -> Vec<Case> {
    let mut cases = from_dx_policy();
    cases.extend(from_dx_malformed());
    cases
}

/// Well-formed packets: the policy's and anti-spoofing's verdicts.
fn from_dx_policy() -> Vec<Case> {
    use Reason::*;
    vec![
        case("ARP request for the gateway", arp(DX, DX_GW), PassArp),
        case(
            "DX -> DG tcp (dev <-> dev gateway allowed)",
            tcp(DX, 40000, DG, 80),
            AllowPolicy,
        ),
        case("DX -> DG udp", udp(DX, 40000, DG, 53), AllowPolicy),
        case("DX -> DG ping", ping(DX, DG, 1), AllowPolicy),
        case(
            "DX -> PX tcp (dev -> prod denied)",
            tcp(DX, 40000, PX, 80),
            DenyPolicy,
        ),
        case("DX -> PX udp", udp(DX, 40000, PX, 53), DenyPolicy),
        case("DX -> PX ping", ping(DX, PX, 2), DenyPolicy),
        case("DX -> PG tcp", tcp(DX, 40000, PG, 443), DenyPolicy),
        case("DX -> PG ping", ping(DX, PG, 3), DenyPolicy),
        case("DX -> host ping (allowed)", ping(DX, DX_GW, 4), AllowPolicy),
        case(
            "DX -> host tcp (not configured)",
            tcp(DX, 40000, DX_GW, 22),
            DenyPolicy,
        ),
        case("DX -> world tcp", tcp(DX, 40000, WORLD, 443), DenyPolicy),
        case("source of DG", tcp(DG, 40000, DX, 80), DenySpoofed),
        case(
            "source of the gateway (host)",
            ping(DX_GW, DG, 5),
            DenySpoofed,
        ),
        case("source in the world", udp(WORLD, 53, DG, 53), DenySpoofed),
        case(
            "source 0.0.0.0",
            udp(Ipv4Addr::UNSPECIFIED, 68, DG, 67),
            DenySpoofed,
        ),
    ]
}

/// Frames the parser refuses, each with its own reason.
fn from_dx_malformed() -> Vec<Case> {
    use Reason::*;
    vec![
        case("802.1Q tagged", vlan_udp(DX, DG), DropVlan),
        case("IPv6", ipv6_udp(), DropIpv6),
        case("LLDP ethertype", lldp(), DropUnknownL3),
        case(
            "IHL 4 (16-byte header)",
            with_ihl(tcp(DX, 1, DG, 80), 4),
            DropBadIhl,
        ),
        case("IHL 0", with_ihl(udp(DX, 1, DG, 53), 0), DropBadIhl),
        case(
            "IHL 15 beyond the packet",
            with_total_len(with_ihl(udp(DX, 1, DG, 53), 15), 60),
            DropBadIhl,
        ),
        case(
            "total length below header length",
            with_total_len(udp(DX, 1, DG, 53), 12),
            DropBadIhl,
        ),
        case(
            "IP version 6 under ethertype IPv4",
            with_version(udp(DX, 1, DG, 53), 6),
            DropBadVersion,
        ),
        case(
            "first fragment (MF set)",
            with_frag(udp(DX, 1, DG, 53), 0x2000),
            DropFragment,
        ),
        case(
            "later fragment (offset 185)",
            with_frag(udp(DX, 1, DG, 53), 185),
            DropFragment,
        ),
        case(
            "fragment with DF and offset",
            with_frag(tcp(DX, 1, DG, 80), 0x4000 | 1),
            DropFragment,
        ),
        xdp_only(
            "one byte of IPv4 header",
            truncated(tcp(DX, 1, DG, 80), packets::L3 + 1),
            DropTruncated,
        ),
        xdp_only(
            "IPv4 header cut at 10 bytes",
            truncated(tcp(DX, 1, DG, 80), packets::L3 + 10),
            DropTruncated,
        ),
        case(
            "TCP header cut at 10 bytes",
            truncated(tcp(DX, 1, DG, 80), packets::L3 + 30),
            DropTruncated,
        ),
        case(
            "UDP header cut at 4 bytes",
            truncated(udp(DX, 1, DG, 53), packets::L3 + 24),
            DropTruncated,
        ),
        case(
            "ICMP header cut at 4 bytes",
            truncated(ping(DX, DG, 1), packets::L3 + 24),
            DropTruncated,
        ),
        case(
            "ARP cut at 20 bytes",
            truncated(arp(DX, DX_GW), packets::L3 + 20),
            DropTruncated,
        ),
    ]
}

#[test]
fn xdp_table_for_frames_leaving_a_quadrant() {
    let mut dp = dataplane(&Config::embedded(), true);
    for c in from_dx_table() {
        check(&mut dp, Hook::Xdp, Quadrant::Dx as u32, &c);
    }
}

#[test]
fn tc_ingress_table_for_packets_leaving_a_quadrant() {
    let mut dp = dataplane(&Config::embedded(), true);
    for c in from_dx_table() {
        if c.skb_test_run {
            check(&mut dp, Hook::TcIngress, Quadrant::Dx as u32, &c);
        }
    }
}

#[test]
fn tc_egress_table_for_packets_entering_a_quadrant() {
    use Reason::*;
    let mut dp = dataplane(&Config::embedded(), true);
    let table = vec![
        case("ARP reply into DX", arp(DX_GW, DX), PassArp),
        case(
            "host -> DX tcp (host reaches every quadrant)",
            tcp(DX_GW, 40000, DX, 22),
            AllowPolicy,
        ),
        case("DG -> DX udp", udp(DG, 40000, DX, 53), AllowPolicy),
        case(
            "PX -> DX tcp (prod -> dev denied)",
            tcp(PX, 40000, DX, 80),
            DenyPolicy,
        ),
        case("PX -> DX udp", udp(PX, 40000, DX, 53), DenyPolicy),
        case("PG -> DX ping", ping(PG, DX, 9), DenyPolicy),
        case("world -> DX tcp", tcp(WORLD, 443, DX, 80), DenyPolicy),
        case(
            "host -> DG address sent into DX",
            tcp(DX_GW, 40000, DG, 22),
            DenyMisrouted,
        ),
        case("tagged frame", vlan_udp(DG, DX), DropVlan),
        case("IPv6", ipv6_udp(), DropIpv6),
        case(
            "fragment",
            with_frag(udp(DG, 1, DX, 53), 0x2000),
            DropFragment,
        ),
    ];
    for c in table {
        check(&mut dp, Hook::TcEgress, Quadrant::Dx as u32, &c);
    }
}

#[test]
fn unregistered_interface_fails_closed() {
    let mut dp = dataplane(&Config::embedded(), false);
    let c = case(
        "allowed flow on an interface the agent never registered",
        tcp(DX, 1, DG, 80),
        Reason::DropUnknownInterface,
    );
    for hook in [Hook::Xdp, Hook::TcIngress, Hook::TcEgress] {
        check(&mut dp, hook, UNATTRIBUTED_SLOT, &c);
    }
}

#[test]
fn replies_of_allowed_flows_pass_and_only_tc_records_flows() {
    use Reason::*;
    let mut dp = dataplane(&Config::embedded(), true);
    let slot = Quadrant::Dx as u32;
    // host opens a TCP flow into DX; DX -> host TCP is otherwise denied.
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "host -> DX:8080 opens",
            tcp(DX_GW, 40000, DX, 8080),
            AllowPolicy,
        ),
    );
    check(
        &mut dp,
        Hook::Xdp,
        slot,
        &case(
            "reply DX:8080 -> host at XDP",
            tcp_ack(DX, 8080, DX_GW, 40000),
            AllowEstablished,
        ),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "reply at tc ingress",
            tcp_ack(DX, 8080, DX_GW, 40000),
            AllowEstablished,
        ),
    );
    for hook in [Hook::Xdp, Hook::TcIngress] {
        check(
            &mut dp,
            hook,
            slot,
            &case(
                "a SYN on the tracked ports opens a new connection: the policy's to decide",
                tcp(DX, 8080, DX_GW, 40000),
                DenyPolicy,
            ),
        );
    }
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "next packet host -> DX",
            tcp_ack(DX_GW, 40000, DX, 8080),
            AllowEstablished,
        ),
    );
    check(
        &mut dp,
        Hook::Xdp,
        slot,
        &case(
            "same ports, other peer port",
            tcp_ack(DX, 8080, DX_GW, 40001),
            DenyPolicy,
        ),
    );
    check(
        &mut dp,
        Hook::Xdp,
        slot,
        &case(
            "same ports, UDP instead",
            udp(DX, 8080, DX_GW, 40000),
            DenyPolicy,
        ),
    );
    // UDP: host:5353 -> DX:53, reply passes, other destination port does not.
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("host -> DX:53 udp", udp(DX_GW, 5353, DX, 53), AllowPolicy),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case("udp reply", udp(DX, 53, DX_GW, 5353), AllowEstablished),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case("udp to another port", udp(DX, 53, DX_GW, 5354), DenyPolicy),
    );
}

/// A tracked flow lives only as long as the policy allows the direction that opened it: after a
/// reload that revokes host -> DX, neither the replies nor the host's next segments of a
/// connection opened before pass (without the check they would, as `AllowEstablished`), and
/// flipping back lets the same tracked flow go on.
#[test]
fn revoking_a_flow_ends_its_tracked_connections() {
    use Reason::*;
    let config = Config::embedded();
    let full = PolicyBundle::embedded().compile(&config).expect("policy");
    let mut dp = dataplane_with(&config, &full, true);
    let slot = Quadrant::Dx as u32;
    let steps = |dp: &mut Dataplane, after: &'static str, reason: Reason| {
        check(
            dp,
            Hook::TcEgress,
            slot,
            &case(after, tcp_ack(DX_GW, 40000, DX, 8080), reason),
        );
        for hook in [Hook::Xdp, Hook::TcIngress] {
            check(
                dp,
                hook,
                slot,
                &case(after, tcp_ack(DX, 8080, DX_GW, 40000), reason),
            );
        }
    };
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "host -> DX:8080 opens",
            tcp(DX_GW, 40000, DX, 8080),
            AllowPolicy,
        ),
    );
    steps(&mut dp, "while allowed", AllowEstablished);

    let mut revoked = full.clone();
    revoked.retain(|(src, dst, _), _| {
        !(*src == dataplane_common::Identity::Host && *dst == dataplane_common::Identity::Dx)
    });
    assert_eq!(
        dp.apply_policy(&KernelPolicy::quadrant_wide(revoked.clone()))
            .expect("apply"),
        1
    );
    steps(&mut dp, "after the revocation", DenyPolicy);

    assert_eq!(
        dp.apply_policy(&KernelPolicy::quadrant_wide(full.clone()))
            .expect("apply"),
        0
    );
    steps(&mut dp, "allowed again", AllowEstablished);
}

#[test]
fn xdp_never_records_a_flow() {
    use Reason::*;
    // DX may open flows to PX on tcp/443, PX may not open any flow to DX.
    let config = with_policy("- { from: dx, to: px, protocols: [tcp], ports: [443] }");
    let mut dp = dataplane_with_only_local_rules(&config);
    let slot = Quadrant::Dx as u32;
    check(
        &mut dp,
        Hook::Xdp,
        slot,
        &case("DX -> PX:443 at XDP", tcp(DX, 40000, PX, 443), AllowPolicy),
    );
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "reply after XDP only",
            tcp_ack(PX, 443, DX, 40000),
            DenyPolicy,
        ),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case("DX -> PX:443 at tc", tcp(DX, 40000, PX, 443), AllowPolicy),
    );
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "reply after tc recorded it",
            tcp_ack(PX, 443, DX, 40000),
            AllowEstablished,
        ),
    );
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "PX opens its own flow to DX",
            tcp(PX, 443, DX, 40001),
            DenyPolicy,
        ),
    );
}

#[test]
fn port_ranges_are_enforced() {
    use Reason::*;
    let config = with_policy(
        "- { from: dx, to: px, protocols: [tcp], ports: [443, \"8000-8080\"] }\n- { from: dx, to: pg, protocols: [udp] }",
    );
    let mut dp = dataplane_with_only_local_rules(&config);
    let table = vec![
        case("tcp 443", tcp(DX, 1, PX, 443), AllowPolicy),
        case("tcp 442", tcp(DX, 1, PX, 442), DenyPolicy),
        case("tcp 444", tcp(DX, 1, PX, 444), DenyPolicy),
        case("tcp 8000", tcp(DX, 1, PX, 8000), AllowPolicy),
        case("tcp 8080", tcp(DX, 1, PX, 8080), AllowPolicy),
        case("tcp 8081", tcp(DX, 1, PX, 8081), DenyPolicy),
        case(
            "udp 443 (only tcp allowed)",
            udp(DX, 1, PX, 443),
            DenyPolicy,
        ),
        case("ping PX (only tcp allowed)", ping(DX, PX, 1), DenyPolicy),
        case("udp to PG, any port", udp(DX, 1, PG, 9), AllowPolicy),
        case("tcp to PG", tcp(DX, 1, PG, 9), DenyPolicy),
        case(
            "DX -> DG no longer allowed (rules replaced)",
            tcp(DX, 1, DG, 80),
            DenyPolicy,
        ),
    ];
    for c in table {
        check(&mut dp, Hook::TcIngress, Quadrant::Dx as u32, &c);
    }
}

#[test]
fn tracked_flows_expire() {
    use Reason::*;
    let mut config = Config::embedded();
    config.conntrack_timeout_secs = 1;
    let mut dp = dataplane(&config, true);
    let slot = Quadrant::Dx as u32;
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("host -> DX opens", tcp(DX_GW, 41000, DX, 9000), AllowPolicy),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "reply within the timeout",
            tcp_ack(DX, 9000, DX_GW, 41000),
            AllowEstablished,
        ),
    );
    thread::sleep(Duration::from_millis(2100));
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "reply after the timeout",
            tcp_ack(DX, 9000, DX_GW, 41000),
            DenyPolicy,
        ),
    );
}

#[test]
fn echo_reply_matches_its_request() {
    use Reason::*;
    // An echo reply passes only as the answer to a request the policy let in.
    let mut dp = dataplane(&Config::embedded(), true);
    let slot = Quadrant::Dx as u32;
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("PX echo request into DX", ping(PX, DX, 77), DenyPolicy),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "DX echo reply to PX without a request",
            pong(DX, PX, 77),
            DenyPolicy,
        ),
    );
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("DG echo request into DX", ping(DG, DX, 78), AllowPolicy),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case("DX echo reply to DG", pong(DX, DG, 78), AllowEstablished),
    );
}

#[test]
fn a_new_policy_goes_live_at_once_by_flipping_slots() {
    use Reason::*;
    let config = Config::embedded();
    let full = PolicyBundle::embedded().compile(&config).expect("policy");
    let mut dp = dataplane_with(&config, &full, true);
    let slot = Quadrant::Dx as u32;
    assert_eq!(dp.live_policy_slot(), 0);
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "DX -> DG under the first policy",
            tcp(DX, 1, DG, 80),
            AllowPolicy,
        ),
    );

    // The same policy without DX -> DG: written into slot 1, then made live.
    let mut narrower = full.clone();
    narrower.retain(|(src, dst, _), _| {
        !(*src == dataplane_common::Identity::Dx && *dst == dataplane_common::Identity::Dg)
    });
    assert_eq!(
        dp.apply_policy(&KernelPolicy::quadrant_wide(narrower.clone()))
            .expect("apply"),
        1
    );
    assert_eq!(dp.live_policy_slot(), 1);
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case("DX -> DG after the flip", tcp(DX, 2, DG, 80), DenyPolicy),
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "DX -> host ping still allowed",
            ping(DX, DX_GW, 9),
            AllowPolicy,
        ),
    );
    // The slot that was live is untouched until the next change.
    // Each key twice: for the cgroup programs and, joined with no workload rules, for packets.
    assert_eq!(dp.policy_entries(0).expect("slot 0"), 2 * full.len());
    assert_eq!(dp.policy_entries(1).expect("slot 1"), 2 * narrower.len());

    assert_eq!(
        dp.apply_policy(&KernelPolicy::quadrant_wide(full.clone()))
            .expect("apply"),
        0
    );
    check(
        &mut dp,
        Hook::TcIngress,
        slot,
        &case(
            "DX -> DG after flipping back",
            tcp(DX, 3, DG, 80),
            AllowPolicy,
        ),
    );
}

/// The tc program delivering into DX counts the ICMP port-unreachables DX's datagrams earn
/// towards DX's UDP breaker for that destination — only those the destination itself sends
/// about a datagram from DX's own address: a third party's claim (DG saying PX refused DX) and
/// an error about another quadrant's datagram leave no breaker, however often they come.
#[test]
fn port_unreachables_into_a_quadrant_open_its_udp_breaker() {
    use dataplane_common::breaker::{CLOSED, OPEN};
    let config = Config::embedded();
    let mut dp = dataplane(&config, true);
    dp.write_breaker_limits(config.breakers.limits())
        .expect("breaker limits");
    let threshold = config.breakers.consecutive_failures;
    for _ in 0..threshold {
        for (what, frame) in [
            (
                "forged by DG for PX",
                port_unreachable(DG, DX, DX, PX, 7160),
            ),
            (
                "about PG's datagram",
                port_unreachable(DG, DX, PG, DG, 7160),
            ),
        ] {
            assert_eq!(
                run(&mut dp, Hook::TcEgress, &frame, what),
                TC_ACT_OK,
                "{what}"
            );
        }
    }
    assert!(dp.breakers().expect("breakers").is_empty());
    let frame = port_unreachable(DG, DX, DX, DG, 7160);
    for i in 1..=threshold {
        assert_eq!(run(&mut dp, Hook::TcEgress, &frame, "from DG"), TC_ACT_OK);
        let all = dp.breakers().expect("breakers");
        let [(key, b)] = all.as_slice() else {
            panic!("one breaker expected: {all:?}");
        };
        assert_eq!(
            (key.daddr, key.dport, key.proto, key.caller),
            (
                u32::from_ne_bytes(DG.octets()),
                7160u16.to_be(),
                17,
                Quadrant::Dx as u8
            )
        );
        assert_eq!(b.failures, i);
        assert_eq!(
            b.state,
            if i < threshold { CLOSED } else { OPEN },
            "after {i}"
        );
    }
}

/// Runs `packet` through the tc program of `hook` and returns (return code, the packet after).
fn run_out(dp: &mut Dataplane, hook: Hook, packet: &[u8]) -> (u32, Vec<u8>) {
    let name = if hook == Hook::TcEgress {
        programs::TC_EGRESS
    } else {
        programs::TC_INGRESS
    };
    let prog = dp.ebpf_mut().program_mut(name).expect("program");
    let p: &mut SchedClassifier = prog.try_into().expect("classifier");
    let mut out = vec![0u8; packet.len() + 64];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("test_run");
    out.truncate(usize::try_from(r.data_size_out).expect("size"));
    (r.return_value, out)
}

/// (source, source port, destination, destination port) of a TCP or UDP frame whose IPv4 and
/// TCP/UDP checksums are checked.
fn checked(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
    let h = PacketHeaders::from_ethernet_slice(frame).expect("a frame");
    let Some(NetHeaders::Ipv4(ip, _)) = &h.net else {
        panic!("not IPv4")
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 checksum"
    );
    let payload = h.payload.slice();
    let (sport, dport) = match &h.transport {
        Some(TransportHeader::Tcp(t)) => {
            let want = t.calc_checksum_ipv4(ip, payload).expect("size");
            assert_eq!(t.checksum, want, "TCP checksum");
            (t.source_port, t.destination_port)
        }
        Some(TransportHeader::Udp(u)) => {
            let want = u.calc_checksum_ipv4(ip, payload).expect("size");
            assert_eq!(u.checksum, want, "UDP checksum");
            (u.source_port, u.destination_port)
        }
        other => panic!("not TCP or UDP: {other:?}"),
    };
    (
        Ipv4Addr::from(ip.source),
        sport,
        Ipv4Addr::from(ip.destination),
        dport,
    )
}

/// The outside path of a service VIP (`lb_flow`), with `lo` as PX's veth and PX the only
/// backend: the host's SYN to VIP:8080 leaves tc egress addressed to PX:9000 with valid
/// checksums, later packets of the connection follow it, PX's answer leaving tc ingress gets
/// VIP:8080 back (valid checksums); a UDP datagram likewise, and the world's refused by the
/// policy; a port of the VIP that is no service, and a quadrant's own packets to the VIP, are
/// left as they are, as are the answers of a later direct connection on a translated tuple; a
/// direct SYN on the tuple of the live translated connection is dropped (`drop_tuple_in_use`).
#[test]
fn outside_packets_to_a_vip_are_translated_with_valid_checksums() {
    let (mut dp, backend) = vip_dataplane();
    let service = |index, proto| vip_service(index, proto, 8080, 1);
    dp.write_lb(
        &[service(0, 6), service(1, 17)],
        &[(0, backend), (16, backend)],
        &[],
    )
    .expect("write the services");

    let (code, out) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40000, VIP, 8080));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(checked(&out), (PX_GW, 40000, PX, 9000), "SYN translated");
    let (code, out) = run_out(&mut dp, Hook::TcEgress, &tcp_ack(PX_GW, 40000, VIP, 8080));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(
        checked(&out),
        (PX_GW, 40000, PX, 9000),
        "the flow keeps its backend"
    );
    let (code, out) = run_out(&mut dp, Hook::TcIngress, &tcp_ack(PX, 9000, PX_GW, 40000));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(
        checked(&out),
        (VIP, 8080, PX_GW, 40000),
        "the answer comes from the VIP"
    );

    let (code, _) = run_out(&mut dp, Hook::TcEgress, &udp(WORLD, 5353, VIP, 8080));
    assert_eq!(
        code, TC_ACT_SHOT,
        "the embedded policy keeps the world out of PX"
    );
    let (code, out) = run_out(&mut dp, Hook::TcEgress, &udp(PX_GW, 5353, VIP, 8080));
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(
        checked(&out),
        (PX_GW, 5353, PX, 9000),
        "a datagram translated"
    );

    let (code, out) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40001, VIP, 8081));
    assert_eq!(code, TC_ACT_OK, "the host may send into PX");
    assert_eq!(
        checked(&out).2,
        VIP,
        "no service on that port: not translated"
    );
    let (_, out) = run_out(&mut dp, Hook::TcEgress, &tcp(PG, 40002, VIP, 8080));
    assert_eq!(
        checked(&out).2,
        VIP,
        "a quadrant's packet to the VIP is not translated"
    );

    // While the VIP's connection lives, a SYN straight to PX:9000 on its tuple: PX could not
    // tell the two apart, and its answers would leave as the VIP's. Dropped, counted.
    let before = dp
        .counter(Hook::TcEgress, Quadrant::Px as u32, Reason::DropTupleInUse)
        .expect("counter");
    let (code, _) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40000, PX, 9000));
    assert_eq!(code, TC_ACT_SHOT, "a direct SYN on a live translated tuple");
    assert_eq!(
        dp.counter(Hook::TcEgress, Quadrant::Px as u32, Reason::DropTupleInUse)
            .expect("counter"),
        before + 1
    );
    let (_, out) = run_out(&mut dp, Hook::TcIngress, &tcp_ack(PX, 9000, PX_GW, 40000));
    assert_eq!(
        checked(&out).0,
        VIP,
        "the live translated flow keeps its entries"
    );
    // It closes; the host reuses source port 40000 for a connection straight to PX:9000, the
    // tuple it was translated to: that one's answers keep PX as their source.
    let (_, out) = run_out(&mut dp, Hook::TcEgress, &tcp_fin(PX_GW, 40000, VIP, 8080));
    assert_eq!(checked(&out).2, PX, "the FIN translated");
    let (code, _) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40000, PX, 9000));
    assert_eq!(code, TC_ACT_OK);
    let (_, out) = run_out(&mut dp, Hook::TcIngress, &tcp_ack(PX, 9000, PX_GW, 40000));
    assert_eq!(
        checked(&out),
        (PX, 9000, PX_GW, 40000),
        "a direct connection on a translated flow's old tuple is not translated back"
    );
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 240, 2, 100);
const PX_GW: Ipv4Addr = Ipv4Addr::new(10, 240, 2, 1);

/// A dataplane with `lo` as PX's veth, and PX:9000 behind it as a backend.
fn vip_dataplane() -> (Dataplane, dataplane_common::lb::LbBackend) {
    let mut dp = dataplane(&Config::embedded(), false);
    dp.register_iface(lo_ifindex(), Quadrant::Px)
        .expect("register lo as PX");
    let backend = dataplane_common::lb::LbBackend {
        addr: u32::from_ne_bytes(PX.octets()),
        port: 9000u16.to_be(),
        weight: 1,
        ifindex: lo_ifindex(),
    };
    (dp, backend)
}

/// Service `index` at VIP:`port` with `backends` backends.
fn vip_service(
    index: u32,
    proto: u8,
    port: u16,
    backends: u16,
) -> (
    dataplane_common::lb::LbServiceKey,
    dataplane_common::lb::LbService,
) {
    (
        dataplane_common::lb::LbServiceKey {
            vip: u32::from_ne_bytes(VIP.octets()),
            port: port.to_be(),
            proto,
            pad: 0,
        },
        dataplane_common::lb::LbService {
            index,
            backends,
            maglev: 0,
            pad: 0,
        },
    )
}

/// Tuples at the backend: the translated SYN redirected to its backend's veth passes tc egress
/// there once more as itself, not a clash, while a direct SYN on that live tuple is dropped; a
/// new connection to a VIP passes over a backend whose tuple a direct connection holds for the
/// next one.
#[test]
fn a_translated_tuple_is_told_apart_from_a_direct_connection_on_it() {
    use dataplane_common::lb::LbBackend;
    let (mut dp, backend) = vip_dataplane();
    // Port 8082: its backend behind another veth. The SYN is redirected there and passes tc
    // egress once more, as the translated SYN — not a clash; a direct one after it is.
    let elsewhere = LbBackend {
        ifindex: 4242,
        ..backend
    };
    dp.write_lb(&[vip_service(2, 6, 8082, 1)], &[(32, elsewhere)], &[])
        .expect("write the service");
    let (code, out) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40010, VIP, 8082));
    assert_eq!(
        code, 7,
        "redirected (TC_ACT_REDIRECT) to the backend's veth"
    );
    assert_eq!(checked(&out), (PX_GW, 40010, PX, 9000));
    let (code, _) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40010, PX, 9000));
    assert_eq!(
        code, TC_ACT_OK,
        "the translated SYN's own pass on the backend's veth"
    );
    let (code, _) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40010, PX, 9000));
    assert_eq!(code, TC_ACT_SHOT, "then a direct SYN on the live tuple");

    // Port 8083 with two backends, PX:9000 and PX:9001; a direct connection from port 40020 to
    // PX:9000 is live: a connection from 40020 to the VIP takes PX:9001, whichever the least
    // loaded pick started from.
    let (code, _) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40020, PX, 9000));
    assert_eq!(code, TC_ACT_OK, "the direct connection");
    let two = vip_service(3, 6, 8083, 2);
    let second = LbBackend {
        port: 9001u16.to_be(),
        ..backend
    };
    dp.write_lb(&[two], &[(48, backend), (49, second)], &[])
        .expect("write the service");
    for sport in [40020, 40020, 40021] {
        let (code, out) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, sport, VIP, 8083));
        assert_eq!(code, TC_ACT_OK);
        let to = checked(&out);
        if sport == 40020 {
            assert_eq!(to, (PX_GW, 40020, PX, 9001), "passed over the taken tuple");
        } else {
            assert!(to.3 == 9000 || to.3 == 9001, "{to:?}");
        }
    }
}

/// A peer node's instance (a backend without a veth) is for the quadrants' sockets alone: tc,
/// which can only hand a packet to a local veth, translates the host's connections to this
/// node's instance whichever slot the pick starts from, and refuses them when only peers'
/// instances are ready.
#[test]
fn outside_connections_to_a_vip_go_to_this_nodes_instances_only() {
    use dataplane_common::lb::LbBackend;
    let (mut dp, backend) = vip_dataplane();
    let remote = LbBackend {
        addr: u32::from_ne_bytes(Ipv4Addr::new(10, 250, 2, 2).octets()),
        port: 9000u16.to_be(),
        weight: 1000,
        ifindex: 0,
    };
    // Slot 64 this node's PX (weight 1), 65 and 66 a peer's: least loaded alone would pick one
    // of the peer's far more often than not.
    dp.write_lb(
        &[vip_service(4, 6, 8084, 3)],
        &[(64, backend), (65, remote), (66, remote)],
        &[],
    )
    .expect("write the service");
    for sport in 40100..40120 {
        let (code, out) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, sport, VIP, 8084));
        assert_eq!(code, TC_ACT_OK, "port {sport}");
        assert_eq!(checked(&out), (PX_GW, sport, PX, 9000), "port {sport}");
    }
    dp.write_lb(&[vip_service(5, 6, 8085, 1)], &[(80, remote)], &[])
        .expect("write the service");
    let (code, _) = run_out(&mut dp, Hook::TcEgress, &tcp(PX_GW, 40200, VIP, 8085));
    assert_eq!(code, TC_ACT_SHOT, "no instance of this node: refused");
}

/// A fault on packets from DG into DX for a minute.
fn dg_to_dx_fault(action: Action, delay_ms: u32) -> FaultSpec {
    FaultSpec {
        action,
        from: "dg".into(),
        to: "dx".into(),
        percent: 100.0,
        delay_ms,
        jitter_ms: 0,
        both_ways: false,
        seconds: 60,
        headroom_mib: quadrant::chaos::DEFAULT_HEADROOM_MIB,
        headroom_pids: quadrant::chaos::DEFAULT_HEADROOM_PIDS,
        restart_agent: true,
        workload: None,
    }
}

/// Writes `spec`'s entries into the loaded dataplane's chaos maps, armed as the controller arms
/// them (the armed horizon at `armed_until`, monotonic ns).
fn arm(dp: &mut Dataplane, entries: &[(FaultKey, Fault)], armed_until: u64) {
    let mut faults: aya::maps::HashMap<_, FaultKey, Fault> =
        aya::maps::HashMap::try_from(dp.ebpf_mut().map_mut(CHAOS_FAULTS).expect("map"))
            .expect("hash");
    for (k, f) in entries {
        faults.insert(k, f, 0).expect("insert");
    }
    let mut armed: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(dp.ebpf_mut().map_mut(CHAOS_ARMED).expect("map"))
            .expect("array");
    armed.set(0, armed_until, 0).expect("set");
}

fn fault_counts(dp: &mut Dataplane, key: FaultKey) -> (u64, u64) {
    let faults: aya::maps::HashMap<_, FaultKey, Fault> =
        aya::maps::HashMap::try_from(dp.ebpf_mut().map_mut(CHAOS_FAULTS).expect("map"))
            .expect("hash");
    let f = faults.get(&key, 0).expect("fault");
    (f.matched, f.dropped)
}

#[test]
fn chaos_faults_drop_only_what_they_name_and_only_while_armed_and_live() {
    use Reason::*;
    let mut dp = dataplane(&Config::embedded(), true);
    let slot = Quadrant::Dx as u32;
    // A new source port each time: a tracked flow would pass as established.
    let dg_to_dx = |port: u16| udp(DG, port, DX, 53);
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("nothing armed", dg_to_dx(41001), AllowPolicy),
    );

    let now = quadrant::breakers::monotonic_ns();
    let spec = dg_to_dx_fault(Action::Drop, 0);
    let entries = spec.entries(false, now).expect("fault");
    let key = entries[0].0;
    // Written but not armed: the programs never look.
    arm(&mut dp, &entries, 0);
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("fault not armed", dg_to_dx(41002), AllowPolicy),
    );
    assert_eq!(fault_counts(&mut dp, key), (0, 0));

    arm(&mut dp, &entries, now + 60_000_000_000);
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("DG -> DX dropped", dg_to_dx(41003), DropChaos),
    );
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "host -> DX not named",
            tcp(DX_GW, 42000, DX, 22),
            AllowPolicy,
        ),
    );
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "denied before any fault",
            tcp(PX, 42001, DX, 80),
            DenyPolicy,
        ),
    );
    assert_eq!(
        fault_counts(&mut dp, key),
        (1, 1),
        "matched and dropped once"
    );

    // Armed until a moment ago: the first packet disarms, so later ones skip the clock too.
    arm(&mut dp, &entries, now);
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case(
            "armed until a moment ago",
            udp(DG, 41200, DX, 53),
            AllowPolicy,
        ),
    );
    let armed: aya::maps::Array<_, u64> =
        aya::maps::Array::try_from(dp.ebpf_mut().map_mut(CHAOS_ARMED).expect("map"))
            .expect("array");
    assert_eq!(
        armed.get(&0, 0).expect("armed"),
        0,
        "disarmed by the program"
    );

    // Armed, but the fault itself has ended.
    let ended = spec.entries(false, now).expect("fault");
    let ended: Vec<_> = ended
        .into_iter()
        .map(|(k, mut f)| {
            f.expires_ns = now;
            (k, f)
        })
        .collect();
    arm(&mut dp, &ended, now + 60_000_000_000);
    check(
        &mut dp,
        Hook::TcEgress,
        slot,
        &case("fault expired", dg_to_dx(41004), AllowPolicy),
    );
}

/// `chaos.enabled: false`: the programs are loaded with `CHAOS_ENABLED` 0, the verifier walks
/// none of the fault checks, and an armed fault that would drop the packet never sees it.
#[test]
fn a_dataplane_loaded_with_chaos_off_takes_no_fault() {
    use Reason::*;
    let config = Config::embedded();
    let policy = PolicyBundle::embedded().compile(&config).expect("policy");
    let mut dp = Dataplane::load_with(None, false).expect("load dataplane (needs root)");
    dp.write_config(&config, 2).expect("write config");
    dp.apply_policy(&KernelPolicy::quadrant_wide(policy))
        .expect("policy");
    dp.register_iface(lo_ifindex(), Quadrant::Dx)
        .expect("register lo as DX");
    let now = quadrant::breakers::monotonic_ns();
    let entries = dg_to_dx_fault(Action::Drop, 0)
        .entries(false, now)
        .expect("fault");
    arm(&mut dp, &entries, now + 60_000_000_000);
    check(
        &mut dp,
        Hook::TcEgress,
        Quadrant::Dx as u32,
        &case("a drop fault armed", udp(DG, 41001, DX, 53), AllowPolicy),
    );
    assert_eq!(
        fault_counts(&mut dp, entries[0].0),
        (0, 0),
        "never looked up"
    );

    // The same object with chaos on: the checks are there for the verifier to walk.
    let on = Dataplane::load(None).expect("load dataplane");
    let count = |dp: &Dataplane, name: &str| {
        dp.verified_instructions()
            .expect("infos")
            .into_iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, c)| c)
            .expect("verified instruction count")
    };
    for name in [programs::TC_EGRESS, programs::CONNECT4, programs::SENDMSG4] {
        let (off, on) = (count(&dp, name), count(&on, name));
        assert!(
            off < on,
            "{name}: {off} instructions verified with chaos off, {on} with it on"
        );
    }
}

#[test]
fn a_chaos_delay_sets_the_departure_time() {
    let mut dp = dataplane(&Config::embedded(), true);
    let now = quadrant::breakers::monotonic_ns();
    // A delay sets the packet's departure time (`__sk_buff.tstamp`, monotonic ns), which an fq
    // qdisc honours.
    let delay = dg_to_dx_fault(Action::Delay, 40);
    arm(
        &mut dp,
        &delay.entries(false, now).expect("fault"),
        now + 60_000_000_000,
    );
    let before = quadrant::breakers::monotonic_ns();
    let (code, tstamp) = run_with_tstamp(&mut dp, &udp(DG, 41100, DX, 53));
    let after = quadrant::breakers::monotonic_ns();
    assert_eq!(code, TC_ACT_OK, "a delayed packet passes");
    assert!(
        (before + 40_000_000..=after + 40_000_000).contains(&tstamp),
        "departure 40 ms after the decision: {tstamp} vs {before}..{after}"
    );
}

/// The TCP flags (RST, SYN, ACK) of a frame whose checksums `checked` verified.
fn tcp_flags(frame: &[u8]) -> (bool, bool, bool) {
    use etherparse::{PacketHeaders, TransportHeader};
    let _ = checked(frame);
    match PacketHeaders::from_ethernet_slice(frame)
        .expect("a frame")
        .transport
    {
        Some(TransportHeader::Tcp(t)) => (t.rst, t.syn, t.ack),
        other => panic!("not TCP: {other:?}"),
    }
}

/// A reset fault sets RST on the first segment of an established connection it matches, with a
/// valid checksum, and on no other: not on a SYN, not twice on one connection, not on UDP; the
/// packet still passes as the policy decided, and the fault counts one reset.
#[test]
fn a_chaos_reset_sets_rst_once_per_connection_with_a_valid_checksum() {
    let mut dp = dataplane(&Config::embedded(), true);
    let now = quadrant::breakers::monotonic_ns();
    let entries = dg_to_dx_fault(Action::Reset, 0)
        .entries(false, now)
        .expect("fault");
    let key = entries[0].0;
    arm(&mut dp, &entries, now + 60_000_000_000);

    let syn = tcp(DG, 41300, DX, 53);
    let (code, out) = run_out(&mut dp, Hook::TcEgress, &syn);
    assert_eq!(
        (code, out.as_slice()),
        (TC_ACT_OK, syn.as_slice()),
        "a SYN passes as it is"
    );

    let seg = tcp_ack(DG, 41300, DX, 53);
    let (code, out) = run_out(&mut dp, Hook::TcEgress, &seg);
    assert_eq!(code, TC_ACT_OK);
    assert_eq!(tcp_flags(&seg), (false, false, true));
    assert_eq!(
        tcp_flags(&out),
        (true, false, true),
        "reset, checksum valid"
    );
    assert_eq!(out.len(), seg.len(), "only the flag changed");

    let (code, out) = run_out(&mut dp, Hook::TcEgress, &seg);
    assert_eq!(
        (code, out.as_slice()),
        (TC_ACT_OK, seg.as_slice()),
        "once per connection"
    );
    let other = tcp_ack(DG, 41301, DX, 53);
    assert!(
        tcp_flags(&run_out(&mut dp, Hook::TcEgress, &other).1).0,
        "another connection"
    );

    let dgram = udp(DG, 41302, DX, 53);
    let (code, out) = run_out(&mut dp, Hook::TcEgress, &dgram);
    assert_eq!(
        (code, out.as_slice()),
        (TC_ACT_OK, dgram.as_slice()),
        "UDP untouched"
    );
    assert_eq!(
        fault_counts(&mut dp, key),
        (5, 2),
        "five matched, two reset"
    );
}

/// Offset of `tstamp` in `struct __sk_buff` (after 36 `u32` fields and the 8-byte `flow_keys`).
const SKB_TSTAMP: usize = 152;

/// Runs `packet` through tc egress; its return value and the skb's `tstamp` after the program.
fn run_with_tstamp(dp: &mut Dataplane, packet: &[u8]) -> (u32, u64) {
    let prog = dp
        .ebpf_mut()
        .program_mut(programs::TC_EGRESS)
        .expect("program");
    let p: &mut SchedClassifier = prog.try_into().expect("classifier");
    let mut ctx = [0u8; 192];
    let result = p
        .test_run(TestRunOptions {
            data_in: Some(packet),
            ctx_out: Some(&mut ctx),
            ..TestRunOptions::default()
        })
        .expect("test_run");
    let tstamp = u64::from_ne_bytes(ctx[SKB_TSTAMP..SKB_TSTAMP + 8].try_into().expect("8 bytes"));
    (result.return_value, tstamp)
}

/// Every record waiting in the flow-event ring buffer.
fn flow_records(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<TraceRecord> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<TraceRecord>(), "record size");
        // SAFETY: the item holds exactly one TraceRecord, written by the programs; any bit
        // pattern of its integer fields is valid.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<TraceRecord>()) });
    }
    out
}

/// A denied packet is one flow event with its reason; a flow tc starts tracking is a
/// `flow_open`, its FIN a `flow_close`, an established packet none; beyond a CPU's budget the
/// events are counted as lost; with flow events off (rate 0) a drop writes nothing.
#[test]
fn a_drop_is_one_flow_event_and_the_budget_holds() {
    let mut dp = dataplane(&Config::embedded(), true);
    let mut ring = dp.take_trace().expect("the flow event ring");
    assert_eq!(
        run(&mut dp, Hook::TcIngress, &tcp(DX, 40000, PX, 80), "denied"),
        TC_ACT_SHOT
    );
    let got = flow_records(&mut ring);
    assert_eq!(got.len(), 1, "{got:?}");
    let r = got[0];
    assert_eq!(
        (r.hook, r.slot, r.reason, r.event, r.kind),
        (
            Hook::TcIngress as u8,
            Quadrant::Dx as u8,
            Reason::DenyPolicy as u8,
            EVENT_VERDICT,
            TRACE_PACKET
        )
    );
    assert_eq!(
        (
            Ipv4Addr::from(u32::from_be(r.saddr)),
            u16::from_be(r.sport),
            Ipv4Addr::from(u32::from_be(r.daddr)),
            u16::from_be(r.dport)
        ),
        (DX, 40000, PX, 80)
    );
    assert_eq!(r.l4_flags & 0x02, 0x02, "the SYN flag is carried");

    run(&mut dp, Hook::TcIngress, &tcp(DX, 40001, DG, 80), "opens");
    run(
        &mut dp,
        Hook::TcIngress,
        &tcp_ack(DX, 40001, DG, 80),
        "established",
    );
    run(
        &mut dp,
        Hook::TcIngress,
        &tcp_fin(DX, 40001, DG, 80),
        "closes",
    );
    let events: Vec<(u8, u8)> = flow_records(&mut ring)
        .iter()
        .map(|r| (r.event, r.reason))
        .collect();
    assert_eq!(
        events,
        [
            (EVENT_FLOW_OPEN, Reason::AllowPolicy as u8),
            (EVENT_FLOW_CLOSE, Reason::AllowEstablished as u8)
        ]
    );

    // One event a second, three at once: of ten drops, three are written (a fourth if the
    // machine stalled a second between two of them), the rest counted as lost.
    dp.set_events_limit(1, 3).expect("limit");
    for port in 0..10 {
        run(&mut dp, Hook::Xdp, &udp(DX, 41000 + port, PX, 53), "flood");
    }
    let written = flow_records(&mut ring).len() as u64;
    assert!((3..=4).contains(&written), "{written} written");
    let counts = dp.events_counts().expect("counts");
    assert_eq!(
        (counts.lost_rate_limit, counts.lost_ring_full),
        (10 - written, 0)
    );

    // Off: a drop is counted, not reported.
    dp.set_events_limit(0, 0).expect("off");
    run(&mut dp, Hook::Xdp, &udp(DX, 42000, PX, 53), "off");
    assert!(flow_records(&mut ring).is_empty());
}
