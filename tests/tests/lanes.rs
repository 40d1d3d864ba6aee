//! RTT lanes between workloads in real quadrants: every transport across quadrants, the lane
//! listing, authorization refusals (denied pair, unattested caller, wrong or missing SVID on the
//! TCP port, a lane the broker never opened), a peer crashing mid-message, and lane exhaustion
//! that stays inside its quadrant. Needs root.

use quadrant_tests::bounded::Bounded as _;
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Output,
    sync::{Arc, mpsc::Receiver},
    time::Duration,
};

use dataplane_common::{
    Quadrant,
    maps::{self, lane_accel},
};
use quadrant::{
    config::LaneLimits,
    identity::ca::Authority,
    lanes::{
        broker::LanesReport,
        frame::{HEADER_LEN, Header, Kind},
    },
};
use quadrant_tests::harness::{Instance, copy_of_policies, sibling_binary, test_config};
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};
use serde_json::Value;

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");
const TCP_PORT: u16 = 7100;

fn echo_bin() -> String {
    sibling_binary(QPROBE, "lane-echo").display().to_string()
}

fn start_echo(inst: &mut Instance, q: Quadrant, tcp: bool) -> Receiver<String> {
    let bin = echo_bin();
    let port = TCP_PORT.to_string();
    let mut argv = vec![bin.as_str(), "serve", "echo"];
    if tcp {
        argv.extend(["--tcp-port", &port]);
    }
    let (_, rx) = inst.background_in(q, Some("echo"), &argv, "listening as");
    let first = rx.recv().expect("listening line");
    assert!(
        first.ends_with(&format!("/quadrant/{}/workload/echo", q.name())),
        "{first}"
    );
    rx
}

fn call(inst: &Instance, from: Quadrant, workload: &str, to: Quadrant, args: &[&str]) -> Output {
    let program = echo_bin();
    let mut command = vec![program.as_str(), "call", to.name(), "echo"];
    command.extend(args);
    inst.run_in(from, Some(workload), &command)
}

fn summary(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "lane-echo call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary JSON")
}

