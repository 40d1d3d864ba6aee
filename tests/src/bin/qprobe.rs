//! qprobe: the traffic helper the namespace tests run inside quadrants.
//!
//! Every client command prints one line, `ok …` or `err <ERRNO|timeout>`, and exits 0 on `ok`,
//! 1 otherwise, so tests assert exact outcomes (EPERM from a cgroup hook versus a timeout from a
//! dropped packet). Servers print `listening` once ready and one line per datagram received.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type, PacketBuilder};

const USAGE: &str = "usage: qprobe tcp-connect ADDR:PORT [TIMEOUT_MS]
       qprobe udp-send ADDR:PORT [TIMEOUT_MS]
       qprobe icmp-echo ADDR [TIMEOUT_MS]
       qprobe tcp-echo ADDR:PORT
       qprobe tcp-whoami ADDR:PORT
       qprobe tcp-spread ADDR:PORT COUNT
       qprobe udp-whoami ADDR:PORT NAME
       qprobe udp-spread ADDR:PORT COUNT
       qprobe tcp-talk ADDR:PORT INTERVAL_MS COUNT [READ_TIMEOUT_MS]
       qprobe udp-echo ADDR:PORT
       qprobe udp-push ADDR:PORT
       qprobe raw-udp SRC DST:PORT PAYLOAD
       qprobe raw-icmp SRC DST
       qprobe packet-socket
       qprobe svid [ENDPOINT]
       qprobe svid-rotation [TIMEOUT_MS]
       qprobe jwt AUDIENCE
       qprobe sources AUDIENCE [TIMEOUT_MS]
       qprobe svid-pem FILE
       qprobe no-header SOCKET";

const DEFAULT_TIMEOUT_MS: u64 = 1000;
#[expect(clippy::cast_possible_truncation, reason = "16 bytes")]
const SOCKADDR_IN_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;
#[expect(clippy::cast_possible_truncation, reason = "16 bytes")]
const TIMEVAL_LEN: libc::socklen_t = size_of::<libc::timeval>() as libc::socklen_t;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("qprobe: {e:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn timeout(args: &[String], i: usize) -> anyhow::Result<Duration> {
    Ok(Duration::from_millis(match args.get(i) {
        Some(t) => t.parse().context("timeout in milliseconds")?,
        None => DEFAULT_TIMEOUT_MS,
    }))
}

fn arg<'a>(args: &'a [String], i: usize, what: &str) -> anyhow::Result<&'a str> {
    args.get(i)
        .map(String::as_str)
        .with_context(|| format!("missing {what}"))
}

