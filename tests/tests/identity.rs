//! MCP-Core identity in real quadrants: the SPIFFE Workload API per quadrant, exercised with the
//! official `spiffe` crate (inside `qprobe`), attestation by cgroup, JWT-SVIDs and rotation.
//! Needs root.

use quadrant_tests::bounded::Bounded as _;
use std::process::Command;

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn endpoint(inst: &Instance, q: Quadrant) -> String {
    format!("unix://{}", inst.config.workload_socket(q).display())
}

#[test]
fn each_workload_gets_only_its_own_quadrant_scoped_identity() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let td = &inst.config.identity.trust_domain;

    let (ok, line) = inst.probe_as(Quadrant::Px, Some("api"), &["svid"]);
    assert!(ok, "{line}");
    assert_eq!(
        line,
        format!("ok spiffe://{td}/quadrant/px/workload/api chain=1")
    );
    let (ok, line) = inst.probe(Quadrant::Dx, &["svid"]);
    assert!(ok, "{line}");
    assert_eq!(
        line,
        format!("ok spiffe://{td}/quadrant/dx/workload/default chain=1")
    );
    let (ok, line) = inst.probe_as(Quadrant::Px, Some("api"), &["jwt", "db"]);
    assert!(ok, "{line}");
    assert_eq!(
        line,
        format!("ok spiffe://{td}/quadrant/px/workload/api aud=db")
    );

    let mut blocked = 0;
    // A DX process dialling PX's Workload API gets no PX identity.
    for q in [Quadrant::Dg, Quadrant::Px, Quadrant::Pg] {
        let (ok, line) = inst.probe(Quadrant::Dx, &["svid", &endpoint(&inst, q)]);
        assert!(
            !ok && line.contains("PermissionDenied"),
            "dx -> {} socket: {line}",
            q.name()
        );
        blocked += 1;
    }
    // A process outside every quadrant gets nothing.
    let out = Command::new(QPROBE)
        .args(["svid", &endpoint(&inst, Quadrant::Px)])
        .output_bounded();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && line.contains("PermissionDenied"),
        "host: {line}"
    );
    blocked += 1;
    // Calls without the workload.spiffe.io header are refused.
    let sock = inst
        .config
        .workload_socket(Quadrant::Px)
        .display()
        .to_string();
    let (ok, line) = inst.probe(Quadrant::Px, &["no-header", &sock]);
    assert!(!ok);
    assert_eq!(
        line,
        "err InvalidArgument: security header missing from request"
    );
    blocked += 1;
    println!("workload API: {blocked} unauthorized attempts blocked");

    // Workload cgroups below the quadrants and the sockets go with `down`.
    let down = inst.down();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!inst.config.cgroup_parent().exists());
    assert!(!inst.config.workload_socket_dir().exists());
}

#[test]
fn svids_rotate_at_half_life_and_streams_follow() {
    let mut config = test_config(None);
    config.identity.svid_ttl_secs = 4;
    let inst = Instance::up(config, QPROBE);
    let (ok, line) = inst.probe_as(Quadrant::Dg, Some("gw"), &["svid-rotation", "6000"]);
    assert!(ok, "{line}");
    let td = inst.config.identity.trust_domain.clone();
    let (ok, sources) = inst.probe_as(Quadrant::Pg, Some("edge"), &["sources", "api", "6000"]);
    assert!(ok, "{sources}");
    assert_eq!(
        sources,
        format!(
            "ok x509 spiffe://{td}/quadrant/pg/workload/edge rotated; jwt spiffe://{td}/quadrant/pg/workload/edge aud=api key in bundle"
        )
    );
    assert!(
        line.starts_with(&format!(
            "ok rotated spiffe://{}/quadrant/dg/workload/gw ",
            inst.config.identity.trust_domain
        )),
        "{line}"
    );
}

/// The Python interpreter of the test environment `cargo xtask setup` makes (grpcio, py-spiffe
/// and the Workload API stubs).
fn python() -> std::path::PathBuf {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the Python test environment)",
        python.display()
    );
    python
}

