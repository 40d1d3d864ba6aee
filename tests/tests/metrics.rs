//! Prometheus metrics and flow events of a running agent. Metrics are checked with the
//! Prometheus project's own tools: the scrape passes `promtool check metrics`, a real
//! `prometheus` scrapes the agent and answers queries over what it stored (the shipped Grafana
//! dashboard's among them), the counters follow
//! the kernel's verdicts and the lanes' requests, and the shipped rules pass `promtool check
//! rules` and their unit tests (both tools from Debian's `prometheus` package, unpacked by
//! `cargo xtask setup`). Flow events: a denied packet is exactly one event with its reason, and
//! a flood beyond the budget loses events that the metrics count. Needs root.
#![expect(
    clippy::float_cmp,
    reason = "the samples compared are counts, exact in f64"
)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use quadrant_tests::{
    bounded::Bounded as _,
    harness::{Instance, sibling_binary, test_config},
};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

fn tool(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/prometheus/usr/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask setup` unpacks Debian's prometheus package there",
        path.display()
    );
    path
}

/// `GET path` over HTTP/1.1; returns (status, body).
fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    // The agent sends a length, never chunks.
    (status, body.to_owned())
}

fn metrics_addr(inst: &Instance) -> SocketAddr {
    inst.status()
        .metrics
        .expect("the test config serves metrics (port 0)")
}

/// The value of the sample whose series (name and labels, as written) is `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn promtool_check(text: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scrape_follows_the_kernel_and_passes_promtool() {
    let inst = Instance::up(test_config(None), QPROBE);
    let addr = metrics_addr(&inst);
    assert_eq!(get(addr, "/healthz", None), (200, "ok\n".into()));
    let (code, body) = get(addr, "/readyz", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("enforced"), "{body}");
    assert_eq!(get(addr, "/nothing", None).0, 404);

    let denied = |text: &str| {
        sample(
            text,
            "quadrant_verdicts_total{hook=\"connect4\",quadrant=\"dx\",reason=\"deny_policy\",verdict=\"drop\"}",
        )
        .unwrap_or(0.0)
    };
    let (_, before) = get(addr, "/metrics", None);
    promtool_check(&before);
    // DX may not reach PX (the embedded policy): each refused connect is one verdict.
    let px = inst.addr(Quadrant::Px);
    for _ in 0..3 {
        let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{px}:7101"), "500"]);
        assert!(!ok, "DX reached PX: {line}");
    }
    let (code, after) = get(addr, "/metrics", None);
    assert_eq!(code, 200);
    assert!(
        denied(&after) - denied(&before) >= 3.0,
        "denied connects before {} after {}:\n{after}",
        denied(&before),
        denied(&after)
    );
    assert_eq!(sample(&after, "quadrant_policy_enforced"), Some(1.0));
    promtool_check(&after);

    let (code, om) = get(
        addr,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert_eq!(code, 200);
    assert!(om.ends_with("# EOF\n"), "not OpenMetrics: {om}");
}

#[test]
fn lane_requests_and_admission_decisions_are_counted() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let addr = metrics_addr(&inst);
    let echo = sibling_binary(QPROBE, "lane-echo").display().to_string();
    let (_, rx) = inst.background_in(
        Quadrant::Dg,
        Some("echo"),
        &[&echo, "serve", "echo"],
        "listening as",
    );
    rx.recv_timeout(Duration::from_secs(10)).expect("listening");
    for transport in ["shm", "uds"] {
        let out = inst.run_in(
            Quadrant::Dx,
            Some("client"),
            &[
                &echo,
                "call",
                "dg",
                "echo",
                "--transport",
                transport,
                "--count",
                "40",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A review with an SVID that is no SVID: admission fails closed, and counts it.
    let dir = std::env::temp_dir().join(format!("quadrant-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let review = dir.join("review.json");
    std::fs::write(
        &review,
        r#"{"review": {"object": {"quadrant": "dx", "workload": "w"}}}"#,
    )
    .expect("review");
    let svid = dir.join("svid.pem");
    std::fs::write(&svid, "not a certificate\n").expect("svid");
    let out = inst.quadrant(&[
        "admit",
        "--review",
        review.to_str().expect("utf8"),
        "--svid",
        svid.to_str().expect("utf8"),
    ]);
    assert!(
        !out.status.success(),
        "a review without an SVID was admitted"
    );

    // The lanes' counts reach the broker when the lanes close or at the next read.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = get(addr, "/metrics", None);
        let done =
            sample(&text, "quadrant_lane_requests_total{quadrant=\"dg\"}").unwrap_or(0.0) >= 80.0;
        if done || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert!(v("quadrant_lane_requests_total{quadrant=\"dg\"}") >= 80.0);
    assert_eq!(
        v("quadrant_lane_request_failures_total{quadrant=\"dg\"}"),
        0.0
    );
    for transport in ["shm", "uds"] {
        let labels = format!("{{quadrant=\"dg\",transport=\"{transport}\"}}");
        assert!(v(&format!("quadrant_lanes_opened_total{labels}")) >= 1.0);
        let count = v(&format!("quadrant_lane_round_trip_seconds_count{labels}"));
        assert!(count >= 40.0, "{transport}: {count} round trips");
        // Every round trip of a lane on one host took more than 0 and less than a second.
        let sum = v(&format!("quadrant_lane_round_trip_seconds_sum{labels}"));
        assert!(
            sum > 0.0 && sum < count,
            "{transport}: sum {sum} s of {count}"
        );
    }
    assert!(v("quadrant_lane_bytes_total{quadrant=\"dg\",direction=\"to_server\"}") > 0.0);
    assert_eq!(
        v("quadrant_admission_decisions_total{result=\"error\"}"),
        1.0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v("quadrant_admission_duration_seconds_count"), 1.0);
    promtool_check(&text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A real Prometheus scrapes the agent; its query API then answers over the stored series.
#[test]
fn prometheus_scrapes_a_running_agent() {
    let inst = Instance::up(test_config(None), QPROBE);
    let addr = metrics_addr(&inst);
    let dir = std::env::temp_dir().join(format!(
        "quadrant-prometheus-{}-{}",
        inst.config.instance,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: quadrant\n    static_configs:\n      - targets: ['{addr}']\n",
            rules = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../manifests/prometheus/quadrant-rules.yaml")
                .display()
        ),
    )
    .expect("config");
    let web = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut server = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
        .spawn()
        .expect("prometheus");
    let query = |q: &str| -> Option<Value> {
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let (code, body) = std::panic::catch_unwind(|| get(web, &path, None)).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    };
    let scalar = |q: &str| -> Option<f64> {
        let v = query(q)?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let deadline = Instant::now() + Duration::from_mins(1);
    let mut seen = (None, None, None);
    while Instant::now() < deadline {
        seen = (
            scalar("up{job=\"quadrant\"}"),
            scalar("quadrant_policy_enforced{job=\"quadrant\"}"),
            scalar("count(quadrant_lanes_limit{job=\"quadrant\"})"),
        );
        if seen == (Some(1.0), Some(1.0), Some(4.0)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The rules loaded beside the scrape: the recording rule exists and no alert fires.
    let rules = query("ALERTS{alertstate=\"firing\"}");
    let dashboard = dashboard_failures(&query, web, addr);
    let _ = server.kill();
    let _ = server.wait();
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert_eq!(
        seen,
        (Some(1.0), Some(1.0), Some(4.0)),
        "prometheus did not scrape the agent (up, policy enforced, quadrants); its log:\n{log}"
    );
    let firing = rules.expect("the alerts query answered");
    assert_eq!(
        firing["data"]["result"].as_array().map(Vec::len),
        Some(0),
        "alerts fire on a healthy agent: {firing}"
    );
    assert!(
        dashboard.is_empty(),
        "dashboard queries:\n{}",
        dashboard.join("\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Evaluates the shipped Grafana dashboard against a Prometheus (`web`) scraping the agent at
/// `agent`, its variables set as Grafana sets them with this node chosen: the node variable's
/// query must list the node; every panel query must evaluate, and return series whenever every
/// metric it reads is in the agent's scrape. Returns what failed.
fn dashboard_failures(
    query: &dyn Fn(&str) -> Option<Value>,
    web: SocketAddr,
    agent: SocketAddr,
) -> Vec<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/grafana/quadrant-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut failed = Vec::new();
    // The node variable: `label_values(quadrant_build_info, instance)`.
    let (code, body) = get(
        web,
        &format!(
            "/api/v1/label/instance/values?{}",
            urlencode_pair("match[]", "quadrant_build_info")
        ),
        None,
    );
    if code != 200 || !body.contains(&format!("\"{agent}\"")) {
        failed.push(format!(
            "the node variable does not list {agent}: {code} {body}"
        ));
    }
    // A multi-value variable is a regex of the chosen values, escaped; the rate interval is
    // Grafana's four scrape intervals (1 s here), rounded up.
    let node = agent.to_string().replace('.', "\\\\.");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .map(|e| {
            e.replace("$instance", &node)
                .replace("$__rate_interval", "5s")
        })
        .collect();
    assert!(exprs.len() > 10, "the dashboard's queries were not found");
    let exported = |text: &str, name: &str| {
        text.lines()
            .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for expr in exprs {
        loop {
            let (_, scrape) = get(agent, "/metrics", None);
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("quadrant_"))
                .collect();
            let expected = names.iter().all(|n| exported(&scrape, n));
            let answer = query(&expr);
            let series = answer
                .as_ref()
                .filter(|a| a["status"] == "success")
                .and_then(|a| a["data"]["result"].as_array().map(Vec::len));
            match series {
                Some(n) if n > 0 || !expected => break,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
                _ => {
                    failed.push(format!(
                        "{expr}: {} (metrics exported now: {expected})",
                        answer.map_or_else(|| "no answer".to_owned(), |a| a.to_string())
                    ));
                    break;
                }
            }
        }
    }
    failed
}

fn urlencode_pair(key: &str, value: &str) -> String {
    format!("{}={}", urlencode(key), urlencode(value))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn the_shipped_rules_pass_promtool_and_their_unit_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/prometheus");
    for args in [
        &["check", "rules", "quadrant-rules.yaml"][..],
        &["test", "rules", "quadrant-rules.test.yaml"][..],
    ] {
        let out = Command::new(tool("promtool"))
            .args(args)
            .current_dir(&dir)
            .output_bounded();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A metrics address that is taken stops `quadrant up` with the address named, before it
/// creates anything.
#[test]
fn a_taken_metrics_address_stops_the_start_with_its_name() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = taken.local_addr().expect("addr");
    let mut config = test_config(None);
    config.metrics.listen = Some(at);
    let path = std::env::temp_dir().join(format!("{}-metrics-taken.yaml", config.instance));
    std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("config");
    let bin = sibling_binary(QPROBE, "quadrant");
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&path)
        .arg("up")
        .stdin(Stdio::null())
        .output_bounded();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up succeeded on a taken address");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {at}")),
        "{stderr}"
    );
    // Nothing is left: no namespace of the instance, no control socket.
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let listed = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !listed.contains(&format!("{}-dx", config.instance)),
        "{listed}"
    );
    assert!(!config.socket_path().exists());
    let _ = std::fs::remove_file(&path);
}

/// `quadrant observe --output json` with `args`: the flow lines.
fn observe(inst: &Instance, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "--output", "json", "--last", "10000"];
    all.extend(args);
    let out = inst.quadrant(&all);
    assert!(
        out.status.success(),
        "observe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON flow line"))
        .collect()
}

fn to_port(flows: &[Value], port: u16) -> Vec<&Value> {
    flows
        .iter()
        .filter(|f| {
            ["TCP", "UDP"]
                .iter()
                .any(|p| f["flow"]["l4"][p]["destination_port"] == port)
        })
        .collect()
}

/// Sends `n` UDP datagrams from inside quadrant `q`'s namespace (not its cgroup: the packet
/// programs decide them) to `to:port`.
fn udp_from_namespace(inst: &Instance, q: Quadrant, to: &str, port: u16, n: u32) {
    let code = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range({n}):\n    s.sendto(b'x', ('{to}', {port}))\n"
    );
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &inst.config.netns(q),
            "python3",
            "-c",
            &code,
        ])
        .output_bounded();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_denied_packet_is_exactly_one_flow_event_with_its_reason() {
    let inst = Instance::up(test_config(None), QPROBE);
    let px = inst.addr(Quadrant::Px);
    // A datagram from DX's namespace to PX: XDP drops it (the policy).
    udp_from_namespace(&inst, Quadrant::Dx, &px, 7102, 1);
    // A connect from DX's cgroup to PX: refused at the socket.
    let (ok, line) = inst.probe(Quadrant::Dx, &["tcp-connect", &format!("{px}:7104"), "500"]);
    assert!(!ok, "{line}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let (udp, tcp) = loop {
        let drops = observe(&inst, &["--quadrant", "dx", "--verdict", "dropped"]);
        let (udp, tcp) = (to_port(&drops, 7102).len(), to_port(&drops, 7104).len());
        if (udp, tcp) == (1, 1) || Instant::now() > deadline {
            break (
                to_port(&drops, 7102)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>(),
                to_port(&drops, 7104)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>(),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(udp.len(), 1, "{udp:?}");
    let f = &udp[0]["flow"];
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["drop_reason_desc"], "deny_policy");
    assert_eq!(f["hook"], "xdp");
    assert_eq!(f["event"], "drop");
    assert_eq!(f["traffic_direction"], "EGRESS");
    assert_eq!(f["IP"]["source"], inst.addr(Quadrant::Dx));
    assert_eq!(f["IP"]["destination"], px);
    assert_eq!(f["source"]["labels"][0], "quadrant:dx");
    assert_eq!(f["destination"]["labels"][0], "quadrant:px");
    assert_eq!(udp[0]["node_name"], inst.config.instance);
    assert_eq!(tcp.len(), 1, "{tcp:?}");
    assert_eq!(tcp[0]["flow"]["hook"], "connect4");
    assert_eq!(tcp[0]["flow"]["drop_reason_desc"], "deny_policy");
    // Filters that exclude it: another quadrant, forwarded flows, another reason.
    for args in [
        &["--quadrant", "dg"][..],
        &["--verdict", "forwarded"][..],
        &["--reason", "deny_spoofed"][..],
        &["--direction", "ingress"][..],
    ] {
        assert!(
            to_port(&observe(&inst, args), 7102).is_empty(),
            "{args:?} let the drop through"
        );
    }
    let out = inst.quadrant(&["observe", "--quadrant", "zz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown quadrant \"zz\""));
}

/// Ten events a second per CPU, five at once: a flood of 500 denied datagrams loses most of its
/// events, and every one is either read or counted lost.
#[test]
fn a_flood_beyond_the_budget_loses_events_and_the_metrics_count_them() {
    let mut config = test_config(None);
    config.observe.events_per_sec = 10;
    config.observe.events_burst = 5;
    let inst = Instance::up(config, QPROBE);
    let addr = metrics_addr(&inst);
    let px = inst.addr(Quadrant::Px);
    let lost = |text: &str| {
        sample(
            text,
            "quadrant_flow_events_lost_total{reason=\"rate_limit\"}",
        )
        .unwrap_or(0.0)
            + sample(
                text,
                "quadrant_flow_events_lost_total{reason=\"ring_full\"}",
            )
            .unwrap_or(0.0)
    };
    let before = lost(&get(addr, "/metrics", None).1);
    udp_from_namespace(&inst, Quadrant::Dx, &px, 7105, 500);
    std::thread::sleep(Duration::from_millis(500));
    let read = f64::from(
        u32::try_from(to_port(&observe(&inst, &["--verdict", "dropped"]), 7105).len())
            .expect("fewer than 2^32"),
    );
    let (_, text) = get(addr, "/metrics", None);
    let lost = lost(&text) - before;
    assert!(read >= 5.0, "the burst is written: {read} read");
    assert!(read < 100.0, "the budget held: {read} read");
    assert!(
        lost >= 500.0 - read,
        "{read} read and {lost} lost of 500 drops"
    );
    assert!(
        sample(&text, "quadrant_flow_events_total{event=\"drop\"}").unwrap_or(0.0) >= read,
        "{text}"
    );
    promtool_check(&text);
}
