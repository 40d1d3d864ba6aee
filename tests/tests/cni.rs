//! CNI chaining without a container runtime: a conflist of Debian's reference `ptp` plugin with
//! `host-local` IPAM and `quadrant-cni` runs the way libcni runs it (`quadrant_tests::cni`)
//! for "pods" that are network namespaces of the test. A pod gets its address from host-local,
//! the quadrant programs go on its host veth, its traffic obeys the quadrant matrix, CHECK finds
//! a missing attachment, DEL twice leaves nothing, a DEL while no agent runs is carried out by
//! the next agent, and the spec's error codes come back for bad input. Needs root and
//! `containernetworking-plugins` (installed by `cargo xtask setup`).

use std::{path::PathBuf, process::Command};

use dataplane_common::Quadrant;
use quadrant_tests::{
    cni::{Pod, Runtime, conflist, in_netns, pods_runtime, subnet},
    harness::{Instance, test_config},
};
use serde_json::{Value, json};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn runtime() -> Runtime {
    pods_runtime(QPROBE)
}

fn pods(inst: &Instance) -> Vec<Value> {
    let out = inst.quadrant(&["pods", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("pods JSON")
}

/// The hooks of a pod's programs, as `quadrant pods` lists them.
fn hooks_of(pod: &Value) -> Vec<&str> {
    pod["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|h| h["hook"].as_str())
        .collect()
}

/// The pod is DX: it reaches DG, not PX; DX reaches it, PX does not; its drops are flow
/// events with its address as DX's.
fn traffic_obeys_the_matrix_as_dx(inst: &mut Instance, pod: &Pod, ip: &str) {
    let _dg = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7301"]);
    let _px = inst.serve(Quadrant::Px, &["tcp-echo", "0.0.0.0:7302"]);
    let qprobe = inst.qprobe.clone();
    assert!(pod.connect(&qprobe, &format!("{}:7301", inst.addr(Quadrant::Dg))));
    assert!(!pod.connect(&qprobe, &format!("{}:7302", inst.addr(Quadrant::Px))));
    let listener = std::thread::spawn({
        let netns = pod.netns.clone();
        let qprobe = qprobe.clone();
        move || {
            in_netns(
                &netns,
                &["timeout", "2", &qprobe, "tcp-echo", "0.0.0.0:7303"],
            )
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (ok, line) = inst.probe(Quadrant::Px, &["tcp-connect", &format!("{ip}:7303"), "500"]);
    assert!(!ok, "PX reached a DX pod: {line}");
    let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{ip}:7303"), "500"]);
    assert!(ok, "DX did not reach a DX pod: {line}");
    let _ = listener.join();
    // Its drops are flow events with the pod's address as DX's.
    let out = inst.quadrant(&[
        "observe",
        "--output",
        "json",
        "--verdict",
        "dropped",
        "--last",
        "1000",
    ]);
    let from_pod = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|f| {
            f["flow"]["IP"]["source"] == ip && f["flow"]["source"]["labels"][0] == "quadrant:dx"
        });
    assert!(
        from_pod,
        "no drop of the pod's traffic to PX in the flow events"
    );
    let name = format!("shop/{}", pod.netns);
    for (filter, expected) in [(name.as_str(), true), ("shop/another", false)] {
        let out = inst.quadrant(&[
            "observe", "--output", "json", "--pod", filter, "--last", "1000",
        ]);
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|f| f["flow"]["source"]["pod_name"] == pod.netns.as_str());
        assert_eq!(found, expected, "observe --pod {filter}");
    }
}

#[test]
fn a_chained_pod_is_enforced_as_its_quadrant_and_leaves_nothing() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let mut rt = runtime();
    let list = conflist(&inst, None);
    let pod = Pod::new(&inst, "pod1");
    let a = pod.attachment(Some("dx"));
    let result = rt.add(&list, &a).expect("ADD");
    // The previous result, unchanged: ptp's interfaces and host-local's address.
    assert_eq!(result["cniVersion"], "1.0.0");
    let address = result["ips"][0]["address"]
        .as_str()
        .expect("an address")
        .to_owned();
    let ip = address.split('/').next().expect("ip").to_owned();
    assert!(address.starts_with(&subnet(&inst)[..9]), "{address}");
    let attached = pods(&inst);
    assert_eq!(attached.len(), 1, "{attached:?}");
    let p = &attached[0];
    assert_eq!(p["quadrant"], "dx");
    assert_eq!(p["addresses"][0], format!("{ip}/24"));
    let hooks = hooks_of(p);
    assert_eq!(hooks, ["xdp", "tc_ingress", "tc_egress"]);
    let veth = p["host_ifname"].as_str().expect("veth").to_owned();
    // The kernel's view: the XDP program on the veth (the tc programs show in the flow
    // events: only the pod's veth sees its packets leave at tc ingress).
    let out = Command::new("bpftool")
        .args(["net", "show", "dev", &veth])
        .output()
        .expect("bpftool");
    let net = String::from_utf8_lossy(&out.stdout);
    assert!(
        net.contains(&format!("{veth}(")) && net.contains("generic id"),
        "{net}"
    );

    traffic_obeys_the_matrix_as_dx(&mut inst, &pod, &ip);

    rt.check(&list, &a).expect("CHECK");
    // The attachment taken away behind the runtime's back: CHECK fails with our code.
    let out = inst.quadrant(&["pods"]);
    assert!(out.status.success());
    let client = quadrant::control::Client::new(inst.config.socket_path());
    assert!(client.pod_del(&a.container_id, &a.ifname).expect("pod_del"));
    let e = rt
        .check(&list, &a)
        .expect_err("CHECK without the attachment");
    assert_eq!(
        (e.plugin.as_str(), e.code()),
        ("quadrant-cni", 100),
        "{e:?}"
    );
    assert!(e.text().contains("not attached"), "{e:?}");

    // The runtime's answer to a failed CHECK: DEL (ours finds nothing to detach: no error).
    rt.del(&list, &a).expect("DEL");
    rt.del(&list, &a).expect("DEL again");
    assert!(pods(&inst).is_empty());
    let pin = inst.config.bpffs_dir().join("links").join("pods");
    let left: Vec<_> = std::fs::read_dir(&pin).into_iter().flatten().collect();
    assert!(
        left.is_empty(),
        "links left under {}: {left:?}",
        pin.display()
    );
    let links = Command::new("ip")
        .args(["-j", "link"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("\"{veth}\"")),
        "veth {veth} left"
    );
    drop(inst.down());
}

#[test]
fn a_del_without_an_agent_is_carried_out_by_the_next_one_and_pods_outlive_an_upgrade() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let mut rt = runtime();
    let list = conflist(&inst, Some("dg"));
    let stays = Pod::new(&inst, "stays");
    let goes = Pod::new(&inst, "goes");
    let (a_stays, a_goes) = (stays.attachment(None), goes.attachment(None));
    rt.add(&list, &a_stays).expect("ADD");
    rt.add(&list, &a_goes).expect("ADD");
    assert_eq!(pods(&inst).len(), 2);
    assert!(
        pods(&inst).iter().all(|p| p["quadrant"] == "dg"),
        "the default quadrant"
    );

    inst.stop_keeping_dataplane();
    // No agent: STATUS says so, DEL succeeds and is queued.
    let e = rt.status(&list, 1).expect_err("STATUS without an agent");
    assert_eq!(e.code(), 50, "{e:?}");
    rt.del(&list, &a_goes).expect("DEL without an agent");
    inst.start_agent();
    rt.status(&list, 1).expect("STATUS");
    let now = pods(&inst);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0]["container_id"], a_stays.container_id);
    // The pod that stayed is enforced by the new agent's programs: as DG, it reaches DG (not
    // DX: DG opens nothing towards DX) and not PG.
    let _dg = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7304"]);
    let _pg = inst.serve(Quadrant::Pg, &["tcp-echo", "0.0.0.0:7305"]);
    let qprobe = inst.qprobe.clone();
    assert!(stays.connect(&qprobe, &format!("{}:7304", inst.addr(Quadrant::Dg))));
    assert!(!stays.connect(&qprobe, &format!("{}:7305", inst.addr(Quadrant::Pg))));
    rt.check(&list, &a_stays).expect("CHECK after the upgrade");
    // GC with no valid attachment detaches the one left.
    rt.gc(&list, 1, &[]).expect("GC");
    assert!(pods(&inst).is_empty());
    rt.del(&list, &a_stays).expect("DEL after GC");
    drop(inst.down());
}

