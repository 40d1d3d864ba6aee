//! The rendered manifests are the golden copy in `manifests/kubernetes/` and pass the
//! Kubernetes schemas offline (`kubernetes-validate --strict`, from the Python package index, in the test Python
//! environment `cargo xtask setup` makes); a node install lays out its files.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use quadrant_deploy::{ClusterPeers, METRICS_PORT, cluster_config, kubernetes, node};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn rendered() -> Vec<kubernetes::File> {
    render(None)
}

/// With `peers`: the nodes as each other's peers (`--peers-upstream-secret`, `--node-prefix`).
fn render(peers: Option<&ClusterPeers>) -> Vec<kubernetes::File> {
    kubernetes::render(&kubernetes::Options {
        namespace: "quadrant-system".into(),
        image: concat!("quadrant:", env!("CARGO_PKG_VERSION")).into(),
        config: cluster_config(peers).expect("config"),
        metrics_port: METRICS_PORT,
        upstream_secret: peers.map(|p| p.upstream_secret.clone()),
    })
    .expect("render")
}

fn with_peers() -> ClusterPeers {
    ClusterPeers {
        upstream_secret: "quadrant-upstream".into(),
        node_prefixes: [("worker-1", "10.241.0.0/22"), ("worker-2", "10.241.4.0/22")]
            .map(|(n, c)| (n.to_owned(), c.to_owned()))
            .into(),
    }
}

