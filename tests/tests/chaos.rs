//! Faults in the dataplane (`quadrant chaos`), in real namespaces: a partition, a loss share, a
//! delay and refused connects, each measured from inside a quadrant, each ending by itself at
//! its expiry, and none reaching traffic it does not name. Needs root.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, test_config};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn chaos(inst: &Instance, args: &[&str]) -> String {
    let mut command = vec!["chaos"];
    command.extend(args);
    let out = inst.quadrant(&command);
    assert!(
        out.status.success(),
        "quadrant {command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn faults(inst: &Instance) -> Vec<Value> {
    serde_json::from_str::<Value>(&chaos(inst, &["status", "--output", "json"]))
        .expect("status json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `qprobe udp-rtt` from DX (or from the host) to DG's echo: its summary.
fn rtt(inst: &Instance, from_host: bool, count: u32, timeout_ms: u32) -> Value {
    let dg = format!("{}:7000", inst.addr(Quadrant::Dg));
    let (count, timeout) = (count.to_string(), timeout_ms.to_string());
    let args = ["udp-rtt", &dg, &count, &timeout];
    let line = if from_host {
        let out = Command::new(QPROBE).args(args).output().expect("qprobe");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    } else {
        inst.probe(Quadrant::Dx, &args).1
    };
    let json = line
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("udp-rtt: {line}"));
    serde_json::from_str(json).expect("udp-rtt json")
}

#[test]
fn faults_drop_delay_and_refuse_and_end_by_themselves() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _udp = inst.background_in(
        Quadrant::Dg,
        None,
        &[QPROBE, "udp-echo", "0.0.0.0:7000"],
        "listening",
    );
    let _tcp = inst.background_in(
        Quadrant::Dg,
        None,
        &[QPROBE, "tcp-echo", "0.0.0.0:7001"],
        "listening",
    );
    let base = rtt(&inst, false, 50, 200);
    assert_eq!(base["answered"], 50, "{base}");
    eprintln!("baseline DX -> DG: {base}");

    partition(&inst);
    loss(&inst);
    delay(&inst);
    refuse(&inst);
    production(&inst);
}

/// A partition: nothing passes, both directions are entries; it heals at its expiry with
/// nobody removing it.
fn partition(inst: &Instance) {
    let armed = Instant::now();
    chaos(
        inst,
        &[
            "inject",
            "drop",
            "--from",
            "dx",
            "--to",
            "dg",
            "--both-ways",
            "--for",
            "2",
        ],
    );
    let cut = rtt(inst, false, 20, 50);
    assert_eq!(cut["answered"], 0, "{cut}");
    // Traffic the fault does not name passes: the host to DG.
    let host = rtt(inst, true, 20, 200);
    assert_eq!(host["answered"], 20, "the host is not partitioned: {host}");
    let listed = faults(inst);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let into_dg = listed
        .iter()
        .find(|f| f["from"] == "dx" && f["to"] == "dg")
        .expect("dx -> dg");
    assert!(into_dg["matched"].as_u64() >= Some(20), "{into_dg}");
    assert_eq!(into_dg["matched"], into_dg["dropped"], "{into_dg}");
    thread::sleep(Duration::from_millis(2_200).saturating_sub(armed.elapsed()));
    let healed = rtt(inst, false, 20, 200);
    assert_eq!(healed["answered"], 20, "ended by its expiry: {healed}");
    assert!(
        faults(inst).iter().all(|f| f["left_ms"] == 0),
        "listed as ended until removed"
    );
}

/// Loss: a share of the packets.
fn loss(inst: &Instance) {
    chaos(
        inst,
        &[
            "inject",
            "drop",
            "--from",
            "dx",
            "--to",
            "dg",
            "--percent",
            "30",
            "--for",
            "20",
        ],
    );
    let lossy = rtt(inst, false, 300, 30);
    let answered = lossy["answered"].as_u64().expect("answered");
    eprintln!("30 % loss: {lossy}");
    // 300 requests at 70 %: 210 ± 8 (one standard deviation).
    assert!((170..=250).contains(&answered), "{lossy}");
    chaos(inst, &["recover", "--all"]);
    assert_eq!(
        rtt(inst, false, 50, 200)["answered"],
        50,
        "recovered at once"
    );
}

/// Delay: 40 ms ± 4 ms on the requests into DG (the answers are not delayed). It needs the fq
/// qdisc; a kernel without it gets a clear refusal and no fault.
fn delay(inst: &Instance) {
    let delay = inst.quadrant(&[
        "chaos",
        "inject",
        "delay",
        "--from",
        "dx",
        "--to",
        "dg",
        "--delay-ms",
        "40",
        "--jitter-ms",
        "4",
        "--for",
        "20",
    ]);
    if quadrant::chaos::fq_available() {
        assert!(
            delay.status.success(),
            "{}",
            String::from_utf8_lossy(&delay.stderr)
        );
        let slow = rtt(inst, false, 40, 500);
        eprintln!("40 ± 4 ms delay: {slow}");
        assert_eq!(slow["answered"], 40, "{slow}");
        let (min, p50, max) = (
            slow["min_us"].as_u64().expect("min"),
            slow["p50_us"].as_u64().expect("p50"),
            slow["max_us"].as_u64().expect("max"),
        );
        assert!(min >= 35_900, "nothing earlier than 36 ms: {slow}");
        assert!((38_000..=46_000).contains(&p50), "p50 near 40 ms: {slow}");
        assert!(max <= 80_000, "{slow}");
        chaos(inst, &["recover", "--all"]);
        let fast = rtt(inst, false, 20, 200);
        assert!(fast["p50_us"].as_u64() < Some(10_000), "{fast}");
    } else {
        let err = String::from_utf8_lossy(&delay.stderr);
        eprintln!("no fq qdisc in this kernel: {err}");
        assert!(!delay.status.success());
        assert!(err.contains("CONFIG_NET_SCH_FQ"), "{err}");
        assert!(faults(inst).is_empty(), "nothing half-applied");
    }
}