fn refusal(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a refusal, got {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

fn lanes(inst: &Instance) -> LanesReport {
    let out = inst.quadrant(&["lanes", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lanes JSON")
}

fn wait_for(rx: &Receiver<String>, needle: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line containing {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

#[test]
fn every_transport_carries_lanes_across_quadrants() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let td = inst.config.identity.trust_domain.clone();
    let _server = start_echo(&mut inst, Quadrant::Dg, true);
    for transport in ["shm", "uds", "tcp"] {
        for (size, count) in [("64", "200"), ("65536", "50"), ("1048576", "3")] {
            let s = summary(&call(
                &inst,
                Quadrant::Dx,
                "client",
                Quadrant::Dg,
                &["--transport", transport, "--size", size, "--count", count],
            ));
            assert_eq!(s["transport"], transport);
            assert_eq!(
                s["local"],
                format!("spiffe://{td}/quadrant/dx/workload/client")
            );
            assert_eq!(
                s["peer"],
                format!("spiffe://{td}/quadrant/dg/workload/echo")
            );
            println!(
                "{transport} {size} B: p50 {} us, p99 {} us",
                s["p50_us"], s["p99_us"]
            );
        }
    }
    // `auto` picks shared memory on one host; a lane inside one quadrant works too.
    let s = summary(&call(&inst, Quadrant::Dg, "peer", Quadrant::Dg, &[]));
    assert_eq!(s["transport"], "shm");

    // A lane held open is listed with its transport, peers, bytes and round-trip time.
    let bin = echo_bin();
    let (_, rx) = inst.background_in(
        Quadrant::Dx,
        Some("holder"),
        &[
            &bin,
            "call",
            "dg",
            "echo",
            "--transport",
            "uds",
            "--count",
            "20",
            "--size",
            "100",
            "--hold",
            "30",
        ],
        "{",
    );
    drop(rx);
    let report = lanes(&inst);
    assert_eq!(report.lanes.len(), 1, "{report:?}");
    let l = &report.lanes[0];
    assert_eq!(l.transport.name(), "uds");
    assert_eq!(
        l.client,
        format!("spiffe://{td}/quadrant/dx/workload/holder")
    );
    assert_eq!(
        (l.bytes_to_server, l.bytes_to_client, l.messages),
        (2000, 2000, 40)
    );
    assert!(l.rtt_ns > 0);
    let dx = report
        .quadrants
        .iter()
        .find(|q| q.quadrant == "dx")
        .expect("dx usage");
    assert_eq!(dx.lanes, 1);
    let text = inst.quadrant(&["lanes"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("dg/echo"));
}

/// A TLS client that accepts any server certificate (the server's checks are under test).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to the service's TCP port from the host, presents `cert` (or nothing), sends a
/// Hello for `lane`, and returns what came back: the reply frame, or the failure.
fn rogue_tcp_lane(
    addr: &str,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    lane: u64,
) -> Result<(Kind, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let conn = rustls::ClientConnection::new(Arc::new(config), "lane".try_into().expect("name"))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let hello = format!(r#"{{"lane":{lane},"token":"00000000000000000000000000000000"}}"#);
    #[expect(clippy::cast_possible_truncation, reason = "a short JSON hello")]
    let header = Header {
        len: hello.len() as u32,
        kind: Kind::Hello,
    }
    .encode();
    tls.write_all(&header).map_err(|e| e.to_string())?;
    tls.write_all(hello.as_bytes()).map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut h = [0u8; HEADER_LEN];
    tls.read_exact(&mut h).map_err(|e| e.to_string())?;
    let h = Header::decode(&h, 4096).map_err(|e| e.to_string())?;
    let mut body = vec![0; h.len as usize];
    tls.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((h.kind, String::from_utf8_lossy(&body).into_owned()))
}

fn pkcs8(der: Vec<u8>) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))
}

/// How many lanes the broker refused to quadrant `q` for `reason`, by its report.
fn refusals(report: &LanesReport, q: &str, reason: &str) -> u64 {
    report
        .refusals
        .iter()
        .find(|r| r.quadrant == q && r.reason.name() == reason)
        .map_or(0, |r| r.count)
}

#[test]
fn unauthorized_lanes_are_refused() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _server = start_echo(&mut inst, Quadrant::Dg, true);
    let mut refused = 0;

    // Production may not open lanes into development (the global layer), on any transport.
    for t in ["auto", "shm", "uds", "tcp"] {
        let e = refusal(&call(
            &inst,
            Quadrant::Px,
            "api",
            Quadrant::Dg,
            &["--transport", t],
        ));
        assert!(e.contains("policy allows no lane from spiffe://"), "{e}");
        assert!(e.contains("/quadrant/px/workload/api"), "{e}");
        refused += 1;
    }
    // A process outside every quadrant is not attested.
    let socket = inst.config.lane_socket();
    let out = std::process::Command::new(echo_bin())
        .args(["call", "dg", "echo"])
        .env("QUADRANT_LANE_SOCKET", &socket)
        .output_bounded();
    let e = refusal(&out);
    assert!(e.contains("caller not attested"), "{e}");
    refused += 1;
    // An unknown service, and TCP to a service that takes no TCP lanes.
    let e = refusal(&call(&inst, Quadrant::Dx, "client", Quadrant::Dx, &[]));
    assert!(e.contains("no service echo is offered in dx"), "{e}");
    refused += 1;
    let _dx_echo = start_echo(&mut inst, Quadrant::Dx, false);
    let e = refusal(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dx,
        &["--transport", "tcp"],
    ));
    assert!(e.contains("the service takes no TCP lanes"), "{e}");
    refused += 1;
    // A request that breaks the lane schema is refused with the field named.
    let e = refusal(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dx,
        &["--transport", "carrier-pigeon"],
    ));
    assert!(e.contains("unknown transport"), "{e}");
    refused += 1;

    // The broker counted its refusals by quadrant and reason.
    let report = lanes(&inst);
    assert_eq!(
        refusals(&report, "px", "policy"),
        4,
        "{:?}",
        report.refusals
    );
    assert_eq!(refusals(&report, "none", "attestation"), 1);
    assert_eq!(refusals(&report, "dx", "no_service"), 1);
    assert_eq!(refusals(&report, "dx", "policy"), 1);
    assert!(report.lanes.is_empty());
    println!("unauthorized lane requests refused by the broker: {refused} of {refused}");
    // Authorized lanes still work.
    summary(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dg,
        &["--transport", "tcp"],
    ));
}

/// The broker decides with the lane rules compiled when a policy is activated (no per-open
/// evaluation, and lanes prepared ahead in its pool carry no decision): a reload that revokes
/// DX → DG must replace them before the next open, on every transport.
#[test]
fn a_reload_that_revokes_a_lane_refuses_the_next_open() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    config.policy_dir = Some(dir.clone());
    let mut inst = Instance::up(config, QPROBE);
    let _server = start_echo(&mut inst, Quadrant::Dg, true);
    for t in ["shm", "uds", "tcp"] {
        summary(&call(
            &inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--transport", t, "--count", "3"],
        ));
    }
    inst.deny_and_reload(&dir, "dx", "dg");
    for t in ["shm", "uds", "tcp"] {
        let e = refusal(&call(
            &inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--transport", t],
        ));
        assert!(
            e.contains("policy allows no lane from spiffe://"),
            "{t}: {e}"
        );
    }
    assert_eq!(refusals(&lanes(&inst), "dx", "policy"), 3);
    // What the reload did not revoke still opens.
    let _dx_echo = start_echo(&mut inst, Quadrant::Dx, false);
    summary(&call(&inst, Quadrant::Dx, "client", Quadrant::Dx, &[]));
}

