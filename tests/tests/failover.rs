//! Failover without losing a request, in real namespaces: callers in PG send numbered requests
//! at a fixed rate to a lane service that both PX instances offer, through the retrying caller
//! (`lane-echo steady`), while the instances' servers are killed (`SIGKILL`) in turn. Every request must
//! end answered with its own echo, and every answer must have been handled by an instance (the
//! servers' ledgers). Needs root.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc::Receiver,
    thread,
    time::Duration,
};

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, sibling_binary, test_config};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const KILLS: usize = 20;

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Starts the echo server of PX instance `k`, answering 1 ms late (so a kill often finds a
/// request in its hands) and writing every request it handles to its ledger.
fn serve(inst: &mut Instance, echo: &str, k: u8, ledger: &Path) -> (u32, Receiver<String>) {
    inst.background_on(
        Quadrant::Px,
        k,
        Some("echo"),
        &[
            echo,
            "serve",
            "echo",
            "--tcp-port",
            "7000",
            "--slow-us",
            "1000",
            "--ledger",
            ledger.to_str().expect("utf8"),
        ],
        "listening as",
    )
}

/// Runs `lane-echo steady` in PG on its own thread (the kills go on meanwhile).
fn steady(inst: &Instance, echo: &str, transport: &str, tag: &str) -> thread::JoinHandle<Output> {
    let mut command = Command::new(&inst.bin);
    command
        .arg("--config")
        .arg(&inst.config_path)
        .args(["exec", "pg", "--workload", "caller", "--", echo, "steady"])
        .args(["px", "echo", "--transport", transport, "--rate", "200"])
        .args(["--seconds", "9", "--tag", tag])
        .stdin(Stdio::null());
    thread::spawn(move || command.output().expect("run lane-echo steady"))
}

/// How many times the servers handled each request, from their ledgers (`ATTEMPT MESSAGE`
/// lines).
fn handled(ledgers: &[PathBuf]) -> BTreeMap<String, Vec<u32>> {
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for path in ledgers {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            let (attempt, msg) = line.split_once(' ').expect("ATTEMPT MESSAGE");
            seen.entry(msg.to_owned())
                .or_default()
                .push(attempt.parse().expect("attempt"));
        }
    }
    seen
}

#[test]
fn no_acknowledged_request_is_lost_while_instances_are_killed() {
    let mut config = test_config(None);
    config.quadrants.get_mut("px").expect("px").instances = 2;
    let mut inst = Instance::up(config, QPROBE);
    let echo = sibling_binary(QPROBE, "lane-echo");
    let echo = echo.to_str().expect("utf8").to_owned();
    let dir = std::env::temp_dir().join(format!("quadrant-ledgers-{}", inst.config.instance));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("ledger dir");
    let ledgers: Vec<PathBuf> = (0..2).map(|k| dir.join(format!("px-{k}"))).collect();
    // The receivers stay alive: a server whose stdout closes dies at its next line.
    let mut servers: Vec<(u32, Receiver<String>)> = (0..2u8)
        .map(|k| serve(&mut inst, &echo, k, &ledgers[usize::from(k)]))
        .collect();

    // One caller whose lanes are local (shared memory), one over TCP + mTLS to the instance's
    // address.
    let local = steady(&inst, &echo, "auto", "a");
    let tcp = steady(&inst, &echo, "tcp", "b");
    thread::sleep(Duration::from_millis(700));
    // Each kill takes the instance the callers' lanes are on (they moved to it at the last
    // kill); its server comes back before the other instance's is killed.
    for i in 0..KILLS {
        let k = i % 2;
        sigkill(servers[k].0);
        thread::sleep(Duration::from_millis(80));
        let k8 = u8::try_from(k).expect("instance");
        servers[k] = serve(&mut inst, &echo, k8, &ledgers[k]);
        thread::sleep(Duration::from_millis(80));
    }

    let outputs = [
        (local.join().expect("caller"), "a"),
        (tcp.join().expect("caller"), "b"),
    ];
    let handled = handled(&ledgers);
    for (out, tag) in outputs {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{tag}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{tag}: summary {stdout:?}: {e}"));
        let numbers = summary["ok_numbers"].take();
        eprintln!("caller {tag}: {summary}");
        let submitted = summary["submitted"].as_u64().expect("submitted");
        assert!(submitted >= 1500, "{tag}: sent at 200/s for 9 s: {summary}");
        for empty in ["not_sent", "indeterminate", "wrong_answer"] {
            assert_eq!(summary[empty], serde_json::json!([]), "{tag}: {empty}");
        }
        assert_eq!(summary["unresolved"], 0, "{tag}: every request ended");
        assert_eq!(summary["ok"], submitted, "{tag}: every request answered");
        let failovers = summary["failovers"].as_u64().expect("failovers");
        assert!(
            failovers >= u64::try_from(KILLS / 2).expect("n"),
            "{tag}: the kills reached the caller's lanes: {summary}"
        );
        assert!(
            summary["resent"].as_u64().expect("resent") >= 1,
            "{tag}: some requests were in flight at a kill: {summary}"
        );
        // Acknowledged means handled: every answer came from a server that logged the request.
        let mut repeats = 0;
        for n in numbers.as_array().expect("ok numbers") {
            let msg = format!("{tag}-{n}");
            let times = handled
                .get(&msg)
                .unwrap_or_else(|| panic!("{tag}: {msg} was answered but no server handled it"));
            if times.len() > 1 {
                repeats += 1;
            }
        }
        eprintln!("caller {tag}: {repeats} requests handled twice (sent again after a kill)");
    }
}

