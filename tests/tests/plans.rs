//! Signed plans through the running agent: a plan signed by a production key runs its artifact
//! inside PX (namespace, cgroup with limits, SVID endpoint); the tamper matrix is refused with
//! nothing started or changed. Needs root.

use std::{fs, os::unix::fs::MetadataExt as _, path::PathBuf, process::Command};

use dataplane_common::Quadrant;
use quadrant::signing::{PLAN_PAYLOAD_TYPE, SigningKey};
use quadrant_tests::harness::{Instance, TEST_STATE_DIR, test_config};
use serde_json::{Value, json};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

struct Fixture {
    inst: Instance,
    dir: PathBuf,
}

impl Fixture {
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.inst.quadrant(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn add_artifact(&self, name: &str, script: &str) -> String {
        let path = self.dir.join(format!("{name}.sh"));
        fs::write(&path, script).expect("write");
        let (ok, reference, err) = self.run(&[
            "artifact",
            "add",
            path.to_str().expect("utf8"),
            "--name",
            name,
        ]);
        assert!(ok, "{err}");
        reference
    }

    /// Signs `plan` with key `key` via the CLI and submits it; returns (ok, stdout, stderr).
    fn sign_and_submit(&self, plan: &Value, key: &str) -> (bool, String, String) {
        self.sign_and_submit_with(plan, key, &[])
    }

    fn submit_envelope(&self, envelope: &str) -> (bool, String, String) {
        self.submit_envelope_with(envelope, &[])
    }

    fn submit_envelope_with(&self, envelope: &str, flags: &[&str]) -> (bool, String, String) {
        let path = self.dir.join("envelope.json");
        fs::write(&path, envelope).expect("write");
        let mut args = vec!["submit", path.to_str().expect("utf8")];
        args.extend(flags);
        self.run(&args)
    }

    /// Signs `plan` with key `key` and submits it with `flags` (`--shadow`).
    fn sign_and_submit_with(
        &self,
        plan: &Value,
        key: &str,
        flags: &[&str],
    ) -> (bool, String, String) {
        let plan_path = self.dir.join("plan.json");
        fs::write(&plan_path, plan.to_string()).expect("write");
        let key_path = self.dir.join(format!("keys/{key}.pk8"));
        let (ok, envelope, err) = self.run(&[
            "plan",
            "sign",
            plan_path.to_str().expect("utf8"),
            "--key",
            key_path.to_str().expect("utf8"),
        ]);
        assert!(ok, "sign: {err}");
        self.submit_envelope_with(&envelope, flags)
    }

    /// Generates key `id` with `role` for `quadrants` under `<dir>/keys` and trusts it.
    fn trust_key(&self, id: &str, role: &str, quadrants: &[&str]) {
        let keys = self.dir.join("keys");
        let mut args = vec![
            "keys",
            "generate",
            "--id",
            id,
            "--role",
            role,
            "--out",
            keys.to_str().expect("utf8"),
        ];
        for q in quadrants {
            args.extend(["--quadrant", q]);
        }
        let (ok, _, err) = self.run(&args);
        assert!(ok, "{err}");
        let (ok, _, err) = self.run(&[
            "keys",
            "trust",
            keys.join(format!("{id}.json")).to_str().expect("utf8"),
        ]);
        assert!(ok, "{err}");
    }

    fn workloads(&self) -> Vec<Value> {
        let (ok, out, err) = self.run(&["workloads", "--output", "json"]);
        assert!(ok, "{err}\nagent log:\n{}", self.inst.agent_log());
        serde_json::from_str(&out).expect("json")
    }
}

fn plan_doc(generation: u64, artifact: &str) -> Value {
    json!({
        "api_version": "quadrant/v1", "quadrant": "px", "workload": "api", "generation": generation,
        "artifacts": [artifact], "args": ["--listen"], "env": {"GREETING": "hello"},
        "resources": {"cpu_millis": 250, "memory_bytes": 67_108_864, "pids": 32},
        "labels": {"app": "api", "owner": "payments"}, "restart": "on_failure",
    })
}

/// Workload `w` (process `pid`) runs in PX's network namespace and its workload cgroup, with
/// the plan's limits, its arguments and environment, and PX's Workload API socket.
fn assert_placed_in_px(fx: &Fixture, w: &Value, pid: u64) {
    // In PX's network namespace and the workload's cgroup, with the plan's limits.
    let ns = |p: &str| fs::metadata(p).map(|m| m.ino()).expect("ns");
    let name = fx.inst.config.instance.clone();
    assert_eq!(
        ns(&format!("/proc/{pid}/ns/net")),
        ns(&format!("/run/netns/{name}-px"))
    );
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(cgroups.contains(&format!("0::/{name}/px/api")), "{cgroups}");
    let limits = w["limits"].as_str().expect("limits");
    if limits.starts_with("cgroup v1") {
        assert!(
            cgroups.contains(&format!(":memory:/{name}/px/api"))
                && cgroups.contains(&format!(":pids:/{name}/px/api")),
            "{cgroups}"
        );
        assert_eq!(
            fs::read_to_string(format!("/sys/fs/cgroup/pids/{name}/px/api/pids.max"))
                .expect("pids")
                .trim(),
            "32"
        );
        assert_eq!(
            fs::read_to_string(format!(
                "/sys/fs/cgroup/memory/{name}/px/api/memory.limit_in_bytes"
            ))
            .expect("mem")
            .trim(),
            "67108864"
        );
    } else {
        assert_eq!(limits, "cgroup v2");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (_, logs, _) = fx.run(&["logs", "px/api"]);
    assert!(
        logs.contains(&format!(
            "up hello --listen via unix://{}",
            fx.inst.config.workload_socket(Quadrant::Px).display()
        )),
        "{logs}"
    );
}

/// The tamper matrix against running generation 1 (process `pid`, artifact `v1`, its signed
/// `envelope`): each submission refused with a clear error, nothing started or changed. Returns
/// the artifact of generation 2.
fn tamper_matrix(fx: &Fixture, pid: u64, v1: &str, envelope: &str) -> String {
    let keys = fx.dir.join("keys");
    // The tamper matrix: each refused with a clear error, nothing started or changed.
    let mut refused = 0;
    let mut expect_refused = |what: &str, (ok, _, err): (bool, String, String), needle: &str| {
        assert!(!ok, "{what} was accepted");
        assert!(err.contains(needle), "{what}: {err}");
        let w = fx.workloads();
        assert_eq!(
            (w.len(), w[0]["generation"].as_u64(), w[0]["pid"].as_u64()),
            (1, Some(1), Some(pid)),
            "{what} changed the running workload"
        );
        refused += 1;
    };
    expect_refused(
        "replay of the same plan",
        fx.submit_envelope(envelope),
        "is not newer than the accepted generation 1",
    );
    expect_refused(
        "development key on a production plan",
        fx.sign_and_submit(&plan_doc(2, v1), "dev"),
        "key dev may not sign plan for quadrant px",
    );
    let mut unsigned: Value = serde_json::from_str(envelope).expect("json");
    unsigned["signatures"] = json!([]);
    expect_refused(
        "unsigned plan",
        fx.submit_envelope(&unsigned.to_string()),
        "carries no signature",
    );
    let (stranger, _) = SigningKey::generate("stranger").expect("key");
    let foreign = quadrant::plans::sign(
        &quadrant::plans::from_value(&plan_doc(2, v1)).expect("plan"),
        &stranger,
    );
    expect_refused(
        "unknown key",
        fx.submit_envelope(&serde_json::to_string(&foreign).expect("json")),
        "unknown key(s) stranger",
    );
    let prod = SigningKey::load(&keys.join("prod.pk8")).expect("key");
    let mut bad = plan_doc(2, v1);
    bad.as_object_mut().expect("object").remove("resources");
    let bad_env = prod.sign(PLAN_PAYLOAD_TYPE, &quadrant::plans::canonical(&bad));
    expect_refused(
        "schema violation",
        fx.submit_envelope(&serde_json::to_string(&bad_env).expect("json")),
        "does not match its schema",
    );
    let mut wrong_type = plan_doc(2, v1);
    wrong_type["generation"] = json!("two");
    let env = prod.sign(PLAN_PAYLOAD_TYPE, &quadrant::plans::canonical(&wrong_type));
    expect_refused(
        "wrong type",
        fx.submit_envelope(&serde_json::to_string(&env).expect("json")),
        "/generation",
    );
    expect_refused(
        "downgrade",
        fx.sign_and_submit(&plan_doc(1, v1), "prod"),
        "not newer",
    );
    let missing = format!("ghost@sha256:{}", "0".repeat(64));
    expect_refused(
        "unknown artifact",
        fx.sign_and_submit(&plan_doc(2, &missing), "prod"),
        "is not in the store",
    );
    let v2 = fx.add_artifact("api2", "#!/bin/sh\necho v2\nexec sleep 60\n");
    let stored = fx.inst.config.artifacts_root.join(&v2);
    fs::set_permissions(&stored, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let good_bytes = fs::read(&stored).expect("read");
    let mut flipped = good_bytes.clone();
    flipped[3] ^= 0x01;
    fs::write(&stored, &flipped).expect("flip");
    expect_refused(
        "flipped byte in the artifact",
        fx.sign_and_submit(&plan_doc(2, &v2), "prod"),
        "integrity error",
    );
    fs::write(&stored, &good_bytes).expect("restore");
    let mut unlabelled = plan_doc(2, &v2);
    unlabelled["labels"] = json!({"app": "api"});
    expect_refused(
        "admission constraint",
        fx.sign_and_submit(&unlabelled, "prod"),
        "workloads-are-labelled",
    );
    println!("plans: {refused} tampered or invalid submissions refused");

    v2
}

/// Only a break-glass authorization takes px/api back to generation 1 (its signed `envelope`),
/// and it is recorded in the audit log.
fn break_glass_to_generation_1(fx: &Fixture, envelope: &str) {
    let (keys, dir) = (fx.dir.join("keys"), &fx.dir);
    let authorize = |key: &str, generation: &str, valid: &str| {
        let (ok, out, err) = fx.run(&[
            "plan",
            "authorize-rollback",
            "--quadrant",
            "px",
            "--workload",
            "api",
            "--generation",
            generation,
            "--reason",
            "generation 2 corrupts orders",
            "--valid-for-secs",
            valid,
            "--key",
            keys.join(format!("{key}.pk8")).to_str().expect("utf8"),
        ]);
        assert!(ok, "{err}");
        let path = dir.join(format!("rollback-{key}-{generation}-{valid}.json"));
        fs::write(&path, out).expect("write");
        path
    };
    let gen1 = dir.join("gen1-envelope.json");
    fs::write(&gen1, envelope).expect("write");
    let rollback = |auth: &PathBuf| {
        fx.run(&[
            "rollback",
            "--authorization",
            auth.to_str().expect("utf8"),
            "--plan",
            gen1.to_str().expect("utf8"),
        ])
    };
    let (ok, _, err) = rollback(&authorize("prod", "1", "600"));
    assert!(
        !ok && err.contains("may not sign break-glass"),
        "plan key as break-glass: {err}"
    );
    let (ok, _, err) = rollback(&authorize("glass", "1", "0"));
    assert!(
        !ok && err.contains("expired"),
        "expired authorization: {err}"
    );
    let (ok, _, err) = rollback(&authorize("glass", "2", "600"));
    assert!(
        !ok && err.contains("generation 2, the plan is px/api generation 1"),
        "mismatched generation: {err}"
    );
    assert_eq!(
        fx.workloads()[0]["generation"].as_u64(),
        Some(2),
        "refused rollbacks change nothing"
    );
    let (ok, out, err) = rollback(&authorize("glass", "1", "600"));
    assert!(ok, "{err}");
    assert!(
        out.starts_with("rolled back px/api to generation 1"),
        "{out}"
    );
    assert_eq!(fx.workloads()[0]["generation"].as_u64(), Some(1));
    let log = fs::read_to_string(&fx.inst.config.audit_log).expect("audit");
    assert!(
        log.contains("\"kind\":\"break-glass\"") && log.contains("generation 2 corrupts orders"),
        "{log}"
    );
    assert!(fx.run(&["audit", "verify"]).0);
    let (ok, _, err) = fx.submit_envelope(envelope);
    assert!(
        !ok && err.contains("not newer"),
        "a plain replay after the rollback: {err}"
    );
}

#[test]
fn signed_plans_run_in_their_quadrant_and_tampering_changes_nothing() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-plans", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir: dir.clone(),
    };
    for (id, role, quadrants) in [
        ("dev", "plan", &["dx", "dg"][..]),
        ("prod", "plan", &["px", "pg"][..]),
        ("glass", "break-glass", &["px", "pg"][..]),
    ] {
        fx.trust_key(id, role, quadrants);
    }
    let v1 = fx.add_artifact(
        "api",
        "#!/bin/sh\necho \"up $GREETING $1 via $SPIFFE_ENDPOINT_SOCKET\"\nexec sleep 60\n",
    );

    let (ok, out, err) = fx.sign_and_submit(&plan_doc(1, &v1), "prod");
    assert!(ok, "{err}");
    let td = &fx.inst.config.identity.trust_domain;
    assert!(
        out.starts_with(&format!(
            "started px/api generation 1 as spiffe://{td}/quadrant/px/workload/api"
        )),
        "{out}"
    );
    let w = fx.workloads();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0]["state"], "running");
    let pid = w[0]["pid"].as_u64().expect("pid");
    assert_placed_in_px(&fx, &w[0], pid);
    let envelope = fs::read_to_string(dir.join("envelope.json")).expect("envelope");
    let v2 = tamper_matrix(&fx, pid, &v1, &envelope);
    // An upgrade replaces the running generation.
    let (ok, out, err) = fx.sign_and_submit(&plan_doc(2, &v2), "prod");
    assert!(ok, "{err}");
    assert!(out.starts_with("started px/api generation 2"), "{out}");
    let w = fx.workloads();
    assert_eq!((w.len(), w[0]["generation"].as_u64()), (1, Some(2)));
    assert_ne!(w[0]["pid"].as_u64(), Some(pid));
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z ")),
        "generation 1 still runs"
    );
    break_glass_to_generation_1(&fx, &envelope);

    let (ok, out, _) = fx.run(&["stop", "px/api"]);
    assert!(ok);
    assert!(out.starts_with("stopped px/api"), "{out}");
    assert_eq!(fx.workloads()[0]["state"], "stopped");
    let (ok, _, err) = fx.run(&["stop", "px/nothing"]);
    assert!(!ok && err.contains("no workload px/nothing"), "{err}");
    let _ = Command::new("true").status();
}