fn run(args: &[String]) -> anyhow::Result<bool> {
    let cmd = arg(args, 0, "command")?;
    match cmd {
        "tcp-connect" => {
            let addr: SocketAddr = arg(args, 1, "ADDR:PORT")?.parse()?;
            Ok(report(tcp_connect(addr, timeout(args, 2)?)))
        }
        "udp-send" => {
            let addr: SocketAddr = arg(args, 1, "ADDR:PORT")?.parse()?;
            Ok(report(udp_send(addr, timeout(args, 2)?)))
        }
        "icmp-echo" => {
            let dst: Ipv4Addr = arg(args, 1, "ADDR")?.parse()?;
            Ok(report(icmp_echo(dst, timeout(args, 2)?)))
        }
        "tcp-echo" => tcp_echo(arg(args, 1, "ADDR:PORT")?.parse()?).map(|()| true),
        "tcp-whoami" => tcp_whoami(arg(args, 1, "ADDR:PORT")?.parse()?).map(|()| true),
        "udp-whoami" => {
            udp_whoami(arg(args, 1, "ADDR:PORT")?.parse()?, arg(args, 2, "NAME")?).map(|()| true)
        }
        "udp-spread" => Ok(report(udp_spread(
            arg(args, 1, "ADDR:PORT")?.parse()?,
            arg(args, 2, "COUNT")?.parse()?,
        ))),
        "tcp-spread" => Ok(report(tcp_spread(
            arg(args, 1, "ADDR:PORT")?.parse()?,
            arg(args, 2, "COUNT")?.parse()?,
        ))),
        "tcp-talk" => tcp_talk(
            arg(args, 1, "ADDR:PORT")?.parse()?,
            timeout(args, 2)?,
            arg(args, 3, "COUNT")?.parse().context("COUNT")?,
            timeout(args, 4)?,
        ),
        "udp-push" => udp_push(arg(args, 1, "ADDR:PORT")?.parse()?).map(|()| true),
        "udp-rtt" => Ok(report(udp_rtt(
            arg(args, 1, "ADDR:PORT")?.parse()?,
            arg(args, 2, "COUNT")?.parse().context("COUNT")?,
            timeout(args, 3)?,
        ))),
        "udp-echo" => udp_echo(arg(args, 1, "ADDR:PORT")?.parse()?).map(|()| true),
        "raw-udp" => {
            let src: Ipv4Addr = arg(args, 1, "SRC")?.parse()?;
            let dst: SocketAddrV4 = arg(args, 2, "DST:PORT")?.parse()?;
            let payload = arg(args, 3, "PAYLOAD")?;
            let b =
                PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64).udp(40_000, dst.port());
            let mut pkt = Vec::with_capacity(b.size(payload.len()));
            b.write(&mut pkt, payload.as_bytes())?;
            Ok(report(raw_send(*dst.ip(), &pkt).map(|()| "sent".into())))
        }
        "raw-icmp" => {
            let src: Ipv4Addr = arg(args, 1, "SRC")?.parse()?;
            let dst: Ipv4Addr = arg(args, 2, "DST")?.parse()?;
            let b =
                PacketBuilder::ipv4(src.octets(), dst.octets(), 64).icmpv4_echo_request(0x5151, 1);
            let mut pkt = Vec::with_capacity(b.size(8));
            b.write(&mut pkt, b"qprobe!!")?;
            Ok(report(raw_send(dst, &pkt).map(|()| "sent".into())))
        }
        "packet-socket" => Ok(report(packet_socket())),
        "svid" => Ok(run_async(spiffe_probe::svid(
            args.get(1).map(String::as_str),
        ))),
        "svid-rotation" => Ok(run_async(spiffe_probe::rotation(timeout(args, 1)?))),
        "jwt" => Ok(run_async(spiffe_probe::jwt(arg(args, 1, "AUDIENCE")?))),
        "sources" => Ok(run_async(spiffe_probe::sources(
            arg(args, 1, "AUDIENCE")?,
            timeout(args, 2)?,
        ))),
        "svid-pem" => Ok(run_async(spiffe_probe::svid_pem(arg(args, 1, "FILE")?))),
        "no-header" => Ok(run_async(spiffe_probe::no_header(arg(args, 1, "SOCKET")?))),
        "lane-crash" => lane_crash(
            arg(args, 1, "QUADRANT")?,
            arg(args, 2, "SERVICE")?,
            arg(args, 3, "TRANSPORT")?,
        ),
        other => bail!("unknown command {other:?}"),
    }
}

/// Prints the outcome line and returns whether it is `ok`.
fn report(result: Result<String, String>) -> bool {
    match result {
        Ok(s) => {
            println!("ok {s}");
            true
        }
        Err(e) => {
            println!("err {e}");
            false
        }
    }
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) =>
        {
            "timeout".into()
        }
        None => e.kind().to_string(),
    }
}

/// `EAGAIN` from a socket with a read timeout means the timeout expired.
fn io_outcome(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout".into(),
        _ => errno_name(e),
    }
}

fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| io_outcome(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| errno_name(&e))?;
    s.write_all(b"hello\n").map_err(|e| errno_name(&e))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| io_outcome(&e))?;
    Ok(line.trim().to_owned())
}

/// One connection, `count` round trips `interval` apart, each reported on its own line (`ok
/// ping N` or `err ERRNO`); the first failure ends it. `ready` once connected.
fn tcp_talk(
    addr: SocketAddr,
    interval: Duration,
    count: u32,
    read_timeout: Duration,
) -> anyhow::Result<bool> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(read_timeout))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut writer = s;
    for n in 0..count {
        let round = writer
            .write_all(format!("ping {n}\n").as_bytes())
            .map_err(|e| errno_name(&e))
            .and_then(|()| {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => Err("closed".to_owned()),
                    Ok(_) => Ok(line.trim().to_owned()),
                    Err(e) => Err(io_outcome(&e)),
                }
            });
        let ok = report(round);
        std::io::stdout().flush()?;
        if !ok {
            return Ok(false);
        }
        thread::sleep(interval);
    }
    Ok(true)
}