/// The offers of PX's `echo` in `quadrant lanes`: instance → hung.
fn offers(inst: &Instance) -> BTreeMap<u64, bool> {
    let out = inst.quadrant(&["lanes", "--output", "json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("lanes json");
    v["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter(|s| s["service"] == "echo")
        .map(|s| {
            (
                s["instance"].as_u64().expect("instance"),
                s["hung"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// Polls `offers` until `want` holds (5 s at most); returns how long it took.
fn until_offers(inst: &Instance, want: &[(u64, bool)]) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let now = offers(inst);
        if want.iter().all(|(k, hung)| now.get(k) == Some(hung)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "offers stay {now:?}, want {want:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        signal,
    )
    .expect("signal");
}

/// A frozen (living but hung) instance: its listener misses the broker's pings and is marked
/// hung within about 300 ms; the caller's request on it times out (per-try 150 ms) and goes to
/// the other instance, and new lanes pass the hung one over until it thaws.
#[test]
fn a_hung_instance_is_passed_over_and_its_requests_answered_elsewhere() {
    use nix::sys::signal::Signal;
    let mut config = test_config(None);
    config.quadrants.get_mut("px").expect("px").instances = 2;
    let mut inst = Instance::up(config, QPROBE);
    let echo = sibling_binary(QPROBE, "lane-echo");
    let echo = echo.to_str().expect("utf8").to_owned();
    let servers: Vec<(u32, Receiver<String>)> = (0..2u8)
        .map(|k| {
            inst.background_on(
                Quadrant::Px,
                k,
                Some("echo"),
                &[&echo, "serve", "echo"],
                "listening as",
            )
        })
        .collect();
    until_offers(&inst, &[(0, false), (1, false)]);

    let mut command = Command::new(&inst.bin);
    command
        .arg("--config")
        .arg(&inst.config_path)
        .args(["exec", "pg", "--workload", "caller", "--", &echo, "steady"])
        .args(["px", "echo", "--rate", "200", "--seconds", "3"])
        .args(["--per-try-ms", "150", "--tag", "h"])
        .stdin(Stdio::null());
    let caller = thread::spawn(move || command.output().expect("run lane-echo steady"));
    thread::sleep(Duration::from_millis(700));
    // The caller's lane is on instance 0 (the lowest of two with no lanes).
    signal(servers[0].0, Signal::SIGSTOP);
    let noticed = until_offers(&inst, &[(0, true), (1, false)]);
    eprintln!("hung listener noticed after {noticed:?}");
    assert!(
        noticed < Duration::from_millis(600),
        "3 pings 100 ms apart, then the next round: {noticed:?}"
    );
    let out = inst.run_in(
        Quadrant::Pg,
        Some("caller"),
        &[&echo, "call", "px", "echo", "--count", "3"],
    );
    assert!(
        out.status.success(),
        "a new lane goes to the instance that answers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = caller.join().expect("caller");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let mut summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("summary {stdout:?}: {e}"));
    summary["ok_numbers"].take();
    eprintln!("caller: {summary}");
    assert_eq!(summary["indeterminate"], serde_json::json!([]));
    assert_eq!(summary["not_sent"], serde_json::json!([]));
    assert_eq!(summary["ok"], summary["submitted"]);
    // One fail-over: the re-open passes over the instance the caller left (as Envoy's
    // `previous_hosts` retry predicate does), though the broker may not call it hung yet.
    assert_eq!(summary["failovers"], 1, "{summary}");

    signal(servers[0].0, Signal::SIGCONT);
    let back = until_offers(&inst, &[(0, false), (1, false)]);
    eprintln!("thawed listener answers again after {back:?}");
}