#[test]
fn a_workload_at_its_limits_affects_only_its_quadrant() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-limits", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let mut fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir: dir.clone(),
    };
    for (id, q) in [("dev", "dx"), ("prod", "px")] {
        fx.trust_key(id, "plan", &[q]);
    }
    // PX runs a workload that tries to start 40 processes under a limit of 8.
    let forker = fx.add_artifact(
        "forker",
        "#!/bin/sh\nfor i in $(seq 1 40); do sleep 30 & done\necho spawned\nwait\n",
    );
    let mut plan = plan_doc(1, &forker);
    plan["resources"]["pids"] = json!(8);
    let (ok, _, err) = fx.sign_and_submit(&plan, "prod");
    assert!(ok, "{err}");
    // DX runs an ordinary workload.
    let steady = fx.add_artifact("steady", "#!/bin/sh\necho steady\nexec sleep 60\n");
    let mut dx_plan = plan_doc(1, &steady);
    dx_plan["quadrant"] = json!("dx");
    dx_plan["workload"] = json!("steady");
    let (ok, _, err) = fx.sign_and_submit(&dx_plan, "dev");
    assert!(ok, "{err}");

    std::thread::sleep(std::time::Duration::from_millis(500));
    let workloads = fx.workloads();
    let px = workloads
        .iter()
        .find(|w| w["name"] == "px/api")
        .expect("px workload");
    let limits = px["limits"].as_str().expect("limits").to_owned();
    let name = &fx.inst.config.instance;
    let current = if limits.starts_with("cgroup v1") {
        fs::read_to_string(format!("/sys/fs/cgroup/pids/{name}/px/api/pids.current"))
    } else {
        fs::read_to_string(
            fx.inst
                .config
                .cgroup_dir(Quadrant::Px)
                .join("api/pids.current"),
        )
    }
    .expect("pids.current");
    let current: u32 = current.trim().parse().expect("number");
    assert!(
        current <= 8,
        "{current} processes in a workload limited to 8"
    );
    let (_, logs, _) = fx.run(&["logs", "px/api"]);
    assert!(
        logs.contains("fork") || logs.contains("Resource temporarily unavailable"),
        "no fork failure logged: {logs}"
    );

    // The other quadrants are untouched: DX's workload runs and DX still reaches DG.
    let dx = workloads
        .iter()
        .find(|w| w["name"] == "dx/steady")
        .expect("dx workload");
    assert_eq!(dx["state"], "running");
    let dx_pid = dx["pid"].as_u64().expect("pid");
    assert!(PathBuf::from(format!("/proc/{dx_pid}")).exists());
    let _server = fx.inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7000"]);
    let dg = fx.inst.addr(Quadrant::Dg);
    assert_eq!(
        fx.inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:7000"), "2000"]
        ),
        (true, "ok hello".into())
    );
    assert!(fx.inst.down().status.success());
}

