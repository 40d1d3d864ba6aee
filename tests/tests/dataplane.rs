//! The agent's own eBPF object: a configured signature is checked before anything is loaded,
//! and the program set and map layout versions only move forward on a host. Needs root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use quadrant::{
    config::Config,
    signing::{DATAPLANE_PAYLOAD_TYPE, SigningKey},
};
use quadrant_tests::harness::{Instance, TEST_STATE_DIR, sibling_binary, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn quadrant(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(sibling_binary(QPROBE, "quadrant"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run quadrant");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Runs `quadrant up`, which must fail; returns its error output.
fn up_refused(config: &Config, path: &Path) -> String {
    fs::write(path, serde_yaml::to_string(config).expect("yaml")).expect("write config");
    let mut child = Command::new(sibling_binary(QPROBE, "quadrant"))
        .arg("--config")
        .arg(path)
        .arg("up")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
                .expect("read");
            assert!(!status.success(), "up should have been refused");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = quadrant(path, &["down"]);
            panic!("up was not refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: refusals, then a signed start, then downgrades"
)]
fn the_dataplane_runs_only_signed_and_never_older() {
    let dir = PathBuf::from(TEST_STATE_DIR).join("qt28-dataplane");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    let mut config = test_config(28, None);
    config.trust_store = dir.join("trust");
    let generations = config.audit_log.with_file_name("qt28-generations.json");
    let _ = fs::remove_file(&generations);
    let path = dir.join("config.yaml");
    fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
    let keys = dir.join("keys");
    let keys_s = keys.to_str().expect("utf8");
    for (id, role) in [("dp", "dataplane"), ("planner", "plan")] {
        let mut args = vec![
            "keys", "generate", "--id", id, "--role", role, "--out", keys_s,
        ];
        for q in ["dx", "dg", "px", "pg"] {
            args.extend(["--quadrant", q]);
        }
        let (ok, out) = quadrant(&path, &args);
        assert!(ok, "{out}");
        let trusted = keys.join(format!("{id}.json"));
        let (ok, out) = quadrant(&path, &["keys", "trust", trusted.to_str().expect("utf8")]);
        assert!(ok, "{out}");
    }
    let sig = dir.join("dataplane.sig.json");
    let sig_s = sig.to_str().expect("utf8");
    let mut refused = 0;

    // Required but absent.
    config.require_signed_dataplane = true;
    let err = up_refused(&config, &path);
    assert!(
        err.contains("no dataplane_signature is configured"),
        "{err}"
    );
    refused += 1;

    // Signed by a key without the dataplane role.
    let (ok, out) = quadrant(
        &path,
        &[
            "dataplane",
            "sign",
            "--key",
            keys.join("planner.pk8").to_str().expect("utf8"),
            "--out",
            sig_s,
        ],
    );
    assert!(ok, "{out}");
    config.dataplane_signature = Some(sig.clone());
    let err = up_refused(&config, &path);
    assert!(
        err.contains("dataplane refused") && err.contains("planner"),
        "{err}"
    );
    refused += 1;

    // Signed by the right key, but for another object.
    let key = SigningKey::load(&keys.join("dp.pk8")).expect("key");
    let other = format!("sha256:{} program-set 2 map-layout 2", "0".repeat(64));
    fs::write(
        &sig,
        serde_json::to_string(&key.sign(DATAPLANE_PAYLOAD_TYPE, other.as_bytes())).expect("json"),
    )
    .expect("write");
    let err = up_refused(&config, &path);
    assert!(err.contains("this agent's object is"), "{err}");
    refused += 1;

    // The genuine signature: the agent runs, and records its versions.
    let (ok, out) = quadrant(
        &path,
        &[
            "dataplane",
            "sign",
            "--key",
            keys.join("dp.pk8").to_str().expect("utf8"),
            "--out",
            sig_s,
        ],
    );
    assert!(ok, "{out}");
    let mut inst = Instance::up(config.clone(), QPROBE);
    assert!(inst.down().status.success());
    let recorded: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&generations).expect("generations"))
            .expect("json");
    assert_eq!(
        recorded["dataplane/program-set"],
        dataplane_common::PROGRAM_SET_VERSION
    );
    assert_eq!(
        recorded["dataplane/map-layout"],
        dataplane_common::MAP_LAYOUT_VERSION
    );

    // A newer program set ran here before: this (older) agent refuses to start.
    let mut newer = recorded.clone();
    newer["dataplane/program-set"] = serde_json::json!(dataplane_common::PROGRAM_SET_VERSION + 1);
    fs::write(&generations, newer.to_string()).expect("write");
    let err = up_refused(&config, &path);
    assert!(
        err.contains("eBPF program set is version") && err.contains("upgrades only move forward"),
        "{err}"
    );
    refused += 1;
    let mut newer = recorded;
    newer["dataplane/map-layout"] = serde_json::json!(dataplane_common::MAP_LAYOUT_VERSION + 1);
    fs::write(&generations, newer.to_string()).expect("write");
    let err = up_refused(&config, &path);
    assert!(err.contains("map layout is version"), "{err}");
    refused += 1;
    println!("dataplane refusals: {refused} of {refused}");
    let _ = fs::remove_file(&generations);
}
