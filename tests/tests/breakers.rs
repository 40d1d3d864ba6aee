//! Circuit breakers in the kernel, in real namespaces: failed connects counted by `sock_ops` open
//! the caller quadrant's breaker for that destination, `connect` then fails with `ECONNREFUSED`
//! before any SYN leaves (a listener that appears meanwhile is not reached), one probe after the
//! ejection closes or reopens it, and every transition is an audit record with both identities.
//! Needs root.

use std::{
    thread,
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use quadrant_tests::harness::{Instance, sibling_binary, test_config};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn breakers(inst: &Instance) -> Value {
    let out = inst.quadrant(&["breakers", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("breakers json")
}

/// The breaker of `caller` for `destination`, if it has an entry.
fn breaker(inst: &Instance, caller: &str, destination: &str) -> Option<Value> {
    breakers(inst)["breakers"]
        .as_array()
        .expect("breakers")
        .iter()
        .find(|b| b["caller"] == caller && b["destination"] == destination)
        .cloned()
}

/// The audit records of kind `breaker` for `destination`, waiting up to 3 s for at least `n`.
fn transitions(inst: &Instance, destination: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = std::fs::read_to_string(&inst.config.audit_log).unwrap_or_default();
        let found: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["kind"] == "breaker" && r["event"]["destination"] == destination)
            .map(|r| r["event"].clone())
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn tcp(inst: &Instance, from: Quadrant, to: &str, timeout_ms: &str) -> String {
    inst.probe(from, &["tcp-connect", to, timeout_ms]).1
}

fn config() -> quadrant::config::Config {
    let mut c = test_config(None);
    c.breakers.consecutive_failures = 3;
    c.breakers.base_ejection_ms = 600;
    c.breakers.max_ejection_ms = 5000;
    c
}

/// An agent whose DX breaker for DG's `port` three refused connects opened, for 5 s; returns it
/// and the destination `addr:port`.
fn breaker_opened_for(port: u16) -> (Instance, String) {
    let mut c = config();
    c.breakers.base_ejection_ms = 5000;
    let inst = Instance::up(c, QPROBE);
    let dg = format!("{}:{port}", inst.addr(Quadrant::Dg));
    for _ in 0..3 {
        assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "err ECONNREFUSED");
    }
    (inst, dg)
}

#[test]
fn failed_connects_open_the_breaker_and_one_probe_closes_it() {
    let mut inst = Instance::up(config(), QPROBE);
    let dg = format!("{}:7100", inst.addr(Quadrant::Dg));
    for i in 0..3 {
        assert_eq!(
            tcp(&inst, Quadrant::Dx, &dg, "1000"),
            "err ECONNREFUSED",
            "attempt {i}: nothing listens"
        );
    }
    let b = breaker(&inst, "dx", &dg).expect("a breaker after three failures");
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["consecutive_failures"], 3, "{b}");
    assert_eq!(b["ejection_ms"], 600, "{b}");
    assert_eq!(b["caller_spiffe_id"], "spiffe://quadrant.local/quadrant/dx");
    assert_eq!(
        b["destination_identity"],
        "spiffe://quadrant.local/quadrant/dg"
    );
    let left = b["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms while open");
    assert!((1..=660).contains(&left), "{b}");
    assert_eq!(
        inst.counter("connect4", Quadrant::Dx, "refuse_breaker_open"),
        0
    );

    // A listener appears; DX's open breaker still refuses at connect(), before any SYN: the
    // listener is never reached, and tc on DX's veth sees no packet. DG's own breaker for the
    // same destination is another one.
    let _server = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7100"]);
    let on_the_wire = |inst: &Instance| {
        inst.status()
            .counters
            .iter()
            .filter(|c| c.hook == "tc_ingress" && c.quadrant == "dx" && c.reason != "pass_arp")
            .map(|c| c.count)
            .sum::<u64>()
    };
    let sent = on_the_wire(&inst);
    assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "err ECONNREFUSED");
    assert_eq!(on_the_wire(&inst), sent, "a refused connect sent packets");
    assert_eq!(
        inst.counter("connect4", Quadrant::Dx, "refuse_breaker_open"),
        1
    );
    assert_eq!(tcp(&inst, Quadrant::Dg, &dg, "1000"), "ok hello");
    // A policy denial is still EPERM, told apart from a breaker.
    let px = format!("{}:7100", inst.addr(Quadrant::Px));
    assert_eq!(tcp(&inst, Quadrant::Dx, &px, "1000"), "err EPERM");

    // Past the ejection the next connect is the probe; it connects and closes the breaker.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "ok hello");
    assert!(on_the_wire(&inst) > sent, "the probe's packets pass tc");
    let b = breaker(&inst, "dx", &dg).expect("the entry stays");
    assert_eq!(
        (&b["state"], &b["consecutive_failures"]),
        (&"closed".into(), &0.into()),
        "{b}"
    );
    assert_eq!((&b["opened"], &b["refused"]), (&1.into(), &1.into()), "{b}");
    assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "ok hello");

    let seen = transitions(&inst, &dg, 3);
    let steps: Vec<(&str, &str, &str)> = seen
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap_or_default(),
                e["to"].as_str().unwrap_or_default(),
                e["cause"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("closed", "open", "consecutive_failures"),
            ("open", "half_open", "probe_started"),
            ("half_open", "closed", "probe_succeeded"),
        ]
    );
    for e in &seen {
        assert_eq!(
            e["caller_spiffe_id"], "spiffe://quadrant.local/quadrant/dx",
            "{e}"
        );
        assert_eq!(
            e["destination_identity"], "spiffe://quadrant.local/quadrant/dg",
            "{e}"
        );
    }
    let verify = inst.quadrant(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn a_half_open_breaker_lets_exactly_one_probe_through_and_a_failed_probe_doubles_the_ejection() {
    let inst = Instance::up(config(), QPROBE);
    // An address in DG's prefix that nobody holds: a SYN to it is never answered, so a connect
    // stays in SYN_SENT until its caller gives up (which counts as a failure).
    let dg = inst.config.addrs(Quadrant::Dg).workload.octets();
    let silent = format!("{}.{}.{}.{}:7200", dg[0], dg[1], dg[2], 99);
    for _ in 0..3 {
        assert_eq!(tcp(&inst, Quadrant::Dx, &silent, "200"), "err timeout");
    }
    assert_eq!(
        breaker(&inst, "dx", &silent).expect("open")["state"],
        "open"
    );
    thread::sleep(Duration::from_millis(700));
    thread::scope(|s| {
        // The probe: waits 1.5 s for an answer that never comes.
        let probe = s.spawn(|| tcp(&inst, Quadrant::Dx, &silent, "1500"));
        let deadline = Instant::now() + Duration::from_secs(1);
        while breaker(&inst, "dx", &silent).expect("entry")["state"] != "half_open" {
            assert!(Instant::now() < deadline, "no probe started");
            thread::sleep(Duration::from_millis(20));
        }
        // Every other connect meanwhile is refused at once.
        let started = Instant::now();
        assert_eq!(
            tcp(&inst, Quadrant::Dx, &silent, "1500"),
            "err ECONNREFUSED"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused, not waited for"
        );
        assert_eq!(probe.join().expect("probe"), "err timeout");
    });
    let b = breaker(&inst, "dx", &silent).expect("entry");
    assert_eq!(
        (&b["state"], &b["ejection_ms"], &b["opened"]),
        (&"open".into(), &1200.into(), &2.into()),
        "{b}"
    );
    let causes: Vec<String> = transitions(&inst, &silent, 3)
        .iter()
        .map(|e| e["cause"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        causes,
        ["consecutive_failures", "probe_started", "probe_failed"]
    );
}

#[test]
fn max_connections_caps_what_a_quadrant_holds_open_to_one_destination() {
    let mut c = config();
    c.breakers.max_connections = 2;
    let mut inst = Instance::up(c, QPROBE);
    let dg = format!("{}:7300", inst.addr(Quadrant::Dg));
    let _server = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7300"]);
    let talk = [QPROBE, "tcp-talk", &dg, "400", "4"];
    let (_, first) = inst.background_in(Quadrant::Dx, None, &talk, "ready");
    let (_, second) = inst.background_in(Quadrant::Dx, None, &talk, "ready");
    assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "err ECONNREFUSED");
    assert_eq!(
        inst.counter("connect4", Quadrant::Dx, "refuse_breaker_full"),
        1
    );
    assert_eq!(
        breaker(&inst, "dx", &dg).expect("counted")["active_connections"],
        2
    );
    // Another quadrant has its own count.
    assert_eq!(tcp(&inst, Quadrant::Dg, &dg, "1000"), "ok hello");
    // Once the two talkers are done, their connections no longer count.
    for rx in [first, second] {
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            assert!(line.starts_with("ok") || line == "ready", "{line}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while breaker(&inst, "dx", &dg).expect("counted")["active_connections"] != 0 {
        assert!(
            Instant::now() < deadline,
            "connections still counted after they closed"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "ok hello");
}

#[test]
fn an_open_breaker_refuses_tcp_lanes_at_the_broker_with_a_retry_after() {
    let (mut inst, dg) = breaker_opened_for(7400);
    let echo = sibling_binary(QPROBE, "lane-echo").display().to_string();
    let serve = [echo.as_str(), "serve", "echo", "--tcp-port", "7400"];
    let _server = inst.background_in(Quadrant::Dg, Some("echo"), &serve, "listening as");
    let call = |transport: &str| {
        inst.run_in(
            Quadrant::Dx,
            Some("client"),
            &[&echo, "call", "dg", "echo", "--transport", transport],
        )
    };
    let out = call("tcp");
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "circuit breaker of dx for echo ({dg}) is open after 3 consecutive failed connects; retry after "
    );
    assert!(err.contains(&want), "{err}");
    let lanes: Value =
        serde_json::from_slice(&inst.quadrant(&["lanes", "--output", "json"]).stdout)
            .expect("lanes json");
    let refused = lanes["refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .find(|r| r["quadrant"] == "dx" && r["reason"] == "breaker_open")
        .map_or(0, |r| r["count"].as_u64().unwrap_or(0));
    assert_eq!(refused, 1, "{lanes}");
    // The breaker covers the TCP destination only: a shared-memory lane to the same service opens.
    let out = call("shm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failing_lane_service_trips_its_breaker_in_the_agent_and_in_the_kernel() {
    let mut c = config();
    c.breakers.min_calls = 10;
    c.breakers.window_ms = 5000;
    c.breakers.base_ejection_ms = 2000;
    // Its availability SLO counts the lanes' failures, the refused opens and the connects the
    // kernel's breakers refused.
    c.slos = serde_yaml::from_str(
        "[{name: echo-up, quadrant: dg, service: echo, indicator: availability, \
          objectives: [{target: 0.99}], timeWindow: [{duration: 28m}], minEvents: 1}]",
    )
    .expect("slos");
    let mut inst = Instance::up(c, QPROBE);
    let echo = sibling_binary(QPROBE, "lane-echo").display().to_string();
    // A service that takes every lane's first request and closes the lane without answering.
    let serve = [
        echo.as_str(),
        "serve",
        "echo",
        "--tcp-port",
        "7500",
        "--drop-after",
        "0",
    ];
    let _server = inst.background_in(Quadrant::Dg, Some("echo"), &serve, "listening as");
    let call = || {
        let out = inst.run_in(
            Quadrant::Dx,
            Some("client"),
            &[
                &echo,
                "call",
                "dg",
                "echo",
                "--transport",
                "shm",
                "--count",
                "1",
            ],
        );
        assert!(!out.status.success(), "the service answered");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for i in 0..10 {
        let err = call();
        assert!(
            !err.contains("circuit breaker"),
            "call {i} refused early: {err}"
        );
    }
    let service = |inst: &Instance| breakers(inst)["services"][0].clone();
    let deadline = Instant::now() + Duration::from_secs(1);
    while service(&inst)["state"] != "open" {
        assert!(
            Instant::now() < deadline,
            "not open: {}\nlanes: {}\nlog: {}",
            breakers(&inst),
            String::from_utf8_lossy(&inst.quadrant(&["lanes", "--output", "json"]).stdout),
            inst.agent_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let s = service(&inst);
    assert_eq!(
        (&s["service"], &s["ejection_ms"]),
        (&"dg/echo".into(), &2000.into()),
        "{s}"
    );
    // Every transport is refused at the broker, and the kernel refuses a TCP connect to the
    // service's port from any quadrant while something listens there.
    let err = call();
    assert!(err.contains("circuit breaker of dg/echo is open"), "{err}");
    let port = format!("{}:7500", inst.addr(Quadrant::Dg));
    assert_eq!(tcp(&inst, Quadrant::Dx, &port, "1000"), "err ECONNREFUSED");
    assert_eq!(tcp(&inst, Quadrant::Dg, &port, "1000"), "err ECONNREFUSED");
    let audit = transitions(&inst, "dg/echo", 1);
    assert_eq!(audit[0]["cause"], "failure_ratio", "{audit:?}");
    assert_eq!(audit[0]["calls"], 10, "{audit:?}");
    // 10 unanswered requests, 1 open refused by the broker, 2 connects refused by the kernel.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = inst.quadrant(&["slo", "--output", "json"]);
        let r: Value = serde_json::from_slice(&out.stdout).expect("slo json");
        let events = &r["slos"][0]["events"];
        if events["total"] == 13 {
            assert_eq!(events["good"], 0, "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        thread::sleep(Duration::from_millis(100));
    }
    // After the ejection: half-open, one probe lane opens (and still fails here); the next
    // open waits while the probe's calls are judged.
    thread::sleep(Duration::from_millis(2200));
    let err = call();
    assert!(!err.contains("circuit breaker"), "{err}");
    assert_eq!(service(&inst)["state"], "half_open");
    let err = call();
    assert!(
        err.contains(
            "circuit breaker of dg/echo is half-open: the calls of its probe lane are being judged"
        ),
        "{err}"
    );
}

/// An agent replaced by its successor (`down --keep-dataplane`, then `up`) hands its breakers
/// over: one that three failed connects opened stays open under the new agent — a listener that
/// appears meanwhile is still not reached — with its failures, ejection and count of openings,
/// and `status` reports the breakers carried.
#[test]
fn an_open_breaker_stays_open_across_an_agent_upgrade() {
    let (mut inst, dg) = breaker_opened_for(7150);
    let before = breaker(&inst, "dx", &dg).expect("open before the upgrade");
    assert_eq!(before["state"], "open", "{before}");
    let out = inst.stop_keeping_dataplane();
    assert!(out.status.success(), "{out:?}");
    inst.start_agent();
    let carried = inst.status().carried.expect("a takeover");
    assert!(carried.breakers >= 1, "{carried:?}");
    let after = breaker(&inst, "dx", &dg).expect("carried over");
    assert_eq!(
        (
            &after["state"],
            &after["consecutive_failures"],
            &after["ejection_ms"],
            &after["opened"]
        ),
        (
            &before["state"],
            &before["consecutive_failures"],
            &before["ejection_ms"],
            &before["opened"]
        ),
        "{after}"
    );
    let _server = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7150"]);
    assert_eq!(tcp(&inst, Quadrant::Dx, &dg, "1000"), "err ECONNREFUSED");
    assert_eq!(tcp(&inst, Quadrant::Dg, &dg, "1000"), "ok hello");
}

/// UDP breakers: the port-unreachables DG's kernel sends for DX's datagrams to a closed port
/// open DX's UDP breaker for it; the next datagram is refused at `sendmsg` with `ECONNREFUSED`
/// and never leaves. After the ejection one datagram goes as the probe (the others are refused
/// meanwhile) and, unanswered by an unreachable for a second, the next one closes the breaker.
#[test]
fn port_unreachables_open_a_udp_breaker_and_a_quiet_probe_closes_it() {
    let mut inst = Instance::up(config(), QPROBE);
    let dg = format!("{}:7160", inst.addr(Quadrant::Dg));
    let udp = |inst: &Instance| inst.probe(Quadrant::Dx, &["udp-send", &dg, "200"]).1;
    for i in 0..3 {
        assert_eq!(udp(&inst), "err timeout", "datagram {i}: nothing listens");
    }
    let b = breaker(&inst, "dx", &dg).expect("a UDP breaker after three port-unreachables");
    assert_eq!(
        (&b["protocol"], &b["state"], &b["consecutive_failures"]),
        (&"udp".into(), &"open".into(), &3.into()),
        "{b}"
    );
    let _server = inst.serve(Quadrant::Dg, &["udp-echo", "0.0.0.0:7160"]);
    assert_eq!(udp(&inst), "err ECONNREFUSED");
    assert_eq!(
        inst.counter("sendmsg4", Quadrant::Dx, "refuse_breaker_open"),
        1
    );
    // After the ejection (600 ms + jitter): one probe, the next datagram refused at once.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(udp(&inst), "ok hello");
    assert_eq!(udp(&inst), "err ECONNREFUSED");
    assert_eq!(
        breaker(&inst, "dx", &dg).expect("entry")["state"],
        "half_open"
    );
    // A second without an unreachable: the next datagram closes it.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(udp(&inst), "ok hello");
    assert_eq!(breaker(&inst, "dx", &dg).expect("entry")["state"], "closed");
    let audit: Vec<(String, String, String)> = transitions(&inst, &dg, 3)
        .iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
            (s("from"), s("to"), s("cause"))
        })
        .collect();
    assert_eq!(
        audit,
        [
            (
                "closed".into(),
                "open".into(),
                "consecutive_failures".into()
            ),
            ("open".into(), "half_open".into(), "probe_started".into()),
            (
                "half_open".into(),
                "closed".into(),
                "probe_succeeded".into()
            ),
        ]
    );
}

/// Admission control: a lane service that answers every other request (half its calls fail,
/// below the 90 % that would open its breaker) keeps a closed breaker that refuses a share of
/// the opens — lane opens at the broker, and TCP connects to its port in the kernel
/// (`refuse_breaker_admission`) — while the rest go through.
#[test]
fn admission_control_refuses_a_share_of_the_connects_to_a_failing_service() {
    let mut c = config();
    c.breakers.min_calls = 10;
    c.breakers.failure_ratio = 0.9;
    c.breakers.admission_control = true;
    let mut inst = Instance::up(c, QPROBE);
    let echo = sibling_binary(QPROBE, "lane-echo").display().to_string();
    let serve = [
        echo.as_str(),
        "serve",
        "echo",
        "--tcp-port",
        "7550",
        "--drop-after",
        "1",
    ];
    let _server = inst.background_in(Quadrant::Dg, Some("echo"), &serve, "listening as");
    // Each lane: one answered request, one dropped.
    for _ in 0..6 {
        let _ = inst.run_in(
            Quadrant::Dx,
            Some("client"),
            &[
                &echo,
                "call",
                "dg",
                "echo",
                "--transport",
                "uds",
                "--count",
                "2",
            ],
        );
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let row = loop {
        let r = breakers(&inst);
        let row = r["services"][0].clone();
        if row["rejection_probability"].as_f64().unwrap_or(0.0) > 0.0 {
            break row;
        }
        assert!(Instant::now() < deadline, "no admission control: {r}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(row["state"], "closed", "{row}");
    let p = row["rejection_probability"].as_f64().expect("probability");
    assert!((0.3..0.6).contains(&p), "{row}");
    let port = format!("{}:7550", inst.addr(Quadrant::Dg));
    let (mut refused, mut through) = (0, 0);
    for _ in 0..40 {
        if tcp(&inst, Quadrant::Dx, &port, "500") == "err ECONNREFUSED" {
            refused += 1;
        } else {
            through += 1;
        }
    }
    assert!(
        refused > 0 && through > 0,
        "{refused} refused, {through} through"
    );
    assert_eq!(
        inst.counter("connect4", Quadrant::Dx, "refuse_breaker_admission"),
        refused
    );
}
