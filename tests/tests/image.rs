//! The agent's container image, run as the rendered DaemonSet's pod runs it: the image
//! `cargo xtask deploy image` builds (here with this build's binaries) imported into podman, then
//! the pod's init container and agent container started with the pod's commands, host
//! namespaces, privileges and host-path mounts (`Bidirectional` as `rshared`), the agent's
//! configuration from the rendered ConfigMap. The host paths of the node are mapped to
//! directories of this test (bpffs and `/run/netns` stay the host's), so the agent's mounts
//! must reach the host through the propagation the manifest asks for — quadrants, their
//! cgroups and pins — or the checks from the host fail. As the kubelet does, the agent gets
//! its service account (token, CA, `KUBERNETES_SERVICE_HOST`/`PORT`) for an API server over TLS
//! (the test's, `quadrant_tests::kubeapi`) and its node's name from the downward API; rendered
//! with peers, it reaches the API in-cluster and publishes itself on its Node object.
//!
//! Needs root, podman, runc and debootstrap (`cargo xtask setup` installs them).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use dataplane_common::Quadrant;
use quadrant::config::{KubernetesPeers, PeersConfig, UpstreamConfig};
use quadrant_tests::{
    bounded::{Bounded as _, output_within},
    harness::{Instance, TEST_STATE_DIR, sibling_binary, test_config, upstream_ca},
    kubeapi::KubeApi,
};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const TCP_PORT: &str = "7000";
const TOKEN: &str = "service-account-token";
const ADDRESS: &str = "quadrant.io/peer-address";
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// podman with this machine's settings: `runc` (crun refuses a host with both cgroup
/// hierarchies mounted, as this one has) and no default limits (podman raises the open-files
/// and process limits of its containers, which this machine's root may not: it lacks
/// `CAP_SYS_RESOURCE`).
fn podman(conf: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf).args(["--runtime", "runc"]);
    c
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh(argv: &[&str]) -> Output {
    Command::new(argv[0]).args(&argv[1..]).output_bounded()
}

/// The containers, the image and the shared mount of one run, removed when dropped (after the
/// attached agent went down: declare it first).
struct Pod {
    conf: PathBuf,
    names: Vec<String>,
    image: String,
    run_dir: PathBuf,
}

impl Pod {
    fn clean(&self) {
        for name in &self.names {
            let _ = podman(&self.conf)
                .args(["rm", "--force", "--time", "10", name])
                .output_bounded();
        }
        let _ = Command::new("umount")
            .arg("--recursive")
            .arg(&self.run_dir)
            .output_bounded();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.clean();
        let _ = podman(&self.conf)
            .args(["rmi", "--force", &self.image])
            .output_bounded();
    }
}

/// Where a host path of the node is in this test.
fn host_side(path: &str, base: &Path, run_dir: &Path) -> PathBuf {
    match path {
        "/sys/fs/bpf" | "/run/netns" => path.into(),
        "/run/quadrant" => run_dir.to_owned(),
        "/var/lib/quadrant" => base.join("var-lib"),
        "/etc/cni/net.d" => base.join("cni-conf"),
        "/opt/cni/bin" => base.join("cni-bin"),
        "/etc/quadrant/trust" => base.join("trust"),
        other => panic!("the DaemonSet mounts host path {other}, which this test does not map"),
    }
}

/// `podman run` arguments for container `c` of pod spec `spec`, its volumes at `volumes`, on
/// the node named `node` (the downward API's `spec.nodeName`).
fn run_args(
    spec: &Value,
    c: &Value,
    volumes: &BTreeMap<String, PathBuf>,
    node: &str,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("a variable name");
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some("spec.nodeName")) => node.to_owned(),
            _ => panic!("variable {name} comes from something this test does not provide: {e}"),
        };
        a.push(format!("--env={name}={value}"));
    }
    if spec["hostNetwork"] == true {
        a.extend(["--network".into(), "host".into()]);
    }
    if spec["hostPID"] == true {
        a.extend(["--pid".into(), "host".into()]);
    }
    let security = &c["securityContext"];
    if security["privileged"] == true {
        a.push("--privileged".into());
    }
    for cap in security["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
    {
        a.push(format!("--cap-add={}", cap.as_str().expect("a capability")));
    }
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().expect("a volume name");
        let host = volumes
            .get(name)
            .unwrap_or_else(|| panic!("volume {name} is not in the pod"));
        let mut options = vec!["rbind"];
        if m["readOnly"] == true {
            options.push("ro");
        }
        if m["mountPropagation"] == "Bidirectional" {
            options.push("rshared");
        }
        a.push(format!(
            "--volume={}:{}:{}",
            host.display(),
            m["mountPath"].as_str().expect("a mount path"),
            options.join(",")
        ));
    }
    let command: Vec<&str> = c["command"]
        .as_array()
        .expect("a command")
        .iter()
        .map(|v| v.as_str().expect("an argument"))
        .collect();
    a.push(format!("--entrypoint={}", command[0]));
    a.push(c["image"].as_str().expect("an image").to_owned());
    a.extend(command[1..].iter().map(|s| (*s).to_owned()));
    a
}

