//! The baselines measured beside the lanes in the same run: bare echoes over a Unix socket and
//! TCP (a `u32` length prefix, then the payload), and iceoryx2 request-response — busy-polling,
//! or waiting for its events (a notifier and listener per direction, as iceoryx2's
//! event-driven examples do).

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::net::UnixListener,
    time::{Duration, Instant},
};

use anyhow::bail;

use crate::measure::{PACINGS, Row, SIZES, measure};

const ICEORYX_SERVICE: &str = "quadrant/bench/echo";

pub fn bare_round_trip<S: Read + Write>(
    s: &mut S,
    msg: &[u8],
    reply: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let len = u32::try_from(msg.len())?.to_le_bytes();
    if msg.len() <= 16 * 1024 {
        let mut buf = Vec::with_capacity(4 + msg.len());
        buf.extend_from_slice(&len);
        buf.extend_from_slice(msg);
        s.write_all(&buf)?;
    } else {
        s.write_all(&len)?;
        s.write_all(msg)?;
    }
    let mut l = [0u8; 4];
    s.read_exact(&mut l)?;
    reply.resize(u32::from_le_bytes(l) as usize, 0);
    s.read_exact(reply)?;
    Ok(())
}

fn bare_echo<S: Read + Write>(mut s: S) {
    let mut buf = Vec::new();
    loop {
        let mut l = [0u8; 4];
        if s.read_exact(&mut l).is_err() {
            return;
        }
        buf.resize(u32::from_le_bytes(l) as usize, 0);
        if s.read_exact(&mut buf).is_err() {
            return;
        }
        let mut out = Vec::with_capacity(4 + buf.len());
        out.extend_from_slice(&l);
        out.extend_from_slice(&buf);
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

pub fn bare_server(kind: &str, at: &str) -> anyhow::Result<()> {
    match kind {
        "uds" => {
            let _ = std::fs::remove_file(at);
            let l = UnixListener::bind(at)?;
            println!("listening");
            std::io::stdout().flush()?;
            for s in l.incoming() {
                let s = s?;
                std::thread::spawn(move || bare_echo(s));
            }
        }
        "tcp" => {
            let l = TcpListener::bind(at)?;
            println!("listening");
            std::io::stdout().flush()?;
            for s in l.incoming() {
                let s = s?;
                s.set_nodelay(true)?;
                std::thread::spawn(move || bare_echo(s));
            }
        }
        other => bail!("unknown bare server {other}"),
    }
    Ok(())
}

/// iceoryx2's errors implement `Debug`; carried as text.
fn ice_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("iceoryx2: {e:?}")
}

/// How the iceoryx2 ends wait for each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IceWait {
    /// Busy-polling (iceoryx2's lowest latency, a core each).
    Poll,
    /// Blocking on an event listener, woken by the peer's notifier.
    Event,
}

impl IceWait {
    /// As given on the command line.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "poll" => Ok(Self::Poll),
            "event" => Ok(Self::Event),
            other => bail!("unknown iceoryx2 waiting {other}: poll or event"),
        }
    }

    fn transport(self) -> &'static str {
        match self {
            Self::Poll => "iceoryx2 busy-poll",
            Self::Event => "iceoryx2 event",
        }
    }
}

type IceNode = iceoryx2::node::Node<iceoryx2::service::ipc::Service>;
type IceRequestResponse = iceoryx2::service::port_factory::request_response::PortFactory<
    iceoryx2::service::ipc::Service,
    [u8],
    (),
    [u8],
    (),
>;
type IceEvent =
    iceoryx2::service::port_factory::event::PortFactory<iceoryx2::service::ipc::Service>;

/// The echo service both ends open, and its two event services (requests ready, responses
/// ready). The node must outlive the services' ports.
fn ice_services() -> anyhow::Result<(IceNode, IceRequestResponse, IceEvent, IceEvent)> {
    use iceoryx2::prelude::*;
    let node = NodeBuilder::new()
        .create::<ipc::Service>()
        .map_err(ice_err)?;
    let service = node
        .service_builder(&ICEORYX_SERVICE.try_into().map_err(ice_err)?)
        .request_response::<[u8], [u8]>()
        .open_or_create()
        .map_err(ice_err)?;
    let event = |suffix: &str| -> anyhow::Result<IceEvent> {
        let name = format!("{ICEORYX_SERVICE}/{suffix}");
        node.service_builder(&name.as_str().try_into().map_err(ice_err)?)
            .event()
            .open_or_create()
            .map_err(ice_err)
    };
    let (requests, responses) = (event("requests")?, event("responses")?);
    Ok((node, service, requests, responses))
}

/// The iceoryx2 echo server (`ice-server poll|event`).
pub fn ice_server(wait: IceWait) -> anyhow::Result<()> {
    use iceoryx2::prelude::*;
    let (_node, service, requests, responses) = ice_services()?;
    let server = service
        .server_builder()
        .initial_max_slice_len(1 << 20)
        .allocation_strategy(AllocationStrategy::PowerOfTwo)
        .create()
        .map_err(ice_err)?;
    let listener = requests.listener_builder().create().map_err(ice_err)?;
    let notifier = responses.notifier_builder().create().map_err(ice_err)?;
    println!("listening");
    std::io::stdout().flush()?;
    loop {
        let mut answered = false;
        while let Some(request) = server.receive().map_err(ice_err)? {
            let payload = request.payload();
            let response = request
                .loan_slice_uninit(payload.len())
                .map_err(ice_err)?
                .write_from_slice(payload);
            response.send().map_err(ice_err)?;
            answered = true;
        }
        match wait {
            IceWait::Poll => std::hint::spin_loop(),
            IceWait::Event => {
                if answered {
                    notifier.notify().map_err(ice_err)?;
                } else {
                    listener.blocking_wait_all(|_| {}).map_err(ice_err)?;
                }
            }
        }
    }
}

/// The iceoryx2 rows: every pacing and size against `ice-server` waiting the same way.
pub fn ice_client(wait: IceWait, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use iceoryx2::prelude::*;
    let (_node, service, requests, responses) = ice_services()?;
    let client = service
        .client_builder()
        .initial_max_slice_len(1 << 20)
        .allocation_strategy(AllocationStrategy::PowerOfTwo)
        .create()
        .map_err(ice_err)?;
    let notifier = requests.notifier_builder().create().map_err(ice_err)?;
    let listener = responses.listener_builder().create().map_err(ice_err)?;
    // The server may still be connecting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while service.dynamic_config().number_of_servers() == 0 {
        if Instant::now() > deadline {
            bail!("iceoryx2 server did not appear");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for pacing in PACINGS {
        for size in SIZES {
            rows.push(measure(
                wait.transport(),
                true,
                (pacing, size),
                |msg, reply| {
                    let pending = client
                        .loan_slice_uninit(msg.len())
                        .map_err(ice_err)?
                        .write_from_slice(msg)
                        .send()
                        .map_err(ice_err)?;
                    if wait == IceWait::Event {
                        notifier.notify().map_err(ice_err)?;
                    }
                    loop {
                        if let Some(r) = pending.receive().map_err(ice_err)? {
                            reply.clear();
                            reply.extend_from_slice(r.payload());
                            return Ok(());
                        }
                        match wait {
                            IceWait::Poll => std::hint::spin_loop(),
                            // A notification sent before this wait is kept, so none is missed.
                            IceWait::Event => {
                                listener.blocking_wait_all(|_| {}).map_err(ice_err)?;
                            }
                        }
                    }
                },
            )?);
        }
    }
    Ok(())
}