/// A plan that declares its lanes: the workload may open only those, over the transport the
/// plan requires; `auto` becomes that transport.
#[test]
fn a_plan_limits_its_workload_to_the_lanes_it_declares() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-lanes", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let mut fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir: dir.clone(),
    };
    fx.trust_key("dev", "plan", &["dx"]);
    let echo = quadrant_tests::harness::sibling_binary(QPROBE, "lane-echo");
    let echo = echo.to_str().expect("utf8");
    let (_, _server) = fx.inst.background_in(
        Quadrant::Dg,
        Some("echo"),
        &[echo, "serve", "echo"],
        "listening as",
    );
    let cases = [
        (
            "dg echo --transport uds",
            "requires shm for its lane to dg/echo; uds was asked",
        ),
        ("dg echo", "\"transport\":\"shm\""),
        (
            "dx other",
            "declares lanes to dg/echo only, not to dx/other",
        ),
    ];
    for (generation, (args, expected)) in (1u64..).zip(cases) {
        let name = format!("caller{generation}");
        let artifact = fx.add_artifact(
            &name,
            &format!("#!/bin/sh\nexec {echo} call {args} --count 3\n"),
        );
        let mut plan = plan_doc(generation, &artifact);
        plan["quadrant"] = json!("dx");
        plan["workload"] = json!("caller");
        plan["restart"] = json!("never");
        plan["lanes"] = json!([{"peer": "dg/echo", "transport": "shm"}]);
        let (ok, _, err) = fx.sign_and_submit(&plan, "dev");
        assert!(ok, "{err}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (_, logs, _) = fx.run(&["logs", "dx/caller"]);
            if logs.contains(expected) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "generation {generation}: {expected:?} not in the log: {logs}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    assert!(fx.inst.down().status.success());
}

/// `quadrant down --keep-dataplane` hands the running workloads to the next agent: the same
/// processes keep running, the new agent lists, stops and restarts them per their plan.
#[test]
fn workloads_keep_running_across_a_kept_dataplane() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-handover", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let mut fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir: dir.clone(),
    };
    fx.trust_key("prod", "plan", &["px"]);
    let steady = fx.add_artifact("steady", "#!/bin/sh\necho up\nexec sleep 300\n");
    let (ok, _, err) = fx.sign_and_submit(&plan_doc(1, &steady), "prod");
    assert!(ok, "{err}");
    let mut other = plan_doc(1, &steady);
    other["workload"] = json!("worker");
    let (ok, _, err) = fx.sign_and_submit(&other, "prod");
    assert!(ok, "{err}");
    let pid_of = |fx: &Fixture, name: &str| -> (String, Option<u64>, u64) {
        let w = fx.workloads();
        let w = w.iter().find(|w| w["name"] == name).expect("workload");
        (
            w["state"].as_str().unwrap_or_default().to_owned(),
            w["pid"].as_u64(),
            w["restarts"].as_u64().unwrap_or_default(),
        )
    };
    let (state, api_pid, _) = pid_of(&fx, "px/api");
    assert_eq!(state, "running");
    let api_pid = api_pid.expect("pid");
    let (_, worker_pid, _) = pid_of(&fx, "px/worker");
    let worker_pid = worker_pid.expect("pid");

    let out = fx.inst.stop_keeping_dataplane();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 workloads keep running"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for pid in [api_pid, worker_pid] {
        assert!(
            PathBuf::from(format!("/proc/{pid}")).exists(),
            "pid {pid} gone"
        );
    }
    // The handover is in the state file, which only root may read (it holds the workloads'
    // environment).
    let state = fx.inst.config.state_path();
    assert_eq!(
        fs::metadata(&state).expect("state file").mode() & 0o777,
        0o600
    );
    assert!(
        fs::read_to_string(&state)
            .expect("state")
            .contains("px/worker")
    );

    fx.inst.start_agent();
    assert_eq!(pid_of(&fx, "px/api"), ("running".into(), Some(api_pid), 0));
    assert_eq!(
        pid_of(&fx, "px/worker"),
        ("running".into(), Some(worker_pid), 0)
    );
    // The new agent stops an adopted process...
    let (ok, _, err) = fx.run(&["stop", "px/api"]);
    assert!(ok, "{err}");
    assert_eq!(pid_of(&fx, "px/api").0, "stopped");
    assert!(
        !PathBuf::from(format!("/proc/{api_pid}/cgroup")).exists() || {
            // A zombie of the old agent's child may linger until reaped by init; it is not running.
            fs::read_to_string(format!("/proc/{api_pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        }
    );
    // ...and restarts one that exits, per its plan (on_failure; an adopted exit is a failure).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(worker_pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (state, pid, restarts) = pid_of(&fx, "px/worker");
        if state == "running" && pid.is_some_and(|p| p != worker_pid) {
            assert_eq!(restarts, 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker not restarted: {state} {pid:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(fx.inst.down().status.success());
}

/// A workload between an exit and its restart when the agent hands over
/// (`down --keep-dataplane`) — or is killed — is handed over too: the next agent starts it again
/// at once, as the restart it was waiting for.
#[test]
fn a_workload_waiting_to_restart_is_handed_over_too() {
    let (mut fx, _) = px_fixture("waiting", "[]", |_| {});
    let flaky = fx.add_artifact("flaky", "#!/bin/sh\necho up\nexit 3\n");
    let (ok, _, err) = fx.sign_and_submit(&plan_doc(1, &flaky), "prod");
    assert!(ok, "{err}");
    let api = |fx: &Fixture| -> Option<(String, u64, bool)> {
        fx.workloads()
            .iter()
            .find(|w| w["name"] == "px/api")
            .map(|w| {
                (
                    w["state"].as_str().unwrap_or_default().to_owned(),
                    w["restarts"].as_u64().unwrap_or_default(),
                    w["restart_pending"] == true,
                )
            })
    };
    // Backoffs double from 200 ms: after three restarts it waits 1.6 s between exits. The
    // count goes up at the end of a wait, just before the next start, so the wait itself is
    // told by `restart_pending` (seen without it, "exited" with three restarts is the moment
    // before the third restart's start).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (state, restarts, pending) = api(&fx).expect("listed");
        if state == "exited" && restarts >= 3 && pending {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{state} {restarts}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = fx.inst.stop_keeping_dataplane();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 workloads keep running") || stdout.contains("px/api"),
        "{stdout}"
    );
    fx.inst.start_agent();
    let (state, _, _) = api(&fx).expect("the next agent supervises it");
    assert!(matches!(state.as_str(), "running" | "exited"), "{state}");
    assert!(
        fx.inst.agent_log().contains("waiting to be restarted"),
        "{}",
        fx.inst.agent_log()
    );

    // The same when the agent is killed in the middle of the backoff: its record names the
    // workload without a process, and the agent after the crash starts it.
    let record = fx.inst.config.workloads_record_path();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting = fx
            .workloads()
            .iter()
            .any(|w| w["name"] == "px/api" && w["restart_pending"] == true);
        let recorded = fs::read_to_string(&record)
            .is_ok_and(|r| r.contains("px/api") && r.contains("pid: null"));
        if waiting && recorded {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recorded as waiting"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fx.inst.crash();
    fx.inst.start_agent();
    assert!(
        api(&fx).is_some(),
        "the agent after the crash supervises it"
    );
    // The log holds every agent's lines: the second start names it too.
    assert_eq!(
        fx.inst
            .agent_log()
            .matches("starting a handed-over workload that was waiting to be restarted")
            .count(),
        2,
        "{}",
        fx.inst.agent_log()
    );
    assert!(fx.inst.down().status.success());
}

/// An agent killed with SIGKILL (a crash, no `down`): its programs stay attached and keep
/// enforcing while it is gone, its workloads keep running, and the agent started next takes
/// over the dataplane it left — with its tracked flows — and the workloads it had recorded,
/// the same processes, supervised again.
#[test]
fn a_killed_agents_successor_takes_over_its_dataplane_and_workloads() {
    let (mut fx, _) = px_fixture("crash", "[]", |_| {});
    let steady = fx.add_artifact("steady", "#!/bin/sh\necho up\nexec sleep 300\n");
    let (ok, _, err) = fx.sign_and_submit(&plan_doc(1, &steady), "prod");
    assert!(ok, "{err}");
    let api = fx.workloads();
    let api = api
        .iter()
        .find(|w| w["name"] == "px/api")
        .expect("workload");
    assert_eq!(api["state"], "running");
    let pid = api["pid"].as_u64().expect("pid");
    // The agent records what it supervises within a quarter of a second.
    let record = fx.inst.config.workloads_record_path();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !fs::read_to_string(&record).is_ok_and(|r| r.contains("px/api")) {
        assert!(std::time::Instant::now() < deadline, "no workload record");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        fs::metadata(&record).expect("record").mode() & 0o777,
        0o600,
        "root only: it holds the workloads' environment"
    );
    let dg = fx.inst.addr(Quadrant::Dg);
    let _echo = fx.inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7310"]);
    let (_, talk) = fx.inst.background_in(
        Quadrant::Dx,
        None,
        &[QPROBE, "tcp-talk", &format!("{dg}:7310"), "100", "40"],
        "ready",
    );
    let next = || {
        talk.recv_timeout(std::time::Duration::from_secs(5))
            .expect("a line")
    };
    assert_eq!(next(), "ready");

    fx.inst.crash();
    let px = fx.inst.addr(Quadrant::Px);
    assert_eq!(
        fx.inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{px}:7311"), "1000"]
        ),
        (false, "err EPERM".into()),
        "still enforcing without the agent"
    );
    assert!(
        PathBuf::from(format!("/proc/{pid}")).exists(),
        "the workload runs on"
    );

    fx.inst.start_agent();
    assert!(
        fx.inst
            .agent_log()
            .contains("the previous agent was killed"),
        "{}",
        fx.inst.agent_log()
    );
    let api = fx.workloads();
    let api = api
        .iter()
        .find(|w| w["name"] == "px/api")
        .expect("workload");
    assert_eq!(
        (api["state"].as_str(), api["pid"].as_u64()),
        (Some("running"), Some(pid)),
        "the same process, supervised again"
    );
    let carried = fx.inst.status().carried.expect("a takeover");
    assert!(carried.flows >= 1, "{carried:?}");
    // The connection opened before the crash talked through it.
    for _ in 0..10 {
        let line = next();
        assert!(line.starts_with("ok"), "{line}");
    }
    let (ok, _, err) = fx.run(&["stop", "px/api"]);
    assert!(ok, "{err}");
    assert!(fx.inst.down().status.success());
}

/// A submitted workload in a quadrant whose policy names single workloads runs without
/// `CAP_NET_RAW`: no packet or raw IP socket. In another quadrant the same artifact has them.
#[test]
fn workloads_where_rules_name_workloads_have_no_raw_sockets() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-raw", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    let policies = dir.join("policies");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    assert!(
        Command::new("cp")
            .arg("-r")
            .arg(&src)
            .arg(&policies)
            .status()
            .expect("cp")
            .success()
    );
    let px_rego = policies.join("runtime/quadrants/px.rego");
    let mut text = fs::read_to_string(&px_rego).expect("px.rego");
    text.push_str("\nallow contains {\"from\": \"spiffe://quadrant.local/quadrant/px/workload/api\", \"to\": \"host\", \"protocols\": [\"tcp\"], \"ports\": [\"7310\"]}\n");
    fs::write(&px_rego, text).expect("write px.rego");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    config.policy_dir = Some(policies);
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    // Output of earlier runs would answer for this one.
    let _ = fs::remove_dir_all(config.state_dir.join(format!("{}-logs", config.instance)));
    let fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir: dir.clone(),
    };
    fx.trust_key("prod", "plan", &["px"]);
    fx.trust_key("dev", "plan", &["dx"]);
    let probe = fx.add_artifact(
        "probe",
        &format!("#!/bin/sh\n{QPROBE} packet-socket\nexec sleep 60\n"),
    );
    let (ok, _, err) = fx.sign_and_submit(&plan_doc(1, &probe), "prod");
    assert!(ok, "{err}");
    let mut dx_plan = plan_doc(1, &probe);
    dx_plan["quadrant"] = json!("dx");
    let (ok, _, err) = fx.sign_and_submit(&dx_plan, "dev");
    assert!(ok, "{err}");
    let outcome = |name: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (_, logs, _) = fx.run(&["logs", name]);
            if let Some(line) = logs
                .lines()
                .find(|l| l.starts_with("ok") || l.starts_with("err"))
            {
                return line.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: no outcome in {logs:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    assert_eq!(outcome("px/api"), "err EPERM");
    assert_eq!(outcome("dx/api"), "ok opened");
}

#[test]
fn production_admission_follows_the_configured_trust_domain() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-plans", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.identity.trust_domain = "prod.example.org".into();
    config.identity.ca_dir = dir.join("ca");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir,
    };
    fx.trust_key("prod", "plan", &["px", "pg"]);
    let artifact = fx.add_artifact("api", "#!/bin/sh\nexec sleep 60\n");
    for q in ["px", "pg"] {
        let mut plan = plan_doc(1, &artifact);
        plan["quadrant"] = json!(q);
        let (ok, out, err) = fx.sign_and_submit(&plan, "prod");
        assert!(ok, "{q}: {err}\nagent log:\n{}", fx.inst.agent_log());
        assert!(
            out.starts_with(&format!(
                "started {q}/api generation 1 as spiffe://prod.example.org/quadrant/{q}/workload/api"
            )),
            "{out}"
        );
    }
    // The embedded constraint checks against the configured trust domain, not the default one.
    let review = json!({"review": {"object": {"quadrant": "px", "workload": "api",
        "spiffe_id": "spiffe://quadrant.local/quadrant/px/workload/api",
        "labels": {"app": "api", "owner": "o"}, "artifacts": [artifact],
        "resources": {"cpu": 1, "memory": 1, "pids": 1}}}});
    let path = fx.dir.join("review.json");
    fs::write(&path, review.to_string()).expect("write");
    let (ok, out, err) = fx.run(&["policy", "eval", "--input", path.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    assert!(
        out.contains("production-needs-production-identity") && out.contains("prod.example.org"),
        "{out}"
    );
    assert_eq!(fx.workloads().len(), 2);
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &std::path::Path) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == path))
    })
}

