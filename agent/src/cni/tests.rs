use std::collections::HashMap;

use serde_json::json;

use super::{
    plugin::{self, run},
    *,
};

fn conf() -> PluginConf {
    PluginConf {
        quadrant: Some("dx".into()),
        socket: "/nonexistent/q.sock".into(),
    }
}

#[test]
fn the_annotation_wins_over_the_default_and_both_must_name_a_quadrant() {
    let annotated = json!({ANNOTATIONS_CAPABILITY: {ANNOTATION: "px", "other": "x"}});
    assert_eq!(quadrant_of(Some(&annotated), &conf()).unwrap(), "px");
    assert_eq!(quadrant_of(None, &conf()).unwrap(), "dx");
    let none = PluginConf {
        quadrant: None,
        ..conf()
    };
    let Failure::Config(m) = quadrant_of(None, &none).unwrap_err() else {
        panic!("not a config error")
    };
    assert!(m.contains(ANNOTATION), "{m}");
    let wrong = json!({ANNOTATIONS_CAPABILITY: {ANNOTATION: "zz"}});
    let Failure::Config(m) = quadrant_of(Some(&wrong), &conf()).unwrap_err() else {
        panic!("not a config error")
    };
    assert!(
        m.contains("unknown quadrant \"zz\"") && m.contains("annotation"),
        "{m}"
    );
}

#[test]
fn the_pod_name_comes_from_cni_args() {
    assert_eq!(
        pod_name("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=x"),
        Some("shop/web-0".into())
    );
    assert_eq!(pod_name("K8S_POD_NAME=web-0"), None);
    assert_eq!(pod_name(""), None);
}

#[test]
fn the_pod_addresses_are_those_of_its_interface() {
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/p"}
        ],
        "ips": [
            {"interface": 1, "address": "10.250.0.5/24", "gateway": "10.250.0.1"},
            {"interface": 0, "address": "10.250.0.1/32"},
            {"interface": 1, "address": "fd00::5/64"}
        ]
    });
    assert_eq!(
        pod_addresses(&prev, "eth0"),
        vec!["10.250.0.5/24".parse::<Ipv4Net>().unwrap()]
    );
    // The pod's IPv6 address refuses the pod; the host side's IPv6 would not.
    let Err(Failure::Config(why)) = pod_ipv4_addresses(&prev, "eth0") else {
        panic!("a dual-stack pod is refused");
    };
    assert!(why.contains("IPv6 address fd00::5/64"), "{why}");
    let mut v4_only = prev.clone();
    v4_only["ips"][2]["interface"] = json!(0);
    assert_eq!(
        pod_ipv4_addresses(&v4_only, "eth0").ok(),
        Some(vec!["10.250.0.5/24".parse::<Ipv4Net>().unwrap()])
    );
}

fn env(vars: &[(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<&str, &str> = vars.iter().copied().collect();
    move |k| vars.get(k).map(|v| (*v).to_owned())
}

#[test]
fn version_lists_what_the_plugin_speaks() {
    let v = run("VERSION", "", env(&[])).unwrap().unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
}

#[test]
fn errors_carry_the_spec_codes() {
    let code = |cmd, stdin: &Value, e: &[(&'static str, &'static str)]| {
        let err = run(cmd, &stdin.to_string(), env(e)).unwrap_err();
        plugin::error_json("1.0.0", &err)["code"].as_u64().unwrap()
    };
    let base = json!({"cniVersion": "1.0.0", "name": "n", "type": "quadrant-cni",
        "socket": "/nonexistent/q.sock", "quadrant": "dx"});
    let ids = [
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/nonexistent"),
    ];
    // No prevResult: 7.
    assert_eq!(code("ADD", &base, &ids), 7);
    // An unknown version: 1.
    let mut old = base.clone();
    old["cniVersion"] = json!("0.2.0");
    assert_eq!(code("ADD", &old, &ids), 1);
    // Not JSON: 6.
    let err = run("ADD", "{", env(&ids)).unwrap_err();
    assert_eq!(u32::from(&err), 6);
    // No container id: 4.
    let mut chained = base.clone();
    chained["prevResult"] = json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []});
    assert_eq!(code("ADD", &chained, &[("CNI_IFNAME", "eth0")]), 4);
    // The namespace is gone: 3.
    assert_eq!(code("ADD", &chained, &ids), 3);
    // No agent: STATUS 50, CHECK 11.
    assert_eq!(code("STATUS", &base, &[]), 50);
    assert_eq!(code("CHECK", &chained, &ids), 11);
    // An unknown command: 4.
    assert_eq!(u32::from(&run("FROB", "", env(&[])).unwrap_err()), 4);
}

#[test]
fn conflists_gain_and_lose_only_our_entry() {
    let dir = std::env::temp_dir().join(format!("quadrant-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.250.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}
    ]});
    std::fs::write(dir.join("10-k8s.conflist"), list.to_string()).unwrap();
    std::fs::write(dir.join("20-other.conflist"), list.to_string()).unwrap();
    let socket = Path::new("/run/quadrant/quadrant.sock");
    let (path, changed) = conflist::install(&dir, Some("dg"), socket).unwrap();
    assert!(changed);
    assert_eq!(path, dir.join("10-k8s.conflist"));
    let (_, again) = conflist::install(&dir, Some("dg"), socket).unwrap();
    assert!(!again, "installing twice changes nothing");
    let now: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let plugins = now["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2]["type"], PLUGIN_TYPE);
    assert_eq!(plugins[2]["quadrant"], "dg");
    assert_eq!(plugins[2]["capabilities"][ANNOTATIONS_CAPABILITY], true);
    assert_eq!(plugins[2]["capabilities"][CGROUP_CAPABILITY], true);
    assert_eq!(
        plugins[0], list["plugins"][0],
        "the others stay as they were"
    );
    let other: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("20-other.conflist")).unwrap())
            .unwrap();
    assert_eq!(other, list, "only the primary conflist is touched");
    assert!(
        conflist::install(&dir, Some("zz"), socket)
            .unwrap_err()
            .contains("zz")
    );
    assert_eq!(conflist::uninstall(&dir).unwrap(), vec![path.clone()]);
    let back: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, list);
    assert!(conflist::uninstall(&dir).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
