//! Quadrant instances and service VIPs, in real namespaces: PX runs several instances (each its
//! own namespace, veth, cgroup and address, all with PX's identity); a `connect()` to a
//! service's VIP from an allowed caller is translated at the socket to a ready instance, least
//! active connections first, and the application sees the VIP as its peer; instances that are
//! not ready, draining or scaled away receive nothing new; the policy still decides. Needs root.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use quadrant::config::ServiceConfig;
use quadrant_tests::harness::{Instance, spread, test_config};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const PORT: u16 = 8080;

fn instances(inst: &Instance) -> Vec<Value> {
    let out = inst.quadrant(&["instances", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("instances json");
    v["instances"].as_array().expect("instances").clone()
}

/// PX's instances as (address → (ready for `api`, open connections)).
fn px(inst: &Instance) -> BTreeMap<String, (bool, u64)> {
    instances(inst)
        .into_iter()
        .filter(|i| i["quadrant"] == "px")
        .map(|i| {
            (
                i["address"].as_str().unwrap_or_default().to_owned(),
                (
                    i["services"]["api"].as_bool().unwrap_or(false),
                    i["connections"].as_u64().unwrap_or(u64::MAX),
                ),
            )
        })
        .collect()
}

/// Waits up to 3 s for `check` on PX's instances.
fn wait_px(inst: &Instance, what: &str, check: impl Fn(&BTreeMap<String, (bool, u64)>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = px(inst);
        if check(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The weight the kernel gives instance `k` of PX as a backend of the first service.
fn kernel_weight(inst: &Instance, k: u32) -> u16 {
    use dataplane_common::lb::{LB_BACKENDS, LbBackend};
    let data = aya::maps::MapData::from_pin(inst.config.bpffs_dir().join("maps").join(LB_BACKENDS))
        .expect("pinned LB_BACKENDS");
    let slots: aya::maps::Array<_, LbBackend> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array");
    slots.get(&k, 0).expect("slot").weight
}

/// An agent whose PX runs `n` instances behind service `api` (`protocol`, port 8080,
/// `affinity`) at the prefix's address .100; returns it, the VIP:port and the instances'
/// addresses.
fn px_behind_a_vip(n: u8, protocol: &str, affinity: &str) -> (Instance, String, Vec<String>) {
    let (config, target, addrs) = config_behind_a_vip(n, protocol, affinity);
    (Instance::up(config, QPROBE), target, addrs)
}

/// The configuration of [`px_behind_a_vip`], not started.
fn config_behind_a_vip(
    n: u8,
    protocol: &str,
    affinity: &str,
) -> (quadrant::config::Config, String, Vec<String>) {
    let mut config = test_config(None);
    let px_prefix = config.addrs(Quadrant::Px).prefix;
    let vip = std::net::Ipv4Addr::from(u32::from(px_prefix.network()) + 100);
    config.quadrants.get_mut("px").expect("px").instances = n;
    config.services = vec![ServiceConfig {
        name: "api".into(),
        quadrant: "px".into(),
        port: PORT,
        vip,
        protocol: protocol.into(),
        affinity: affinity.into(),
        internal_traffic_policy: "cluster".into(),
        kubernetes_service: None,
    }];
    let addrs = (0..quadrant::config::MAX_INSTANCES)
        .map(|k| {
            config
                .instance_addr(quadrant::config::InstanceRef::new(Quadrant::Px, k))
                .to_string()
        })
        .collect();
    (config, format!("{vip}:{PORT}"), addrs)
}

/// Starts `qprobe tcp-whoami` on port 8080 of PX's first `n` instances and waits until every
/// instance is ready for `api`.
fn whoami_on_every_instance(inst: &mut Instance, n: u8) {
    let listen = format!("0.0.0.0:{PORT}");
    for k in 0..n {
        inst.serve_on_instance(Quadrant::Px, k, &["tcp-whoami", &listen]);
    }
    wait_px(inst, "every instance ready", |m| {
        m.values().all(|(r, _)| *r)
    });
}

fn ok_spread(inst: &Instance, from: Quadrant, args: &[&str]) -> (String, BTreeMap<String, u32>) {
    let (ok, line) = inst.probe(from, args);
    assert!(ok, "{args:?}: {line}");
    spread(&line)
}

#[test]
fn connects_to_a_vip_spread_over_ready_instances_by_least_connections() {
    let (mut inst, target, a) = px_behind_a_vip(3, "tcp", "none");
    assert_eq!(px(&inst).len(), 3, "three PX instances");
    wait_px(&inst, "nothing listens yet", |m| {
        m.values().all(|(r, _)| !r)
    });
    let (ok, line) = inst.probe(Quadrant::Pg, &["tcp-connect", &target]);
    assert!(
        !ok && line == "err ECONNREFUSED",
        "no ready instance: refused at once, as a service without endpoints: {line}"
    );

    let listen = format!("0.0.0.0:{PORT}");
    let servers: Vec<u32> = (0..3)
        .map(|k| inst.serve_on_instance(Quadrant::Px, k, &["tcp-whoami", &listen]))
        .collect();
    wait_px(&inst, "every instance ready", |m| {
        m.values().all(|(r, _)| *r)
    });

    // Nine held connections from PG: three per instance, each answered by the instance it
    // went to, and every one sees the VIP as its peer.
    let (peer, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "9"]);
    assert_eq!(peer, target, "getpeername gives the VIP back");
    let even: BTreeMap<String, u32> =
        [(a[0].clone(), 3), (a[1].clone(), 3), (a[2].clone(), 3)].into();
    assert_eq!(counts, even, "least connections");
    wait_px(&inst, "every connection released at close", |m| {
        m.values().all(|(_, c)| *c == 0)
    });

    // The policy still decides: development may not reach production, VIP or not.
    let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &target]);
    assert!(!ok && line == "err EPERM", "{line}");

    // An instance whose server died gets nothing new: the kernel takes it out of the service
    // as the listener is released (before the agent's next probe, up to 100 ms later, could),
    // and the agent's probe keeps it out.
    assert_eq!(
        kernel_weight(&inst, 2),
        1000,
        "instance 2 ready in the kernel"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(servers[2]).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    let exited = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/stat", servers[2]))
        .is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            exited.elapsed() < Duration::from_secs(3),
            "server never exited"
        );
        thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(
        kernel_weight(&inst, 2),
        0,
        "out of the service the moment its listener went"
    );
    wait_px(&inst, "instance 2 not ready", |m| {
        m.get(&a[2]).is_some_and(|(r, _)| !r)
    });
    let (_, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "8"]);
    assert_eq!(
        counts,
        [(a[0].clone(), 4), (a[1].clone(), 4)].into(),
        "only the ready ones"
    );

    // A draining instance gets nothing new either, until it is resumed.
    let out = inst.quadrant(&["drain", "px", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "4"]);
    assert_eq!(counts, [(a[0].clone(), 4)].into());
    let out = inst.quadrant(&["drain", "px", "1", "--resume"]);
    assert!(out.status.success());
    let (_, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "2"]);
    assert_eq!(counts, [(a[0].clone(), 1), (a[1].clone(), 1)].into());
    let out = inst.quadrant(&["drain", "px", "0"]);
    assert!(!out.status.success(), "instance 0 is the quadrant itself");
}