#[test]
fn bad_input_gets_the_spec_error_codes() {
    let inst = Instance::up(test_config(None), QPROBE);
    let mut rt = runtime();
    let pod = Pod::new(&inst, "bad");
    // No quadrant anywhere: 7, and ptp's ADD is undone by the runtime's DEL.
    let list = conflist(&inst, None);
    let e = rt
        .add(&list, &pod.attachment(None))
        .expect_err("no quadrant");
    assert_eq!((e.plugin.as_str(), e.code()), ("quadrant-cni", 7), "{e:?}");
    assert!(e.text().contains("quadrant.io/quadrant"), "{e:?}");
    rt.del(&list, &pod.attachment(None)).expect("DEL");
    // An unknown quadrant: 7, named.
    let e = rt.add(&list, &pod.attachment(Some("zz"))).expect_err("zz");
    assert_eq!(e.code(), 7);
    assert!(
        e.text().contains("\\\"zz\\\"") || e.text().contains("\"zz\""),
        "{e:?}"
    );
    rt.del(&list, &pod.attachment(Some("zz"))).expect("DEL");
    // A dual-stack network: the pod's IPv6 address could carry nothing (the programs judge
    // IPv4 only), so the pod is refused with 7, naming it, and nothing is attached.
    let mut dual = list.clone();
    let n = &inst.config.instance[2..];
    dual["plugins"][0]["ipam"]["ranges"] = json!([
        [{"subnet": subnet(&inst)}],
        [{"subnet": format!("fd00:243:{n}::/64")}],
    ]);
    if let Some(ipam) = dual["plugins"][0]["ipam"].as_object_mut() {
        ipam.remove("subnet");
    }
    let e = rt
        .add(&dual, &pod.attachment(Some("dx")))
        .expect_err("dual stack");
    assert_eq!((e.plugin.as_str(), e.code()), ("quadrant-cni", 7), "{e:?}");
    assert!(e.text().contains("IPv6 address fd00:243:"), "{e:?}");
    assert!(pods(&inst).is_empty(), "nothing attached");
    rt.del(&dual, &pod.attachment(Some("dx"))).expect("DEL");
    // Alone, without a primary plugin: no prevResult, 7.
    let alone = json!({"cniVersion": "1.0.0", "name": "alone", "plugins": [list["plugins"][1]]});
    let e = rt
        .add(&alone, &pod.attachment(Some("dx")))
        .expect_err("alone");
    assert_eq!(e.code(), 7);
    assert!(e.text().contains("prevResult"), "{e:?}");
    // VERSION.
    let v = rt.version(&list, 1);
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    assert!(pods(&inst).is_empty());
}