fn udp_send(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| errno_name(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| errno_name(&e))?;
    s.send_to(b"hello", addr).map_err(|e| errno_name(&e))?;
    let mut buf = [0u8; 1500];
    let (n, _) = s.recv_from(&mut buf).map_err(|e| io_outcome(&e))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn tcp_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let Ok(mut conn) = conn else { continue };
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                // A socket in a socket map (lane acceleration) returns EAGAIN from a blocking
                // read when its thread is woken without data, as a freeze of its quadrant does.
                let n = match conn.read(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                        ) =>
                    {
                        continue;
                    }
                    Err(_) => break,
                };
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Answers each connection with the address it was accepted on (the instance's own, whatever
/// address the client asked for) and holds it open until the client closes it.
fn tcp_whoami(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    for conn in l.incoming() {
        let Ok(mut conn) = conn else { continue };
        thread::spawn(move || {
            let me = conn
                .local_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            if conn.write_all(format!("{me}\n").as_bytes()).is_ok() {
                let mut buf = [0u8; 64];
                while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
        });
    }
    Ok(())
}

/// Opens `count` connections to `addr`, all held open until the last has answered, and reports
/// how many each server address answered (`ok peer=<getpeername> a=N b=M …`).
fn tcp_spread(addr: SocketAddr, count: u32) -> Result<String, String> {
    let mut held = Vec::new();
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    let mut peers = std::collections::BTreeSet::new();
    for _ in 0..count {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| io_outcome(&e))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| errno_name(&e))?;
        peers.insert(s.peer_addr().map_err(|e| errno_name(&e))?.to_string());
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| io_outcome(&e))?;
        *answers.entry(line.trim().to_owned()).or_default() += 1;
        held.push(s);
    }
    let peers: Vec<String> = peers.into_iter().collect();
    let spread: Vec<String> = answers.iter().map(|(a, n)| format!("{a}={n}")).collect();
    Ok(format!("peer={} {}", peers.join(","), spread.join(" ")))
}

/// Answers every datagram with `name`.
fn udp_whoami(addr: SocketAddr, name: &str) -> anyhow::Result<()> {
    let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut buf = [0u8; 512];
    loop {
        let (_, peer) = s.recv_from(&mut buf)?;
        s.send_to(name.as_bytes(), peer)?;
    }
}

/// Sends `count` datagrams to `addr` from one unconnected socket, one answer each, and reports
/// the sources the answers came from and who answered (`ok from=<sources> a=N …`).
fn udp_spread(addr: SocketAddr, count: u32) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| errno_name(&e))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| errno_name(&e))?;
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    let mut sources = std::collections::BTreeSet::new();
    let mut buf = [0u8; 512];
    for _ in 0..count {
        s.send_to(b"who", addr).map_err(|e| errno_name(&e))?;
        let (n, from) = s.recv_from(&mut buf).map_err(|e| io_outcome(&e))?;
        sources.insert(from.to_string());
        *answers
            .entry(String::from_utf8_lossy(&buf[..n]).into_owned())
            .or_default() += 1;
    }
    let sources: Vec<String> = sources.into_iter().collect();
    let spread: Vec<String> = answers.iter().map(|(a, n)| format!("{a}={n}")).collect();
    Ok(format!("from={} {}", sources.join(","), spread.join(" ")))
}

