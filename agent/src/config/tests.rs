//! Tests of the configuration: the embedded default, merging, and every error naming its field.

use dataplane_common::{
    Identity,
    policy::{PROTO_TCP, PROTO_UDP, PortRange},
};

use super::*;

fn with(extra: &str) -> Result<Config, ConfigError> {
    let base = "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.1.2.0/24 }\n  pg: { prefix: 10.1.3.0/24 }\n";
    Config::from_yaml(&format!("{base}{extra}"), "test")
}

fn err(extra: &str) -> String {
    with(extra).unwrap_err().to_string()
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded();
    assert!(
        c.policy.is_empty(),
        "the default matrix lives in the Rego bundle"
    );
    assert_eq!(c.policy_dir, None);
    let dx = c.addrs(Quadrant::Dx);
    assert_eq!(dx.gateway, Ipv4Addr::new(10, 240, 0, 1));
    assert_eq!(dx.workload, Ipv4Addr::new(10, 240, 0, 2));
    assert_eq!(c.host_iface(Quadrant::Pg), "qh-pg");
    assert_eq!(c.netns(Quadrant::Px), "quadrant-px");
}

#[test]
fn rules_merge_ports_and_expand_lists() {
    let c = with("policy:\n  - { from: [dx, dg], to: px, protocols: [tcp], ports: [443, \"8000-8080\"] }\n  - { from: dx, to: px, protocols: [tcp], ports: [22] }\n").unwrap();
    let p = c.compile_policy().unwrap();
    assert_eq!(
        p[&(Identity::Dx, Identity::Px, PROTO_TCP)],
        vec![
            PortRange { lo: 443, hi: 443 },
            PortRange { lo: 8000, hi: 8080 },
            PortRange { lo: 22, hi: 22 }
        ]
    );
    assert_eq!(p[&(Identity::Dg, Identity::Px, PROTO_TCP)].len(), 2);
    assert!(!p.contains_key(&(Identity::Dx, Identity::Px, PROTO_UDP)));
}

#[test]
fn bad_input_names_the_field() {
    assert!(
        err("policy:\n  - { from: dx, to: prod }\n")
            .contains("policy[0].to: unknown identity \"prod\"")
    );
    assert!(
        err("policy:\n  - { from: dx, to: px, protocols: [sctp] }\n")
            .contains("policy[0].protocols[0]")
    );
    assert!(
        err("policy:\n  - { from: dx, to: px, ports: [\"90-80\"] }\n")
            .contains("ends before it starts")
    );
    assert!(
        err("policy:\n  - { from: dx, to: px, ports: [\"http\"] }\n")
            .contains("policy[0].ports[0]")
    );
    assert!(
        err("policy:\n  - { from: dx, to: px, protocols: [icmp], ports: [1] }\n")
            .contains("icmp has no ports")
    );
    assert!(
        err("policy:\n  - { from: dx, to: px, color: red }\n").contains("unknown field `color`")
    );
    assert!(err("instance: \"a b\"\n").contains("instance"));
    assert!(err("interface_prefix: abcdefghijklm\n").contains("interface_prefix"));
    assert!(err("bpffs: relative/dir\n").contains("bpffs"));
    assert!(err("identity: { trust_domain: \"Bad Domain\" }\n").contains("identity.trust_domain"));
    assert!(err("identity: { svid_ttl_secs: 1 }\n").contains("identity.svid_ttl_secs"));
    assert!(err("identity: { ca_dir: ca }\n").contains("identity.ca_dir"));
    assert!(
        err("xdp_mode: turbo\n").contains("xdp_mode: unknown variant `turbo`"),
        "{}",
        err("xdp_mode: turbo\n")
    );
    assert_eq!(
        with("xdp_mode: off\n").unwrap().xdp_mode,
        XdpAttachMode::Off
    );
    assert_eq!(with("").unwrap().xdp_mode, XdpAttachMode::Generic);
    let many = (1..=9)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        err(&format!(
            "policy:\n  - {{ from: dx, to: px, protocols: [tcp], ports: [{many}] }}\n"
        ))
        .contains("more than 8 port ranges")
    );
}