/// With `cni.install`, the agent chains itself into the primary conflist at start and takes
/// only its own entry out at `down`.
#[test]
fn the_agent_chains_itself_in_and_out() {
    let mut config = test_config(None);
    let dir = PathBuf::from(format!("/run/quadrant-test/{}-net.d", config.instance));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("conf dir");
    let primary = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.250.0.0/24"}}
    ]});
    std::fs::write(dir.join("10-k8s.conflist"), primary.to_string()).expect("conflist");
    config.cni.install = true;
    config.cni.conf_dir.clone_from(&dir);
    config.cni.quadrant = Some("pg".into());
    let mut inst = Instance::up(config, QPROBE);
    let read = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("10-k8s.conflist")).expect("read"))
            .expect("JSON")
    };
    let chained = read();
    assert_eq!(chained["plugins"][1]["type"], "quadrant-cni", "{chained}");
    assert_eq!(chained["plugins"][1]["quadrant"], "pg");
    assert_eq!(
        chained["plugins"][1]["socket"],
        inst.config.socket_path().display().to_string()
    );
    assert!(inst.down().status.success());
    assert_eq!(read(), primary, "only our entry went");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A repeated ADD for the same container and interface but another veth moves the programs to
/// the new veth (the old pinned links are not switched on the old one, which would leave the
/// new veth unguarded).
#[test]
fn a_repeated_add_on_another_veth_moves_the_programs() {
    let inst = Instance::up(test_config(None), QPROBE);
    let n = inst.config.instance.clone();
    let (a, b) = (format!("{n}-va"), format!("{n}-vb"));
    for v in [&a, &b] {
        let _ = Command::new("ip").args(["link", "del", v]).output();
    }
    let ok = Command::new("ip")
        .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
        .status()
        .expect("ip link add");
    assert!(ok.success());
    for v in [&a, &b] {
        assert!(
            Command::new("ip")
                .args(["link", "set", v, "up"])
                .status()
                .expect("up")
                .success()
        );
    }
    let ifindex = |v: &str| -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{v}/ifindex"))
            .expect("ifindex")
            .trim()
            .parse()
            .expect("number")
    };
    let spec = |v: &str| quadrant::pods::PodSpec {
        container_id: format!("c-{n}-moved"),
        ifname: "eth0".into(),
        netns: String::new(),
        host_ifname: v.to_owned(),
        host_ifindex: ifindex(v),
        quadrant: "dx".into(),
        addresses: vec![format!("10.243.{}.9/24", &n[2..]).parse().expect("address")],
        pod: None,
        cgroup: None,
    };
    let client = quadrant::control::Client::new(inst.config.socket_path());
    client.pod_add(spec(&a)).expect("first ADD");
    client.pod_add(spec(&b)).expect("ADD again on another veth");
    let xdp_on = |v: &str| {
        let out = Command::new("bpftool")
            .args(["net", "show", "dev", v])
            .output()
            .expect("bpftool");
        String::from_utf8_lossy(&out.stdout).contains("generic id")
    };
    assert!(xdp_on(&b), "the new veth has no XDP program");
    assert!(!xdp_on(&a), "the old veth kept its XDP program");
    let listed = pods(&inst);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["host_ifname"], b.as_str());
    assert!(
        client
            .pod_del(&format!("c-{n}-moved"), "eth0")
            .expect("DEL")
    );
    let _ = Command::new("ip").args(["link", "del", &a]).output();
}