/// CPU time process `pid` used so far, in clock ticks (user + system).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the state.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Asserts the agent answers `quadrant status` and a Workload API fetch now; returns the
/// policy digest status reports.
fn answers(inst: &Instance) -> Option<String> {
    let status = inst.status();
    let (ok, line) = inst.probe(Quadrant::Dx, &["svid"]);
    assert!(ok, "Workload API fetch: {line}");
    status.policy_digest
}

#[test]
fn status_and_the_workload_api_answer_while_a_slow_submit_and_a_slow_reload_run() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-slow", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let policies = quadrant_tests::harness::copy_of_policies(&config.instance);
    config.policy_dir = Some(policies.clone());
    let fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir: dir.clone(),
    };
    fx.trust_key("prod", "plan", &["px"]);
    let pid = fx.inst.agent_pid();

    // A deliberately slow artifact: a script followed by 2 GiB the shell never reaches
    // (a sparse file: no memory spent), which admission re-hashes before the plan runs.
    fs::create_dir_all(&fx.inst.config.artifacts_root).expect("store");
    let staged = dir.join("big.sh");
    fs::write(&staged, "#!/bin/sh\necho big\nexec sleep 60\n").expect("write");
    fs::File::options()
        .write(true)
        .open(&staged)
        .and_then(|f| f.set_len(2 << 30))
        .expect("pad");
    let digest =
        quadrant::artifacts::sha256_hex(fs::File::open(&staged).expect("open")).expect("hash");
    let reference = format!("big@sha256:{digest}");
    let stored = fx.inst.config.artifacts_root.join(&reference);
    fs::rename(&staged, &stored).expect("into the store");
    fs::set_permissions(&stored, std::os::unix::fs::PermissionsExt::from_mode(0o555))
        .expect("chmod");

    let before = answers(&fx.inst);
    std::thread::scope(|s| {
        let submit = s.spawn(|| fx.sign_and_submit(&plan_doc(1, &reference), "prod"));
        // The agent is in the middle of the submit once it has the artifact open.
        while !has_open(pid, &stored) {
            assert!(
                !submit.is_finished(),
                "the submit ended before its artifact was read"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        answers(&fx.inst);
        assert!(
            has_open(pid, &stored) && !submit.is_finished(),
            "status and the fetch answered only after the artifact was hashed"
        );
        let (ok, _, err) = submit.join().expect("submit thread");
        assert!(ok, "{err}");
    });

    // A deliberately slow policy: a deny whose body counts through millions of numbers.
    let global = policies.join("runtime/global.rego");
    let rego = fs::read_to_string(&global).expect("read");
    let slow = "deny contains {\"from\": \"dx\", \"to\": \"px\", \"reason\": \"slow\"} if {\n\t\
                count([x | some x in numbers.range(1, 1000000); x % 7 == 0]) > 0\n}\n";
    fs::write(&global, format!("{rego}\n{slow}")).expect("write");
    std::thread::scope(|s| {
        let idle = cpu_ticks(pid);
        let reload = s.spawn(|| fx.run(&["policy", "reload"]));
        // The agent is evaluating once it has spent half a second of CPU on it.
        while cpu_ticks(pid) < idle + 50 {
            assert!(
                !reload.is_finished(),
                "the reload ended before it took half a second"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let during = answers(&fx.inst);
        assert!(
            !reload.is_finished(),
            "status and the fetch answered only after the reload"
        );
        assert_eq!(
            during, before,
            "during the reload the previous policy is live"
        );
        let (ok, _, err) = reload.join().expect("reload thread");
        assert!(ok, "{err}");
    });
    assert_ne!(
        answers(&fx.inst),
        before,
        "the reload made the new bundle live"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// An agent with PX's `echo` lane service (`lane-echo serve`) and a latency SLO for it that
/// every round trip breaks (99 % under 10 ns); returns it and the `lane-echo` path.
fn slo_fixture() -> (Fixture, String, std::sync::mpsc::Receiver<String>) {
    let (mut fx, echo) = px_fixture(
        "slo",
        "[{name: echo-fast, quadrant: px, service: echo, indicator: latency, \
          objectives: [{target: 0.99, value: 0.00001}], timeWindow: [{duration: 28m}], minEvents: 5}]",
        |_| {},
    );
    let (_, service) = fx.inst.background_in(
        Quadrant::Px,
        Some("echo"),
        &[&echo, "serve", "echo"],
        "listening as",
    );
    (fx, echo, service)
}

/// An agent with its own artifact store and trust store under `<state>/<instance>-<name>`, the
/// SLOs `slos` (YAML), whatever `tweak` sets, no plan generations recorded, and a `prod` key
/// trusted for PX and PG plans; returns it and the `lane-echo` path.
fn px_fixture(
    name: &str,
    slos: &str,
    tweak: impl FnOnce(&mut quadrant::config::Config),
) -> (Fixture, String) {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-{name}", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    config.slos = serde_yaml::from_str(slos).expect("slos");
    tweak(&mut config);
    let _ = fs::remove_file(quadrant::daemon::state::generations_path(&config));
    let fx = Fixture {
        inst: Instance::up(config, QPROBE),
        dir,
    };
    fx.trust_key("prod", "plan", &["px", "pg"]);
    let echo = quadrant_tests::harness::sibling_binary(QPROBE, "lane-echo")
        .display()
        .to_string();
    (fx, echo)
}

fn slo(fx: &Fixture) -> Value {
    let (ok, out, err) = fx.run(&["slo", "--output", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("slo json")
}

/// Whether PX's page rule fired while PG called PX's echo.
fn burn_px_budget(fx: &Fixture, echo: &str) -> bool {
    // PG calls PX's echo for about two seconds, a round trip every 5 ms; meanwhile the fast
    // page rule (2.5 s and 0.21 s for a 28-minute window) must fire.
    std::thread::scope(|s| {
        let caller = s.spawn(|| {
            fx.inst.run_in(
                Quadrant::Pg,
                Some("client"),
                &[
                    echo,
                    "call",
                    "px",
                    "echo",
                    "--count",
                    "400",
                    "--interval-ms",
                    "5",
                ],
            )
        });
        let mut fired = false;
        while !caller.is_finished() {
            let r = slo(fx);
            fired |= r["quadrants"]["px"]["fast_burn"] == true;
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let out = caller.join().expect("caller");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fired
    })
}

/// An SLO of PX's `echo` lane service that every round trip breaks (99 % under 10 ns): lane
/// requests from PG spend PX's error budget; `quadrant slo` reports the SLI, the budget and the
/// burn; while PG keeps calling, the page rule fires; admission then refuses a new PX plan,
/// naming the SLO and its figures, and admits the same plan marked `priority: p0`.
#[test]
fn a_spent_production_error_budget_holds_back_plans_except_p0() {
    // The service's output is read for as long as the test runs.
    let (fx, echo, _service) = slo_fixture();
    // Before any request: no data, nothing held back.
    let before = slo(&fx);
    assert_eq!(before["slos"][0]["events"]["total"], 0, "{before}");
    assert_eq!(before["quadrants"]["px"]["budget_remaining"], Value::Null);

    let fired = burn_px_budget(&fx, &echo);
    assert!(fired, "the page rule never fired: {}", slo(&fx));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = slo(&fx);
    let s = &r["slos"][0];
    assert_eq!(s["events"]["total"], 400, "{r}");
    assert_eq!(s["events"]["good"], 0, "{r}");
    // 100 % bad against 1 % allowed: 100 times the budget, 99 budgets overspent.
    assert!(
        (s["budget_remaining"].as_f64().expect("budget") + 99.0).abs() < 1e-6,
        "{r}"
    );
    assert_eq!(r["quadrants"]["dx"]["budget_remaining"], Value::Null);

    let artifact = fx.add_artifact("api", "#!/bin/sh\nexec sleep 60\n");
    // A plan declaring a second latency SLO for echo is refused before admission.
    let mut clash = plan_doc(1, &artifact);
    clash["slo"] = json!({"service": "echo", "p99_latency_ms": 5.0});
    clash["priority"] = json!("p0");
    let (ok, _, err) = fx.sign_and_submit(&clash, "prod");
    assert!(
        !ok && err.contains(
            "the plan's slo section: px-api-latency.service: px/echo has a latency SLO already"
        ),
        "{err}"
    );
    let (ok, _, err) = fx.sign_and_submit(&plan_doc(1, &artifact), "prod");
    assert!(!ok, "admitted while PX's budget is spent");
    // The 6x page rule (15 s and 1.25 s here) still fires a moment after the calls; the spent
    // budget alone would refuse too (unit-tested in policies/admission/decision_test.rego).
    assert!(
        err.contains("production-keeps-its-error-budget: quadrant px")
            && err.contains("echo-fast (latency of px/echo): 0 good of 400, target 0.99, budget remaining -9900.0 %"),
        "{err}"
    );
    assert!(fx.workloads().is_empty());
    let mut urgent = plan_doc(1, &artifact);
    urgent["priority"] = json!("p0");
    urgent["slo"] = json!({"service": "echo", "availability": 0.9, "window": "1h"});
    let (ok, out, err) = fx.sign_and_submit(&urgent, "prod");
    assert!(ok, "a p0 plan: {err}");
    assert!(out.starts_with("started px/api generation 1"), "{out}");
    // Its SLO is kept while it runs, and leaves with it.
    let names = |r: &Value| -> Vec<String> {
        r["slos"]
            .as_array()
            .expect("slos")
            .iter()
            .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(names(&slo(&fx)), ["echo-fast", "px-api-availability"]);
    let (ok, _, err) = fx.run(&["stop", "px/api"]);
    assert!(ok, "{err}");
    assert_eq!(names(&slo(&fx)), ["echo-fast"]);
}

/// The `echo` lane service of PX as a plan's workload, at `generation`, serving with `args`.
fn echo_plan(fx: &Fixture, echo: &str, generation: u64, args: &str) -> Value {
    let artifact = fx.add_artifact(
        &format!("echo-{generation}"),
        &format!("#!/bin/sh\nexec {echo} serve echo {args}\n"),
    );
    // The same content added again is reported `… (already present)`.
    let artifact = artifact.split_whitespace().next().unwrap_or_default();
    json!({
        "api_version": "quadrant/v1", "quadrant": "px", "workload": "echo",
        "generation": generation, "artifacts": [artifact],
        "resources": {"cpu_millis": 500, "memory_bytes": 67_108_864, "pids": 32},
        "labels": {"app": "echo", "owner": "payments"}, "restart": "on_failure",
    })
}

/// PG's `client` calls PX's `echo` `count` times, `interval_ms` apart; the call checks every
/// echo, so a single reply of the shadow reaching it fails it.
fn pg_calls(fx: &Fixture, echo: &str, count: &str, interval_ms: &str) -> Value {
    let out = fx.inst.run_in(
        Quadrant::Pg,
        Some("client"),
        &[
            echo,
            "call",
            "px",
            "echo",
            "--transport",
            "uds",
            "--count",
            count,
            "--interval-ms",
            interval_ms,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary")
}

fn shadows(fx: &Fixture) -> Value {
    let (ok, out, err) = fx.run(&["shadow", "--output", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("shadow json")
}

/// PX with a cost SLO for `echo` every slice breaks (so the next generation of the workload
/// serving it starts as a shadow by itself), a quarter of requests mirrored, 40 to judge.
fn shadow_fixture() -> (Fixture, String) {
    // A cost limit every slice breaks: the next generation is started as a shadow.
    px_fixture(
        "shadow",
        "[{name: echo-cost, quadrant: px, service: echo, indicator: cost, \
          objectives: [{target: 0.99, value: 0.000001}], timeWindow: [{duration: 28m}], minEvents: 1}, \
          {name: echo-memory, quadrant: px, service: echo, indicator: memory, \
          objectives: [{target: 0.99, value: 1024}], timeWindow: [{duration: 28m}], minEvents: 1}]",
        |c| {
            c.shadows.fraction = 0.25;
            c.shadows.min_requests = 40;
        },
    )
}

/// PG calls until the cost SLO measured a slice of more than a second.
fn measure_cost(fx: &Fixture, echo: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let cost = loop {
        let _ = pg_calls(fx, echo, "60", "20");
        let r = slo(fx);
        if let Some(c) = r["slos"][0]["cost_per_1000"].as_object() {
            break c.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cost measured: {r}"
        );
    };
    assert!(cost["last"].as_f64().expect("last") > 0.0, "{cost:?}");
    // The memory SLO judged the same slices by the workload's cgroup memory: far below 1 GiB.
    let r = slo(fx);
    let memory = &r["slos"][1];
    assert_eq!(memory["name"], "echo-memory", "{r}");
    let held = memory["memory_mib"]["last"]
        .as_f64()
        .expect("memory measured");
    assert!(held > 0.0 && held < 1024.0, "{r}");
    assert!(memory["events"]["total"].as_u64() >= Some(1), "{r}");
    assert_eq!(memory["events"]["good"], memory["events"]["total"], "{r}");
}

/// (generation, state) of workload `name` in `quadrant workloads`.
fn workload_state(fx: &Fixture, name: &str) -> Option<(Option<u64>, Option<String>)> {
    let (ok, out, err) = fx.run(&["workloads", "--output", "json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("workloads");
    list.as_array()
        .expect("list")
        .iter()
        .find(|w| w["name"] == name)
        .map(|w| {
            (
                w["generation"].as_u64(),
                w["state"].as_str().map(str::to_owned),
            )
        })
}

/// Waits (up to 5 s) until the shadow offers its service beside the live one.
fn wait_for_shadow_service(fx: &Fixture) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while shadows(fx)["shadows"][0]["services"] != json!(["echo"])
        || !fx
            .run(&["lanes"])
            .1
            .contains("shadow generation (25.0 % mirrored)")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fx.run(&["lanes"]).1
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Once the shadow offers its service, PG calls 200 times; returns the shadow's report after
/// the mirrored copies were worked through (none dropped).
fn mirrored_to_the_shadow(fx: &Fixture, echo: &str) -> Value {
    wait_for_shadow_service(fx);

    let call = pg_calls(fx, echo, "200", "2");
    assert_eq!(call["count"], 200);
    let dropped = call["mirror_dropped"].as_u64().expect("mirror_dropped");
    // The mirror thread works through its queue after the caller's round trips; a copy still
    // in flight when the caller's process exits is lost with it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let s = loop {
        let r = shadows(fx);
        let s = r["shadows"][0].clone();
        let mirrored = s["shadow"]["requests"].as_u64().unwrap_or_default();
        if mirrored + dropped >= 49 {
            std::thread::sleep(std::time::Duration::from_millis(1200));
            break shadows(fx)["shadows"][0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mirrored = s["shadow"]["requests"].as_u64().unwrap_or_default();
    assert!((49..=50).contains(&(mirrored + dropped)), "{s}");
    assert_eq!(dropped, 0, "{call}");
    // Each generation's memory, from its own cgroup (v1 groups on a hybrid host).
    assert!(
        s["live"]["memory_bytes"].as_u64() > Some(0)
            && s["shadow"]["memory_bytes"].as_u64() > Some(0),
        "{s}"
    );
    s
}

/// PG's calls to PX's echo succeed again within 5 s (after a restart of the service).
fn calls_succeed_again(fx: &Fixture, echo: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = fx.inst.run_in(
            Quadrant::Pg,
            Some("client"),
            &[echo, "call", "px", "echo", "--count", "5"],
        );
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A new generation submitted while the service's cost SLO is near its limit starts as a
/// shadow by itself: it answers inverted echoes 3 ms late, gets exactly a quarter of PG's
/// requests mirrored, and the caller — which checks every echo — never sees one of its replies.
/// `quadrant shadow` compares the two generations over the same traffic and says reject; the
/// operator rejects it. The next generation, shadowed on request, is promoted and becomes the
/// live one. Every step is audited.
#[test]
fn a_shadow_generation_gets_mirrored_requests_and_no_caller_sees_its_replies() {
    let (fx, echo) = shadow_fixture();

    // Without a live generation there is nothing to shadow.
    let (ok, _, err) =
        fx.sign_and_submit_with(&echo_plan(&fx, &echo, 1, ""), "prod", &["--shadow"]);
    assert!(
        !ok && err.contains("px/echo has no live generation running"),
        "{err}"
    );
    let (ok, out, err) = fx.sign_and_submit(&echo_plan(&fx, &echo, 1, ""), "prod");
    assert!(ok, "{err}");
    assert!(out.starts_with("started px/echo generation 1"), "{out}");
    // Calls for more than a second: the cost SLO measures a slice.
    measure_cost(&fx, &echo);

    let (ok, out, err) =
        fx.sign_and_submit(&echo_plan(&fx, &echo, 2, "--invert --slow-us 3000"), "prod");
    assert!(ok, "{err}");
    assert!(
        out.starts_with(
            "started px/echo generation 2 as a shadow of the live generation, as px/echo@shadow (cost SLO echo-cost "
        ),
        "{out}"
    );
    // One shadow at a time, and generations still only move forward.
    let (ok, _, err) = fx.sign_and_submit(&echo_plan(&fx, &echo, 3, ""), "prod");
    assert!(
        !ok && err.contains("px/echo already runs generation 2 as a shadow"),
        "{err}"
    );
    let s = mirrored_to_the_shadow(&fx, &echo);
    assert_eq!(
        (
            s["live"]["generation"].as_u64(),
            s["shadow"]["generation"].as_u64()
        ),
        (Some(1), Some(2))
    );
    // Both are measured from the shadow's first mirrored request on (the fourth call).
    let live = s["live"]["requests"].as_u64().expect("live requests");
    assert!((190..=200).contains(&live), "{s}");
    assert_eq!(
        (s["live"]["failed"].as_u64(), s["shadow"]["failed"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert!(s["shadow"]["p99_ms"].as_f64().expect("p99") >= 3.0, "{s}");
    assert_eq!(s["verdict"], "reject", "{s}");
    assert!(
        s["findings"].as_array().expect("findings").iter().any(|f| {
            let f = f.as_str().unwrap_or_default();
            f.starts_with("p99 latency") && f.ends_with("(worse)")
        }),
        "{s}"
    );
    let (ok, out, err) = fx.run(&["shadow", "reject", "px/echo"]);
    assert!(ok, "{err}");
    assert!(out.contains("px/echo generation 2 rejected"), "{out}");
    assert_eq!(shadows(&fx)["shadows"], json!([]));
    // The live generation 1 serves on; the rejected one burned generation 2.
    assert_eq!(
        workload_state(&fx, "px/echo"),
        Some((Some(1), Some("running".into())))
    );
    assert_eq!(
        workload_state(&fx, "px/echo@shadow").map(|s| s.1),
        Some(Some("stopped".into()))
    );
    let (ok, _, err) = fx.sign_and_submit(&echo_plan(&fx, &echo, 2, ""), "prod");
    assert!(!ok && err.contains("generation"), "{err}");

    // Generation 3, shadowed on request, is promoted: it is the live generation then.
    let (ok, out, err) =
        fx.sign_and_submit_with(&echo_plan(&fx, &echo, 3, ""), "prod", &["--shadow"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("as px/echo@shadow (asked for (--shadow))"),
        "{out}"
    );
    let (ok, out, err) = fx.run(&["shadow", "promote", "px/echo"]);
    assert!(ok, "{err}");
    assert!(out.contains("px/echo generation 3 promoted"), "{out}");
    calls_succeed_again(&fx, &echo);
    assert_eq!(
        workload_state(&fx, "px/echo"),
        Some((Some(3), Some("running".into())))
    );

    // Start, reject, start, promote: each an audit record, and the log still verifies.
    let audit = fs::read_to_string(&fx.inst.config.audit_log).expect("audit log");
    let actions: Vec<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "shadow")
        .map(|r| r["event"]["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["start", "rejected", "start", "promoted"],
        "{audit}"
    );
    let (ok, _, err) = fx.run(&["audit", "verify"]);
    assert!(ok, "{err}");
}

/// A plan's `breaker` section judges its service by its own thresholds while it runs: five
/// failed calls open PX's `echo` breaker for 800 ms where the configuration waits for 20; a
/// second plan cannot set thresholds for the same service; stopping the workload takes them.
#[test]
fn a_plan_sets_the_breaker_thresholds_of_its_service() {
    let (fx, echo) = shadow_fixture();
    let mut plan = echo_plan(&fx, &echo, 1, "--drop-after 0");
    plan["breaker"] = json!({"min_calls": 5, "base_ejection_ms": 800});
    let (ok, _, err) = fx.sign_and_submit(&plan, "prod");
    assert!(ok, "{err}");
    let api = fx.add_artifact("api", "#!/bin/sh\nexec sleep 60\n");
    let mut other = plan_doc(1, &api);
    other["breaker"] = json!({"service": "echo", "min_calls": 50});
    let (ok, _, err) = fx.sign_and_submit(&other, "prod");
    assert!(
        !ok && err.contains(
            "the plan's breaker section: px/echo has breaker thresholds from the plan of px/echo already"
        ),
        "{err}"
    );
    let mut bad = plan_doc(1, &api);
    bad["breaker"] = json!({"base_ejection_ms": 120_000});
    let (ok, _, err) = fx.sign_and_submit(&bad, "prod");
    assert!(
        !ok && err.contains("breaker.base_ejection_ms: 120000 is above"),
        "{err}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !fx.run(&["lanes"]).1.contains("px/echo") {
        assert!(std::time::Instant::now() < deadline, "echo never offered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let breakers = || -> Value {
        let (ok, out, err) = fx.run(&["breakers", "--output", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).expect("breakers json")
    };
    for _ in 0..5 {
        let out = fx.inst.run_in(
            Quadrant::Pg,
            Some("client"),
            &[
                &echo,
                "call",
                "px",
                "echo",
                "--transport",
                "uds",
                "--count",
                "1",
            ],
        );
        assert!(!out.status.success(), "the service answered");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let row = loop {
        let r = breakers();
        if r["services"][0]["state"] == "open" {
            break r["services"][0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "not open: {r}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        (
            &row["service"],
            &row["ejection_ms"],
            &row["plan"],
            &row["opened"]
        ),
        (&json!("px/echo"), &json!(800), &json!("px/echo"), &json!(1)),
        "{row}"
    );
    let (ok, _, err) = fx.run(&["stop", "px/echo"]);
    assert!(ok, "{err}");
    assert_eq!(breakers()["services"][0]["plan"], Value::Null);
}

/// A shadow generation does not outlive its agent: across `down --keep-dataplane` and `up` the
/// live generation is adopted and serves on, the shadow's process is stopped and recorded as
/// rejected.
#[test]
fn a_shadow_generation_is_stopped_across_an_agent_upgrade() {
    let (mut fx, echo) = shadow_fixture();
    let (ok, _, err) = fx.sign_and_submit(&echo_plan(&fx, &echo, 1, ""), "prod");
    assert!(ok, "{err}");
    let (ok, _, err) =
        fx.sign_and_submit_with(&echo_plan(&fx, &echo, 2, ""), "prod", &["--shadow"]);
    assert!(ok, "{err}");
    // The shadow runs and offers its service before the agent hands over (a process still
    // starting, or restarting after a failed start, is not handed over at all).
    wait_for_shadow_service(&fx);
    let out = fx.inst.stop_keeping_dataplane();
    assert!(out.status.success(), "{out:?}");
    fx.inst.start_agent();
    assert_eq!(
        workload_state(&fx, "px/echo"),
        Some((Some(1), Some("running".into())))
    );
    assert_eq!(
        workload_state(&fx, "px/echo@shadow").map(|s| s.1),
        Some(Some("stopped".into()))
    );
    assert_eq!(shadows(&fx)["shadows"], json!([]));
    calls_succeed_again(&fx, &echo);
    let audit = fs::read_to_string(&fx.inst.config.audit_log).expect("audit log");
    assert!(
        audit.lines().any(|l| l.contains("\"kind\":\"shadow\"")
            && l.contains("\"action\":\"rejected\"")
            && l.contains("agent upgrade")),
        "{audit}"
    );
}

#[test]
fn workloads_are_placed_on_the_instance_that_fits_and_a_refusal_explains_each() {
    let (mut fx, _) = px_fixture("place", "[]", |c| {
        let px = c.quadrants.get_mut("px").expect("px");
        px.instances = 3;
        px.capacity.memory_bytes = Some(256 << 20);
        px.instance_labels
            .insert(2, [("disk".to_owned(), "ssd".to_owned())].into());
    });
    let (ok, _, err) = fx.run(&["drain", "px", "1"]);
    assert!(ok, "{err}");
    let artifact = fx.add_artifact("sleeper", "#!/bin/sh\nexec sleep 600\n");
    let mut plan = plan_doc(1, &artifact);
    plan["resources"]["memory_bytes"] = json!(200 << 20);
    plan["constraints"] = json!(["disk=ssd"]);

    // `place --explain` shows the decision before anything runs.
    let plan_path = fx.dir.join("place.json");
    fs::write(&plan_path, plan.to_string()).expect("write");
    let (ok, out, err) = fx.run(&["place", "--explain", plan_path.to_str().expect("utf8")]);
    assert!(ok, "{out} {err}");
    assert!(out.starts_with("instance 2 of px (1 fit"), "{out}");
    assert!(out.contains("px-1     filtered: draining"), "{out}");
    assert!(
        out.contains("px       filtered: didn't match constraint disk=ssd"),
        "{out}"
    );

    let (ok, _, err) = fx.sign_and_submit(&plan, "prod");
    assert!(ok, "{err}");
    let pid = fx.workloads()[0]["pid"].as_u64().expect("pid");
    let name = fx.inst.config.instance.clone();
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(
        cgroups.contains(&format!("0::/{name}/px-2/api")),
        "{cgroups}"
    );
    let ns = |p: &str| fs::metadata(p).map(|m| m.ino()).expect("ns");
    assert_eq!(
        ns(&format!("/proc/{pid}/ns/net")),
        ns(&format!("/run/netns/{name}-px-2"))
    );

    // A second such workload fits nowhere, and says why for each instance.
    let mut other = plan.clone();
    other["workload"] = json!("batch");
    let (ok, _, err) = fx.sign_and_submit(&other, "prod");
    assert!(!ok);
    assert!(
        err.contains(
            "px/batch: not placed: 0/3 px instances available: 1 didn't match constraint \
             disk=ssd, 1 draining, 1 insufficient memory (need 200 MiB, free 56 MiB)"
        ),
        "{err}"
    );
    // Nothing of it was recorded: after the drain ends it is placed, generation 1 still.
    let (ok, _, err) = fx.run(&["drain", "px", "1", "--resume"]);
    assert!(ok, "{err}");
    other["constraints"] = json!([]);
    let (ok, _, err) = fx.sign_and_submit(&other, "prod");
    assert!(ok, "{err}");
    // The next generation of `api` replaces the first: its own memory is not counted twice.
    plan["generation"] = json!(2);
    let (ok, _, err) = fx.sign_and_submit(&plan, "prod");
    assert!(ok, "{err}");
    let api_pid = |fx: &Fixture| {
        fx.workloads()
            .iter()
            .find(|w| w["name"] == "px/api")
            .and_then(|w| w["pid"].as_u64())
    };
    let pid = api_pid(&fx).expect("api runs");

    // Across an agent upgrade the instances and the workload placed on one are taken over.
    let out = fx.inst.stop_keeping_dataplane();
    assert!(out.status.success(), "{out:?}");
    fx.inst.start_agent();
    assert_eq!(api_pid(&fx), Some(pid), "the same process, adopted in px-2");
    let (ok, out, _) = fx.run(&["instances"]);
    assert!(ok && out.contains("px-2"), "{out}");
}