/// Runs the gRPC C-core client (`tests/python/workload_api_client.py`) in quadrant `q` as
/// `workload` against `socket`; returns its checks by name.
fn python_client(
    inst: &Instance,
    q: Quadrant,
    workload: &str,
    socket: &std::path::Path,
    extra: &[&str],
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/workload_api_client.py");
    let python = python();
    let mut argv = vec![
        python.to_str().expect("utf8"),
        script.to_str().expect("utf8"),
        socket.to_str().expect("utf8"),
    ];
    argv.extend(extra);
    let out = inst.run_in(q, Some(workload), &argv);
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (v["check"].as_str().expect("check").to_owned(), v)
        })
        .collect()
}

#[test]
fn a_grpc_c_core_client_uses_the_workload_api() {
    let inst = Instance::up(test_config(None), QPROBE);
    let td = inst.config.identity.trust_domain.clone();
    let id = format!("spiffe://{td}/quadrant/dx/workload/pyclient");
    let socket = inst.config.workload_socket(Quadrant::Dx);
    let mut got = python_client(&inst, Quadrant::Dx, "pyclient", &socket, &["raw"]);
    got.extend(python_client(
        &inst,
        Quadrant::Dx,
        "pyclient",
        &socket,
        &["py-spiffe"],
    ));
    let check = |name: &str| {
        let v = got
            .get(name)
            .unwrap_or_else(|| panic!("no check {name}: {got:?}"));
        assert_eq!(v["ok"], true, "{name}: {v}");
        v.clone()
    };
    let x509 = check("raw.x509_svid");
    assert_eq!(x509["spiffe_id"], id.as_str());
    assert_eq!(x509["uri_sans"], serde_json::json!([id]));
    assert_eq!(
        (x509["chain"].as_u64(), x509["bundle_certs"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(x509["key_bytes"].as_u64() > Some(0));
    let bundles = check("raw.x509_bundles");
    assert_eq!(
        bundles["trust_domains"],
        serde_json::json!([format!("spiffe://{td}")])
    );
    assert_eq!(bundles["certs"], 1);
    let jwt = check("raw.jwt_svid");
    assert_eq!(
        (jwt["spiffe_id"].as_str(), jwt["parts"].as_u64()),
        (Some(id.as_str()), Some(3))
    );
    assert_eq!(
        check("raw.jwt_bundles")["keys"],
        serde_json::json!({format!("spiffe://{td}"): 1})
    );
    let valid = check("raw.validate_jwt");
    assert_eq!(valid["spiffe_id"], id.as_str());
    assert_eq!(valid["aud"], serde_json::json!(["db"]));
    let wrong = &got["raw.validate_jwt_wrong_audience"];
    assert_eq!(
        (&wrong["ok"], &wrong["code"]),
        (
            &serde_json::json!(false),
            &serde_json::json!("INVALID_ARGUMENT")
        ),
        "{wrong}"
    );
    let no_header = &got["raw.no_header"];
    assert_eq!(no_header["code"], "INVALID_ARGUMENT", "{no_header}");
    assert_eq!(no_header["details"], "security header missing from request");
    // py-spiffe checks the SVID, the bundle and the JWT signature against the SPIFFE specs.
    let x509 = check("py_spiffe.x509");
    assert_eq!(
        (
            x509["spiffe_id"].as_str(),
            x509["chain"].as_u64(),
            x509["bundle_authorities"].as_u64()
        ),
        (Some(id.as_str()), Some(1), Some(1))
    );
    let jwt = check("py_spiffe.jwt");
    assert_eq!(
        (jwt["spiffe_id"].as_str(), jwt["validated"].as_str()),
        (Some(id.as_str()), Some(id.as_str()))
    );

    // A DX process dialling PX's or DG's Workload API is refused, in C-core as in Rust.
    for other in [Quadrant::Px, Quadrant::Dg] {
        let socket = inst.config.workload_socket(other);
        let got = python_client(&inst, Quadrant::Dx, "pyclient", &socket, &["x509"]);
        let v = &got["raw.x509_svid"];
        assert_eq!(
            (&v["ok"], &v["code"]),
            (
                &serde_json::json!(false),
                &serde_json::json!("PERMISSION_DENIED")
            ),
            "{}: {v}",
            other.name()
        );
    }
}