/// Answers the first datagram of each peer with `tick N` every 100 ms until a send fails (then
/// prints `stopped at tick N: ERRNO`): after its first datagram the peer never sends again, so
/// the ticks pass a one-way policy only as replies of the flow the peer opened, through
/// CONNTRACK.
fn udp_push(addr: SocketAddr) -> anyhow::Result<()> {
    let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut buf = [0u8; 512];
    let mut peers = std::collections::BTreeSet::new();
    loop {
        let (_, peer) = s.recv_from(&mut buf)?;
        if !peers.insert(peer) {
            continue;
        }
        let s = s.try_clone()?;
        thread::spawn(move || {
            for n in 0_u64.. {
                if let Err(e) = s.send_to(format!("tick {n}").as_bytes(), peer) {
                    println!("stopped at tick {n}: {}", errno_name(&e));
                    let _ = std::io::stdout().flush();
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
    }
}

fn udp_echo(addr: SocketAddr) -> anyhow::Result<()> {
    let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = s.recv_from(&mut buf)?;
        println!("got {} from {peer}", String::from_utf8_lossy(&buf[..n]));
        std::io::stdout().flush()?;
        // A reply the sender's quadrant may refuse; the error is not the echo server's concern.
        let _ = s.send_to(&buf[..n], peer);
    }
}

/// `count` numbered datagrams to a `udp-echo` server one at a time, each waiting up to `timeout`
/// for its echo: how many were answered and the round trips (µs) of those.
fn udp_rtt(addr: SocketAddr, count: u32, timeout: Duration) -> Result<String, String> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| errno_name(&e))?;
    s.connect(addr).map_err(|e| errno_name(&e))?;
    s.set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(|e| errno_name(&e))?;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..count {
        let msg = format!("rtt-{i}");
        let start = Instant::now();
        if s.send(msg.as_bytes()).is_err() {
            continue;
        }
        while start.elapsed() < timeout {
            match s.recv(&mut buf) {
                Ok(n) if &buf[..n] == msg.as_bytes() => {
                    rtts.push(start.elapsed().as_micros());
                    break;
                }
                _ => {}
            }
        }
    }
    rtts.sort_unstable();
    let at = |q: usize| {
        rtts.get(q * rtts.len().saturating_sub(1) / 100)
            .copied()
            .unwrap_or(0)
    };
    Ok(format!(
        "{{\"sent\":{count},\"answered\":{},\"min_us\":{},\"p50_us\":{},\"max_us\":{}}}",
        rtts.len(),
        at(0),
        at(50),
        at(100)
    ))
}

/// Opens (and closes) an `AF_PACKET` socket, which could send any frame on the interface.
fn packet_socket() -> Result<String, String> {
    let proto = u16::try_from(libc::ETH_P_ALL).unwrap_or_default().to_be();
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
    if fd < 0 {
        return Err(errno_name(&std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok("opened".into())
}

/// A raw IPv4 socket, or the errno name of why there is none.
fn raw_socket(proto: libc::c_int) -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, proto) };
    if fd < 0 {
        return Err(errno_name(&std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(dst: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default();
    sa.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    sa
}

/// Sends a complete IPv4 packet (any source address) through an `IPPROTO_RAW` socket, which no
/// cgroup `sock_addr` hook sees.
fn raw_send(dst: Ipv4Addr, packet: &[u8]) -> Result<(), String> {
    let fd = raw_socket(libc::IPPROTO_RAW)?;
    let sa = sockaddr(dst);
    // SAFETY: buffer and address are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const sa).cast(),
            SOCKADDR_IN_LEN,
        )
    };
    if n < 0 {
        return Err(errno_name(&std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One ICMP echo request through a raw socket; waits for the matching reply.
fn icmp_echo(dst: Ipv4Addr, timeout: Duration) -> Result<String, String> {
    let fd = raw_socket(libc::IPPROTO_ICMP)?;
    let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(1);
    let payload = b"qprobe-echo";
    let header = Icmpv4Header::with_checksum(
        Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq: 1 }),
        payload,
    );
    let mut pkt = header.to_bytes().to_vec();
    pkt.extend_from_slice(payload);
    let sa = sockaddr(dst);
    // SAFETY: buffer and address are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const sa).cast(),
            SOCKADDR_IN_LEN,
        )
    };
    if n < 0 {
        return Err(errno_name(&std::io::Error::last_os_error()));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timeout".into());
        }
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(1),
            tv_usec: libc::suseconds_t::from(left.subsec_micros().max(1)),
        };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                TIMEVAL_LEN,
            );
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io_outcome(&std::io::Error::last_os_error()));
        }
        let n = usize::try_from(n).unwrap_or(0);
        // IPv4 header (IHL) then ICMP: type 0 (echo reply) with our identifier, from dst.
        if n < 20 {
            continue;
        }
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        let from = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        if n >= ihl + 8
            && buf[ihl] == 0
            && u16::from_be_bytes([buf[ihl + 4], buf[ihl + 5]]) == id
            && from == dst
        {
            return Ok(format!("reply from {from}"));
        }
    }
}