#[test]
fn scaling_adds_and_removes_instances_and_new_ones_wait_for_their_probe() {
    let (mut inst, target, a) = px_behind_a_vip(2, "tcp", "none");
    let listen = format!("0.0.0.0:{PORT}");
    for k in 0..2 {
        inst.serve_on_instance(Quadrant::Px, k, &["tcp-whoami", &listen]);
    }
    wait_px(&inst, "both ready", |m| {
        m.len() == 2 && m.values().all(|(r, _)| *r)
    });
    let name = inst.config.instance.clone();
    let netns = |k: u8| std::path::PathBuf::from(format!("/run/netns/{name}-px-{k}"));

    let out = inst.quadrant(&["scale", "px", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(px(&inst).len(), 1);
    assert!(!netns(1).exists(), "instance 1 removed");
    let (_, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "2"]);
    assert_eq!(counts, [(a[0].clone(), 2)].into());

    let out = inst.quadrant(&["scale", "px", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(px(&inst).len(), 4);
    let (_, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "3"]);
    assert_eq!(
        counts,
        [(a[0].clone(), 3)].into(),
        "nothing listens on the new ones yet"
    );
    inst.serve_on_instance(Quadrant::Px, 3, &["tcp-whoami", &listen]);
    wait_px(&inst, "instance 3 ready", |m| {
        m.get(&a[3]).is_some_and(|(r, _)| *r)
    });
    let (_, counts) = ok_spread(&inst, Quadrant::Pg, &["tcp-spread", &target, "4"]);
    assert_eq!(counts, [(a[0].clone(), 2), (a[3].clone(), 2)].into());

    // A process of an added instance has PX's identity: the Workload API attests it as PX.
    let out = inst.bounded(
        std::process::Command::new(&inst.bin)
            .arg("--config")
            .arg(&inst.config_path)
            .args(["exec", "px", "--instance", "3", "--workload", "api", "--"])
            .args([QPROBE, "svid"]),
    );
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && line.contains("/quadrant/px/workload/api "),
        "{line} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = inst.quadrant(&["instances"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("px-3"));
    let out = inst.quadrant(&["exec", "px", "--instance", "9", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no instance 9"),
        "{err}"
    );

    // Bad counts are refused with the limit, and nothing changes.
    for bad in ["0", "17"] {
        let out = inst.quadrant(&["scale", "px", bad]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("1..=16"), "{err}");
    }
    assert_eq!(px(&inst).len(), 4);

    let out = inst.down();
    assert!(out.status.success());
    for k in 1..4 {
        assert!(!netns(k).exists(), "instance {k} removed at down");
    }
}

/// Runs `qprobe ARGS…` on the host itself (in no quadrant: its sockets are not translated, its
/// packets to the VIP are, in tc); returns its line.
fn probe_from_host(args: &[&str]) -> String {
    let out = std::process::Command::new(QPROBE)
        .args(args)
        .output()
        .expect("run qprobe");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "{args:?}: {line}");
    line
}

/// Connections from outside the quadrants are balanced per packet in tc: the host's nine held
/// connections to the VIP spread 3/3/3 by least connections (each whole connection — handshake,
/// data, close — on one instance, or it would not work), its sockets see the VIP as the peer,
/// and each connection's count is released when it closes.
#[test]
fn connections_from_the_host_to_a_vip_are_balanced_in_tc() {
    let (mut inst, target, a) = px_behind_a_vip(3, "tcp", "none");
    whoami_on_every_instance(&mut inst, 3);
    for round in 0..2 {
        let (peer, counts) = spread(&probe_from_host(&["tcp-spread", &target, "9"]));
        assert_eq!(peer, target, "the host's sockets see the VIP");
        let expected: BTreeMap<String, u32> = a[..3].iter().map(|x| (x.clone(), 3)).collect();
        assert_eq!(counts, expected, "round {round}: least connections, 3 each");
        wait_px(&inst, "counts released at the connections' close", |m| {
            m.values().all(|(_, c)| *c == 0)
        });
    }
    let translated = inst.counter("tc_egress", Quadrant::Px, "allow_policy");
    assert!(translated > 0, "the translated SYNs passed the policy");
}

/// A network namespace standing for the world outside the node: linked to the host by a veth
/// (`<prefix>-w`, host side 10.242.S.1/30, world side 10.242.S.2/30 with its default route
/// through the host). Removed when dropped.
struct World {
    netns: String,
    host_iface: String,
}

impl World {
    fn new(config: &quadrant::config::Config) -> Self {
        let slot: u8 = config
            .instance
            .trim_start_matches("qt")
            .parse()
            .expect("a test slot");
        let world = Self {
            netns: format!("{}-world", config.instance),
            host_iface: format!("{}-w", config.interface_prefix),
        };
        world.remove();
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        let host = format!("10.242.{slot}.1");
        ip(&["netns", "add", &world.netns]);
        ip(&[
            "link",
            "add",
            &world.host_iface,
            "type",
            "veth",
            "peer",
            "name",
            "w0",
            "netns",
            &world.netns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host}/30"),
            "dev",
            &world.host_iface,
        ]);
        ip(&["link", "set", &world.host_iface, "up"]);
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{}/forwarding", world.host_iface),
            "1",
        )
        .expect("forwarding");
        let n = world.netns.as_str();
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("10.242.{slot}.2/30"),
            "dev",
            "w0",
        ]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "set", "w0", "up"]);
        ip(&["-n", n, "route", "add", "default", "via", &host]);
        world
    }

    /// Runs `qprobe ARGS…` in the world; (success, its line).
    fn probe(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, QPROBE])
            .args(args)
            .output()
            .expect("ip netns exec");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success(), line)
    }

    fn remove(&self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_iface])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Connections from the world, forwarded by the host to a VIP: refused by the default policy