/// Refused connects: `ECONNREFUSED` at `connect()`, counted as `refuse_chaos`.
fn refuse(inst: &Instance) {
    let dg_tcp = format!("{}:7001", inst.addr(Quadrant::Dg));
    let before = inst.counter("connect4", Quadrant::Dx, "refuse_chaos");
    chaos(
        inst,
        &[
            "inject", "refuse", "--from", "dx", "--to", "dg", "--for", "20",
        ],
    );
    let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &dg_tcp, "500"]);
    assert!(!ok && line.contains("ECONNREFUSED"), "{line}");
    assert!(inst.counter("connect4", Quadrant::Dx, "refuse_chaos") > before);
    chaos(inst, &["recover", "--all"]);
    let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &dg_tcp, "500"]);
    assert!(ok, "{line}");
}

/// Production quadrants only by name; recover twice in a row.
fn production(inst: &Instance) {
    let out = inst.quadrant(&[
        "chaos", "inject", "drop", "--from", "dx", "--to", "px", "--for", "5",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-production"), "{err}");
    chaos(
        inst,
        &[
            "inject",
            "drop",
            "--from",
            "dx",
            "--to",
            "px",
            "--for",
            "5",
            "--allow-production",
        ],
    );
    chaos(inst, &["recover", "--all"]);
    let again = chaos(inst, &["recover", "--all"]);
    assert!(again.contains("removed 0 fault(s)"), "{again}");
    assert!(chaos(inst, &["status"]).contains("no faults"));
}

/// An effect probe's report: from and to, at least `baseline` answered before the fault, at
/// most `fault` during it, at least `recovery` after it.
fn assert_effect(
    effect: &Value,
    (from, to): (&str, &str),
    (baseline, fault, recovery): (f64, f64, f64),
) {
    assert_eq!((&effect["from"], &effect["to"]), (&from.into(), &to.into()));
    let share = |w: &str| effect[w]["availability"].as_f64().unwrap_or(-1.0);
    assert!(share("baseline") >= baseline, "before the fault: {effect}");
    assert!(
        (0.0..=fault).contains(&share("fault")),
        "during the fault: {effect}"
    );
    assert!(share("recovery") >= recovery, "after the fault: {effect}");
}

/// A library experiment with short windows, written where the agent's configuration is.
fn experiment(inst: &Instance, name: &str, fault_secs: u64) -> std::path::PathBuf {
    experiment_with(inst, name, fault_secs, 3)
}

/// [`experiment`] with `recovery_secs` of recovery.
fn experiment_with(
    inst: &Instance,
    name: &str,
    fault_secs: u64,
    recovery_secs: u64,
) -> std::path::PathBuf {
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/chaos")
        .join(name);
    let mut exp: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&lib).expect("library experiment"))
            .expect("yaml");
    exp["windows"] = serde_json::json!({
        "baseline_secs": 2, "fault_secs": fault_secs, "recovery_secs": recovery_secs
    });
    exp["steady_state"] = serde_json::json!({
        // The latency bound is loose: tests share two cores with other tests' agents; the
        // verdict's latency rules are unit-tested (`chaos::run`).
        "rate_per_sec": 100, "timeout_ms": 200, "min_availability": 0.999,
        "max_p99_ratio": 1.5, "max_p99_ms": 50.0, "recovery_within_secs": 30
    });
    let path = inst
        .config_path
        .with_file_name(format!("{}-{name}", inst.config.instance));
    std::fs::write(&path, serde_yaml::to_string(&exp).expect("yaml")).expect("write");
    path
}

/// `manifests/chaos/partition-dx-dg.yaml`: DX and DG lose each other, PX and PG keep every
/// request and their latency, the targets are back at once after the fault, the report says so.
#[test]
fn an_experiment_reports_each_quadrant_and_finds_no_cascade() {
    let inst = Instance::up(test_config(None), QPROBE);
    let report = run_experiment(&inst, "partition-dx-dg.yaml", 3);
    eprintln!("{}", serde_json::to_string_pretty(&report).expect("json"));
    assert_eq!(report["verdict"], "passed");
    assert_eq!(report["cascades"], 0);
    for q in report["quadrants"].as_array().expect("quadrants") {
        let name = q["quadrant"].as_str().expect("name");
        assert!(q["baseline"]["sent"].as_u64() >= Some(150), "{name}: {q}");
        // Over TCP from the host too: one connection, a request at the lane probes' rate.
        assert!(
            q["tcp"]["baseline"]["sent"].as_u64() >= Some(20),
            "{name}: {q}"
        );
        assert!(
            q["tcp"]["fault"]["availability"].as_f64() >= Some(0.999),
            "the partition is between DX and DG, not from the host: {name}: {q}"
        );
        if q["target"] == true {
            assert!(
                q["recovered_after_secs"].as_f64() <= Some(1.0),
                "{name}: {q}"
            );
        } else {
            assert!(
                q["fault"]["availability"].as_f64() >= Some(0.999),
                "{name}: {q}"
            );
        }
    }
    assert_effect(&report["effects"][0], ("dx", "dg"), (0.99, 0.01, 0.95));
    let fault = &report["faults"][0];
    assert!(fault["matched"].as_u64() > Some(0), "{fault}");
    // Nothing left behind: no fault, no echo.
    assert!(chaos(&inst, &["status"]).contains("no faults"));
}

/// The quadrant `name` of a report.
fn quadrant_of<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["quadrants"]
        .as_array()
        .expect("quadrants")
        .iter()
        .find(|q| q["quadrant"] == name)
        .expect("quadrant in the report")
}