/// Workload API checks with the official `spiffe` crate (and one raw call without the security
/// header). Endpoint: `SPIFFE_ENDPOINT_SOCKET`, set by `quadrant exec`, unless given.
mod spiffe_probe {
    use std::time::Duration;

    use spiffe::WorkloadApiClient;
    use tokio_stream::StreamExt as _;
    use x509_parser::prelude::{FromDer as _, X509Certificate};

    async fn client(endpoint: Option<&str>) -> Result<WorkloadApiClient, String> {
        match endpoint {
            Some(e) => WorkloadApiClient::connect_to(e).await,
            None => WorkloadApiClient::connect_env().await,
        }
        .map_err(|e| format!("connect: {e}"))
    }

    /// Fetches the X.509-SVID and checks its chain against the X.509 bundle.
    pub async fn svid(endpoint: Option<&str>) -> Result<String, String> {
        let c = client(endpoint).await?;
        let svid = c.fetch_x509_svid().await.map_err(|e| format!("{e:?}"))?;
        let bundles = c.fetch_x509_bundles().await.map_err(|e| format!("{e:?}"))?;
        let td = svid.spiffe_id().trust_domain();
        let bundle = bundles
            .get(td)
            .ok_or("no bundle for the SVID's trust domain")?;
        let chain: Vec<X509Certificate<'_>> = svid
            .cert_chain()
            .iter()
            .map(|c| {
                X509Certificate::from_der(c.as_bytes())
                    .map(|(_, x)| x)
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        for pair in chain.windows(2) {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|e| format!("chain: {e}"))?;
        }
        let last = chain.last().ok_or("empty chain")?;
        let anchored = bundle.authorities().iter().any(|root| {
            X509Certificate::from_der(root.as_bytes())
                .is_ok_and(|(_, r)| last.verify_signature(Some(r.public_key())).is_ok())
        });
        if !anchored {
            return Err("chain does not lead to the bundle".into());
        }
        Ok(format!("{} chain={}", svid.spiffe_id(), chain.len()))
    }

    /// `X509Source` and `JwtSource`, as SPIFFE applications use them: the X.509 source follows a
    /// rotation within `wait`; a JWT-SVID's signing key is in the JWT bundle the source holds.
    pub async fn sources(aud: &str, wait: Duration) -> Result<String, String> {
        let x509 = spiffe::X509Source::new()
            .await
            .map_err(|e| format!("X509Source: {e:?}"))?;
        let first = x509.svid().map_err(|e| format!("{e:?}"))?;
        let serial = |s: &spiffe::X509Svid| {
            X509Certificate::from_der(s.leaf().as_bytes())
                .map(|(_, x)| x.raw_serial_as_string())
                .unwrap_or_default()
        };
        let mut updates = x509.updated();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::time::timeout_at(deadline, updates.changed())
                .await
                .map_err(|_| "X509Source saw no rotation".to_owned())?
                .map_err(|e| format!("{e:?}"))?;
            if serial(&*x509.svid().map_err(|e| format!("{e:?}"))?) != serial(&first) {
                break;
            }
        }
        let jwt = spiffe::JwtSource::new()
            .await
            .map_err(|e| format!("JwtSource: {e:?}"))?;
        let svid = jwt
            .fetch_jwt_svid([aud])
            .await
            .map_err(|e| format!("{e:?}"))?;
        let bundles = jwt.bundle_set().map_err(|e| format!("{e:?}"))?;
        let bundle = bundles
            .get(svid.spiffe_id().trust_domain())
            .ok_or("no JWT bundle for the trust domain")?;
        if bundle.find_jwt_authority(svid.key_id()).is_none() {
            return Err("the JWT-SVID's key is not in the JWT bundle".into());
        }
        x509.shutdown().await;
        jwt.shutdown().await;
        Ok(format!(
            "x509 {} rotated; jwt {} aud={aud} key in bundle",
            first.spiffe_id(),
            svid.spiffe_id()
        ))
    }