/// ("no ingress from outside the node"); once the policy lets the world reach PX, balanced in
/// tc like the host's, each connection kept on its instance, the VIP as the peer.
#[test]
fn connections_from_the_world_to_a_vip_obey_the_policy_and_are_balanced() {
    let (mut config, target, a) = config_behind_a_vip(2, "tcp", "none");
    let policies = quadrant_tests::harness::copy_of_policies(&config.instance);
    config.policy_dir = Some(policies.clone());
    let world = World::new(&config);
    let mut inst = Instance::up(config, QPROBE);
    whoami_on_every_instance(&mut inst, 2);
    let denied = inst.counter("tc_egress", Quadrant::Px, "deny_policy");
    let (ok, line) = world.probe(&["tcp-spread", &target, "1"]);
    assert!(!ok, "the default policy keeps the world out: {line}");
    assert!(inst.counter("tc_egress", Quadrant::Px, "deny_policy") > denied);
    wait_px(&inst, "a refused SYN counts nothing", |m| {
        m.values().all(|(_, c)| *c == 0)
    });

    let global = policies.join("runtime/global.rego");
    let rego = std::fs::read_to_string(&global).expect("global.rego");
    let opened = rego.replace(
        "deny contains {\"from\": \"world\", \"to\": q, \"reason\": \"no ingress from outside the node\"} if {\n\tsome q in development | production\n}",
        "",
    );
    assert_ne!(opened, rego, "the world deny is in global.rego");
    std::fs::write(&global, opened).expect("write global.rego");
    let px_rego = policies.join("runtime/quadrants/px.rego");
    let mut px_rules = std::fs::read_to_string(&px_rego).expect("px.rego");
    px_rules.push_str(
        "\nallow contains {\"from\": \"world\", \"to\": \"px\", \"protocols\": [\"tcp\"]}\n",
    );
    std::fs::write(&px_rego, px_rules).expect("write px.rego");
    let reload = inst.quadrant(&["policy", "reload"]);
    assert!(reload.status.success(), "{reload:?}");

    let (ok, line) = world.probe(&["tcp-spread", &target, "4"]);
    assert!(ok, "{line}");
    let (peer, counts) = spread(&line);
    assert_eq!(peer, target, "the world's sockets see the VIP");
    let expected: BTreeMap<String, u32> = a[..2].iter().map(|x| (x.clone(), 2)).collect();
    assert_eq!(counts, expected, "least connections, 2 each");
    wait_px(&inst, "counts released at close", |m| {
        m.values().all(|(_, c)| *c == 0)
    });
}

