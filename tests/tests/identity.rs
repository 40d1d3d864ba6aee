//! MCP-Core identity in real quadrants: the SPIFFE Workload API per quadrant, exercised with the
//! official `spiffe` crate (inside `qprobe`), attestation by cgroup, JWT-SVIDs and rotation.
//! Needs root.

use std::process::Command;

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn endpoint(inst: &Instance, q: Quadrant) -> String {
    format!("unix://{}", inst.config.workload_socket(q).display())
}

#[test]
fn each_workload_gets_only_its_own_quadrant_scoped_identity() {
    let mut inst = Instance::up(test_config(10, None), QPROBE);
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
        .output()
        .expect("qprobe");
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
    let mut config = test_config(11, None);
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