#[test]
fn the_golden_copy_is_what_render_writes() {
    let golden = root().join("manifests/kubernetes");
    for (name, text) in rendered() {
        let kept = std::fs::read_to_string(golden.join(&name)).unwrap_or_default();
        assert_eq!(
            kept, text,
            "manifests/kubernetes/{name} differs from the render: \
             cargo xtask deploy render --out manifests/kubernetes"
        );
    }
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas() {
    let validate = root().join("target/pyenv/bin/kubernetes-validate");
    assert!(
        validate.exists(),
        "{} is missing: cargo xtask setup installs it",
        validate.display()
    );
    let dir = std::env::temp_dir().join(format!("quadrant-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut checked = 0;
    for (name, text) in rendered().into_iter().chain(
        render(Some(&with_peers()))
            .into_iter()
            .map(|(n, t)| (format!("peers-{n}"), t)),
    ) {
        if name.ends_with("kustomization.yaml") {
            continue;
        }
        let path = dir.join(&name);
        std::fs::write(&path, &text).expect("write");
        let out = Command::new(&validate)
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .arg(&path)
            .output()
            .expect("kubernetes-validate");
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert_eq!(checked, 14);
    // A manifest with a field Kubernetes does not know fails: the check can fail.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\nnotAField: 1\n",
    )
    .expect("write");
    let out = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .arg(&bad)
        .output()
        .expect("kubernetes-validate");
    assert!(!out.status.success(), "an unknown field passed --strict");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_daemon_set_runs_on_every_node_with_what_the_agent_needs() {
    let files = rendered();
    let ds = &files
        .iter()
        .find(|(n, _)| n == "daemonset.yaml")
        .expect("daemonset")
        .1;
    let ds: serde_json::Value = serde_yaml::from_str(ds).expect("yaml");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(pod["initContainers"][0]["name"], "install-cni");
    let agent = &pod["containers"][0];
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], METRICS_PORT);
    // Bidirectional mount propagation (its pins outlive the pod) needs a privileged container.
    assert_eq!(agent["securityContext"]["privileged"], true);
    let caps = agent["securityContext"]["capabilities"]["add"].to_string();
    for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(caps.contains(cap), "{caps}");
    }
    let mounts = agent["volumeMounts"].to_string();
    for path in ["/sys/fs/bpf", "/run/quadrant", "/etc/cni/net.d"] {
        assert!(mounts.contains(path), "{mounts}");
    }
    let config = &files
        .iter()
        .find(|(n, _)| n == "configmap.yaml")
        .expect("configmap")
        .1;
    let cm: serde_json::Value = serde_yaml::from_str(config).expect("yaml");
    let agent_config: serde_json::Value =
        serde_yaml::from_str(cm["data"]["config.yaml"].as_str().expect("config")).expect("yaml");
    assert_eq!(agent_config["cni"]["install"], true);
    assert_eq!(
        agent_config["metrics"]["listen"],
        format!("0.0.0.0:{METRICS_PORT}")
    );
}

/// Rendered with peers: the Secret of the upstream CA mounted where the configuration looks
/// for it, the peers' port, the node's name from the downward API, the API rights the agent
/// uses (and no others).
#[test]
fn the_nodes_can_be_rendered_as_each_others_peers() {
    let files = render(Some(&with_peers()));
    let file = |name: &str| -> serde_json::Value {
        serde_yaml::from_str(&files.iter().find(|(n, _)| n == name).expect(name).1).expect("yaml")
    };
    let ds = file("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    assert_eq!(agent["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(
        agent["ports"][1]["containerPort"],
        quadrant_deploy::PEER_PORT
    );
    let upstream = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "upstream")
        .expect("the upstream volume");
    assert_eq!(upstream["secret"]["secretName"], "quadrant-upstream");
    let cm = file("configmap.yaml");
    let config: serde_json::Value =
        serde_yaml::from_str(cm["data"]["config.yaml"].as_str().expect("config")).expect("yaml");
    let mount = agent["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == "upstream")
        .expect("mounted");
    let dir = mount["mountPath"].as_str().expect("path");
    assert_eq!(
        config["identity"]["upstream"]["cert"],
        format!("{dir}/tls.crt")
    );
    assert_eq!(
        config["identity"]["upstream"]["key"],
        format!("{dir}/tls.key")
    );
    assert_eq!(
        config["peers"]["listen"],
        format!("0.0.0.0:{}", quadrant_deploy::PEER_PORT)
    );
    assert_eq!(
        config["peers"]["kubernetes"]["node_prefixes"]["worker-2"],
        "10.241.4.0/22"
    );
    let role = file("clusterrole.yaml");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            { "apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"] },
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"] },
        ])
    );
    // Without peers, no Secret is needed.
    let plain = rendered();
    let ds = &plain
        .iter()
        .find(|(n, _)| n == "daemonset.yaml")
        .expect("ds")
        .1;
    assert!(!ds.contains("upstream"), "{ds}");
}

#[test]
fn a_node_install_lays_out_its_files_and_keeps_a_configuration() {
    let base = std::env::temp_dir().join(format!("quadrant-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let bins = base.join("bin");
    std::fs::create_dir_all(&bins).expect("bins");
    std::fs::write(bins.join("quadrant"), b"agent").expect("bin");
    std::fs::write(bins.join("quadrant-cni"), b"cni").expect("bin");
    let root = base.join("root");
    let done = node::install(&root, &bins).expect("install");
    assert_eq!(done.written.len(), 4, "{done:?}");
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/local/bin/quadrant"), 0o755);
    assert_eq!(mode("opt/cni/bin/quadrant-cni"), 0o755);
    assert_eq!(mode("etc/quadrant/config.yaml"), 0o600);
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/quadrant.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/quadrant"));
    std::fs::write(root.join("etc/quadrant/config.yaml"), "instance: mine\n").expect("edit");
    let again = node::install(&root, &bins).expect("install again");
    assert_eq!(again.kept, vec![root.join("etc/quadrant/config.yaml")]);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/quadrant/config.yaml")).expect("config"),
        "instance: mine\n"
    );
    let missing = node::install(&root, &base.join("nothing")).unwrap_err();
    assert!(
        missing.to_string().contains("cargo build --release"),
        "{missing}"
    );
    let _ = std::fs::remove_dir_all(&base);
}