#[test]
fn rogue_tcp_clients_get_no_lane() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let td = inst.config.identity.trust_domain.clone();
    let server = start_echo(&mut inst, Quadrant::Dg, true);
    let mut refused = 0;

    // On the service's TCP port: no SVID, an SVID outside the trust bundle, and a genuine SVID
    // for a lane the broker never opened. None gets a lane; the service says why.
    let addr = format!("{}:{TCP_PORT}", inst.addr(Quadrant::Dg));
    // Before any lane was announced the service has no SVID to present and refuses at once.
    let r = rogue_tcp_lane(&addr, None, 1);
    assert!(r.is_err(), "{r:?}");
    wait_for(&server, "no TCP lane was announced");
    // After an authorized TCP lane, it holds its SVID and checks the client's.
    summary(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dg,
        &["--transport", "tcp"],
    ));
    let r = rogue_tcp_lane(&addr, None, 1);
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|(k, _)| *k != Kind::Accept),
        "{r:?}"
    );
    let line = wait_for(&server, "refused a TCP lane");
    assert!(line.contains("handshake"), "{line}");
    refused += 1;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, "forged");
    let id = format!("spiffe://{td}/quadrant/dx/workload/client");
    p.subject_alt_names = vec![SanType::URI(id.clone().try_into().expect("uri"))];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let forged = p.self_signed(&key).expect("cert");
    let r = rogue_tcp_lane(
        &addr,
        Some((vec![forged.der().clone()], pkcs8(key.serialize_der()))),
        1,
    );
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|(k, _)| *k != Kind::Accept),
        "{r:?}"
    );
    let line = wait_for(&server, "refused a TCP lane");
    assert!(
        line.contains("peer SVID refused") || line.contains("handshake"),
        "{line}"
    );
    refused += 1;

    let authority = Authority::load_or_create(&inst.config.identity.ca_dir, &td, None).expect("ca");
    let svid = authority
        .mint_x509(&id, Duration::from_mins(10))
        .expect("svid");
    let chain = svid
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let (kind, why) =
        rogue_tcp_lane(&addr, Some((chain, pkcs8(svid.key_pkcs8.clone()))), 999).expect("reply");
    assert_eq!(kind, Kind::Refuse);
    assert!(
        why.contains("lane 999 was not opened through the broker"),
        "{why}"
    );
    refused += 1;
    assert!(lanes(&inst).lanes.is_empty());
    println!("rogue TCP lane attempts refused by the service: {refused} of {refused}");
    // Authorized lanes still work.
    summary(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dg,
        &["--transport", "tcp"],
    ));
}

#[test]
fn a_peer_crashing_mid_message_closes_the_lane_cleanly() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let server = start_echo(&mut inst, Quadrant::Dg, true);
    for transport in ["shm", "uds", "tcp"] {
        let out = inst.run_in(
            Quadrant::Dx,
            Some("crasher"),
            &[QPROBE, "lane-crash", "dg", "echo", transport],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("ok echoed"),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "the crasher must die");
        let lane: u64 = stdout
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .expect("lane id");
        let outcome = wait_for(&server, &format!("lane {lane} from"));
        assert!(
            outcome.ends_with("error: lane peer went away"),
            "{transport}: {outcome}"
        );
        // The broker freed the lane and its memory.
        let report = lanes(&inst);
        assert!(report.lanes.iter().all(|l| l.lane != lane), "{report:?}");
        let dx = report
            .quadrants
            .iter()
            .find(|q| q.quadrant == "dx")
            .expect("dx");
        assert_eq!((dx.lanes, dx.shm_bytes), (0, 0));
        // The service goes on serving.
        summary(&call(
            &inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--transport", transport],
        ));
    }
}

/// Runs `lane-echo hold ARGS` as `workload` of `q` until it is holding its lanes; returns what
/// it printed (one line per lane opened or refused).
fn hold(inst: &mut Instance, q: Quadrant, workload: &str, args: &[&str]) -> Vec<String> {
    let bin = echo_bin();
    let mut command = vec![bin.as_str(), "hold"];
    command.extend(args);
    let (_, rx) = inst.background_in(q, Some(workload), &command, "holding");
    rx.try_iter().collect()
}

fn opened(lines: &[String]) -> usize {
    lines.iter().filter(|l| l.starts_with("open")).count()
}