#[test]
fn prefixes_are_checked() {
    let overlap = Config::from_yaml(
        "quadrants:\n  dx: { prefix: 10.1.0.0/16 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(
        overlap.contains("quadrants.dg.prefix") && overlap.contains("overlaps dx"),
        "{overlap}"
    );
    let missing = Config::from_yaml("quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n", "t")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("quadrants.dg: missing"), "{missing}");
    let hostbits = Config::from_yaml(
        "quadrants:\n  dx: { prefix: 10.1.0.5/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(hostbits.contains("did you mean 10.1.0.0/24"), "{hostbits}");
    let unknown = Config::from_yaml(
        "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n  qa: { prefix: 10.4.0.0/24 }\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(unknown.contains("quadrants.qa"), "{unknown}");
}

#[test]
fn instances_and_services_are_checked_and_named() {
    let base = "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n";
    let with =
        |px: &str, services: &str| Config::from_yaml(&format!("{base}  px: {px}\n{services}"), "t");
    let c = with(
        "{ prefix: 10.2.0.0/24, instances: 3, capacity: { cpu: 0.2, memory_bytes: 268435456 } }",
        "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.2.0.100 }\n",
    )
    .unwrap();
    assert_eq!(c.instances(Quadrant::Px), 3);
    assert_eq!(c.instances(Quadrant::Dx), 1);
    let px2 = InstanceRef::new(Quadrant::Px, 2);
    assert_eq!(px2.name(), "px-2");
    assert_eq!(c.instance_netns(px2), "quadrant-px-2");
    assert_eq!(c.instance_iface(px2), "qh-px-2");
    assert_eq!(c.instance_addr(px2).to_string(), "10.2.0.4");
    assert_eq!(
        c.instance_cgroup_dir(px2),
        c.cgroup_parent().join("px-2"),
        "beside the quadrant's, at the same level"
    );
    let px0 = InstanceRef::new(Quadrant::Px, 0);
    assert_eq!(c.instance_netns(px0), c.netns(Quadrant::Px));
    assert_eq!(c.instance_addr(px0), c.addrs(Quadrant::Px).workload);
    assert_eq!(c.instance_of_addr(c.instance_addr(px2)), Some(px2));
    assert_eq!(c.capacity(Quadrant::Px).weight(), 200);
    assert_eq!(
        c.capacity(Quadrant::Px).cpu_max().as_deref(),
        Some("2000 10000")
    );
    assert_eq!(c.capacity(Quadrant::Dx).weight(), UNLIMITED_WEIGHT);
    assert_eq!(c.services[0].proto(), PROTO_TCP);
    assert!(c.services[0].cluster_wide(), "cluster-wide by default");
}

#[test]
fn bad_instances_and_services_are_refused_naming_the_field() {
    let base = "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n";
    let with =
        |px: &str, services: &str| Config::from_yaml(&format!("{base}  px: {px}\n{services}"), "t");
    for (px, services, expect) in [
        (
            "{ prefix: 10.2.0.0/24, instances: 0 }",
            "",
            "quadrants.px.instances: 0 is outside 1..=16",
        ),
        (
            "{ prefix: 10.2.0.0/24, instances: 17 }",
            "",
            "outside 1..=16",
        ),
        (
            "{ prefix: 10.2.0.0/30, instances: 2 }",
            "",
            "use /27 or larger",
        ),
        (
            "{ prefix: 10.2.0.0/24, capacity: { cpu: 0.05 } }",
            "",
            "quadrants.px.capacity.cpu: 0.05 is outside 0.1..=1024",
        ),
        (
            "{ prefix: 10.2.0.0/24, capacity: { memory_bytes: 1024 } }",
            "",
            "below 4 MiB",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.2.0.5 }\n",
            "services[0].vip: 10.2.0.5 is (or may become) the address of instance 3 of px",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.2.0.1 }\n",
            "is px's gateway",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: qa, port: 8080, vip: 10.9.0.1 }\n",
            "services[0].quadrant",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.9.0.1, \
             internal_traffic_policy: node }\n",
            "services[0].internal_traffic_policy: \"node\": expected cluster or local",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.9.0.1, \
             kubernetes_service: shop/api }\n",
            "services[0].kubernetes_service: needs peers.kubernetes",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.9.0.1, \
             kubernetes_service: Shop/api }\n",
            "services[0].kubernetes_service: \"Shop/api\": expected namespace/name",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.9.0.1, protocol: sctp }\n",
            "services[0].protocol",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 8080, vip: 10.9.0.1, affinity: ip }\n",
            "services[0].affinity: \"ip\": expected none or workload",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: api, quadrant: px, port: 80, vip: 10.9.0.1 }\n  - { name: api, quadrant: px, port: 81, vip: 10.9.0.2 }\n",
            "services[1].name: \"api\" is named twice",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: a, quadrant: px, port: 80, vip: 10.9.0.1 }\n  - { name: b, quadrant: px, port: 80, vip: 10.9.0.2 }\n",
            "services[1].port: px port 80 (tcp) already serves \"a\"",
        ),
        (
            "{ prefix: 10.2.0.0/24 }",
            "services:\n  - { name: a, quadrant: px, port: 80, vip: 10.9.0.1 }\n  - { name: b, quadrant: pg, port: 80, vip: 10.9.0.1 }\n",
            "services[1].vip: 10.9.0.1:80 (tcp) is already service \"a\"'s",
        ),
    ] {
        let e = with(px, services).unwrap_err().to_string();
        assert!(e.contains(expect), "{px} {services}: {e}");
    }
}