/// Background `podman exec`s, ended when dropped.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one pod, built, run, checked and taken down in order"
)]
fn the_daemonsets_pod_runs_the_agent_from_its_image() {
    // The host's view of the agent's paths, then the container's (the manifest's).
    let mut host = test_config(None);
    let n = host.instance.clone();
    let base = PathBuf::from(TEST_STATE_DIR).join(format!("{n}-image"));
    let run_dir = base.join("run");
    let conf = base.join("containers.conf");
    let image = format!("localhost/quadrant-test:{n}");
    let names = vec![format!("{n}-install-cni"), format!("{n}-agent")];
    let pod = Pod {
        conf: conf.clone(),
        names: names.clone(),
        image: image.clone(),
        run_dir: run_dir.clone(),
    };
    pod.clean();
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&run_dir).expect("run dir");
    std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n").expect("containers.conf");
    // The node's /run/quadrant is a shared mount, so what the agent mounts there (its cgroup2)
    // reaches the host; so are bpffs and /run/netns (`ip netns` makes it one).
    let d = run_dir.display().to_string();
    ok(&sh(&["mount", "--bind", &d, &d]), "the run directory bound");
    ok(
        &sh(&["mount", "--make-shared", &d]),
        "the run directory shared",
    );
    let probe_ns = format!("{n}-imgprobe");
    ok(&sh(&["ip", "netns", "add", &probe_ns]), "ip netns add");
    ok(&sh(&["ip", "netns", "del", &probe_ns]), "ip netns del");
    let bpffs = sh(&["stat", "--file-system", "--format=%T", "/sys/fs/bpf"]);
    if !String::from_utf8_lossy(&bpffs.stdout).contains("bpf") {
        ok(
            &sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]),
            "mount bpffs",
        );
    }
    let cni_conf = base.join("cni-conf");
    std::fs::create_dir_all(&cni_conf).expect("cni conf dir");
    let primary = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.250.0.0/24"}}
    ]});
    std::fs::write(cni_conf.join("10-k8s.conflist"), primary.to_string()).expect("conflist");
    host.state_dir.clone_from(&run_dir);
    host.cgroup2 = run_dir.join("cgroup2");
    host.identity.ca_dir = base.join("var-lib/ca");
    host.audit_log = base.join("var-lib/audit.log");
    host.trust_store = base.join("trust");
    host.cni.install = true;
    host.cni.conf_dir.clone_from(&cni_conf);
    let mut inside = host.clone();
    inside.state_dir = "/run/quadrant".into();
    inside.cgroup2 = "/run/quadrant/cgroup2".into();
    inside.identity.ca_dir = "/var/lib/quadrant/ca".into();
    inside.audit_log = "/var/lib/quadrant/audit.log".into();
    inside.trust_store = "/etc/quadrant/trust".into();
    inside.cni.conf_dir = "/etc/cni/net.d".into();
    // The nodes as peers (found through the API); the upstream CA from its Secret.
    let api = KubeApi::start_tls((std::net::Ipv4Addr::LOCALHOST, 0).into(), TOKEN);
    api.add_node(&n, "127.0.0.1");
    let slot: u16 = n.trim_start_matches("qt").parse().expect("slot");
    let peers_at = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 7500 + slot);
    let upstream = upstream_ca(&base.join("upstream"));
    for (c, up) in [
        (&mut host, upstream.clone()),
        (
            &mut inside,
            UpstreamConfig {
                cert: format!("{}/tls.crt", quadrant_deploy::UPSTREAM_DIR).into(),
                key: format!("{}/tls.key", quadrant_deploy::UPSTREAM_DIR).into(),
            },
        ),
    ] {
        c.identity.upstream = Some(up);
        c.peers = PeersConfig {
            listen: Some(peers_at),
            nodes: Vec::new(),
            routes: false,
            kubernetes: Some(KubernetesPeers::default()),
        };
    }

    // The image, from this build's binaries.
    let bin = sibling_binary(QPROBE, "quadrant");
    let built = quadrant_deploy::image::build(&quadrant_deploy::image::Options {
        tag: image.clone(),
        bin_dir: bin.parent().expect("bin dir").to_owned(),
        engine: Some("podman".into()),
        suite: None,
        mirror: "http://deb.debian.org/debian".into(),
        work_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image"),
        save: None,
    })
    .expect("the image builds");
    assert_eq!(built.tag, image);

    // The manifests, with this configuration in the ConfigMap.
    let files = quadrant_deploy::kubernetes::render(&quadrant_deploy::kubernetes::Options {
        namespace: "quadrant-system".into(),
        image: image.clone(),
        config: serde_yaml::to_string(&inside).expect("yaml"),
        metrics_port: quadrant_deploy::METRICS_PORT,
        upstream_secret: Some("quadrant-upstream".into()),
    })
    .expect("render");
    let file = |name: &str| -> Value {
        let text = &files.iter().find(|(f, _)| f == name).expect(name).1;
        serde_yaml::from_str(text).expect("YAML")
    };
    let daemon_set = file("daemonset.yaml");
    let config_map = file("configmap.yaml");
    let spec = &daemon_set["spec"]["template"]["spec"];
    let mut volumes = BTreeMap::new();
    for v in spec["volumes"].as_array().expect("volumes") {
        let name = v["name"].as_str().expect("name").to_owned();
        let dir = if let Some(p) = v["hostPath"]["path"].as_str() {
            host_side(p, &base, &run_dir)
        } else if let Some(secret) = v["secret"]["secretName"].as_str() {
            // A Secret of type kubernetes.io/tls, as `kubectl create secret tls` makes it.
            assert_eq!(secret, "quadrant-upstream");
            let dir = base.join(format!("secret-{name}"));
            std::fs::create_dir_all(&dir).expect("secret dir");
            std::fs::copy(&upstream.cert, dir.join("tls.crt")).expect("tls.crt");
            std::fs::copy(&upstream.key, dir.join("tls.key")).expect("tls.key");
            dir
        } else {
            assert_eq!(v["configMap"]["name"], config_map["metadata"]["name"]);
            let dir = base.join(format!("configmap-{name}"));
            std::fs::create_dir_all(&dir).expect("configmap dir");
            for (key, text) in config_map["data"].as_object().expect("data") {
                std::fs::write(dir.join(key), text.as_str().expect("text")).expect("write");
            }
            dir
        };
        std::fs::create_dir_all(&dir).expect("host path");
        volumes.insert(name, dir);
    }

    // The init container runs to its end first, as the kubelet runs it.
    let init = &spec["initContainers"][0];
    let out = podman(&conf)
        .args(["run", "--rm", "--name", &names[0]])
        .args(run_args(spec, init, &volumes, &inside.instance))
        .output_bounded();
    ok(&out, "the init container");
    let cni = base.join("cni-bin/quadrant-cni");
    let version = Command::new(&cni)
        .env("CNI_COMMAND", "VERSION")
        .output_bounded();
    let version = ok(
        &version,
        "quadrant-cni VERSION, as the init container installed it",
    );
    assert!(version.contains("1.1.0"), "{version}");

    let agent = &spec["containers"][0];
    let config_in_pod = agent["command"]
        .as_array()
        .and_then(|c| c.iter().skip_while(|a| *a != "--config").nth(1))
        .and_then(Value::as_str)
        .expect("the agent's command names its configuration");
    // The test's probe binary, for workloads started in the pod (the one addition to the pod).
    let tools = format!(
        "--volume={}:/opt/quadrant-test:ro",
        Path::new(QPROBE).parent().expect("dir").display()
    );
    // What the kubelet gives every container of a pod with a service account.
    let account = base.join("serviceaccount");
    std::fs::create_dir_all(&account).expect("service account dir");
    std::fs::write(account.join("token"), TOKEN).expect("token");
    std::fs::write(account.join("ca.crt"), api.ca_pem.as_deref().expect("TLS")).expect("ca");
    std::fs::write(account.join("namespace"), "quadrant-system").expect("namespace");
    let kubelet = [
        format!("--volume={}:{SERVICE_ACCOUNT}:ro", account.display()),
        format!("--env=KUBERNETES_SERVICE_HOST={}", api.addr.ip()),
        format!("--env=KUBERNETES_SERVICE_PORT={}", api.addr.port()),
    ];
    let out = output_within(
        podman(&conf)
            .args(["run", "--detach", "--name", &names[1], &tools])
            .args(&kubelet)
            .args(run_args(spec, agent, &volumes, &inside.instance)),
        Duration::from_mins(1),
        &[],
    );
    ok(&out, "the agent container");
    let logs = || {
        let out = podman(&conf).args(["logs", &names[1]]).output_bounded();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let running = || {
        let out = podman(&conf)
            .args(["inspect", "--format", "{{.State.Running}}", &names[1]])
            .output_bounded();
        if String::from_utf8_lossy(&out.stdout).trim() == "true" {
            Ok(())
        } else {
            Err(logs())
        }
    };
    let mut agent_of_pod = Instance::attach(host, QPROBE, running);

    // In-cluster, with its service account: the agent published itself on its Node object.
    let start = std::time::Instant::now();
    loop {
        let on_node = api.annotations(&n);
        if on_node.get(ADDRESS) == Some(&peers_at.to_string()) {
            let prefixes = &on_node["quadrant.io/quadrant-prefixes"];
            let px = format!("px={}", inside.quadrants["px"].prefix);
            assert!(prefixes.contains(&px), "{on_node:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the agent did not publish itself on node {n}: {on_node:?}\nrequests: {:?}\n{}",
            api.requests(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let instances = agent_of_pod.quadrant(&["instances", "--output", "json"]);
    let instances: Value = serde_json::from_slice(&instances.stdout).expect("instances json");
    assert_eq!(instances["kubernetes_error"], Value::Null, "{instances}");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?") && r.contains("watch=true")),
        "{:?}",
        api.requests()
    );

    // Seen from the host: the four quadrants, their readiness, the dataplane's verdicts.
    let status = agent_of_pod.status();
    assert_eq!(status.quadrants.len(), 4, "{status:?}");
    let metrics = status.metrics.expect("the agent serves metrics");
    let ready = get(metrics, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200") || ready.starts_with("HTTP/1.0 200"),
        "{ready}"
    );
    // What the agent mounted in its container reached the host (Bidirectional): the
    // quadrants' network namespaces and its cgroup2 hierarchy with the quadrants' cgroups.
    // (A namespace's file alone would be there without the propagation: it is its mount
    // that makes it one.)
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for q in Quadrant::ALL {
        let name = format!("/run/netns/{}", inside.netns(q));
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(name.as_str())),
            "{name} is not mounted on the host"
        );
        let cgroup = run_dir.join("cgroup2").join(&n).join(q.name());
        assert!(
            cgroup.join("cgroup.procs").is_file(),
            "{} is not on the host",
            cgroup.display()
        );
    }
    // Workloads are started as an operator does on a node (`kubectl exec` into the agent's
    // pod): the agent's CLI in its container, which sees the paths the agent records.
    let in_pod = |q: Quadrant, args: &[&str]| {
        let mut c = podman(&conf);
        c.args(["exec", &names[1], "/usr/local/bin/quadrant", "--config"])
            .arg(config_in_pod)
            .args(["exec", q.name(), "--", "/opt/quadrant-test/qprobe"])
            .args(args);
        c
    };
    let mut servers = Servers(Vec::new());
    for q in [Quadrant::Dg, Quadrant::Px] {
        let mut child = in_pod(q, &["tcp-echo", &format!("0.0.0.0:{TCP_PORT}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("podman exec");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
        servers.0.push(child);
        assert!(
            line.starts_with("listening"),
            "{q:?} echo: {line:?}\n{}",
            logs()
        );
    }
    let probe = |q: Quadrant, to: Quadrant, wait_ms: &str| -> String {
        let out = in_pod(
            q,
            &[
                "tcp-connect",
                &format!("{}:{TCP_PORT}", agent_of_pod.addr(to)),
                wait_ms,
            ],
        )
        .output_bounded();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let line = probe(Quadrant::Dx, Quadrant::Dg, "2000");
    assert!(line.starts_with("ok"), "DX -> DG: {line}\n{}", logs());
    let line = probe(Quadrant::Dx, Quadrant::Px, "400");
    assert!(line.starts_with("err"), "DX -> PX must be dropped: {line}");
    drop(servers);
    // Chained into the node's CNI configuration, naming the socket as the node sees it.
    let read = || -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(cni_conf.join("10-k8s.conflist")).expect("conflist"),
        )
        .expect("JSON")
    };
    let chained = read();
    assert_eq!(chained["plugins"][1]["type"], "quadrant-cni", "{chained}");
    assert_eq!(
        chained["plugins"][1]["socket"],
        inside.socket_path().display().to_string()
    );

    // `down` ends the agent, and with it the container, cleanly.
    ok(&agent_of_pod.down(), "quadrant down");
    let waited = output_within(
        podman(&conf).args(["wait", &names[1]]),
        Duration::from_secs(30),
        &[],
    );
    assert_eq!(ok(&waited, "podman wait").trim(), "0", "{}", logs());
    let on_node = api.annotations(&n);
    assert!(
        !on_node.contains_key(ADDRESS),
        "down withdraws: {on_node:?}"
    );
    assert_eq!(read(), primary, "only our entry went");
    let netns = String::from_utf8_lossy(&sh(&["ip", "netns", "list"]).stdout).into_owned();
    assert!(
        !netns.lines().any(|l| l.starts_with(&format!("{n}-"))),
        "quadrants left behind: {netns}"
    );
    drop(agent_of_pod);
    drop(pod);
    let _ = std::fs::remove_dir_all(&base);
}