#[test]
fn lane_exhaustion_is_refused_per_quadrant() {
    let mut config = test_config(None);
    config.lanes.limits.insert(
        "dx".into(),
        LaneLimits {
            max_lanes: 2,
            ..LaneLimits::default()
        },
    );
    config.lanes.limits.insert(
        "pg".into(),
        LaneLimits {
            max_shm_bytes: 10 << 20,
            ..LaneLimits::default()
        },
    );
    let mut inst = Instance::up(config, QPROBE);
    let _dg = start_echo(&mut inst, Quadrant::Dg, false);
    let _px = start_echo(&mut inst, Quadrant::Px, false);

    // DX: two lanes, then the third is refused naming max_lanes.
    let lines = hold(
        &mut inst,
        Quadrant::Dx,
        "greedy",
        &["dg", "echo", "--max", "5"],
    );
    assert_eq!(opened(&lines), 2, "{lines:?}");
    let refused = lines
        .iter()
        .find(|l| l.starts_with("refused"))
        .expect("a refusal");
    assert!(
        refused.contains("lane limit reached: quadrant dx has 2 open lanes, max_lanes is 2"),
        "{refused}"
    );
    let e = refusal(&call(&inst, Quadrant::Dx, "other", Quadrant::Dg, &[]));
    assert!(e.contains("max_lanes"), "{e}");

    // PG: one shared-memory lane fits its 10 MiB, the second does not; a Unix socket lane
    // (one page of statistics) still does.
    let lines = hold(
        &mut inst,
        Quadrant::Pg,
        "ring-holder",
        &["px", "echo", "--max", "2", "--transport", "shm"],
    );
    assert_eq!(opened(&lines), 1, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("max_shm_bytes is 10485760")),
        "{lines:?}"
    );
    let s = summary(&call(
        &inst,
        Quadrant::Pg,
        "small",
        Quadrant::Px,
        &["--transport", "uds"],
    ));
    assert_eq!(s["transport"], "uds");

    // Other quadrants are untouched by DX's exhaustion: DG and PX workloads open lanes at will.
    for _ in 0..3 {
        summary(&call(&inst, Quadrant::Dg, "worker", Quadrant::Dg, &[]));
        summary(&call(&inst, Quadrant::Px, "worker", Quadrant::Px, &[]));
    }
    let report = lanes(&inst);
    let usage = |q: &str| {
        report
            .quadrants
            .iter()
            .find(|u| u.quadrant == q)
            .expect("usage")
            .clone()
    };
    assert_eq!(usage("dx").lanes, 2);
    assert_eq!(usage("pg").lanes, 1);
    assert_eq!((usage("dg").lanes, usage("px").lanes), (0, 0));
    assert_eq!(refusals(&report, "dx", "max_lanes"), 2);
    assert_eq!(refusals(&report, "pg", "max_shm_bytes"), 1);
    assert_eq!(
        refusals(&report, "dg", "max_lanes") + refusals(&report, "px", "max_lanes"),
        0
    );
}

#[test]
fn tcp_lanes_run_over_the_sk_msg_redirect_when_acceleration_is_on() {
    let mut config = test_config(None);
    config.lanes.tcp_acceleration = quadrant::config::TcpAcceleration::SkMsg;
    let mut inst = Instance::up(config, QPROBE);
    let _server = start_echo(&mut inst, Quadrant::Dg, true);
    for (size, count) in [("64", "100"), ("65536", "20")] {
        let s = summary(&call(
            &inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--transport", "tcp", "--size", size, "--count", count],
        ));
        assert_eq!(s["transport"], "tcp");
    }
    let accel = lanes(&inst)
        .tcp_acceleration
        .expect("acceleration counters");
    // Both ends of each connection were recorded and the TLS records went straight across.
    assert!(accel.sockets >= 4, "{accel:?}");
    assert!(accel.redirected >= 240, "{accel:?}");
}

/// Starts a TCP echo in DG and, in DX, `qprobe tcp-talk` to it (`count` round trips
/// `interval_ms` apart, one connection, each answer awaited 1 s); returns the echo's address and
/// tcp-talk's lines after its `ready`.
fn talk_to_dg(inst: &mut Instance, interval_ms: &str, count: &str) -> (String, Receiver<String>) {
    talk_to_dg_waiting(inst, (interval_ms, count), "1000")
}

/// [`talk_to_dg`], each answer awaited `read_timeout_ms`.
fn talk_to_dg_waiting(
    inst: &mut Instance,
    (interval_ms, count): (&str, &str),
    read_timeout_ms: &str,
) -> (String, Receiver<String>) {
    let target = format!("{}:7101", inst.addr(Quadrant::Dg));
    let _echo = inst.serve(Quadrant::Dg, &["tcp-echo", "0.0.0.0:7101"]);
    let (_, talk) = inst.background_in(
        Quadrant::Dx,
        None,
        &[
            QPROBE,
            "tcp-talk",
            &target,
            interval_ms,
            count,
            read_timeout_ms,
        ],
        "ready",
    );
    let ready = talk.recv_timeout(Duration::from_secs(5));
    assert_eq!(ready.as_deref(), Ok("ready"));
    (target, talk)
}

/// The outcome of `tcp-talk` once a reload that revoked its flow has returned: the first failure
/// among the lines it printed meanwhile, else the first failure among its next two lines (a
/// round trip under way when the reload returned may still complete). An `ok` there means the
/// connection outlived the revocation.
fn after_revocation(talk: &Receiver<String>) -> String {
    let mut last = String::new();
    while let Ok(line) = talk.try_recv() {
        if line.starts_with("err") {
            return line;
        }
        last = line;
    }
    for _ in 0..2 {
        last = talk
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("tcp-talk printed nothing after {last:?}"));
        if last.starts_with("err") {
            break;
        }
    }
    last
}