#[test]
fn peers_are_checked() {
    use std::fmt::Write as _;
    let quadrants = "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n";
    let with =
        |peers: &str| Config::from_yaml(&format!("instance: n1\n{quadrants}peers:\n{peers}"), "t");
    let c = with("  listen: 10.0.0.1:7470\n  nodes:\n    - { name: n2, address: 10.0.0.2:7470 }\n")
        .unwrap();
    assert_eq!(c.peers.nodes[0].name, "n2");
    assert!(c.peers.routes, "routes are on unless turned off");
    for (yaml, want) in [
        (
            "  nodes:\n    - { name: n1, address: 10.0.0.2:7470 }\n",
            "peers.nodes[0].name: \"n1\" is this agent's own instance",
        ),
        (
            "  nodes:\n    - { name: n2, address: 10.0.0.2:7470 }\n    - { name: n2, address: 10.0.0.3:7470 }\n",
            "peers.nodes[1].name: \"n2\" is listed twice",
        ),
        (
            "  nodes:\n    - { name: n2, address: 0.0.0.0:7470 }\n",
            "peers.nodes[0].address",
        ),
        (
            "  nodes:\n    - { name: \"n 2\", address: 10.0.0.2:7470 }\n",
            "1-253 characters",
        ),
        (
            "  nodes:\n    - { name: \"-n2\", address: 10.0.0.2:7470 }\n",
            "begin and end with a letter or digit",
        ),
        ("  kubernetes: {}\n", "peers.kubernetes: needs peers.listen"),
        (
            "  listen: 10.0.0.1:7470\n  kubernetes: { node_name: \"a..b\" }\n",
            "peers.kubernetes.node_name",
        ),
        (
            "  listen: 10.0.0.1:0\n",
            "peers.listen: 10.0.0.1:0 needs a port",
        ),
        ("  nodes: []\n  extra: 1\n", "unknown field `extra`"),
    ] {
        let err = with(yaml).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}: {err}");
    }
    let mut many = String::new();
    for i in 0..=MAX_PEERS {
        let _ = writeln!(
            many,
            "    - {{ name: p{i}, address: 10.0.1.{}:7470 }}",
            i + 1
        );
    }
    let err = with(&format!("  nodes:\n{many}")).unwrap_err().to_string();
    assert!(err.contains("at most 14"), "{err}");
}

#[test]
fn kubernetes_peers_are_checked() {
    let quadrants = "quadrants:\n  dx: { prefix: 10.1.0.0/24 }\n  dg: { prefix: 10.1.1.0/24 }\n  px: { prefix: 10.2.0.0/24 }\n  pg: { prefix: 10.3.0.0/24 }\n";
    let with =
        |peers: &str| Config::from_yaml(&format!("instance: n1\n{quadrants}peers:\n{peers}"), "t");
    let k = with(
        "  listen: 10.0.0.1:7470\n  kubernetes: { node_name: ip-10-0-0-1.eu-west-1.compute.internal, kubeconfig: /etc/kube.yaml }\n",
    )
    .unwrap();
    let k = k.peers.kubernetes.expect("kubernetes");
    assert_eq!(
        k.node().as_deref(),
        Ok("ip-10-0-0-1.eu-west-1.compute.internal")
    );
    // One configuration for every node: a listed node takes its block's quarters.
    let shared = |node: &str| {
        with(&format!(
            "  listen: 0.0.0.0:7470\n  kubernetes:\n    node_name: {node}\n    node_prefixes:\n      w-1: 10.241.0.0/22\n      w-2: 10.241.4.0/22\n"
        ))
    };
    let w2 = shared("w-2").unwrap();
    let got: Vec<String> = ["dx", "dg", "px", "pg"]
        .iter()
        .map(|q| w2.quadrants[*q].prefix.to_string())
        .collect();
    assert_eq!(
        got,
        [
            "10.241.4.0/24",
            "10.241.5.0/24",
            "10.241.6.0/24",
            "10.241.7.0/24"
        ]
    );
    let w9 = shared("w-9").unwrap();
    assert_eq!(
        w9.quadrants["px"].prefix.to_string(),
        "10.2.0.0/24",
        "a node not listed keeps quadrants.*.prefix"
    );
    for (blocks, want) in [
        (
            "      w-1: 10.241.0.0/22\n      w-2: 10.241.2.0/23\n",
            "node_prefixes.w-2: 10.241.2.0/23 overlaps w-1's 10.241.0.0/22",
        ),
        ("      w-1: 10.241.0.0/29\n", "at most /28"),
    ] {
        let err = with(&format!(
            "  listen: 0.0.0.0:7470\n  kubernetes:\n    node_name: w-1\n    node_prefixes:\n{blocks}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "{blocks}: {err}");
    }
}

/// The configuration the Kubernetes manifests carry (`manifests/kubernetes/configmap.yaml`,
/// rendered by `cargo xtask deploy render`) is one the agent takes.
#[test]
fn the_kubernetes_config_map_holds_a_valid_configuration() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/kubernetes/configmap.yaml"
    );
    let cm: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("configmap")).expect("yaml");
    let text = cm["data"]["config.yaml"].as_str().expect("config.yaml");
    let c = Config::from_yaml(text, path).expect("a valid configuration");
    assert!(c.cni.install);
    assert_eq!(
        c.metrics.listen,
        Some("0.0.0.0:9965".parse().expect("address"))
    );
}
