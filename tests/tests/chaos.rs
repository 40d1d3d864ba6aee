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
    if fq_available() {
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

/// Whether this kernel has the fq qdisc (tried on a dummy interface of a namespace of its own).
fn fq_available() -> bool {
    let ns = format!("qfq-{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let _ = run(&["ip", "netns", "add", &ns]);
    let ok = run(&["ip", "-n", &ns, "link", "add", "d0", "type", "dummy"])
        && run(&[
            "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "d0", "root", "fq",
        ]);
    let _ = run(&["ip", "netns", "del", &ns]);
    ok
}