/// Redirected messages never cross the tc programs, so revoking the flow that opened a
/// connection must stop them where they are redirected: after a reload that denies DX → DG, the
/// next message of a connection that was running over the redirect is refused with `EACCES`
/// (without the check in `sk_msg`, it would still reach DG and be answered).
#[test]
fn revoking_a_flow_stops_its_redirected_connections() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    config.policy_dir = Some(dir.clone());
    config.lanes.tcp_acceleration = quadrant::config::TcpAcceleration::SkMsg;
    let mut inst = Instance::up(config, QPROBE);
    let (target, talk) = talk_to_dg(&mut inst, "100", "200");
    let next = |what: &str| {
        talk.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what}: no line from tcp-talk"))
    };
    for n in 0..3 {
        assert_eq!(next("allowed round trip"), format!("ok ping {n}"));
    }
    let accel = |inst: &Instance| lanes(inst).tcp_acceleration.expect("acceleration counters");
    let before = accel(&inst);
    // Both ends' messages of each round trip went straight across.
    assert!(before.redirected >= 6, "{before:?}");
    assert_eq!(before.refused, 0, "{before:?}");

    inst.deny_and_reload(&dir, "dx", "dg");
    // The first failure must be the refusal, and it must come at once.
    assert_eq!(
        after_revocation(&talk),
        "err EACCES",
        "{}",
        inst.agent_log()
    );
    let after = accel(&inst);
    assert!(after.refused >= 1, "{after:?}");
    // A new connection is refused at connect by the cgroup hook, as without acceleration.
    assert_eq!(
        inst.probe(Quadrant::Dx, &["tcp-connect", &target, "1000"]),
        (false, "err EPERM".into())
    );
}

/// An agent replaced by its successor (`down --keep-dataplane`, then `up`): a lane opened
/// before goes on carrying messages while no broker runs and after (the broker is not on its
/// path), and the service offers itself again to the new broker, so new lanes open without
/// restarting it (without that, the service ends when its broker goes away and the next open
/// finds no service).
#[test]
fn lanes_and_services_carry_on_across_an_agent_upgrade() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let service = start_echo(&mut inst, Quadrant::Dg, false);
    let bin = echo_bin();
    // Round trips every 100 ms for 6 s over one shared-memory lane, across the hand-over.
    let long = std::process::Command::new(&inst.bin)
        .arg("--config")
        .arg(&inst.config_path)
        .args([
            "exec",
            "dx",
            "--workload",
            "client",
            "--",
            &bin,
            "call",
            "dg",
            "echo",
        ])
        .args([
            "--transport",
            "shm",
            "--count",
            "60",
            "--interval-ms",
            "100",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lane-echo call");
    assert!(
        matches!(service.recv_timeout(Duration::from_secs(5)), Ok(l) if l.contains("open: shm")),
        "the long lane did not open"
    );
    let out = inst.stop_keeping_dataplane();
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    inst.start_agent();

    // The service finds the new broker within its retry pause (at most 200 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = call(
            &inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--transport", "uds", "--count", "10"],
        );
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("no service")
            || std::time::Instant::now() > deadline
        {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let s = summary(&out);
    assert_eq!(s["transport"], "uds");
    assert_eq!(
        s["peer"],
        format!("spiffe://quadrant.local/quadrant/dg/workload/echo")
    );
    let long = quadrant_tests::bounded::wait_output_within(
        long,
        quadrant_tests::bounded::COMMAND_TIMEOUT,
        "the long lane-echo call",
        &[inst.agent_pid()],
    );
    let s = summary(&long);
    assert_eq!(
        (s["transport"].as_str(), s["count"].as_u64()),
        (Some("shm"), Some(60))
    );
}

/// Where the instance's agent pinned the map `name`.
fn pinned_map(inst: &Instance, name: &str) -> std::path::PathBuf {
    inst.config.bpffs_dir().join("maps").join(name)
}

/// Kernel ids of the instance's pinned `LANE_SOCKS` and of the `sk_msg` program using it.
fn lane_socks_and_sk_msg(inst: &Instance) -> (u32, u32) {
    let map = aya::maps::MapData::from_pin(pinned_map(inst, maps::LANE_SOCKS))
        .expect("pinned LANE_SOCKS")
        .info()
        .expect("map info")
        .id();
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| {
            p.name_as_str() == Some(quadrant::loader::programs::SK_MSG)
                && p.map_ids()
                    .ok()
                    .flatten()
                    .is_some_and(|ids| ids.contains(&map))
        })
        .expect("an sk_msg program using LANE_SOCKS")
        .id();
    (map, prog)
}

