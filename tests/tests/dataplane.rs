//! The agent's own eBPF object: a configured signature is checked before anything is loaded,
//! the program set and map layout versions only move forward on a host, and a new agent takes
//! over the dataplane an old one kept running with its tracked flows. Needs root.

use quadrant_tests::bounded::Bounded as _;
use std::{
    fs,
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;

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
        .output_bounded();
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

/// Generates a `dataplane` key `dp` and a `plan` key `planner` for every quadrant under `keys`
/// and trusts both.
fn trust_keys(path: &Path, keys: &Path) {
    let keys_s = keys.to_str().expect("utf8");
    for (id, role) in [("dp", "dataplane"), ("planner", "plan")] {
        let mut args = vec![
            "keys", "generate", "--id", id, "--role", role, "--out", keys_s,
        ];
        for q in ["dx", "dg", "px", "pg"] {
            args.extend(["--quadrant", q]);
        }
        let (ok, out) = quadrant(path, &args);
        assert!(ok, "{out}");
        let trusted = keys.join(format!("{id}.json"));
        let (ok, out) = quadrant(path, &["keys", "trust", trusted.to_str().expect("utf8")]);
        assert!(ok, "{out}");
    }
}

/// Signs this agent's object with key `id` (`quadrant dataplane sign`) into `sig`.
fn sign_object(path: &Path, keys: &Path, id: &str, sig: &Path) {
    let (ok, out) = quadrant(
        path,
        &[
            "dataplane",
            "sign",
            "--key",
            keys.join(format!("{id}.pk8")).to_str().expect("utf8"),
            "--out",
            sig.to_str().expect("utf8"),
        ],
    );
    assert!(ok, "{out}");
}

#[test]
fn the_dataplane_runs_only_signed_and_never_older() {
    let mut config = test_config(None);
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-dataplane", config.instance));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    config.trust_store = dir.join("trust");
    let generations = quadrant::daemon::state::generations_path(&config);
    let _ = fs::remove_file(&generations);
    let path = dir.join("config.yaml");
    fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
    let keys = dir.join("keys");
    trust_keys(&path, &keys);
    let sig = dir.join("dataplane.sig.json");
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
    sign_object(&path, &keys, "planner", &sig);
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
    sign_object(&path, &keys, "dp", &sig);
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

/// Receives `count` `tick N` datagrams from a `qprobe udp-push` flow, each the one after `last`
/// (none lost since the previous call); panics naming `phase` if one does not arrive within two
/// seconds.
fn ticks(socket: &UdpSocket, last: &mut Option<u64>, count: usize, phase: &str) {
    let mut buf = [0u8; 64];
    for _ in 0..count {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{phase}: the pushed flow stopped: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]);
        let tick: u64 = text
            .strip_prefix("tick ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{phase}: unexpected datagram {text:?}"));
        if let Some(prev) = *last {
            assert_eq!(tick, prev + 1, "{phase}: ticks lost");
        }
        *last = Some(tick);
    }
}

fn program_ids(inst: &Instance) -> Vec<u32> {
    inst.status()
        .quadrants
        .iter()
        .flat_map(|q| q.programs.iter().map(|p| p.program_id))
        .collect()
}

#[test]
fn a_kept_dataplane_is_taken_over_with_its_flows() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let dg = inst.addr(Quadrant::Dg);
    let px = inst.addr(Quadrant::Px);
    let _push = inst.serve(Quadrant::Dg, &["udp-push", "0.0.0.0:7100"]);
    let _echo = inst.serve(Quadrant::Px, &["tcp-echo", "0.0.0.0:7101"]);
    // host → DG is allowed, DG → host only for ICMP: every tick DG pushes passes only as a reply
    // of the flow the host opened with one datagram, through CONNTRACK (the host never sends
    // again, so nothing but the carried entry lets the ticks through after a takeover).
    let host = UdpSocket::bind("0.0.0.0:0").expect("bind");
    host.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    host.send_to(b"start", format!("{dg}:7100")).expect("send");
    let mut last = None;
    ticks(&host, &mut last, 3, "before");
    let old_ids = program_ids(&inst);
    let blocked =
        |inst: &Instance| inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{px}:7101"), "500"]);
    assert_eq!(blocked(&inst), (false, "err EPERM".into()));

    // The agent stops; the dataplane goes on enforcing without it.
    let out = inst.stop_keeping_dataplane();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("keep enforcing"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    ticks(&host, &mut last, 5, "without an agent");
    assert_eq!(blocked(&inst), (false, "err EPERM".into()));

    // A new agent takes it over: the flow goes on, the links run the new programs.
    inst.start_agent();
    let status = inst.status();
    let carried = status.carried.expect("the agent took the dataplane over");
    assert!(carried.flows >= 1, "{carried:?}");
    assert_eq!(
        carried.from_map_layout,
        dataplane_common::MAP_LAYOUT_VERSION
    );
    assert!(carried.counters, "{carried:?}");
    ticks(&host, &mut last, 10, "after the takeover");
    if let Some(line) = inst.agent_log().lines().find(|l| l.contains("took over")) {
        println!("{line}");
    }
    let new_ids = program_ids(&inst);
    assert_eq!(new_ids.len(), old_ids.len());
    assert!(
        new_ids.iter().all(|id| !old_ids.contains(id)),
        "old {old_ids:?}, new {new_ids:?}"
    );
    assert!(
        inst.counter("connect4", Quadrant::Dx, "deny_policy") >= 2,
        "counters carried over: {:?}",
        inst.status().counters
    );
    assert_eq!(blocked(&inst), (false, "err EPERM".into()));
    let _echo_dg = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7102"]);
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{dg}:7102"), "2000"]
        ),
        (true, "ok hello".into())
    );

    // Kept again, but its CONNTRACK is not one this agent can read: the takeover is refused
    // and the kept dataplane stays exactly as it was.
    assert!(inst.stop_keeping_dataplane().status.success());
    let pin = inst.config.bpffs_dir().join("maps").join("CONNTRACK");
    fs::remove_file(&pin).expect("unpin CONNTRACK");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "lru_hash",
            "key",
            "16",
            "value",
            "8",
            "entries",
            "64",
            "name",
            "CONNTRACK",
        ])
        .output_bounded();
    assert!(made.status.success(), "{made:?}");
    let err = up_refused(&inst.config, &inst.config_path);
    assert!(
        err.contains("CONNTRACK")
            && err.contains("knows no conversion")
            && err.contains("was not changed and keeps enforcing"),
        "{err}"
    );
    ticks(&host, &mut last, 5, "after the refused takeover");
    assert_eq!(blocked(&inst), (false, "err EPERM".into()));
    assert!(inst.down().status.success());
    assert!(!inst.config.bpffs_dir().exists());
}
