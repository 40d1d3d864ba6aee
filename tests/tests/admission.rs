//! Admission through the running agent: a genuine SVID from the Workload API, forged ones, the
//! constraints, the hash-chained audit log, and fail-closed behaviour. Needs root.

use std::{
    fs,
    path::{Path, PathBuf},
};

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, TEST_STATE_DIR, test_config};
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use serde_json::{Value, json};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn file(name: &str) -> PathBuf {
    PathBuf::from(TEST_STATE_DIR).join(name)
}

fn review(quadrant: &str, workload: &str) -> Value {
    json!({"review": {"object": {
        "quadrant": quadrant,
        "workload": workload,
        "labels": {"app": workload, "owner": "payments"},
        "artifacts": [format!("{workload}@sha256:{DIGEST}")],
        "resources": {"cpu": "500m", "memory": "256Mi", "pids": 64},
    }}})
}

/// Runs `quadrant admit`; returns (admitted, decision JSON, stderr).
fn admit(inst: &Instance, name: &str, review: &Value, svid: &Path) -> (bool, Value, String) {
    let path = file(&format!("{name}.json"));
    fs::write(&path, review.to_string()).expect("write review");
    let out = inst.quadrant(&[
        "admit",
        "--review",
        path.to_str().expect("utf8"),
        "--svid",
        svid.to_str().expect("utf8"),
    ]);
    let decision: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        decision,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fetch_svid(inst: &Instance, q: Quadrant, workload: &str) -> PathBuf {
    let path = file(&format!(
        "{}-{}-{workload}.pem",
        inst.config.instance,
        q.name()
    ));
    let (ok, line) = inst.probe_as(
        q,
        Some(workload),
        &["svid-pem", path.to_str().expect("utf8")],
    );
    assert!(ok, "{line}");
    path
}

fn self_signed(id: &str) -> PathBuf {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, "forged");
    p.subject_alt_names = vec![SanType::URI(id.to_owned().try_into().expect("uri"))];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let path = file("forged-self-signed.pem");
    fs::write(&path, p.self_signed(&key).expect("cert").pem()).expect("write");
    path
}

#[test]
fn admission_checks_identity_then_constraints_and_records_every_decision() {
    let config = test_config(None);
    let _ = fs::remove_file(&config.audit_log);
    let _ = fs::remove_file(quadrant::audit::head_path(&config.audit_log));
    let inst = Instance::up(config, QPROBE);
    let px_api = fetch_svid(&inst, Quadrant::Px, "api");
    let dx_api = fetch_svid(&inst, Quadrant::Dx, "api");
    let td = inst.config.identity.trust_domain.clone();

    let (ok, d, err) = admit(&inst, "good", &review("px", "api"), &px_api);
    assert!(ok, "{err}");
    assert_eq!(
        d["spiffe_id"],
        format!("spiffe://{td}/quadrant/px/workload/api")
    );

    let mut blocked = 0;
    let mut refused = |name: &str, review: &Value, svid: &Path, needle: &str| {
        let (ok, d, err) = admit(&inst, name, review, svid);
        assert!(!ok, "{name} was admitted: {d}");
        assert!(err.contains(needle), "{name}: {err}");
        blocked += 1;
    };
    refused(
        "dev identity into prod",
        &review("px", "api"),
        &dx_api,
        "belongs to quadrant dx, not px",
    );
    refused(
        "self-signed",
        &review("px", "api"),
        &self_signed(&format!("spiffe://{td}/quadrant/px/workload/api")),
        "does not verify up to the trust bundle",
    );
    refused(
        "other workload's SVID",
        &review("px", "billing"),
        &px_api,
        "names workload \"billing\"",
    );
    let mut unlabelled = review("px", "api");
    unlabelled["review"]["object"]["labels"] = json!({"app": "api"});
    refused(
        "missing label",
        &unlabelled,
        &px_api,
        "workloads-are-labelled: missing required label \"owner\"",
    );
    let mut tagged = review("px", "api");
    tagged["review"]["object"]["artifacts"] = json!(["api:latest"]);
    refused(
        "tag instead of digest",
        &tagged,
        &px_api,
        "artifacts-are-content-addressed",
    );
    let garbage = file("garbage.pem");
    fs::write(&garbage, "not pem").expect("write");
    refused(
        "unreadable SVID",
        &review("px", "api"),
        &garbage,
        "identity:",
    );
    println!("admission: {blocked} unauthorized admissions blocked");

    // Every decision is in the audit log, and the chain verifies.
    let out = inst.quadrant(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": 7 records, chain intact"));
    let log = fs::read_to_string(&inst.config.audit_log).expect("log");
    let first: Value = serde_json::from_str(log.lines().next().expect("line")).expect("record");
    assert_eq!(first["event"]["allowed"], true);
    // An edited record is detected.
    fs::write(
        &inst.config.audit_log,
        log.replacen("\"allowed\":false", "\"allowed\":true", 1),
    )
    .expect("tamper");
    let out = inst.quadrant(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the record was edited"));
}

#[test]
fn admission_fails_closed_without_a_policy_engine() {
    let mut config = test_config(None);
    let dir = file(&format!("{}-broken-policies", config.instance));
    fs::create_dir_all(&dir).expect("dir");
    fs::write(
        dir.join("broken.rego"),
        "package quadrant.admission\n\ndecision := {\n",
    )
    .expect("write");
    config.policy_dir = Some(dir);
    let inst = Instance::up(config, QPROBE);
    let svid = fetch_svid(&inst, Quadrant::Dg, "gw");
    let (ok, d, err) = admit(&inst, "no-engine", &review("dg", "gw"), &svid);
    assert!(!ok);
    assert!(err.contains("admission unavailable (fail-closed)"), "{err}");
    assert!(d["audit_seq"].is_u64(), "the refusal is recorded too: {d}");
}

#[test]
fn without_the_identity_service_quadrants_come_up_deny_all() {
    let mut config = test_config(None);
    // A CA directory that cannot be created: the identity service cannot start.
    let not_a_dir = file(&format!("{}-ca-is-a-file", config.instance));
    fs::write(&not_a_dir, "not a directory").expect("write");
    config.identity.ca_dir = not_a_dir.join("ca");
    let inst = Instance::up(config, QPROBE);
    let status = inst.status();
    assert!(
        status
            .policy
            .starts_with("deny-all: identity service unavailable"),
        "{}",
        status.policy
    );
    let dg = inst.addr(Quadrant::Dg);
    assert_eq!(
        inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{dg}:7000"), "500"]),
        (false, "err EPERM".into())
    );
    // No Workload API, so no identity for anyone.
    let (ok, line) = inst.probe(Quadrant::Dx, &["svid"]);
    assert!(!ok, "{line}");
    // Admission refuses, and says why.
    let (ok, d, err) = admit(
        &inst,
        "no-identity",
        &review("dx", "api"),
        &self_signed("spiffe://quadrant.local/quadrant/dx/workload/api"),
    );
    assert!(
        !ok && err.contains("admission unavailable (fail-closed): identity service unavailable"),
        "{err}"
    );
    assert!(d["audit_seq"].is_u64());
    let out = inst.quadrant(&["policy", "reload"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stay in deny-all"));
}