/// `tcp_acceleration: auto` measures `sk_msg` against the stack when the agent starts, turns
/// the acceleration on exactly when it wins (p50 <= 0.9x, p99 <= 1.0x, the rule unit-tested
/// in `accel_probe`), and the connections between quadrants follow: redirected when it is on,
/// untouched by the acceleration programs when it is off. Which way it goes depends on this
/// machine; the test holds the agent to its own figures.
#[test]
fn automatic_acceleration_follows_its_measurement() {
    let mut config = test_config(None);
    config.lanes.tcp_acceleration = quadrant::config::TcpAcceleration::Auto;
    let mut inst = Instance::up(config, QPROBE);
    let report = lanes(&inst);
    let probe = report.tcp_acceleration_probe.clone().unwrap_or_else(|| {
        panic!(
            "no probe figures: {:?}",
            report.tcp_acceleration_probe_error
        )
    });
    println!("probe: {probe:?}");
    assert_eq!(probe.rounds, quadrant::lanes::accel_probe::ROUNDS);
    assert!(
        probe.redirected_p50_ns > 0 && probe.stack_p50_ns > 0,
        "{probe:?}"
    );
    assert!(
        probe.redirected_p50_ns <= probe.redirected_p99_ns,
        "{probe:?}"
    );
    assert_eq!(
        probe.on,
        quadrant::lanes::accel_probe::wins(
            probe.redirected_p50_ns,
            probe.redirected_p99_ns,
            probe.stack_p50_ns,
            probe.stack_p99_ns
        ),
        "{probe:?}"
    );
    assert!(
        !inst.config.accel_probe_cgroup_dir().exists(),
        "the probe's cgroup outlived it"
    );
    // What the kernel programs counted (sockets recorded, messages redirected, passed,
    // refused), read from the pinned map, around ten round trips DX -> DG.
    let pinned = pinned_map(&inst, maps::LANE_ACCEL);
    let kernel_counts = || {
        let data = aya::maps::MapData::from_pin(&pinned).expect("pinned LANE_ACCEL");
        let arr: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
                .expect("LANE_ACCEL is a per-CPU array");
        (0..lane_accel::COUNT)
            .map(|i| arr.get(&i, 0).expect("counter").iter().sum::<u64>())
            .collect::<Vec<u64>>()
    };
    let before = kernel_counts();
    let (_, talk) = talk_to_dg(&mut inst, "20", "10");
    for n in 0..10 {
        let line = talk.recv_timeout(Duration::from_secs(5));
        assert_eq!(line.as_deref(), Ok(format!("ok ping {n}").as_str()));
    }
    let after = kernel_counts();
    let counters = lanes(&inst).tcp_acceleration;
    if probe.on {
        let c = counters.expect("acceleration counters while it is on");
        // Only the quadrants' messages: the probe's are not counted.
        assert!(c.redirected >= 20 && c.redirected < 100, "{c:?}");
        let slot = lane_accel::REDIRECTED as usize;
        assert!(after[slot] >= before[slot] + 20, "{before:?} -> {after:?}");
    } else {
        assert_eq!(counters, None);
        assert_eq!(
            after, before,
            "the acceleration programs ran for the quadrants' connections although the probe found no win"
        );
    }
}

/// With the `sk_msg` acceleration, a connection running over the redirect when its agent hands
/// over to the next one goes on: the new agent starts with an empty socket map, so the
/// connection falls back to the TCP stack (and tc), every round trip answered. And it is under
/// the new agent's policy: revoking DX → DG stops it (nothing of the old dataplane keeps
/// redirecting it under the old policy).
#[test]
fn accelerated_connections_carry_on_across_an_agent_upgrade() {
    let mut config = test_config(None);
    let dir = copy_of_policies(&config.instance);
    config.policy_dir = Some(dir.clone());
    config.lanes.tcp_acceleration = quadrant::config::TcpAcceleration::SkMsg;
    let mut inst = Instance::up(config, QPROBE);
    let (_, talk) = talk_to_dg(&mut inst, "20", "1000");
    let mut lines = Vec::new();
    let mut next = |what: &str| {
        let line = talk
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what}: no line from tcp-talk after {lines:?}"));
        lines.push(line.clone());
        line
    };
    for n in 0..5 {
        assert_eq!(next("before"), format!("ok ping {n}"));
    }
    let redirected = lanes(&inst)
        .tcp_acceleration
        .expect("acceleration counters")
        .redirected;
    assert!(redirected >= 10, "{redirected}");
    let (old_map, old_sk_msg) = lane_socks_and_sk_msg(&inst);
    assert!(inst.stop_keeping_dataplane().status.success());
    inst.start_agent();
    // 300 round trips 20 ms apart take about 6 s, more than the hand-over.
    for n in 5..300 {
        assert_eq!(next("across the hand-over"), format!("ok ping {n}"));
    }
    // Once the takeover unpins them, the kept socket map and its sk_msg program leave the
    // kernel (a socket map drops its programs with its last user reference): nothing of the
    // old dataplane's acceleration stays behind.
    let kernel_has = |map: u32, prog: u32| {
        let maps = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .any(|m| m.id() == map);
        let progs = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .any(|p| p.id() == prog);
        maps || progs
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while kernel_has(old_map, old_sk_msg) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !kernel_has(old_map, old_sk_msg),
        "the kept LANE_SOCKS (map {old_map}) or its sk_msg (program {old_sk_msg}) outlived the takeover"
    );
    let (new_map, _) = lane_socks_and_sk_msg(&inst);
    assert_ne!(new_map, old_map);
    inst.deny_and_reload(&dir, "dx", "dg");
    // On the stack, tc drops the segments: the read times out.
    let outcome = after_revocation(&talk);
    assert!(outcome.starts_with("err"), "{outcome}");
}