/// `manifests/chaos/partition-px-pg.yaml`: PX and PG lose each other both ways (both effect
/// probes at 0 % during the fault, back after), DX and DG keep their steady state; PG's lanes
/// into PX are cut over every transport (reported, not judged: they call a target).
#[test]
fn a_partition_of_production_from_its_gateway_passes() {
    let inst = Instance::up(test_config(None), QPROBE);
    let report = run_experiment(&inst, "partition-px-pg.yaml", 2);
    assert_effect(&report["effects"][0], ("px", "pg"), (0.95, 0.01, 0.9));
    assert_effect(&report["effects"][1], ("pg", "px"), (0.95, 0.01, 0.9));
    for q in ["dx", "dg"] {
        let q = quadrant_of(&report, q);
        assert!(q["fault"]["availability"].as_f64() >= Some(0.999), "{q}");
    }
    // Every lane across the partition is cut, not only the TCP one the packets carry: the
    // broker shuts shared-memory and Unix-socket lanes and opens none across it until the end.
    let into_px: Vec<&Value> = quadrant_of(&report, "pg")["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .filter(|l| l["service"] == "px")
        .collect();
    assert_eq!(into_px.len(), 3, "{into_px:?}");
    for l in into_px {
        assert!(l["fault"]["availability"].as_f64() <= Some(0.1), "{l}");
        assert!(l["recovery"]["availability"].as_f64() >= Some(0.9), "{l}");
    }
}

/// `manifests/chaos/loss-pg.yaml`: 5 % of the packets into PG dropped — PG answers about 95 %
/// during the fault (the dataplane's counts agree), the others every request.
#[test]
fn loss_into_pg_drops_its_share_and_no_more() {
    let inst = Instance::up(test_config(None), QPROBE);
    let report = run_experiment(&inst, "loss-pg.yaml", 3);
    let pg = quadrant_of(&report, "pg");
    let during = pg["fault"]["availability"].as_f64().expect("availability");
    assert!((0.85..=0.995).contains(&during), "{pg}");
    let fault = &report["faults"][0];
    let (matched, dropped) = (
        fault["matched"].as_f64().expect("matched"),
        fault["dropped"].as_f64().expect("dropped"),
    );
    assert!(
        matched >= 200.0 && (0.01..=0.12).contains(&(dropped / matched)),
        "{fault}"
    );
    for q in ["dx", "dg", "px"] {
        let q = quadrant_of(&report, q);
        assert!(q["fault"]["availability"].as_f64() >= Some(0.999), "{q}");
    }
}

/// `manifests/chaos/dx-and-dg-at-once.yaml`: two quadrants down at once (the simultaneous
/// failures of the spec's edge cases), PX and PG hold, both targets back at once.
#[test]
fn dx_and_dg_failing_at_once_leave_production_whole() {
    let inst = Instance::up(test_config(None), QPROBE);
    let report = run_experiment(&inst, "dx-and-dg-at-once.yaml", 2);
    for q in ["dx", "dg"] {
        let q = quadrant_of(&report, q);
        assert!(q["fault"]["availability"].as_f64() <= Some(0.05), "{q}");
        assert!(q["recovered_after_secs"].as_f64() <= Some(1.0), "{q}");
    }
    for q in ["px", "pg"] {
        let q = quadrant_of(&report, q);
        assert!(q["fault"]["availability"].as_f64() >= Some(0.999), "{q}");
    }
    assert_eq!(report["cascades"], 0);
}

/// An experiment's rollbacks run in order once the faults have ended — a command inside DX that
/// leaves a mark, `recover_all` — each reported; one that fails (a command exiting 1) fails the
/// run, naming it. A rollback without what its action needs is refused before anything runs.
#[test]
fn rollbacks_run_after_the_faults_and_a_failed_one_fails_the_run() {
    let inst = Instance::up(test_config(None), QPROBE);
    let mark = inst
        .config_path
        .with_file_name(format!("{}-rolled-back", inst.config.instance));
    let _ = std::fs::remove_file(&mark);
    let file = inst
        .config_path
        .with_file_name(format!("{}-rollbacks.yaml", inst.config.instance));
    let write = |rollbacks: &str| {
        std::fs::write(
            &file,
            format!(
                "title: rollbacks\ntargets: [dx, dg]\n\
                 windows: {{ baseline_secs: 1, fault_secs: 1, recovery_secs: 1 }}\n\
                 method:\n  - {{ action: drop, from: dx, to: dg, both_ways: true }}\n\
                 rollbacks:\n{rollbacks}"
            ),
        )
        .expect("experiment");
    };
    write(&format!(
        "  - {{ action: exec, quadrant: dx, argv: [/bin/sh, -c, 'cat /proc/self/cgroup > {}'] }}\n\
         \x20 - {{ action: recover_all }}\n",
        mark.display()
    ));
    let report = run_file(&inst, "rollbacks", &file);
    let rollbacks = report["rollbacks"].as_array().expect("rollbacks");
    assert_eq!(rollbacks.len(), 2, "{rollbacks:?}");
    assert!(rollbacks.iter().all(|r| r["ok"] == true), "{rollbacks:?}");
    let cgroup = std::fs::read_to_string(&mark).expect("the exec rollback ran");
    assert!(cgroup.contains("/dx"), "inside DX: {cgroup}");
    assert!(
        rollbacks[1]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("the dataplane is disarmed")),
        "{rollbacks:?}"
    );

    write("  - { action: command, argv: [/bin/sh, -c, 'echo not restored; exit 1'] }\n");
    let reasons = failed_run(&inst, &file)["reasons"].to_string();
    assert!(
        reasons.contains("rollbacks[0] (command /bin/sh -c echo not restored; exit 1) failed")
            && reasons.contains("not restored"),
        "{reasons}"
    );

    write("  - { action: exec, argv: [/bin/true] }\n");
    let out = inst.quadrant(&["chaos", "run", "--dry-run", file.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("rollbacks[0]: quadrant"),
        "{err}"
    );
}

/// Runs the experiment `file`, asserting that the run failed (exit status and verdict); its
/// report.
fn failed_run(inst: &Instance, file: &std::path::Path) -> Value {
    let out = inst.quadrant(&[
        "chaos",
        "run",
        file.to_str().expect("utf8"),
        "--output",
        "json",
    ]);
    assert!(!out.status.success(), "the run should fail");
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["verdict"], "failed", "{report}");
    report
}

/// A partition of DX and PX under the embedded policy, which keeps development from production
/// already: the faults find no traffic, and the run fails saying so rather than "passing".
#[test]
fn a_partition_the_policy_already_makes_fails_as_without_effect() {
    let inst = Instance::up(test_config(None), QPROBE);
    let file = inst
        .config_path
        .with_file_name(format!("{}-dx-px.yaml", inst.config.instance));
    std::fs::write(
        &file,
        "title: DX <-> PX\ntargets: [dx, px]\nallow_production: true\n\
         windows: { baseline_secs: 1, fault_secs: 2, recovery_secs: 1 }\n\
         method:\n  - { action: drop, from: dx, to: px, both_ways: true }\n",
    )
    .expect("experiment");
    let reasons = failed_run(&inst, &file)["reasons"].to_string();
    assert!(
        reasons.contains("drop dx -> px never hit traffic")
            && reasons.contains("drop px -> dx never hit traffic"),
        "{reasons}"
    );
}

