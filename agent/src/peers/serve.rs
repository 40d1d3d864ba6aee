//! The accepting side of peer links: the TLS handshake with the node's SVID, the check that the
//! client is one of its peer nodes (`peers.nodes` or the Kubernetes API's), and the answers to its hellos and lane opens.

use std::{
    net::{TcpListener, TcpStream},
    sync::Arc,
};

use rustls::{ServerConnection, StreamOwned};
use tracing::{debug, info, warn};

use super::{CONNECT_TIMEOUT, POLL, Peers, wire};
use crate::{
    config::node_id,
    lanes::{control::Refusal, tls},
};
use wire::{Frames, Reply, Request};

impl Peers {
    /// Accepts links until the agent stops; each is served by a thread of its own.
    pub(super) fn accept_loop(self: Arc<Self>, listener: &TcpListener) {
        while !self.stopping() {
            match listener.accept() {
                Ok((sock, from)) => {
                    let p = Arc::clone(&self);
                    let spawned =
                        std::thread::Builder::new()
                            .name("peer-conn".into())
                            .spawn(move || {
                                if let Err(e) = p.serve(sock) {
                                    warn!(%from, error = %e, "peer link ended");
                                }
                            });
                    if let Err(e) = spawned {
                        warn!(error = %e, "cannot serve a peer link");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(e) => {
                    warn!(error = %e, "accepting a peer failed");
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// Which configured node a verified client SPIFFE ID is.
    fn node_of(&self, id: &str) -> Option<String> {
        let td = self.trust_domain();
        self.names().into_iter().find(|n| node_id(td, n) == id)
    }

    fn serve(&self, sock: TcpStream) -> Result<(), String> {
        sock.set_nonblocking(false)
            .and_then(|()| sock.set_read_timeout(Some(POLL)))
            .and_then(|()| sock.set_write_timeout(Some(CONNECT_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        let _ = sock.set_nodelay(true);
        let config = tls::node_server_config(&self.node_svid()?)?;
        let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut stream = StreamOwned::new(conn, sock);
        super::complete_handshake(&mut stream.conn, &mut stream.sock)
            .map_err(|e| format!("handshake: {e}"))?;
        let id = stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::spiffe_id_of)
            .ok_or("the client presented no SVID")?;
        let Some(name) = self.node_of(&id) else {
            let names = self.names();
            let message = format!(
                "{id} is not one of this agent's peer nodes ({})",
                if names.is_empty() {
                    "it has none".to_owned()
                } else {
                    names.join(", ")
                }
            );
            let _ = wire::write(
                &mut stream,
                &Reply::Refused {
                    reason: Refusal::Policy,
                    message: message.clone(),
                    retry_after_ms: None,
                },
            );
            return Err(message);
        };
        info!(node = name, "peer node linked in");
        let mut frames = Frames::default();
        loop {
            if self.stopping() {
                return Ok(());
            }
            if self.address_of(&name).is_none() {
                info!(node = name, "link of a node that is no longer a peer ended");
                return Ok(());
            }
            let request = match frames.next::<_, Request>(&mut stream, None) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!(node = name, "peer node closed its link");
                    return Ok(());
                }
                Err(e) => return Err(format!("from node {name}: {e}")),
            };
            let reply = self.answer(&name, request);
            wire::write(&mut stream, &reply).map_err(|e| format!("to node {name}: {e}"))?;
        }
    }

    fn answer(&self, name: &str, request: Request) -> Reply {
        let refused = |reason, message| Reply::Refused {
            reason,
            message,
            retry_after_ms: None,
        };
        match request {
            Request::Hello {
                node,
                prefixes,
                pods,
            } => {
                if node != name {
                    return refused(
                        Refusal::Invalid,
                        format!("the link's SVID is node {name}'s, its hello says {node}"),
                    );
                }
                match self.learn_told(name, &prefixes) {
                    Ok(()) => {
                        self.learn_pods(name, &pods);
                        Reply::Hello {
                            node: self.me.clone(),
                            prefixes: self.own_prefixes(),
                            pods: self.own_pods(),
                            backends: self.own_backends(),
                        }
                    }
                    Err(e) => refused(Refusal::Invalid, e),
                }
            }
            Request::Open(open) => {
                let Some(agent) = self.agent.upgrade() else {
                    return refused(Refusal::Busy, "the agent is stopping".into());
                };
                match agent.broker.open_for_peer(name, &open) {
                    Ok(grant) => Reply::Granted(grant),
                    Err(r) => Reply::Refused {
                        reason: r.reason,
                        message: r.message,
                        retry_after_ms: r.retry_after_ms,
                    },
                }
            }
        }
    }
}