/// A message the kept `sk_msg` handed to a peer that has not read it yet when an upgraded agent
/// takes over still reaches it: the kernel drops what a socket's queue holds when the socket
/// leaves the socket map, so the new agent first turns the kept sockets to the stack and takes
/// them out only a moment later. The echo's quadrant is frozen across the hand-over, with a
/// request waiting in its socket's queue, and thawed as soon as the new agent answers; then
/// frozen again past the moment the kept sockets leave the map, with a request sent before it.
#[test]
fn a_redirected_message_not_yet_read_survives_an_agent_upgrade() {
    let mut config = test_config(None);
    config.lanes.tcp_acceleration = quadrant::config::TcpAcceleration::SkMsg;
    let mut inst = Instance::up(config, QPROBE);
    let (_, talk) = talk_to_dg_waiting(&mut inst, ("20", "1000"), "20000");
    let next = || {
        talk.recv_timeout(Duration::from_secs(30))
            .expect("no line from tcp-talk")
    };
    for n in 0..5 {
        assert_eq!(next(), format!("ok ping {n}"));
    }
    let freeze = inst.config.cgroup_dir(Quadrant::Dg).join("cgroup.freeze");
    std::fs::write(&freeze, "1").expect("freeze DG");
    // tcp-talk's next request is handed to the frozen echo's socket and waits there.
    std::thread::sleep(Duration::from_millis(200));
    assert!(inst.stop_keeping_dataplane().status.success());
    inst.start_agent();
    std::fs::write(&freeze, "0").expect("thaw DG");
    let mut n = 5;
    let first = next();
    // Answered before the freeze took hold, the last requests come first.
    while first != format!("ok ping {n}") && n < 20 {
        n += 1;
    }
    assert_eq!(
        first,
        format!("ok ping {n}"),
        "the request under way was lost"
    );
    for n in n + 1..n + 20 {
        assert_eq!(next(), format!("ok ping {n}"));
    }
    // Sent while the kept sockets are still in the kept map, a request takes the stack: frozen
    // again, the echo does not read it before they leave the map, and it is not lost then.
    let n = n + 20;
    std::fs::write(&freeze, "1").expect("freeze DG");
    std::thread::sleep(Duration::from_secs(6));
    std::fs::write(&freeze, "0").expect("thaw DG");
    let mut m = n;
    let first = next();
    while first != format!("ok ping {m}") && m < n + 10 {
        m += 1;
    }
    assert_eq!(
        first,
        format!("ok ping {m}"),
        "the request sent in the grace was lost"
    );
    assert_eq!(next(), format!("ok ping {}", m + 1));
}