/// The controller killed in the middle of the fault: the fault still ends at its expiry, and
/// the echoes and probes it started die with it.
#[test]
fn a_killed_controller_leaves_no_fault_and_no_process_behind() {
    let inst = Instance::up(test_config(None), QPROBE);
    let file = experiment(&inst, "partition-dx-dg.yaml", 3);
    let mut controller = Command::new(&inst.bin)
        .arg("--config")
        .arg(&inst.config_path)
        .args(["chaos", "run", file.to_str().expect("utf8")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("controller");
    let start = Instant::now();
    let expires = loop {
        if let Some(f) = faults(&inst).first() {
            break f["expires_ns"].as_u64().expect("expires_ns");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the fault was never armed"
        );
        thread::sleep(Duration::from_millis(50));
    };
    thread::sleep(Duration::from_millis(500));
    // Its echoes (one per quadrant) and its effect probes.
    let out = Command::new("pgrep")
        .args(["-P", &controller.id().to_string()])
        .output()
        .expect("pgrep");
    let children: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(children.len() >= 4, "echoes and probes: {children:?}");
    controller.kill().expect("SIGKILL");
    let _ = controller.wait();
    let killed_at = quadrant::breakers::monotonic_ns();
    assert!(killed_at < expires, "killed during the fault");
    // Its echoes and probes are gone within a moment.
    let start = Instant::now();
    while children
        .iter()
        .any(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "echoes or probes outlived their controller"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let mut dg = start_dg_echo(&inst);
    // Until the expiry DX cannot reach DG; from expiry + 1 s on it can.
    let cut = rtt(&inst, false, 5, 50);
    if quadrant::breakers::monotonic_ns() < expires {
        assert_eq!(cut["answered"], 0, "{cut}");
    }
    let wait = Duration::from_nanos(
        (expires + 1_000_000_000).saturating_sub(quadrant::breakers::monotonic_ns()),
    );
    thread::sleep(wait);
    let healed = rtt(&inst, false, 20, 200);
    assert_eq!(healed["answered"], 20, "{healed}");
    assert!(faults(&inst).iter().all(|f| f["left_ms"] == 0));
    chaos(&inst, &["recover", "--all"]);
    let _ = dg.kill();
    let _ = dg.wait();
}

fn start_dg_echo(inst: &Instance) -> std::process::Child {
    let mut child = Command::new(&inst.bin)
        .arg("--config")
        .arg(&inst.config_path)
        .args(["exec", "dg", "--", QPROBE, "udp-echo", "0.0.0.0:7000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("echo");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "listening");
    child
}

/// A frozen quadrant answers nothing until its expiry, when its guardian thaws it — the
/// controller (`inject`) is long gone by then; `recover --all` thaws at once.
#[test]
fn a_frozen_quadrant_thaws_at_its_expiry_by_itself() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _udp = inst.background_in(
        Quadrant::Dg,
        None,
        &[QPROBE, "udp-echo", "0.0.0.0:7000"],
        "listening",
    );
    assert_eq!(rtt(&inst, true, 10, 200)["answered"], 10);
    let armed = Instant::now();
    chaos(&inst, &["inject", "freeze", "--to", "dg", "--for", "2"]);
    let frozen = rtt(&inst, true, 10, 50);
    assert_eq!(frozen["answered"], 0, "{frozen}");
    let listed = faults(&inst);
    assert!(
        listed
            .iter()
            .any(|f| f["action"] == "freeze" && f["to"] == "dg" && f["left_ms"].as_u64() > Some(0)),
        "{listed:?}"
    );
    thread::sleep(Duration::from_millis(2_500).saturating_sub(armed.elapsed()));
    let thawed = rtt(&inst, true, 10, 200);
    assert_eq!(thawed["answered"], 10, "thawed by its guardian: {thawed}");
    assert!(faults(&inst).is_empty());

    chaos(&inst, &["inject", "freeze", "--to", "dg", "--for", "60"]);
    assert_eq!(rtt(&inst, true, 5, 50)["answered"], 0);
    let out = chaos(&inst, &["recover", "--all"]);
    assert!(out.contains("thawed 1 quadrant(s) or workload(s)"), "{out}");
    assert_eq!(rtt(&inst, true, 10, 200)["answered"], 10, "thawed at once");

    let out = inst.quadrant(&["chaos", "inject", "freeze", "--to", "pg", "--for", "5"]);
    assert!(!out.status.success(), "production only by name");
}

/// `manifests/chaos/freeze-dg.yaml`: DG frozen, the others unaffected, DG back right after.
#[test]
fn a_freeze_experiment_passes_with_the_target_back_at_once() {
    let inst = Instance::up(test_config(None), QPROBE);
    let report = run_experiment(&inst, "freeze-dg.yaml", 2);
    let dg = report["quadrants"]
        .as_array()
        .expect("quadrants")
        .iter()
        .find(|q| q["quadrant"] == "dg")
        .expect("dg")
        .clone();
    // Frozen for most of the window: requests sent in the moment the freeze takes hold may
    // still be answered.
    assert!(dg["fault"]["availability"].as_f64() <= Some(0.25), "{dg}");
    assert!(dg["recovered_after_secs"].as_f64() <= Some(1.0), "{dg}");
    assert!(
        dg["tcp"]["fault"]["availability"].as_f64() <= Some(0.25)
            && dg["tcp"]["recovery"]["availability"].as_f64() >= Some(0.5),
        "a frozen echo answers no TCP either, and does again: {dg}"
    );
    assert!(chaos(&inst, &["status"]).contains("no faults"));
}

/// `manifests/chaos/kill-dx.yaml`: every DX process killed, the other quadrants untouched, DX
/// back once its echo returns.
#[test]
fn a_kill_experiment_passes_and_only_the_target_goes_down() {
    let inst = Instance::up(test_config(None), QPROBE);
    // Recovery long enough for DG's lanes into DX: DX's lane service was gone for the fault
    // window, so its breaker is open or half-open when the service returns.
    let report = run_file(
        &inst,
        "kill-dx.yaml",
        &experiment_with(&inst, "kill-dx.yaml", 2, 6),
    );
    for q in report["quadrants"].as_array().expect("quadrants") {
        let fault = q["fault"]["availability"].as_f64().expect("availability");
        if q["quadrant"] == "dx" {
            assert!(fault <= 0.1, "killed: {q}");
            assert!(q["recovered_after_secs"].as_f64() <= Some(1.0), "{q}");
        } else {
            assert!(fault >= 0.999, "untouched: {q}");
        }
    }
    // Lanes across quadrants: DG's lanes into DX fail with DX (its callers' loss, reported,
    // not judged) and come back with DX's service once its breaker lets them (a breaker that
    // judged its probe by the opens it refused never closed here); PG's into PX hold.
    let cross = |from: &str, to: &str| -> Vec<Value> {
        report["quadrants"]
            .as_array()
            .expect("quadrants")
            .iter()
            .filter(|q| q["quadrant"] == from)
            .flat_map(|q| q["lanes"].as_array().cloned().unwrap_or_default())
            .filter(|l| l["service"] == to)
            .collect()
    };
    let dg_to_dx = cross("dg", "dx");
    assert_eq!(dg_to_dx.len(), 3, "one per transport: {dg_to_dx:?}");
    for l in &dg_to_dx {
        assert!(l["baseline"]["availability"].as_f64() >= Some(0.99), "{l}");
        assert!(l["fault"]["availability"].as_f64() <= Some(0.5), "{l}");
        assert!(l["recovery"]["answered"].as_u64() >= Some(10), "back: {l}");
    }
    let pg_to_px = cross("pg", "px");
    assert_eq!(pg_to_px.len(), 3, "{pg_to_px:?}");
    for l in &pg_to_px {
        assert!(l["fault"]["availability"].as_f64() >= Some(0.999), "{l}");
    }
}

/// Runs a library experiment with short windows (`experiment`) and returns its JSON report,
/// asserting that it passed.
fn run_experiment(inst: &Instance, name: &str, fault_secs: u64) -> Value {
    run_file(inst, name, &experiment(inst, name, fault_secs))
}

/// Runs the experiment `file` (made from the library's `name`), asserting that it passed.
fn run_file(inst: &Instance, name: &str, file: &std::path::Path) -> Value {
    let out = inst.quadrant(&[
        "chaos",
        "run",
        file.to_str().expect("utf8"),
        "--output",
        "json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{name}: {:?}", report["reasons"]);
    report
}

/// Whether a process in `q` can start another one (`sh` forking `true`).
fn forks(inst: &Instance, q: Quadrant) -> bool {
    inst.run_in(q, None, &["/bin/sh", "-c", "/bin/true && echo forked"])
        .stdout
        .starts_with(b"forked")
}

/// Whether a process in `q` can take 48 MiB (Python filling a buffer).
fn allocates(inst: &Instance, q: Quadrant) -> bool {
    inst.run_in(
        q,
        None,
        &[
            "python3",
            "-c",
            "b = bytearray(48 << 20); print('allocated')",
        ],
    )
    .stdout
    .starts_with(b"allocated")
}

/// The live fault of `action` in `chaos status`, if any.
fn live(inst: &Instance, action: &str) -> Option<Value> {
    faults(inst).into_iter().find(|f| f["action"] == action)
}

/// Arms `action` on DX for `secs` with `extra` arguments; returns when it was armed.
fn press(inst: &Instance, action: &str, extra: &[&str], secs: u64) -> Instant {
    let secs = secs.to_string();
    let mut args = vec!["inject", action, "--to", "dx", "--for", &secs];
    args.extend(extra);
    let armed = Instant::now();
    chaos(inst, &args);
    armed
}

/// Resource pressure inside one quadrant: its forks refused, its memory gone, its CPU
/// throttled — the other quadrants untouched, each pressure ending by itself at its expiry (the
/// controller exits at once; the guardian ends it) or at `recover --all`, twice without error.
#[test]
fn resource_pressure_bites_only_its_quadrant_and_ends_by_itself() {
    let inst = Instance::up(test_config(None), QPROBE);
    assert!(forks(&inst, Quadrant::Dx) && allocates(&inst, Quadrant::Dx));
    pids_pressure(&inst);
    memory_pressure(&inst);
    pressure_recovery(&inst);
}

fn pids_pressure(inst: &Instance) {
    let armed = press(inst, "pids-pressure", &["--headroom-pids", "4"], 3);
    thread::sleep(Duration::from_millis(300));
    assert!(!forks(inst, Quadrant::Dx), "DX's forks refused");
    assert!(forks(inst, Quadrant::Dg), "DG untouched");
    let f = live(inst, "pids_pressure").expect("listed");
    assert!(
        f["matched"].as_u64() > Some(0),
        "refused forks counted: {f}"
    );
    thread::sleep(Duration::from_millis(3_500).saturating_sub(armed.elapsed()));
    assert!(live(inst, "pids_pressure").is_none(), "ended at its expiry");
    assert!(forks(inst, Quadrant::Dx), "DX forks again");
}

fn memory_pressure(inst: &Instance) {
    let armed = press(inst, "memory-pressure", &["--headroom-mib", "32"], 4);
    thread::sleep(Duration::from_millis(500));
    assert!(!allocates(inst, Quadrant::Dx), "DX has no memory to give");
    assert!(allocates(inst, Quadrant::Dg), "DG untouched");
    let f = live(inst, "memory_pressure").expect("listed");
    assert!(f["matched"].as_u64() > Some(0), "OOM kills counted: {f}");
    thread::sleep(Duration::from_millis(4_500).saturating_sub(armed.elapsed()));
    assert!(
        live(inst, "memory_pressure").is_none(),
        "ended at its expiry"
    );
    assert!(allocates(inst, Quadrant::Dx), "DX's limit restored");
}

fn pressure_recovery(inst: &Instance) {
    press(inst, "cpu-pressure", &["--percent", "10"], 60);
    press(inst, "pids-pressure", &[], 60);
    thread::sleep(Duration::from_millis(500));
    let f = live(inst, "cpu_pressure").expect("listed");
    assert!(
        f["matched"].as_u64() > Some(0),
        "throttled periods counted: {f}"
    );
    let out = inst.quadrant(&[
        "chaos",
        "inject",
        "cpu-pressure",
        "--to",
        "dx",
        "--for",
        "5",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("under cpu pressure already"),
        "one pressure per resource: {out:?}"
    );
    let out = chaos(inst, &["recover", "--all"]);
    assert!(out.contains("ended 2 resource pressure(s)"), "{out}");
    assert!(forks(inst, Quadrant::Dx), "ended at once");
    let again = chaos(inst, &["recover", "--all"]);
    assert!(again.contains("ended 0 resource pressure(s)"), "{again}");
    assert!(chaos(inst, &["status"]).contains("no faults"));

    let out = inst.quadrant(&[
        "chaos",
        "inject",
        "memory-pressure",
        "--to",
        "px",
        "--for",
        "5",
    ]);
    assert!(!out.status.success(), "production only by name");
    let out = inst.quadrant(&[
        "chaos",
        "inject",
        "pids-pressure",
        "--to",
        "dx",
        "--headroom-pids",
        "0",
        "--for",
        "5",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("headroom_pids: 0 is outside 1..=4096"),
        "{out:?}"
    );
}

/// `manifests/chaos/memory-dx.yaml` and `pids-dx.yaml`: DX out of memory, then out of
/// processes; DG, PX and PG keep their steady state; each fault counted its effect.
#[test]
fn exhaustion_experiments_pass_with_no_cascade() {
    let inst = Instance::up(test_config(None), QPROBE);
    for (name, action) in [
        ("memory-dx.yaml", "memory_pressure"),
        ("pids-dx.yaml", "pids_pressure"),
    ] {
        let report = run_experiment(&inst, name, 3);
        assert_eq!(report["cascades"], 0, "{name}");
        let fault = &report["faults"][0];
        assert_eq!(fault["action"], action);
        assert!(fault["matched"].as_u64() > Some(0), "{name}: {fault}");
        for q in report["quadrants"].as_array().expect("quadrants") {
            if q["quadrant"] != "dx" {
                assert!(
                    q["fault"]["availability"].as_f64() >= Some(0.999),
                    "{name}: {q}"
                );
            }
        }
        assert!(chaos(&inst, &["status"]).contains("no faults"), "{name}");
    }
}

/// A reset fault on DX → DG: a connection talking across it is reset (the sender sees
/// `ECONNRESET`), once the fault has ended a new connection talks again, and the fault counted
/// its reset.
#[test]
fn a_reset_fault_resets_established_connections() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let target = format!("{}:7102", inst.addr(Quadrant::Dg));
    let _echo = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7102"]);
    let (_, talk) = inst.background_in(
        Quadrant::Dx,
        None,
        &[QPROBE, "tcp-talk", &target, "100", "100"],
        "ready",
    );
    let next = || talk.recv_timeout(Duration::from_secs(5)).expect("a line");
    assert_eq!(next(), "ready");
    assert_eq!(next(), "ok ping 0", "talking before the fault");
    let armed = Instant::now();
    chaos(
        &inst,
        &[
            "inject", "reset", "--from", "dx", "--to", "dg", "--for", "2",
        ],
    );
    let outcome = loop {
        let line = next();
        if line.starts_with("err") {
            break line;
        }
        assert!(
            armed.elapsed() < Duration::from_secs(2),
            "not reset: {line}"
        );
    };
    assert_eq!(outcome, "err ECONNRESET");
    let f = live(&inst, "reset").expect("listed");
    assert!(f["dropped"].as_u64() >= Some(1), "one reset counted: {f}");
    thread::sleep(Duration::from_millis(2_300).saturating_sub(armed.elapsed()));
    assert!(
        faults(&inst).iter().all(|f| f["left_ms"] == 0),
        "ended at its expiry"
    );
    let (_, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &target, "1000"]);
    assert_eq!(line, "ok hello", "a new connection after the fault");
}

/// `manifests/chaos/kill-agent.yaml`: the agent killed with `SIGKILL` during traffic; the
/// dataplane keeps enforcing, every quadrant answers through the kill and the takeover, and the
/// next agent (the controller starts it) takes the dataplane over.
#[test]
fn a_killed_agent_costs_no_quadrant_its_steady_state() {
    let inst = Instance::up(test_config(None), QPROBE);
    let before = inst.status().pid;
    let report = run_experiment(&inst, "kill-agent.yaml", 3);
    assert_eq!(report["cascades"], 0);
    for q in report["quadrants"].as_array().expect("quadrants") {
        assert_eq!(q["target"], false);
        assert!(q["fault"]["availability"].as_f64() >= Some(0.999), "{q}");
    }
    assert!(
        report["agent_back_after_ms"].as_f64() > Some(0.0),
        "{report}"
    );
    let status = inst.status();
    assert_ne!(status.pid, before, "another agent");
    assert!(status.carried.is_some(), "it took the dataplane over");
    let px = inst.addr(Quadrant::Px);
    assert_eq!(
        inst.probe(
            Quadrant::Dx,
            &["tcp-connect", &format!("{px}:7320"), "1000"]
        ),
        (false, "err EPERM".into()),
        "still enforcing"
    );
}

/// An identity outage of PX: its Workload API refuses with `Unavailable` until the expiry while
/// PG's answers; `manifests/chaos/identity-px.yaml` passes, its effect probe inside PX fetching
/// nothing during the fault and every SVID before and after it.
#[test]
fn an_identity_outage_takes_only_its_quadrants_workload_api_away() {
    let inst = Instance::up(test_config(None), QPROBE);
    assert!(inst.probe(Quadrant::Px, &["svid"]).0, "served before");
    // A client holding the SVID stream open (it waits 20 s for a rotation).
    let watcher = Command::new(&inst.bin)
        .arg("--config")
        .arg(&inst.config_path)
        .args(["exec", "px", "--", QPROBE, "svid-rotation", "20000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("svid-rotation");
    thread::sleep(Duration::from_millis(500));
    let armed = Instant::now();
    chaos(
        &inst,
        &[
            "inject",
            "identity-outage",
            "--to",
            "px",
            "--for",
            "2",
            "--allow-production",
        ],
    );
    let ended = watcher.wait_with_output().expect("svid-rotation");
    let ended = String::from_utf8_lossy(&ended.stdout);
    assert!(
        ended.contains("navailable") && armed.elapsed() < Duration::from_secs(10),
        "the open stream ends with the outage: {ended}"
    );
    let (ok, line) = inst.probe(Quadrant::Px, &["svid"]);
    assert!(!ok && line.contains("unavailable"), "{line}");
    assert!(inst.probe(Quadrant::Pg, &["svid"]).0, "PG served");
    thread::sleep(Duration::from_millis(2_200).saturating_sub(armed.elapsed()));
    assert!(
        inst.probe(Quadrant::Px, &["svid"]).0,
        "served again at the expiry"
    );

    let report = run_experiment(&inst, "identity-px.yaml", 2);
    let fault = &report["faults"][0];
    assert_eq!(fault["action"], "identity_outage");
    assert!(fault["matched"].as_u64() > Some(0), "{fault}");
    // The probe's first fetch includes its start (a new process, a debug build, two cores
    // shared with other tests): one of the baseline's may miss the timeout.
    assert_effect(&report["effects"][0], ("px", "identity"), (0.9, 0.1, 0.9));
}

/// Lanes quadrant `q`'s workloads have open (`quadrant lanes`).
fn lanes_from(inst: &Instance, q: &str) -> u64 {
    let out = inst.quadrant(&["lanes", "--output", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("lanes json");
    report["quadrants"]
        .as_array()
        .expect("quadrants")
        .iter()
        .find(|u| u["quadrant"] == q)
        .and_then(|u| u["lanes"].as_u64())
        .unwrap_or(0)
}

/// Lane exhaustion in DX: a DX workload's open is refused for the limit while DG opens lanes
/// as before; at the expiry DX's lanes are free; `manifests/chaos/lanes-dx.yaml` passes with
/// the refusals counted.
#[test]
fn lane_exhaustion_refuses_only_its_quadrants_opens_and_ends_by_itself() {
    let inst = Instance::up(test_config(None), QPROBE);
    let echo = quadrant_tests::harness::sibling_binary(QPROBE, "lane-echo")
        .display()
        .to_string();
    let armed = Instant::now();
    chaos(
        &inst,
        &["inject", "lane-exhaustion", "--to", "dx", "--for", "3"],
    );
    assert_eq!(
        lanes_from(&inst, "dx"),
        64,
        "the default max_lanes, all held"
    );
    let listed = live(&inst, "lane_exhaustion").expect("listed");
    assert!(
        listed["to"] == "dx" && listed["left_ms"].as_u64() > Some(0),
        "{listed}"
    );
    let call = inst.run_in(
        Quadrant::Dx,
        None,
        &[&echo, "call", "dx", "chaos-lane-sink"],
    );
    let refused = String::from_utf8_lossy(&call.stderr);
    assert!(refused.contains("lane limit reached"), "{refused}");
    // DG's own capacity is untouched: its open is granted (the sink answers no message).
    let dg = inst.run_in(
        Quadrant::Dg,
        None,
        &[&echo, "call", "dx", "chaos-lane-sink"],
    );
    let dg = String::from_utf8_lossy(&dg.stderr);
    assert!(!dg.contains("lane refused"), "DG opens: {dg}");
    thread::sleep(Duration::from_millis(3_500).saturating_sub(armed.elapsed()));
    assert_eq!(lanes_from(&inst, "dx"), 0, "free at the expiry");
    assert!(live(&inst, "lane_exhaustion").is_none(), "no longer listed");

    let report = run_experiment(&inst, "lanes-dx.yaml", 2);
    let fault = &report["faults"][0];
    assert_eq!(fault["action"], "lane_exhaustion");
    assert!(fault["matched"].as_u64() > Some(0), "{fault}");
    assert_eq!(lanes_from(&inst, "dx"), 0, "the hog ended with the run");
}

/// `qprobe udp-rtt` from the host to port `port` of DG: how many of `count` were answered.
fn answered(inst: &Instance, port: u16, count: u32) -> u64 {
    let to = format!("{}:{port}", inst.addr(Quadrant::Dg));
    let out = Command::new(QPROBE)
        .args(["udp-rtt", &to, &count.to_string(), "100"])
        .output()
        .expect("qprobe");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let json: Value =
        serde_json::from_str(line.trim().strip_prefix("ok ").unwrap_or("{}")).unwrap_or_default();
    json["answered"].as_u64().unwrap_or(0)
}

/// A freeze or kill may take one workload of a quadrant instead of all of it: the other
/// workload of DG keeps answering, the frozen one thaws at the expiry by its guardian, the
/// killed one is gone; a workload the quadrant does not run is named in the refusal.
#[test]
fn a_freeze_or_kill_may_take_one_workload_only() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let mut echoes = Vec::new();
    for (w, port) in [("frozen", "7401"), ("spared", "7402")] {
        echoes.push(inst.background_in(
            Quadrant::Dg,
            Some(w),
            &[QPROBE, "udp-echo", &format!("0.0.0.0:{port}")],
            "listening",
        ));
    }
    assert_eq!((answered(&inst, 7401, 5), answered(&inst, 7402, 5)), (5, 5));
    let armed = Instant::now();
    let out = chaos(
        &inst,
        &[
            "inject",
            "freeze",
            "--to",
            "dg",
            "--workload",
            "frozen",
            "--for",
            "2",
        ],
    );
    assert!(out.contains("froze dg/frozen"), "{out}");
    assert_eq!(answered(&inst, 7401, 5), 0, "frozen");
    assert_eq!(answered(&inst, 7402, 5), 5, "the other workload answers");
    assert!(
        faults(&inst)
            .iter()
            .any(|f| f["action"] == "freeze" && f["to"] == "dg/frozen"),
        "listed as the workload"
    );
    thread::sleep(Duration::from_millis(2_500).saturating_sub(armed.elapsed()));
    assert_eq!(answered(&inst, 7401, 5), 5, "thawed by its guardian");

    chaos(
        &inst,
        &[
            "inject",
            "kill",
            "--to",
            "dg",
            "--workload",
            "spared",
            "--for",
            "1",
        ],
    );
    assert_eq!(answered(&inst, 7402, 3), 0, "killed");
    assert_eq!(answered(&inst, 7401, 5), 5, "the other workload lives");
    let out = inst.quadrant(&[
        "chaos",
        "inject",
        "kill",
        "--to",
        "dg",
        "--workload",
        "nobody",
        "--for",
        "1",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dg runs no workload nobody"),
        "{out:?}"
    );
}

/// A policy outage of DG: a new lane involving DG is refused, naming the outage, while lanes
/// already open go on and the other quadrants decide as before; it ends at its expiry;
/// `manifests/chaos/policy-dg.yaml` passes, its effect probe's fresh lanes refused during the
/// fault only.
#[test]
fn a_policy_outage_fails_its_quadrants_lane_decisions_closed() {
    let inst = Instance::up(test_config(None), QPROBE);
    let report = run_experiment(&inst, "policy-dg.yaml", 2);
    let fault = &report["faults"][0];
    assert_eq!(fault["action"], "policy_outage");
    assert!(fault["matched"].as_u64() > Some(0), "{fault}");
    assert_effect(&report["effects"][0], ("dg", "lane-opens"), (0.9, 0.1, 0.9));
    let dg = report["quadrants"]
        .as_array()
        .expect("quadrants")
        .iter()
        .find(|q| q["quadrant"] == "dg")
        .expect("dg")
        .clone();
    for lane in dg["lanes"].as_array().expect("lanes") {
        assert!(
            lane["fault"]["availability"].as_f64() >= Some(0.99),
            "a lane open before the outage goes on: {lane}"
        );
    }
}

/// An agent started with `chaos.enabled: false`: `inject` and `run` are refused naming the
/// setting, nothing is written, traffic flows; `status` and `recover` still answer.
#[test]
fn an_agent_with_chaos_off_takes_no_fault() {
    let mut config = test_config(None);
    config.chaos.enabled = false;
    let inst = Instance::up(config, QPROBE);
    let out = inst.quadrant(&[
        "chaos", "inject", "drop", "--from", "dx", "--to", "dg", "--for", "60",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("chaos.enabled: false"),
        "{err}"
    );
    let file = experiment(&inst, "partition-dx-dg.yaml", 2);
    let out = inst.quadrant(&["chaos", "run", file.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("chaos is off for instance"),
        "{err}"
    );
    assert!(chaos(&inst, &["status"]).contains("no faults"));
    assert!(chaos(&inst, &["recover", "--all"]).contains("removed 0 fault(s)"));
}

/// The outages the agent keeps are faults like the others: `chaos status` lists them with
/// their refusals and `recover --all` ends them (twice in a row without error).
#[test]
fn outages_are_listed_by_status_and_ended_by_recover() {
    let inst = Instance::up(test_config(None), QPROBE);
    for (fault, q) in [("identity-outage", "px"), ("policy-outage", "dg")] {
        chaos(
            &inst,
            &[
                "inject",
                fault,
                "--to",
                q,
                "--for",
                "60",
                "--allow-production",
            ],
        );
    }
    let (ok, line) = inst.probe(Quadrant::Px, &["svid"]);
    assert!(!ok && line.contains("unavailable"), "{line}");
    let listed_faults = faults(&inst);
    let listed = |action: &str, to: &str| {
        listed_faults
            .iter()
            .find(|f| f["action"] == action && f["to"] == to)
            .cloned()
    };
    let identity = listed("identity_outage", "px").expect("identity outage listed");
    assert!(identity["left_ms"].as_u64() > Some(50_000), "{identity}");
    assert!(
        identity["matched"].as_u64() >= Some(1),
        "the refused fetch: {identity}"
    );
    assert!(listed("policy_outage", "dg").is_some(), "{listed_faults:?}");
    assert_eq!(listed_faults.len(), 2, "{listed_faults:?}");
    assert!(chaos(&inst, &["status"]).contains("identity_outage"));

    let out = chaos(&inst, &["recover", "--all"]);
    assert!(out.contains("and 2 outage(s)"), "{out}");
    assert!(chaos(&inst, &["status"]).contains("no faults"));
    assert!(inst.probe(Quadrant::Px, &["svid"]).0, "served again");
    let again = chaos(&inst, &["recover", "--all"]);
    assert!(again.contains("and 0 outage(s)"), "{again}");
}

/// `recover --all` takes every step whatever one of them finds: a resource pressure whose limit
/// cannot be written back (a directory stands where its file was) is reported and its lease
/// kept for the next recover, and the dataplane's faults are removed all the same.
#[test]
fn recover_all_goes_on_past_a_limit_it_cannot_restore() {
    use quadrant::chaos::pressure::{Amount, Lease, Resource};
    let inst = Instance::up(test_config(None), QPROBE);
    chaos(
        &inst,
        &[
            "inject", "drop", "--from", "dx", "--to", "dg", "--for", "60",
        ],
    );
    let state = &inst.config.state_dir;
    let not_a_file = state.join(format!("{}-not-a-limit-file", inst.config.instance));
    std::fs::create_dir_all(&not_a_file).expect("dir");
    let lease = Lease {
        quadrant: "dx".into(),
        resource: Resource::Pids,
        amount: Amount {
            cpu_percent: 0.0,
            headroom_mib: 0,
            headroom_pids: 16,
        },
        until_ns: u64::MAX,
        groups: Vec::new(),
        restore: vec![(not_a_file.clone(), "max".into())],
        stressors: Vec::new(),
        effect_at_start: 0,
        stress_mib: 0,
    };
    let lease_path = state.join(format!(
        "{}-chaos-pressure-dx-pids.json",
        inst.config.instance
    ));
    std::fs::write(&lease_path, serde_json::to_vec(&lease).expect("json")).expect("lease");
    let out = inst.quadrant(&["chaos", "recover", "--all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed restore went unreported");
    assert!(
        stderr.contains("removed 1 fault(s)") && stderr.contains("restoring dx's pids limits"),
        "{stderr}"
    );
    assert!(lease_path.exists(), "the lease stays for the next recover");
    let left = faults(&inst);
    assert!(
        left.iter().all(|f| f["action"] != "drop"),
        "the drop fault outlived recover: {left:?}"
    );
    std::fs::remove_file(&lease_path).expect("lease");
    std::fs::remove_dir(&not_a_file).expect("dir");
    chaos(&inst, &["recover", "--all"]);
}