/// A pod whose runtime names its cgroup (`runtimeConfig.cgroupPath`, a kubepods hierarchy three
/// levels deep): the cgroup programs go on it and it is registered as DX's, so from inside the
/// pod's cgroup a connect to PX is refused at once by `connect4` (`EPERM`) — the same connect
/// from the pod's namespace outside that cgroup is dropped at the veth and times out — and DG
/// stays reachable; DEL takes the cgroup programs and the registration away again.
#[test]
fn a_pod_with_its_cgroup_is_judged_at_connect() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let mut rt = runtime();
    let mut list = conflist(&inst, None);
    list["plugins"][1]["capabilities"]["cgroupPath"] = json!(true);
    let pod = Pod::new(&inst, "pod-cg");
    let kubepods = format!("kubepods-{}", inst.config.instance);
    let pod_cgroup = inst
        .config
        .cgroup2
        .join(&kubepods)
        .join("burstable")
        .join("pod1234");
    std::fs::create_dir_all(&pod_cgroup).expect("the pod's cgroup");
    let mut a = pod.attachment(Some("dx"));
    a.runtime_config["cgroupPath"] = json!(format!("/{kubepods}/burstable/pod1234"));
    rt.add(&list, &a).expect("ADD");
    let attached = pods(&inst);
    let p = &attached[0];
    assert!(p["cgroup_id"].as_u64().is_some(), "{p}");
    let hooks = hooks_of(p);
    assert!(
        hooks.contains(&"connect4") && hooks.contains(&"sendmsg4") && hooks.contains(&"xdp"),
        "{hooks:?}"
    );

    let _dg = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7311"]);
    let _px = inst.serve(Quadrant::Px, &["tcp-echo", "0.0.0.0:7312"]);
    let (dg, px) = (
        format!("{}:7311", inst.addr(Quadrant::Dg)),
        format!("{}:7312", inst.addr(Quadrant::Px)),
    );
    let qprobe = inst.qprobe.clone();
    let procs = pod_cgroup.join("cgroup.procs");
    let from_cgroup = |to: &str| {
        let script = format!(
            "echo $$ > {} && exec {qprobe} tcp-connect {to} 500",
            procs.display()
        );
        let out = in_netns(&pod.netns, &["sh", "-c", &script]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(
        from_cgroup(&dg).starts_with("ok"),
        "DG from the pod's cgroup"
    );
    let refused = from_cgroup(&px);
    assert!(refused.contains("EPERM"), "refused at connect(): {refused}");
    let outside = in_netns(&pod.netns, &[&qprobe, "tcp-connect", &px, "500"]);
    let outside = String::from_utf8_lossy(&outside.stdout).trim().to_owned();
    assert!(
        !outside.starts_with("ok") && !outside.contains("EPERM"),
        "outside the cgroup only the veth judges: {outside}"
    );

    rt.del(&list, &a).expect("DEL");
    assert!(pods(&inst).is_empty());
    let out = Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(&pod_cgroup)
        .output()
        .expect("bpftool");
    let left = String::from_utf8_lossy(&out.stdout);
    assert!(
        !left.contains("quadrant_"),
        "programs left on the pod's cgroup: {left}"
    );
    for dir in [
        pod_cgroup.clone(),
        inst.config.cgroup2.join(&kubepods).join("burstable"),
        inst.config.cgroup2.join(&kubepods),
    ] {
        let _ = std::fs::remove_dir(dir);
    }
    drop(inst.down());
}