#[test]
fn the_event_stream_reports_lanes_and_reloads_in_its_schema() {
    use std::io::BufRead as _;
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _server = start_echo(&mut inst, Quadrant::Dg, false);
    let mut follower = std::process::Command::new(&inst.bin)
        .arg("--config")
        .arg(&inst.config_path)
        .args(["events", "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("quadrant events");
    std::thread::sleep(Duration::from_millis(300));
    summary(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dg,
        &["--transport", "uds"],
    ));
    refusal(&call(&inst, Quadrant::Px, "api", Quadrant::Dg, &[]));
    assert!(inst.quadrant(&["policy", "reload"]).status.success());
    let lines: Vec<String> = std::io::BufReader::new(follower.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(follower.wait().expect("wait").success());
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    for e in &events {
        let errors = quadrant::events::schema_errors(e);
        assert!(errors.is_empty(), "{e}: {errors:?}");
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        ["lane_opened", "lane_refused", "policy_reloaded"],
        "{lines:?}"
    );
    assert_eq!(events[0]["service"], "dg/echo");
    assert_eq!(events[0]["transport"], "uds");
    assert_eq!(events[1]["quadrant"], "px");
    assert_eq!(events[1]["reason"], "policy");
    assert!(events[0]["seq"].as_u64() < events[2]["seq"].as_u64());
}

/// `quadrant events --quadrant px`: the events that name PX, and those that name no quadrant
/// (a policy reload); a lane between DX and DG is not PX's.
#[test]
fn events_of_one_quadrant() {
    use std::io::BufRead as _;
    let mut inst = Instance::up(test_config(None), QPROBE);
    let _server = start_echo(&mut inst, Quadrant::Dg, false);
    let mut follower = std::process::Command::new(&inst.bin)
        .arg("--config")
        .arg(&inst.config_path)
        .args(["events", "--quadrant", "px", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("quadrant events");
    std::thread::sleep(Duration::from_millis(300));
    summary(&call(&inst, Quadrant::Dx, "client", Quadrant::Dg, &[]));
    refusal(&call(&inst, Quadrant::Px, "api", Quadrant::Dg, &[]));
    assert!(inst.quadrant(&["policy", "reload"]).status.success());
    let lines: Vec<String> = std::io::BufReader::new(follower.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(follower.wait().expect("wait").success());
    let kinds: Vec<String> = lines
        .iter()
        .map(|l| {
            let e: Value = serde_json::from_str(l).expect("JSON line");
            e["event"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(kinds, ["lane_refused", "policy_reloaded"], "{lines:?}");
    let bad = inst.quadrant(&["events", "--quadrant", "zz", "--count", "1"]);
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("unknown quadrant")
            || String::from_utf8_lossy(&bad.stderr).contains("unknown quadrant"),
        "{bad:?}"
    );
}

/// TCP handshakes run side by side: connections that never speak TLS (a client stalling its
/// handshake) hold up no other lane. Accepted one after the other, three stalled connections
/// would keep the next genuine lane waiting 15 s, past its 5 s set-up timeout.
#[test]
fn a_stalled_tcp_handshake_holds_up_no_other_lane() {
    let mut inst = Instance::up(test_config(None), QPROBE);
    let server = start_echo(&mut inst, Quadrant::Dg, true);
    let dg = inst.addr(Quadrant::Dg);
    let tcp_lane = |inst: &Instance| {
        summary(&call(
            inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--transport", "tcp", "--size", "64", "--count", "5"],
        ))
    };
    // A first lane gives the service its SVID for TCP.
    assert_eq!(tcp_lane(&inst)["transport"], "tcp");
    let stalled: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect((dg.as_str(), TCP_PORT)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(tcp_lane(&inst)["transport"], "tcp");
    // The stalled connections are refused once their set-up time runs out.
    wait_for(&server, "refused a TCP lane from");
    drop(stalled);
}

/// The audit records of `kind`, waiting up to 3 s for at least one.
fn audited(inst: &Instance, kind: &str) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let log = std::fs::read_to_string(&inst.config.audit_log).unwrap_or_default();
        let found: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["kind"] == kind)
            .map(|r| r["event"].clone())
            .collect();
        if !found.is_empty() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A latency SLO of DG's echo (90 % within 1 ms) that its shared-memory lanes break (answered 3
/// ms late) re-routes new `auto` lanes to a Unix socket, which keeps it; the switch is an audit
/// record with the figures, and within `reroute_hold_secs` nothing switches back.
#[test]
fn a_burning_latency_slo_moves_new_auto_lanes_to_another_transport() {
    let mut config = test_config(None);
    config.lanes.reroute_hold_secs = 3;
    config.slos = serde_yaml::from_str(
        "[{name: echo-fast, quadrant: dg, service: echo, indicator: latency, \
          objectives: [{target: 0.9, value: 1}], timeWindow: [{duration: 28m}], minEvents: 5}, \
          {name: echo-cost, quadrant: dg, service: echo, indicator: cost, \
          objectives: [{target: 0.9, value: 0.000000001}], timeWindow: [{duration: 28m}]}]",
    )
    .expect("slos");
    let mut inst = Instance::up(config, QPROBE);
    let bin = echo_bin();
    let serve = [bin.as_str(), "serve", "echo", "--slow-shm-us", "3000"];
    let (_, _server) = inst.background_in(Quadrant::Dg, Some("echo"), &serve, "listening as");
    let auto_call = |inst: &Instance| {
        summary(&call(
            inst,
            Quadrant::Dx,
            "client",
            Quadrant::Dg,
            &["--count", "20"],
        ))
    };
    let first = auto_call(&inst);
    assert_eq!(first["transport"], "shm", "{first}");
    let records = audited(&inst, "reroute");
    assert_eq!(records.len(), 1, "{records:?}\n{}", inst.agent_log());
    let r = &records[0];
    assert_eq!(
        (&r["service"], &r["slo"], &r["from"], &r["to"]),
        (
            &"dg/echo".into(),
            &"echo-fast".into(),
            &"shm".into(),
            &"uds".into()
        ),
        "{r}"
    );
    // Decided while the first call still ran (at least minEvents of its round trips seen).
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("shm: 0 of ")
            && reason.ends_with(
                " round trips within the threshold; no measurements of uds yet, trying it"
            ),
        "{r}"
    );
    let second = auto_call(&inst);
    assert_eq!(second["transport"], "uds", "{second}");
    // During the hold only half of the new auto lanes move: the next one keeps shm.
    let kept = auto_call(&inst);
    assert_eq!(kept["transport"], "shm", "{kept}");
    // A lane that asks for shared memory still gets it.
    let asked = summary(&call(
        &inst,
        Quadrant::Dx,
        "client",
        Quadrant::Dg,
        &["--transport", "shm", "--count", "2"],
    ));
    assert_eq!(asked["transport"], "shm");
    // Past the hold, the Unix socket meets the target: no switch back, and every new auto
    // lane goes to it.
    std::thread::sleep(Duration::from_millis(3500));
    let third = auto_call(&inst);
    assert_eq!(third["transport"], "uds", "{third}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(audited(&inst, "reroute").len(), 1);
    // The cost SLO (at most a nanosecond of CPU per 1,000 requests) judged one-second slices
    // of the echo workload's cgroup CPU time: every slice with requests broke it.
    let out = inst.quadrant(&["slo", "--output", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("slo json");
    let cost = &report["slos"][1];
    assert_eq!(cost["name"], "echo-cost", "{report}");
    assert!(
        cost["events"]["total"].as_u64().unwrap_or(0) >= 1,
        "{report}"
    );
    assert_eq!(cost["events"]["good"], 0, "{report}");
}