    /// Writes the caller's X.509-SVID chain as PEM to `file`.
    pub async fn svid_pem(file: &str) -> Result<String, String> {
        let c = client(None).await?;
        let svid = c.fetch_x509_svid().await.map_err(|e| format!("{e:?}"))?;
        let mut pem = String::new();
        for cert in svid.cert_chain() {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_bytes());
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        std::fs::write(file, pem).map_err(|e| e.to_string())?;
        Ok(format!("wrote {} {file}", svid.spiffe_id()))
    }

    /// Waits for the SVID stream to deliver a rotated SVID.
    pub async fn rotation(wait: Duration) -> Result<String, String> {
        let c = client(None).await?;
        let mut stream = c.stream_x509_svids().await.map_err(|e| format!("{e:?}"))?;
        let first = stream
            .next()
            .await
            .ok_or("stream ended")?
            .map_err(|e| format!("{e:?}"))?;
        let serial = |s: &spiffe::X509Svid| {
            X509Certificate::from_der(s.leaf().as_bytes())
                .map(|(_, x)| x.raw_serial_as_string())
                .unwrap_or_default()
        };
        let next = tokio::time::timeout(wait, stream.next())
            .await
            .map_err(|_| "timeout".to_owned())?;
        let next = next.ok_or("stream ended")?.map_err(|e| format!("{e:?}"))?;
        if serial(&first) == serial(&next) {
            return Err("same SVID delivered twice".into());
        }
        Ok(format!(
            "rotated {} {} -> {}",
            next.spiffe_id(),
            serial(&first),
            serial(&next)
        ))
    }

    /// Fetches a JWT-SVID for `aud`, has the agent validate it, and checks that another audience
    /// is refused.
    pub async fn jwt(aud: &str) -> Result<String, String> {
        let c = client(None).await?;
        let token = c
            .fetch_jwt_token([aud], None)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let svid = c
            .validate_jwt_token(aud, &token)
            .await
            .map_err(|e| format!("validate: {e:?}"))?;
        if c.validate_jwt_token("someone-else", &token).await.is_ok() {
            return Err("a token for another audience validated".into());
        }
        let mut forged: Vec<&str> = token.split('.').collect();
        forged[2] = "AAAA";
        if c.validate_jwt_token(aud, &forged.join(".")).await.is_ok() {
            return Err("a token with a forged signature validated".into());
        }
        Ok(format!(
            "{} aud={}",
            svid.spiffe_id(),
            svid.audience().join(",")
        ))
    }

    /// Calls `FetchJWTSVID` without the `workload.spiffe.io` header; returns the gRPC code.
    pub async fn no_header(socket: &str) -> Result<String, String> {
        use hyper_util::rt::TokioIo;
        use quadrant::identity::workload_api::pb::{
            JwtsvidRequest, spiffe_workload_api_client::SpiffeWorkloadApiClient,
        };
        let path = socket.to_owned();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
            .map_err(|e| e.to_string())?
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = SpiffeWorkloadApiClient::new(channel);
        match client
            .fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            })
            .await
        {
            Ok(_) => Ok("answered without the security header".into()),
            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

fn run_async(f: impl Future<Output = Result<String, String>>) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    report(rt.block_on(f))
}

/// Opens a lane, completes one round trip, then dies (SIGABRT) in the middle of writing the next
/// message — in the ring itself on a shared-memory lane.
fn lane_crash(quadrant: &str, service: &str, transport: &str) -> anyhow::Result<bool> {
    use quadrant::lanes::{LaneClient, TransportChoice};
    let choice: TransportChoice =
        serde_json::from_value(serde_json::Value::String(transport.into()))?;
    let mut lane = LaneClient::connect(None)?.open(quadrant, service, choice)?;
    let mut reply = Vec::new();
    lane.request(b"before the crash", &mut reply)?;
    println!("ok echoed {} {}", lane.id(), lane.transport().name());
    std::io::Write::flush(&mut std::io::stdout())?;
    lane.send_with(64 * 1024, |buf| {
        buf[..1024].fill(7);
        std::process::abort();
    })?;
    Ok(true)
}