/// An outside connection that goes quiet past the flow table's timeout without a FIN or RST
/// (its peer vanished, say) no longer counts against its instance once the agent collects it
/// (about a second later).
#[test]
fn an_outside_connection_the_flow_table_forgot_stops_counting() {
    let (mut config, target, _) = config_behind_a_vip(2, "tcp", "none");
    config.conntrack_timeout_secs = 2;
    let mut inst = Instance::up(config, QPROBE);
    whoami_on_every_instance(&mut inst, 2);
    let held = std::net::TcpStream::connect(&target).expect("connect to the VIP from the host");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&held), &mut line).expect("name");
    assert_eq!(held.peer_addr().expect("peer").to_string(), target);
    wait_px(&inst, "the held connection counts", |m| {
        m.values().map(|(_, c)| c).sum::<u64>() == 1
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(6);
    loop {
        if px(&inst).values().map(|(_, c)| c).sum::<u64>() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still counted: {:?}", px(&inst));
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "released only after the 2 s flow timeout: {:?}",
        start.elapsed()
    );
    drop(held);
}

#[test]
fn datagrams_to_a_vip_stay_with_one_instance_per_socket_and_answer_from_the_vip() {
    let (mut inst, target, a) = px_behind_a_vip(3, "udp", "none");
    let listen = format!("0.0.0.0:{PORT}");
    for k in 0..3 {
        let name = a[usize::from(k)].clone();
        inst.serve_on_instance(Quadrant::Px, k, &["udp-whoami", &listen, &name]);
    }
    wait_px(&inst, "udp instances ready", |m| {
        m.values().all(|(r, _)| *r)
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (from, counts) = ok_spread(&inst, Quadrant::Pg, &["udp-spread", &target, "3"]);
        assert_eq!(from, target, "recvmsg gives the VIP back as the source");
        assert_eq!(
            counts.len(),
            1,
            "one socket stays with one instance: {counts:?}"
        );
        let (who, n) = counts.into_iter().next().expect("one");
        assert_eq!(n, 3);
        assert!(a[..3].contains(&who), "{who}");
        seen.insert(who);
    }
    assert!(
        seen.len() >= 2,
        "new sockets spread over the instances: {seen:?}"
    );
}

/// The instance each open lane to PX's `echo` is served by, from `quadrant lanes`.
fn lane_instances(inst: &Instance) -> Vec<u64> {
    let out = inst.quadrant(&["lanes", "--output", "json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("lanes json");
    let mut found: Vec<u64> = v["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .filter(|l| l["service"] == "echo")
        .map(|l| l["instance"].as_u64().expect("instance"))
        .collect();
    found.sort_unstable();
    found
}

/// Starts `lane-echo hold px echo --max N` in PG and waits for it to hold its lanes.
fn hold(inst: &mut Instance, echo: &str, n: usize) -> std::sync::mpsc::Receiver<String> {
    let max = n.to_string();
    let (_, lines) = inst.background_in(
        Quadrant::Pg,
        Some("caller"),
        &[echo, "hold", "px", "echo", "--max", &max],
        "holding",
    );
    let last = lines.try_iter().last().unwrap_or_default();
    assert_eq!(last, format!("holding {n}"), "every lane opened");
    lines
}

#[test]
fn lanes_to_a_service_offered_by_several_instances_are_spread_and_follow_drains() {
    let mut config = test_config(None);
    config.quadrants.get_mut("px").expect("px").instances = 2;
    let mut inst = Instance::up(config, QPROBE);
    let echo = quadrant_tests::harness::sibling_binary(QPROBE, "lane-echo");
    let echo = echo.to_str().expect("utf8").to_owned();
    let mut servers = Vec::new();
    // The receivers stay alive: a server whose stdout closes dies at its next line.
    let mut outputs = Vec::new();
    for k in 0..2 {
        let (pid, lines) = inst.background_on(
            Quadrant::Px,
            k,
            Some("echo"),
            &[&echo, "serve", "echo", "--tcp-port", "7000"],
            "listening as",
        );
        servers.push(pid);
        outputs.push(lines);
    }
    // Four lanes held from PG: two on each instance (fewest open lanes first).
    let _held = hold(&mut inst, &echo, 4);
    assert_eq!(lane_instances(&inst), [0, 0, 1, 1]);

    // A TCP lane connects to the address of the instance it was given.
    for _ in 0..2 {
        let out = inst.run_in(
            Quadrant::Pg,
            Some("caller"),
            &[
                &echo,
                "call",
                "px",
                "echo",
                "--transport",
                "tcp",
                "--count",
                "3",
            ],
        );
        assert!(
            out.status.success(),
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Instance 1 draining: new lanes go to instance 0 only.
    let out = inst.quadrant(&["drain", "px", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _held_too = hold(&mut inst, &echo, 2);
    assert_eq!(lane_instances(&inst), [0, 0, 0, 0, 1, 1]);

    // The instance that offered first goes away: its replica takes the service over.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(servers[0]).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    let out = inst.quadrant(&["drain", "px", "1", "--resume"]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = inst.run_in(
            Quadrant::Pg,
            Some("caller"),
            &[&echo, "call", "px", "echo", "--count", "3"],
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lane after the first instance went: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lane_instances(&inst).iter().all(|&i| i == 1),
        "only instance 1 serves now"
    );
}

/// Holds `n` lanes from PG to PX's `echo` opened with affinity key `key`; returns the
/// instances they went to (from `quadrant lanes`, the lanes held before subtracted) and the
/// receiver that keeps the holder alive.
fn hold_keyed(
    inst: &mut Instance,
    echo: &str,
    key: &str,
    n: usize,
) -> (Vec<u64>, std::sync::mpsc::Receiver<String>) {
    let before = lane_instances(inst);
    let max = n.to_string();
    let (_, lines) = inst.background_in(
        Quadrant::Pg,
        Some("caller"),
        &[echo, "hold", "px", "echo", "--max", &max, "--key", key],
        "holding",
    );
    let mut now = lane_instances(inst);
    for b in before {
        let i = now.iter().position(|&x| x == b).expect("held lanes stay");
        now.remove(i);
    }
    (now, lines)
}

/// Lanes with an affinity key: every lane of a key on one instance, the keys spread over the
/// instances; draining a key's instance moves that key (to one instance), and it comes back
/// when the drain ends.
#[test]
fn lanes_with_an_affinity_key_stay_on_the_keys_instance() {
    let mut config = test_config(None);
    config.quadrants.get_mut("px").expect("px").instances = 3;
    let mut inst = Instance::up(config, QPROBE);
    let echo = quadrant_tests::harness::sibling_binary(QPROBE, "lane-echo");
    let echo = echo.to_str().expect("utf8").to_owned();
    let mut outputs = Vec::new();
    for k in 0..3 {
        let (_, lines) = inst.background_on(
            Quadrant::Px,
            k,
            Some("echo"),
            &[&echo, "serve", "echo"],
            "listening as",
        );
        outputs.push(lines);
    }
    let mut homes = BTreeMap::new();
    for key in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let (got, lines) = hold_keyed(&mut inst, &echo, key, 3);
        outputs.push(lines);
        assert_eq!(got.len(), 3, "{key}: {got:?}");
        assert!(
            got.iter().all(|&i| i == got[0]),
            "{key}: one instance: {got:?}"
        );
        homes.insert(key, got[0]);
    }
    let used: std::collections::BTreeSet<u64> = homes.values().copied().collect();
    assert!(used.len() >= 2, "keys spread over the instances: {homes:?}");

    let home = homes["alice"];
    let out = inst.quadrant(&["drain", "px", &home.to_string()]);
    assert!(out.status.success());
    let (moved, lines) = hold_keyed(&mut inst, &echo, "alice", 2);
    outputs.push(lines);
    assert!(
        moved.iter().all(|&i| i != home && i == moved[0]),
        "alice moves off instance {home}, to one instance: {moved:?}"
    );
    let out = inst.quadrant(&["drain", "px", &home.to_string(), "--resume"]);
    assert!(out.status.success());
    let (back, lines) = hold_keyed(&mut inst, &echo, "alice", 1);
    outputs.push(lines);
    assert_eq!(back, [home], "alice is back on instance {home}");
}

#[test]
fn affinity_keeps_each_workload_on_its_instance_across_an_unrelated_change() {
    let (mut inst, target, a) = px_behind_a_vip(4, "tcp", "workload");
    whoami_on_every_instance(&mut inst, 4);
    let place = |inst: &Instance, w: &str| {
        let (ok, line) = inst.probe_as(Quadrant::Pg, Some(w), &["tcp-spread", &target, "3"]);
        assert!(ok, "{w}: {line}");
        let counts = spread(&line).1;
        assert_eq!(
            counts.len(),
            1,
            "{w}: every connection to one instance: {line}"
        );
        counts.into_keys().next().expect("one")
    };
    let workloads: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
    let before: BTreeMap<&str, String> = workloads
        .iter()
        .map(|w| (w.as_str(), place(&inst, w)))
        .collect();
    let used: std::collections::BTreeSet<&String> = before.values().collect();
    assert!(
        used.len() >= 2,
        "workloads spread over the instances: {before:?}"
    );
    for w in &workloads {
        assert_eq!(
            place(&inst, w),
            before[w.as_str()],
            "{w} stays where it was"
        );
    }

    // Instance 3 goes: its workloads move, the others (nearly all: Maglev moves few) stay.
    let out = inst.quadrant(&["scale", "px", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut moved = 0;
    for w in &workloads {
        let now = place(&inst, w);
        assert_ne!(now, a[3], "{w} on a removed instance");
        if before[w.as_str()] != a[3] && now != before[w.as_str()] {
            moved += 1;
        }
        assert_eq!(place(&inst, w), now, "{w} sticks to its new place");
    }
    assert!(
        moved <= 2,
        "{moved} of the workloads on the remaining instances moved"
    );
}

#[test]
fn every_instance_runs_within_its_capacity() {
    let mut config = test_config(None);
    let px = config.quadrants.get_mut("px").expect("px");
    px.instances = 2;
    px.capacity.cpu = Some(0.2);
    px.capacity.memory_bytes = Some(64 << 20);
    let inst = Instance::up(config, QPROBE);
    let name = inst.config.instance.clone();
    for (k, dir) in [(0u8, "px".to_owned()), (1, "px-1".to_owned())] {
        let out = inst.bounded(
            std::process::Command::new(&inst.bin)
                .arg("--config")
                .arg(&inst.config_path)
                .args(["exec", "px", "--instance", &k.to_string(), "--"])
                .args(["cat", "/proc/self/cgroup"]),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cgroups = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(cgroups.contains(&format!("0::/{name}/{dir}")), "{cgroups}");
        let v2 = inst.config.cgroup2.join(&name).join(&dir);
        if v2.join("cpu.max").exists() {
            let read = |f: &str| std::fs::read_to_string(v2.join(f)).expect(f);
            assert_eq!(read("cpu.max").trim(), "2000 10000");
            assert_eq!(read("memory.max").trim(), (64u64 << 20).to_string());
        } else {
            // A hybrid host: the limits live in v1 groups the instance's processes join.
            for (controller, file, want) in [
                ("cpu", "cpu.cfs_quota_us", "2000".to_owned()),
                ("memory", "memory.limit_in_bytes", (64u64 << 20).to_string()),
            ] {
                assert!(
                    cgroups.contains(&format!(":{controller}:/{name}/{dir}")),
                    "{controller}: {cgroups}"
                );
                let group = std::path::Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(&name)
                    .join(&dir);
                let got = std::fs::read_to_string(group.join(file)).expect(file);
                assert_eq!(got.trim(), want, "{controller} of {dir}");
            }
        }
    }
    let weights: Vec<u64> = instances(&inst)
        .iter()
        .filter(|i| i["quadrant"] == "px")
        .map(|i| i["weight"].as_u64().expect("weight"))
        .collect();
    assert_eq!(
        weights,
        [200, 200],
        "weighted by capacity (thousandths of a CPU)"
    );
}
