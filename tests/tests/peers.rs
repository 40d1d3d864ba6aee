//! Instances on another node: two agents, one in the test's network namespace and one in a
//! namespace of its own standing in for a second host, joined by a veth "link" and by a peer
//! link (TCP + mTLS, node SVIDs from CAs under one upstream root). A lane from node A to a
//! service only node B offers goes to B's instance; a caller whose local instance dies fails
//! over to B without losing a request. Needs root.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use quadrant::config::{
    Config, KubernetesPeers, PeerNode, PeersConfig, ServiceConfig, UpstreamConfig,
};
use quadrant_tests::{
    cni::{Pod, conflist, pods_runtime, subnet},
    harness::{Instance, TEST_STATE_DIR, sibling_binary, test_config, upstream_ca as upstream},
    kubeapi::KubeApi,
};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const PEER_PORT: u16 = 7470;
/// The peer port of the nodes the Kubernetes API lists (node A listens on every address).
const KUBE_PEER_PORT: u16 = 7471;
const TOKEN: &str = "quadrant-test-token";
const ADDRESS: &str = "quadrant.io/peer-address";

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn slot_of(config: &Config) -> u8 {
    config
        .instance
        .trim_start_matches("qt")
        .parse()
        .expect("qtN")
}

/// The namespace of node B and the link between the nodes, removed on drop.
struct Link {
    netns: String,
    host_if: String,
}

impl Link {
    /// Namespace `<b>-node`, a veth `<a>-nl` (10.250.S.1/30, here) ↔ `<b>-nl` (10.250.S.2/30,
    /// in it), forwarding on both ends (the routed path between the nodes' quadrants).
    fn new(a: &Config, b: &Config) -> (Self, [std::net::Ipv4Addr; 2]) {
        let s = slot_of(a);
        let netns = format!("{}-node", b.instance);
        let (host_if, peer_if) = (format!("{}-nl", a.instance), format!("{}-nl", b.instance));
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run(&["ip", "netns", "add", &netns]);
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns",
            &netns,
        ]);
        let (ip_a, ip_b) = (format!("10.250.{s}.1"), format!("10.250.{s}.2"));
        run(&["ip", "addr", "add", &format!("{ip_a}/30"), "dev", &host_if]);
        run(&["ip", "link", "set", &host_if, "up"]);
        run(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_b}/30"),
            "dev",
            &peer_if,
        ]);
        run(&["ip", "-n", &netns, "link", "set", &peer_if, "up"]);
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{host_if}.forwarding=1"),
        ]);
        run(&[
            "nsenter",
            &format!("--net=/run/netns/{netns}"),
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{peer_if}.forwarding=1"),
        ]);
        (
            Self { netns, host_if },
            [ip_a.parse().expect("ip"), ip_b.parse().expect("ip")],
        )
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Links to `server` (node `server_name`'s acceptor) as SPIFFE ID `id`, with an SVID from a CA
/// under the same upstream root, and says hello; the answer, or why there is none.
fn link_as(
    up: &UpstreamConfig,
    id: &str,
    server: std::net::SocketAddr,
    server_name: &str,
) -> String {
    use quadrant::{
        identity::ca::{Authority, Upstream},
        lanes::tls,
        peers::wire::{self, Frames, Reply, Request},
    };
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("intruder-ca-{}", server.port()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Authority::load_or_create(
        &dir,
        "quadrant.local",
        Some(&Upstream {
            cert: up.cert.clone(),
            key: up.key.clone(),
        }),
    )
    .expect("CA");
    let svid = ca.mint_x509(id, Duration::from_mins(10)).expect("SVID");
    let svid = tls::Svid::from_material(&tls::Svid::material(
        &svid.chain,
        &svid.key_pkcs8,
        ca.roots(),
        "quadrant.local",
    ))
    .expect("svid");
    let config = tls::node_client_config(
        &svid,
        &quadrant::config::node_id("quadrant.local", server_name),
    )
    .expect("client config");
    let sock =
        std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2)).expect("connect");
    // Long enough for the handshake on a machine busy with other tests (a 100 ms read timeout
    // here ended it with EAGAIN under load); `Frames::next` still keeps its own deadline.
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let conn = rustls::ClientConnection::new(config, tls::sni()).expect("client");
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let hello = Request::Hello {
        node: id.rsplit('/').next().unwrap_or_default().to_owned(),
        prefixes: std::collections::BTreeMap::new(),
        pods: Vec::new(),
    };
    if let Err(e) = wire::write(&mut stream, &hello) {
        return format!("no link: {e}");
    }
    match Frames::default()
        .next::<_, Reply>(&mut stream, Some(Instant::now() + Duration::from_secs(3)))
    {
        Ok(Some(Reply::Refused { message, .. })) => format!("refused: {message}"),
        Ok(Some(other)) => format!("answered: {other:?}"),
        Ok(None) => "no answer".to_owned(),
        Err(e) => format!("no link: {e}"),
    }
}

/// `quadrant instances --output json`'s peer nodes.
fn peers(inst: &Instance) -> Vec<Value> {
    let out = inst.quadrant(&["instances", "--output", "json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("instances json");
    v["peers"].as_array().cloned().unwrap_or_default()
}

fn until_linked(inst: &Instance) -> Value {
    let start = Instant::now();
    loop {
        let p = peers(inst);
        if p.first().is_some_and(|p| p["linked"] == true) {
            return p[0].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} never linked to its peer: {p:?}\n{}",
            inst.config.instance,
            inst.agent_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The lane `quadrant lanes` on `inst` lists as one between it and node `node` (5 s at most).
fn until_lane(inst: &Instance, node: &str) -> Value {
    let start = Instant::now();
    loop {
        let out = inst.quadrant(&["lanes", "--output", "json"]);
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).expect("lanes json");
        if let Some(l) = v["lanes"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["node"] == node))
        {
            return l.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{} lists no lane with node {node}: {v}",
            inst.config.instance
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn json_line(out: &std::process::Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{what}: {stdout:?}: {e}"))
}

/// One configuration for both nodes, as a DaemonSet's ConfigMap is (the quadrant prefixes node
/// A's): each node takes its own block from `node_prefixes` by its name.
fn share_one_configuration(a_config: &mut Config, b_config: &mut Config) {
    let blocks: std::collections::BTreeMap<String, ipnet::Ipv4Net> = [&*a_config, &*b_config]
        .iter()
        .map(|c| {
            let dx = c.quadrants["dx"].prefix;
            let block = ipnet::Ipv4Net::new(dx.network(), 22).expect("block");
            assert_eq!(
                block.trunc().network(),
                dx.network(),
                "test prefixes in /22s"
            );
            (c.instance.clone(), block)
        })
        .collect();
    let own_b = b_config.quadrants.clone();
    b_config.quadrants = a_config.quadrants.clone();
    for c in [a_config, &mut *b_config] {
        if let Some(k) = c.peers.kubernetes.as_mut() {
            k.node_prefixes = blocks.clone();
        }
        let text = serde_yaml::to_string(&*c).expect("yaml");
        *c = Config::from_yaml(&text, "the shared configuration").expect("config");
    }
    assert_eq!(b_config.quadrants, own_b, "node B took its block");
}

/// Two nodes, their link and the service both can run.
struct Nodes {
    a: Instance,
    b: Instance,
    up: UpstreamConfig,
    acceptor_b: std::net::SocketAddr,
    echo: String,
    ledgers: PathBuf,
    /// The servers' output: a server whose stdout closes dies at its next line.
    outputs: Vec<std::sync::mpsc::Receiver<String>>,
    /// With the nodes from the Kubernetes API: its server (dropped after the agents, which take
    /// their annotations off at `down`) and the nodes' addresses.
    api: Option<KubeApi>,
    ips: [std::net::Ipv4Addr; 2],
    // Dropped last: the agents go before their namespace and link.
    link: Link,
}

impl Nodes {
    /// Node B in a namespace of its own, node A here; each lists the other as its peer, or
    /// (`kubernetes`) both follow a Kubernetes API server that lists both nodes.
    fn up(kubernetes: bool) -> Self {
        Self::up_with(kubernetes, |_, _| {})
    }

    /// [`Nodes::up`], each node's configuration changed by `edit` (given A's too) first.
    fn up_with(kubernetes: bool, edit: impl Fn(&mut Config, &Config)) -> Self {
        let mut a_config = test_config(None);
        let mut b_config = test_config(None);
        let a_as_given = a_config.clone();
        edit(&mut a_config, &a_as_given);
        edit(&mut b_config, &a_as_given);
        let (link, [ip_a, ip_b]) = Link::new(&a_config, &b_config);
        let api = kubernetes.then(|| {
            let api = KubeApi::start((ip_a, 0).into(), TOKEN);
            api.add_node(&a_config.instance, &ip_a.to_string());
            api.add_node(&b_config.instance, &ip_b.to_string());
            api
        });
        let up = upstream(
            &PathBuf::from(TEST_STATE_DIR).join(format!("{}-upstream", a_config.instance)),
        );
        let (a_name, b_name) = (a_config.instance.clone(), b_config.instance.clone());
        for (c, me, (name, ip_other)) in [
            (&mut a_config, ip_a, (b_name, ip_b)),
            (&mut b_config, ip_b, (a_name, ip_a)),
        ] {
            // A CA left by another test of the slot chains to no upstream.
            let _ = std::fs::remove_dir_all(&c.identity.ca_dir);
            c.identity.upstream = Some(up.clone());
            c.peers = match &api {
                None => PeersConfig {
                    listen: Some(std::net::SocketAddrV4::new(me, PEER_PORT)),
                    nodes: vec![PeerNode {
                        name,
                        address: std::net::SocketAddrV4::new(ip_other, PEER_PORT),
                    }],
                    routes: true,
                    kubernetes: None,
                },
                Some(api) => {
                    let kubeconfig = PathBuf::from(TEST_STATE_DIR)
                        .join(format!("{}-kubeconfig.yaml", c.instance));
                    api.kubeconfig(&kubeconfig, TOKEN);
                    PeersConfig {
                        // A on every address: it publishes its node's InternalIP.
                        listen: Some(std::net::SocketAddrV4::new(
                            if me == ip_a {
                                std::net::Ipv4Addr::UNSPECIFIED
                            } else {
                                me
                            },
                            KUBE_PEER_PORT,
                        )),
                        nodes: Vec::new(),
                        routes: true,
                        kubernetes: Some(KubernetesPeers {
                            node_name: Some(c.instance.clone()),
                            kubeconfig: Some(kubeconfig),
                            node_prefixes: std::collections::BTreeMap::new(),
                        }),
                    }
                }
            };
        }
        if api.is_some() {
            share_one_configuration(&mut a_config, &mut b_config);
        }
        let b = Instance::up_in(b_config, QPROBE, Some(&link.netns));
        let a = Instance::up(a_config, QPROBE);
        let echo = sibling_binary(QPROBE, "lane-echo");
        let ledgers =
            std::env::temp_dir().join(format!("quadrant-peer-ledgers-{}", a.config.instance));
        let _ = std::fs::remove_dir_all(&ledgers);
        std::fs::create_dir_all(&ledgers).expect("ledger dir");
        Self {
            a,
            b,
            up,
            acceptor_b: std::net::SocketAddr::new(
                ip_b.into(),
                if api.is_some() {
                    KUBE_PEER_PORT
                } else {
                    PEER_PORT
                },
            ),
            echo: echo.to_str().expect("utf8").to_owned(),
            ledgers,
            outputs: Vec::new(),
            api,
            ips: [ip_a, ip_b],
            link,
        }
    }

    fn ledger(&self, node: &str) -> String {
        self.ledgers.join(node).to_str().expect("utf8").to_owned()
    }

    /// The echo service in PX of node `node` ("a" or "b"), writing its ledger.
    fn serve(&mut self, node: &str) -> u32 {
        let ledger = self.ledger(node);
        let echo = self.echo.clone();
        let inst = if node == "a" {
            &mut self.a
        } else {
            &mut self.b
        };
        let (pid, output) = inst.background_in(
            Quadrant::Px,
            Some("echo"),
            &[
                &echo,
                "serve",
                "echo",
                "--tcp-port",
                "7000",
                "--ledger",
                &ledger,
            ],
            "listening as",
        );
        self.outputs.push(output);
        pid
    }

    /// `lane-echo ARGS…` in A's PG as workload `caller`, on a thread of its own.
    fn caller(&self, args: &[&str]) -> thread::JoinHandle<std::process::Output> {
        let mut command = Command::new(&self.a.bin);
        command
            .arg("--config")
            .arg(&self.a.config_path)
            .args(["exec", "pg", "--workload", "caller", "--", &self.echo])
            .args(args)
            .stdin(Stdio::null());
        thread::spawn(move || command.output().expect("run lane-echo"))
    }

    /// Both linked, each with the other's prefixes.
    fn linked(&self) {
        let seen_by_a = until_linked(&self.a);
        let seen_by_b = until_linked(&self.b);
        let b_px = self.b.config.quadrants["px"].prefix.to_string();
        let a_pg = self.a.config.quadrants["pg"].prefix.to_string();
        assert_eq!(seen_by_a["prefixes"]["px"], b_px, "{seen_by_a}");
        assert_eq!(seen_by_b["prefixes"]["pg"], a_pg, "{seen_by_b}");
    }

    /// Only the nodes of its list may link: a node SVID of another name under the same root is
    /// refused after the handshake, a workload's SVID in the handshake.
    fn only_listed_nodes_link(&self) {
        let b_name = &self.b.config.instance;
        let intruder = link_as(
            &self.up,
            "spiffe://quadrant.local/node/intruder",
            self.acceptor_b,
            b_name,
        );
        assert!(
            intruder.starts_with("refused:")
                && intruder.contains("is not one of this agent's peer nodes"),
            "{intruder}"
        );
        let workload = link_as(
            &self.up,
            "spiffe://quadrant.local/quadrant/pg/workload/caller",
            self.acceptor_b,
            b_name,
        );
        assert!(workload.starts_with("no link:"), "{workload}");
    }

    /// A plain TCP echo in B's PX (the lane service's port speaks TLS and may reset a plain
    /// client); its address.
    fn echo_in_b_px(&mut self) -> String {
        let (_, output) = self.b.background_in(
            Quadrant::Px,
            None,
            &[QPROBE, "tcp-echo", "0.0.0.0:7001"],
            "listening",
        );
        self.outputs.push(output);
        format!("{}:7001", self.b.addr(Quadrant::Px))
    }

    /// Node B's kernel knows A's prefixes as A's quadrants: A's PG reaches B's PX on the
    /// service's port; the host of A (an outside address to B) does not.
    fn kernels_know_the_other_nodes_quadrants(&mut self) {
        let b_px = self.echo_in_b_px();
        let (reached, why) = self.a.probe(Quadrant::Pg, &["tcp-connect", &b_px, "1000"]);
        assert!(reached, "A's PG to B's PX: {why}");
        let denied = self.b.counter("tc_egress", Quadrant::Px, "deny_policy");
        let from_host = Command::new(QPROBE)
            .args(["tcp-connect", &b_px, "500"])
            .output()
            .expect("qprobe");
        assert!(
            !from_host.status.success(),
            "the outside reaches no quadrant of B: {}",
            String::from_utf8_lossy(&from_host.stdout)
        );
        assert!(
            self.b.counter("tc_egress", Quadrant::Px, "deny_policy") > denied,
            "B's tc dropped it by policy"
        );
    }

    /// Only B offers the service: a lane from A's PG goes there, over TCP + mTLS, and both
    /// nodes list it as a lane between them; shared memory cannot cross.
    fn lanes_go_to_b(&self) {
        let call = |transport: &str| {
            self.a.run_in(
                Quadrant::Pg,
                Some("caller"),
                &[
                    &self.echo,
                    "call",
                    "px",
                    "echo",
                    "--count",
                    "20",
                    "--transport",
                    transport,
                ],
            )
        };
        let summary = json_line(&call("auto"), "call to node B");
        assert_eq!(summary["transport"], "tcp", "{summary}");
        let held = self.caller(&["call", "px", "echo", "--count", "1", "--hold", "3"]);
        let on_a = until_lane(&self.a, &self.b.config.instance);
        let on_b = until_lane(&self.b, &self.a.config.instance);
        assert!(
            on_a["instance"].as_u64() >= Some(16),
            "peer instances are 16 and up: {on_a}"
        );
        assert_eq!(on_b["instance"], 0, "{on_b}");
        assert_eq!(on_a["client"], on_b["client"]);
        assert_eq!(on_a["server"], on_b["server"]);
        json_line(&held.join().expect("held call"), "held call");
        let out = call("shm");
        assert!(!out.status.success(), "shared memory cannot cross nodes");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("lanes between nodes are TCP + mTLS"),
            "{stderr}"
        );
        let p = peers(&self.a);
        assert!(p[0]["lanes_opened"].as_u64() >= Some(2), "{p:?}");
    }

    /// A local instance takes lanes first; when it dies, the caller's requests go to B's and
    /// none is lost.
    fn failover_to_b(&mut self) {
        let local = self.serve("a");
        let caller = self.caller(&[
            "steady",
            "px",
            "echo",
            "--rate",
            "200",
            "--seconds",
            "4",
            "--tag",
            "x",
        ]);
        thread::sleep(Duration::from_millis(1500));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(local).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        );
        let out = caller.join().expect("caller");
        let mut summary = json_line(&out, "steady caller");
        let numbers = summary["ok_numbers"].take();
        // Lists shortened to their lengths for the report.
        for list in ["not_sent", "indeterminate", "wrong_answer"] {
            let n = summary[list].as_array().map_or(0, Vec::len);
            summary[list] = n.into();
        }
        eprintln!("caller across nodes: {summary}");
        for empty in ["not_sent", "indeterminate", "wrong_answer"] {
            assert_eq!(
                summary[empty],
                0,
                "{empty}: {summary}\n{}\nnode A: {}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&self.a.quadrant(&["lanes"]).stdout),
            );
        }
        assert_eq!(summary["ok"], summary["submitted"], "{summary}");
        assert!(summary["failovers"].as_u64() >= Some(1), "{summary}");
        let ledger_a = std::fs::read_to_string(self.ledger("a")).unwrap_or_default();
        let ledger_b = std::fs::read_to_string(self.ledger("b")).unwrap_or_default();
        let (mut on_a, mut on_b) = (0, 0);
        for n in numbers.as_array().expect("ok numbers") {
            let msg = format!(" x-{n}");
            if ledger_b.lines().any(|l| l.ends_with(&msg)) {
                on_b += 1;
            } else {
                assert!(
                    ledger_a.lines().any(|l| l.ends_with(&msg)),
                    "x-{n} was answered but no instance handled it"
                );
                on_a += 1;
            }
        }
        eprintln!("requests handled on node A: {on_a}, on node B: {on_b}");
        assert!(
            on_a > 0 && on_b > 0,
            "before and after the kill: {on_a} / {on_b}"
        );
    }
}

#[test]
fn lanes_go_to_another_nodes_instance_and_fail_over_to_it() {
    let mut nodes = Nodes::up(false);
    nodes.linked();
    nodes.only_listed_nodes_link();
    nodes.serve("b");
    nodes.kernels_know_the_other_nodes_quadrants();
    nodes.lanes_go_to_b();
    nodes.failover_to_b();
}

/// `inst`'s metrics, as Prometheus scrapes them.
fn scrape(inst: &Instance) -> String {
    use std::io::{Read as _, Write as _};
    let addr = inst.status().metrics.expect("metrics served");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text
}

/// Waits up to 10 s for `check` on `inst`'s peer nodes.
fn until_peers(inst: &Instance, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    until(inst, what, || peers(inst), |p| check(p))
}

/// Reads `read` every 100 ms until `check` holds (its last reading), for up to 10 s.
fn until<T: std::fmt::Debug>(
    inst: &Instance,
    what: &str,
    read: impl Fn() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let now = read();
        if check(&now) {
            return now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}: {what}: {now:?}\n{}",
            inst.config.instance,
            inst.agent_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A /22 of quadrant prefixes a node without an agent announces (`10.<second>.<4·slot>.0/22`),
/// blackholed on this host while the test runs: whatever happens, nothing to it leaves the
/// machine (the routes the agent adds for it are longer).
struct AnnouncedBlock {
    base: u8,
    second: u8,
    _blackhole: Undo,
}

impl AnnouncedBlock {
    fn new(config: &Config, second: u8) -> Self {
        let base = 4 * slot_of(config);
        let block = format!("10.{second}.{base}.0/22");
        Self {
            base,
            second,
            _blackhole: blackhole(&block),
        }
    }

    /// Quadrant `q`'s prefix (dx, dg, px, pg in order).
    fn prefix(&self, q: u8) -> String {
        format!("10.{}.{}.0/24", self.second, self.base + q)
    }

    /// The `quadrant.io/quadrant-prefixes` annotation.
    fn annotation(&self) -> String {
        format!(
            "dg={},dx={},pg={},px={}",
            self.prefix(1),
            self.prefix(0),
            self.prefix(3),
            self.prefix(2)
        )
    }

    /// A workload address in its PX, port 7001.
    fn px_workload(&self) -> String {
        format!("10.{}.{}.2:7001", self.second, self.base + 2)
    }

    /// No route to its PX any more (the agent lists a node as gone before it has taken its
    /// prefixes and routes away, so this waits up to 5 s).
    fn assert_px_unrouted(&self, what: &str) {
        until_unrouted(&self.prefix(2), what);
    }
}

/// Waits up to 5 s for the host to have no route to `net` (node `what`'s).
fn until_unrouted(net: &str, what: &str) {
    let start = Instant::now();
    loop {
        let out = Command::new("ip")
            .args(["route", "show", net])
            .output()
            .expect("ip route");
        if out.stdout.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what}'s route to {net} stays: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A blackhole route for `net`, deleted when dropped.
fn blackhole(net: &str) -> Undo {
    run(&["ip", "route", "replace", "blackhole", net]);
    Undo(vec![
        ["ip", "route", "del", "blackhole", net]
            .map(str::to_owned)
            .to_vec(),
    ])
}

/// A node the API lists whose agent does not answer (nothing listens at its address, on node
/// B): listed by A, not linked, and its announced prefixes in A's kernel at once — DX to its PX
/// is refused at `connect()` as DX → PX, PG to its PX let through as PG → PX (its routes lead
/// into B's namespace, where nothing answers).
/// Deleted, it is forgotten.
fn a_node_without_its_agent_is_known_by_its_announced_prefixes(nodes: &Nodes) {
    let api = nodes.api.as_ref().expect("api");
    let c = format!("{}-c", nodes.a.config.instance);
    let block = AnnouncedBlock::new(&nodes.a.config, 252);
    api.add_node(&c, &nodes.ips[1].to_string());
    api.annotate(
        &c,
        &[
            (ADDRESS, &format!("{}:{}", nodes.ips[1], KUBE_PEER_PORT + 8)),
            ("quadrant.io/quadrant-prefixes", &block.annotation()),
        ],
    );
    let listed = until_peers(&nodes.a, "C listed with its prefixes", |p| {
        p.iter()
            .any(|p| p["name"] == c.as_str() && p["prefixes"]["px"] == block.prefix(2).as_str())
    });
    let c_status = listed.iter().find(|p| p["name"] == c.as_str()).expect("C");
    assert_eq!(c_status["linked"], false, "{c_status}");
    judged_as_px(&nodes.a, &block.px_workload(), "C's PX");
    api.delete_node(&c);
    until_peers(&nodes.a, "C forgotten", |p| {
        !p.iter().any(|p| p["name"] == c.as_str())
    });
    block.assert_px_unrouted("C");
}

/// `to` is PX to `a`'s kernel: DX gets `EPERM` at `connect()`; PG, which may reach PX but not
/// the world, is let through (to a route where nothing answers).
fn judged_as_px(a: &Instance, to: &str, what: &str) {
    let (ok, line) = a.probe(Quadrant::Dx, &["tcp-connect", to, "300"]);
    assert!(!ok && line == "err EPERM", "DX -> {what}: {line}");
    let (_, line) = a.probe(Quadrant::Pg, &["tcp-connect", to, "300"]);
    assert_ne!(line, "err EPERM", "PG -> {what} is PG -> PX");
}

/// More nodes than link slots (14): B and 13 more take the slots, the 14th by name waits (listed,
/// counted as waiting, its announced prefixes enforced); when a node with a slot goes, the
/// waiting one takes its slot; deleted, it is forgotten.
fn more_nodes_than_link_slots_wait_for_one(nodes: &Nodes) {
    let api = nodes.api.as_ref().expect("api");
    let name = |i: usize| format!("{}-x{i:02}", nodes.a.config.instance);
    // Their agents' port is closed: they never link.
    let address = format!("{}:{}", nodes.ips[1], KUBE_PEER_PORT + 9);
    // The last one announces prefixes: waiting, its quadrants are judged all the same.
    let block = AnnouncedBlock::new(&nodes.a.config, 253);
    let announced = block.annotation();
    for i in 0..14 {
        api.add_node(&name(i), &nodes.ips[1].to_string());
        if i < 13 {
            api.annotate(&name(i), &[(ADDRESS, &address)]);
        } else {
            api.annotate(
                &name(i),
                &[
                    (ADDRESS, &address),
                    ("quadrant.io/quadrant-prefixes", &announced),
                ],
            );
        }
    }
    let last = name(13);
    let p = until_peers(&nodes.a, "15 peers, one waiting", |p| {
        p.len() == 15
            && p.iter()
                .any(|p| p["name"] == last.as_str() && p["waiting"] == true)
    });
    let waiting: Vec<&Value> = p.iter().filter(|p| p["waiting"] == true).collect();
    assert_eq!(waiting.len(), 1, "{p:?}");
    assert_eq!(
        waiting[0]["prefixes"]["px"],
        block.prefix(2).as_str(),
        "{p:?}"
    );
    judged_as_px(&nodes.a, &block.px_workload(), "the waiting node's PX");
    assert!(
        scrape(&nodes.a)
            .lines()
            .any(|l| l == "quadrant_peer_nodes{source=\"kubernetes\",state=\"waiting\"} 1"),
        "the waiting node counted"
    );
    api.delete_node(&name(0));
    until_peers(&nodes.a, "the waiting node took the freed slot", |p| {
        p.len() == 14 && p.iter().all(|p| p["waiting"] != true)
    });
    for i in 1..14 {
        api.delete_node(&name(i));
    }
    until_peers(&nodes.a, "back to B alone", |p| p.len() == 1);
    block.assert_px_unrouted("the last one");
}

/// The peer nodes come from the Kubernetes API: each agent publishes its address and prefixes
/// on its Node object (node A, listening on every address, its `InternalIP`), both link, lanes
/// cross; a node whose object is deleted is let go at once (no link, no route to its
/// quadrants, its own link refused) and linked again when its kubelet registers it anew (its
/// agent writes the annotations again); a full `down` takes the annotations off.
#[test]
fn peer_nodes_come_from_the_kubernetes_api() {
    let mut nodes = Nodes::up(true);
    nodes.linked();
    published_and_watched(&nodes);
    nodes.only_listed_nodes_link();
    nodes.serve("b");
    nodes.lanes_go_to_b();
    a_node_without_its_agent_is_known_by_its_announced_prefixes(&nodes);
    more_nodes_than_link_slots_wait_for_one(&nodes);
    a_deleted_node_is_let_go_until_it_registers_again(&nodes);

    let b_name = nodes.b.config.instance.clone();
    let out = nodes.b.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = nodes.api.as_ref().expect("api").annotations(&b_name);
    assert!(
        !after.contains_key(ADDRESS),
        "a full down withdraws: {after:?}"
    );
    until_peers(&nodes.a, "B gone after its down", <[Value]>::is_empty);

    // The API server goes away: A keeps serving and says so (status and metric).
    let api_addr = nodes.api.as_ref().expect("api").addr;
    drop(nodes.api.take());
    let start = Instant::now();
    loop {
        let out = nodes.a.quadrant(&["instances", "--output", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("instances json");
        if let Some(e) = v["kubernetes_error"].as_str() {
            eprintln!("A without its API server: {e}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "A never reported the API server's loss: {v}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        scrape(&nodes.a)
            .lines()
            .any(|l| l == "quadrant_kubernetes_api_up 0"),
        "the loss as a metric"
    );
    // A server that takes connections and never answers does not hold up A's stop: taking its
    // annotations off gives up after 5 s.
    let _silent = std::net::TcpListener::bind(api_addr).expect("a silent server");
    let start = Instant::now();
    let out = nodes.a.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "down took {:?} with a silent API server",
        start.elapsed()
    );
    eprintln!("down with a silent API server: {:?}", start.elapsed());
}

/// Each agent's address (A's from its `InternalIP`) and prefixes on its Node object, the nodes
/// watched, B a linked peer from the API, counted.
fn published_and_watched(nodes: &Nodes) {
    let (a_name, b_name) = (&nodes.a.config.instance, &nodes.b.config.instance);
    let [ip_a, ip_b] = nodes.ips;
    let api = nodes.api.as_ref().expect("api");
    let (on_a, on_b) = (api.annotations(a_name), api.annotations(b_name));
    assert_eq!(
        on_a[ADDRESS],
        format!("{ip_a}:{KUBE_PEER_PORT}"),
        "{on_a:?}"
    );
    assert_eq!(
        on_b[ADDRESS],
        format!("{ip_b}:{KUBE_PEER_PORT}"),
        "{on_b:?}"
    );
    let px = format!("px={}", nodes.b.config.quadrants["px"].prefix);
    assert!(
        on_b["quadrant.io/quadrant-prefixes"].contains(&px),
        "{on_b:?}"
    );
    let requests = api.requests();
    let watches: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/nodes?") && r.contains("watch=true"))
        .collect();
    assert!(
        !watches.is_empty(),
        "the agents watch the nodes: {requests:?}"
    );
    assert!(
        watches
            .iter()
            .all(|r| r.contains("[application/json;as=PartialObjectMetadata;")),
        "the nodes' metadata alone: {watches:?}"
    );
    let p = peers(&nodes.a);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["name"], b_name.as_str());
    assert_eq!(p[0]["source"], "kubernetes");
    let metrics = scrape(&nodes.a);
    for line in [
        "quadrant_peer_nodes{source=\"kubernetes\",state=\"linked\"} 1",
        "quadrant_kubernetes_api_up 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
}

/// B's Node object deleted: A lets B go at once (no peer, no route to B's quadrants) and refuses
/// B's link; B registered anew: its agent writes its annotations again, A links and a lane
/// crosses again.
fn a_deleted_node_is_let_go_until_it_registers_again(nodes: &Nodes) {
    let b_name = nodes.b.config.instance.clone();
    let ip_b = nodes.ips[1];
    let b_px = nodes.b.config.quadrants["px"].prefix.to_string();
    let route = || {
        let out = Command::new("ip")
            .args(["route", "show", &b_px])
            .output()
            .expect("ip route");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(route().contains(&ip_b.to_string()), "{}", route());
    nodes.api.as_ref().expect("api").delete_node(&b_name);
    until_peers(&nodes.a, "node B let go", <[Value]>::is_empty);
    until_unrouted(&b_px, "former peer B");
    let refused = until_peers(&nodes.b, "B's link refused by A", |p| {
        p.first().is_some_and(|p| {
            p["linked"] == false
                && p["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("is not one of this agent's peer nodes"))
        })
    });
    eprintln!("node B after its object was deleted: {refused:?}");

    nodes
        .api
        .as_ref()
        .expect("api")
        .add_node(&b_name, &ip_b.to_string());
    until_peers(&nodes.a, "node B back", |p| {
        p.first().is_some_and(|p| p["linked"] == true)
    });
    assert!(route().contains(&ip_b.to_string()), "{}", route());
    let again = nodes.a.run_in(
        Quadrant::Pg,
        Some("caller"),
        &[&nodes.echo, "call", "px", "echo", "--count", "5"],
    );
    assert_eq!(
        json_line(&again, "call after B's return")["transport"],
        "tcp"
    );
}

/// `cargo xtask deploy render --peers-upstream-secret S --node-prefix N=CIDR…` writes a
/// configuration the agent takes, every listed node getting its own block.
#[test]
fn the_rendered_peers_configuration_gives_each_node_its_block() {
    let peers = quadrant_deploy::ClusterPeers {
        upstream_secret: "quadrant-upstream".into(),
        node_prefixes: [("worker-1", "10.241.0.0/22"), ("worker-2", "10.241.4.0/22")]
            .map(|(n, c)| (n.to_owned(), c.to_owned()))
            .into(),
    };
    let text = quadrant_deploy::cluster_config(Some(&peers)).expect("render");
    for (node, px) in [
        ("worker-1", "10.241.2.0/24"),
        ("worker-2", "10.241.6.0/24"),
        ("worker-3", "10.240.2.0/24"),
    ] {
        // The DaemonSet names the node in NODE_NAME; here it is written into the file.
        let mut v: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        v["peers"]["kubernetes"]["node_name"] = node.into();
        let c = Config::from_yaml(&serde_yaml::to_string(&v).expect("yaml"), "rendered")
            .unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!(c.quadrants["px"].prefix.to_string(), px, "{node}");
        let k = c.peers.kubernetes.expect("kubernetes");
        assert_eq!(k.kubeconfig, None, "in-cluster");
        assert!(c.identity.upstream.is_some());
    }
}

/// Pods across nodes: a pod `quadrant-cni` attached on node A as PX is told to node B over the
/// link and judged there as PX — B's PX reaches it, B's DG is refused at `connect()` (a gateway
/// may reach the world, not production), and the pod reaches B's PX, which admits nothing from
/// outside the nodes. Its DEL takes it off B again.
#[test]
fn a_pod_on_one_node_is_its_quadrant_on_the_other() {
    let mut nodes = Nodes::up(false);
    nodes.linked();
    let pod = ServingPod::on_a(&nodes, 7302);
    let told = until_peers(&nodes.b, "A's pod told to B", |p| {
        p.first().is_some_and(|p| p["pods"] == 1)
    });
    eprintln!("node A as node B sees it: {told:?}");
    let to_pod = format!("{}:7302", pod.ip);
    let (ok, line) = nodes
        .b
        .probe(Quadrant::Px, &["tcp-connect", &to_pod, "1000"]);
    assert!(ok, "B's PX -> A's PX pod: {line}");
    let (ok, line) = nodes
        .b
        .probe(Quadrant::Dg, &["tcp-connect", &to_pod, "300"]);
    assert!(!ok && line == "err EPERM", "B's DG -> A's PX pod: {line}");
    let b_px = nodes.echo_in_b_px();
    assert!(pod.pod.connect(QPROBE, &b_px), "A's PX pod -> B's PX");
    pod.remove();
    until_peers(&nodes.b, "the pod gone from B", |p| {
        p.first().is_some_and(|p| p["pods"] == 0)
    });
}

/// Commands run when dropped (a failed test leaves no route behind).
struct Undo(Vec<Vec<String>>);

impl Drop for Undo {
    fn drop(&mut self) {
        for argv in &self.0 {
            let _ = Command::new(&argv[0]).args(&argv[1..]).output();
        }
    }
}

/// A child killed and reaped when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `quadrant instances --output json`'s instances of the peer nodes behind its VIPs, as
/// (address, balanced).
fn remote(inst: &Instance) -> Vec<(String, bool)> {
    let out = inst.quadrant(&["instances", "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("instances json");
    v["remote"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|i| {
                    (
                        i["address"].as_str().unwrap_or_default().to_owned(),
                        i["balanced"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn until_remote(inst: &Instance, what: &str, check: impl Fn(&[(String, bool)]) -> bool) {
    until(inst, what, || remote(inst), |r| check(r));
}

/// Waits until no connection through a VIP is open from `inst`'s quadrants (counts are
/// released as the sockets close).
fn until_idle(inst: &Instance) {
    let open = || -> u64 {
        let out = inst.quadrant(&["instances", "--output", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("instances json");
        ["instances", "remote"]
            .iter()
            .filter_map(|k| v[k].as_array())
            .flatten()
            .map(|i| i["connections"].as_u64().unwrap_or(0))
            .sum()
    };
    until(inst, "no connection open through a VIP", open, |n| *n == 0);
}

/// `qprobe tcp-spread`'s answers, which must be `ok`.
fn spread(ok: bool, line: &str) -> (String, std::collections::BTreeMap<String, u32>) {
    assert!(ok, "{line}");
    quadrant_tests::harness::spread(line)
}

/// Service `api` on both nodes of [`Nodes`]: its VIP at A's PX prefix's .100 (one shared
/// configuration), port 7402, balanced cluster-wide.
struct Vip {
    nodes: Nodes,
    target: String,
    listen: String,
    a_px: String,
    b_px: String,
}

impl Vip {
    const PORT: u16 = 7402;

    fn up() -> Self {
        let nodes = Nodes::up_with(false, |c, a| {
            c.services = vec![ServiceConfig {
                name: "api".into(),
                quadrant: "px".into(),
                port: Self::PORT,
                vip: std::net::Ipv4Addr::from(
                    u32::from(a.addrs(Quadrant::Px).prefix.network()) + 100,
                ),
                protocol: "tcp".into(),
                affinity: "none".into(),
                internal_traffic_policy: "cluster".into(),
                kubernetes_service: None,
            }];
        });
        nodes.linked();
        Self {
            target: format!("{}:{}", nodes.a.config.services[0].vip, Self::PORT),
            listen: format!("0.0.0.0:{}", Self::PORT),
            a_px: nodes.a.addr(Quadrant::Px),
            b_px: nodes.b.addr(Quadrant::Px),
            nodes,
        }
    }

    /// `tcp-spread` of `n` held connections from A's PG: the peer they saw, the answers.
    fn spread_from_a(&self, n: &str) -> (String, std::collections::BTreeMap<String, u32>) {
        let (ok, line) = self
            .nodes
            .a
            .probe(Quadrant::Pg, &["tcp-spread", &self.target, n]);
        spread(ok, &line)
    }

    /// The whoami server in PX of node B (`b`) or A; its pid.
    fn serve(&mut self, b: bool) -> u32 {
        let inst = if b {
            &mut self.nodes.b
        } else {
            &mut self.nodes.a
        };
        inst.serve_on_instance(Quadrant::Px, 0, &["tcp-whoami", &self.listen])
    }

    /// Only B's instance is ready: A's quadrants reach it through the VIP (which they see as
    /// their peer), the policy still decides, and A's host — balanced in tc over A's instances
    /// — is refused. Returns B's server's pid.
    fn only_b_serves(&mut self) -> u32 {
        let (ok, line) = self
            .nodes
            .a
            .probe(Quadrant::Pg, &["tcp-connect", &self.target, "500"]);
        assert!(
            !ok && line == "err ECONNREFUSED",
            "no instance ready on either node: {line}"
        );
        let server = self.serve(true);
        until_remote(&self.nodes.a, "B's instance in A's VIP", |r| {
            r == [(self.b_px.clone(), true)]
        });
        let (peer, counts) = self.spread_from_a("4");
        assert_eq!(peer, self.target, "getpeername gives the VIP back");
        assert_eq!(counts, [(self.b_px.clone(), 4)].into(), "only B's is ready");
        assert_eq!(peers(&self.nodes.a)[0]["instances"], 1);
        let text =
            String::from_utf8_lossy(&self.nodes.a.quadrant(&["instances"]).stdout).into_owned();
        let row = format!("{}:{}", self.b_px, Self::PORT);
        assert!(
            text.lines()
                .any(|l| l.starts_with(&row) && l.contains(" peers ") && l.ends_with("balanced")),
            "{text}"
        );
        let (ok, line) = self
            .nodes
            .a
            .probe(Quadrant::Dx, &["tcp-connect", &self.target, "500"]);
        assert!(
            !ok && line == "err EPERM",
            "development may not reach production on another node either: {line}"
        );
        let refused = || {
            self.nodes
                .a
                .counter("tc_egress", Quadrant::Px, "refuse_no_backend")
        };
        let before = refused();
        let from_host = Command::new(QPROBE)
            .args(["tcp-connect", &self.target, "300"])
            .output()
            .expect("qprobe");
        assert!(
            !from_host.status.success(),
            "the host's connections go to A's instances, none of which is ready: {}",
            String::from_utf8_lossy(&from_host.stdout)
        );
        assert!(
            refused() > before,
            "refused in tc, not sent to B's instance"
        );
        server
    }

    /// Both nodes' instances ready: A's quadrants are spread over both by least connections,
    /// A's host over A's alone.
    fn both_serve(&mut self) {
        until_idle(&self.nodes.a);
        self.serve(false);
        until_remote(&self.nodes.b, "A's instance in B's VIP", |r| {
            r == [(self.a_px.clone(), true)]
        });
        let (_, counts) = self.spread_from_a("8");
        assert_eq!(
            counts,
            [(self.a_px.clone(), 4), (self.b_px.clone(), 4)].into(),
            "least connections over both nodes"
        );
        let from_host = Command::new(QPROBE)
            .args(["tcp-spread", &self.target, "4"])
            .output()
            .expect("qprobe");
        let (_, counts) = spread(
            from_host.status.success(),
            String::from_utf8_lossy(&from_host.stdout).trim(),
        );
        assert_eq!(counts, [(self.a_px.clone(), 4)].into(), "tc: A's only");
    }
}

/// A VIP balanced cluster-wide: A's quadrants' connections reach B's PX instance while only
/// that one is ready, are spread over both nodes' instances once A's is ready too; A's host is
/// balanced in tc over A's instances alone; B's instance leaves A's VIP once B no longer has it
/// ready, and when B's agent is gone (its instance still answering).
#[test]
fn a_vip_balances_over_the_instances_of_every_node() {
    let mut vip = Vip::up();
    let b_server = vip.only_b_serves();
    vip.both_serve();
    let only_a: std::collections::BTreeMap<String, u32> = [(vip.a_px.clone(), 4)].into();

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(b_server).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    until_remote(&vip.nodes.a, "B's instance out of A's VIP", <[_]>::is_empty);
    assert_eq!(vip.spread_from_a("4").1, only_a, "B's gone from A's VIP");

    // Back on B; then B's agent dies (its instance still answers): A's VIP lets it go with the
    // link.
    until_idle(&vip.nodes.a);
    vip.serve(true);
    until_remote(&vip.nodes.a, "B's instance back in A's VIP", |r| {
        r == [(vip.b_px.clone(), true)]
    });
    vip.nodes.b.crash();
    until_remote(&vip.nodes.a, "B's gone with its link", <[_]>::is_empty);
    assert_eq!(vip.spread_from_a("4").1, only_a, "only A's instance");
}

/// `quadrant instances --output json`'s Kubernetes endpoints not balanced to.
fn endpoints_refused(inst: &Instance) -> Vec<String> {
    let out = inst.quadrant(&["instances", "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("instances json");
    v["endpoints_refused"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A service naming a Kubernetes Service (`kubernetes_service: shop/api`) on both nodes, which
/// follow the API: the `EndpointSlice`'s ready endpoint — a PX pod attached on A, serving on the
/// slice's port 8080 — is behind the VIP (port 7403) on both nodes, each judging the pod as PX
/// (A attached it, B was told), and A's host reaches it through tc (its veth is A's); endpoints
/// the kernel does not judge as PX (A's DX, the world)
/// are refused and listed; an endpoint no longer ready leaves the VIP.
#[test]
fn a_kubernetes_services_endpoints_are_behind_its_vip_on_every_node() {
    const PORT: u16 = 7403;
    let nodes = Nodes::up_with(true, |c, a| {
        let api = ServiceConfig {
            name: "api".into(),
            quadrant: "px".into(),
            port: PORT,
            vip: std::net::Ipv4Addr::from(u32::from(a.addrs(Quadrant::Px).prefix.network()) + 100),
            protocol: "tcp".into(),
            affinity: "none".into(),
            internal_traffic_policy: "cluster".into(),
            kubernetes_service: Some("shop/api".into()),
        };
        // The same Service's endpoints, balanced locally: each node's own pods only.
        let near = ServiceConfig {
            name: "near".into(),
            port: PORT + 1,
            vip: std::net::Ipv4Addr::from(u32::from(api.vip) + 1),
            internal_traffic_policy: "local".into(),
            ..api.clone()
        };
        c.services = vec![api, near];
    });
    nodes.linked();
    let target = format!("{}:{PORT}", nodes.a.config.services[0].vip);
    let near = format!("{}:{}", nodes.a.config.services[1].vip, PORT + 1);
    let pod = ServingPod::on_a(&nodes, 8080);
    let ip = pod.ip.clone();

    let api = nodes.api.as_ref().expect("api");
    let a_dx = nodes.a.addr(Quadrant::Dx);
    let endpoint = |a: &str, ready: bool| serde_json::json!({ "addresses": [a], "conditions": { "ready": ready } });
    api.put_endpoint_slice(
        "shop",
        "api-1",
        "api",
        &serde_json::json!([{ "port": 8080, "protocol": "TCP" }]),
        &serde_json::json!([
            endpoint(&ip, true),
            endpoint(&a_dx, true),
            endpoint("192.0.2.10", true)
        ]),
    );
    for (inst, behind) in [(&nodes.a, 2), (&nodes.b, 1)] {
        until_remote(inst, "the pod behind the VIPs", |r| {
            r.len() == behind && r.iter().all(|e| *e == (ip.clone(), true))
        });
        let (ok, line) = inst.probe(Quadrant::Pg, &["tcp-spread", &target, "2"]);
        let (peer, counts) = spread(ok, &line);
        assert_eq!(peer, target, "getpeername gives the VIP back");
        assert_eq!(counts, [(ip.clone(), 2)].into(), "the pod answered");
    }
    // A's host, balanced in tc over A's own backends: the pod is one (its veth is A's).
    let from_host = Command::new(QPROBE)
        .args(["tcp-spread", &target, "2"])
        .output()
        .expect("qprobe");
    let (peer, counts) = spread(
        from_host.status.success(),
        String::from_utf8_lossy(&from_host.stdout).trim(),
    );
    assert_eq!(peer, target, "the host's socket sees the VIP");
    assert_eq!(counts, [(ip.clone(), 2)].into(), "the host reached the pod");
    // Balanced locally: A's pod for A's quadrants, nothing for B's.
    let (ok, line) = nodes.a.probe(Quadrant::Pg, &["tcp-spread", &near, "2"]);
    assert_eq!(spread(ok, &line).1, [(ip.clone(), 2)].into(), "A's own pod");
    let (ok, line) = nodes.b.probe(Quadrant::Pg, &["tcp-connect", &near, "500"]);
    assert!(
        !ok && line == "err ECONNREFUSED",
        "no pod of B's behind the local service: {line}"
    );
    let refused = endpoints_refused(&nodes.a);
    assert_eq!(
        refused,
        ["api", "near"]
            .map(|s| [
                format!("{s}: {a_dx}:8080 (dx here, not px)"),
                format!("{s}: 192.0.2.10:8080 (world here, not px)"),
            ])
            .concat(),
        "{refused:?}"
    );
    let (ok, line) = nodes
        .a
        .probe(Quadrant::Dx, &["tcp-connect", &target, "500"]);
    assert!(
        !ok && line == "err EPERM",
        "the policy still decides: {line}"
    );

    api.put_endpoint_slice(
        "shop",
        "api-1",
        "api",
        &serde_json::json!([{ "port": 8080, "protocol": "TCP" }]),
        &serde_json::json!([endpoint(&ip, false)]),
    );
    until_remote(&nodes.a, "the pod no longer ready", <[_]>::is_empty);
    let (ok, line) = nodes
        .a
        .probe(Quadrant::Pg, &["tcp-connect", &target, "500"]);
    assert!(
        !ok && line == "err ECONNREFUSED",
        "no endpoint left: {line}"
    );
    pod.remove();
}

/// A PX pod on node A (the reference plugins and `quadrant-cni`), its network routed to A from
/// B's namespace (as a cluster's network routes it; what no pod takes any more goes nowhere),
/// running `tcp-whoami` on a port.
struct ServingPod {
    ip: String,
    rt: quadrant_tests::cni::Runtime,
    list: Value,
    attachment: quadrant_tests::cni::Attachment,
    _server: Killed,
    _routes: Undo,
    pod: Pod,
}

impl ServingPod {
    fn on_a(nodes: &Nodes, port: u16) -> Self {
        let mut rt = pods_runtime(QPROBE);
        let list = conflist(&nodes.a, None);
        let pod = Pod::new(&nodes.a, "web");
        let attachment = pod.attachment(Some("px"));
        let result = rt.add(&list, &attachment).expect("ADD");
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .expect("the pod's address")
            .to_owned();
        let pods_net = subnet(&nodes.a);
        let routes = blackhole(&pods_net);
        run(&[
            "ip",
            "-n",
            &nodes.link.netns,
            "route",
            "replace",
            &pods_net,
            "via",
            &nodes.ips[0].to_string(),
        ]);
        let mut server = Killed(
            Command::new("ip")
                .args(["netns", "exec", &pod.netns, QPROBE, "tcp-whoami"])
                .arg(format!("0.0.0.0:{port}"))
                .stdout(Stdio::piped())
                .spawn()
                .expect("the pod's server"),
        );
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.0.stdout.take().expect("stdout")),
            &mut line,
        );
        assert!(line.starts_with("listening"), "{line}");
        Self {
            ip,
            rt,
            list,
            attachment,
            _server: server,
            _routes: routes,
            pod,
        }
    }

    /// DEL, as the runtime calls it when the pod goes.
    fn remove(mut self) {
        self.rt.del(&self.list, &self.attachment).expect("DEL");
    }
}
