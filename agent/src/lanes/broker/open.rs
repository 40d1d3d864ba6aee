//! Building a lane: its memory (sealed memfd, rings), its descriptors per transport, its charge
//! against the opener quadrant's limits, and handing each end its part — the service first.

use std::{
    io,
    os::fd::OwnedFd,
    sync::{Arc, PoisonError, atomic::Ordering},
    time::Instant,
};

use dataplane_common::Quadrant;
use tracing::warn;

use super::{
    Broker, Conn, INCOMING_PATIENCE, OpenLane,
    decide::{self, Refused, refuse},
    report::LaneInfo,
};
use crate::lanes::{
    Transport, TransportChoice,
    control::{self, LaneGrant, LaneMessage, Refusal, TcpGrant},
    os::{self, Mapping},
    ring::{self, Region},
    tls::Svid,
};

impl Broker {
    fn svid_material(&self, id: &str) -> Result<control::SvidMaterial, Refused> {
        let identity = self
            .identity
            .as_ref()
            .ok_or_else(|| refuse(Refusal::Policy, "identity service unavailable".into()))?;
        let svid = identity
            .x509_for(id)
            .map_err(|e| {
                refuse(
                    Refusal::Policy,
                    format!("cannot issue an SVID for {id}: {e}"),
                )
            })?
            .borrow()
            .clone();
        Ok(Svid::material(
            &svid.chain,
            &svid.key_pkcs8,
            identity.authority().roots(),
            identity.authority().trust_domain(),
        ))
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one lane built step by step, each failure named"
    )]
    pub(super) fn open(
        &self,
        conn: &Arc<Conn>,
        from_q: Quadrant,
        from_id: &str,
        to_q: Quadrant,
        service: &str,
        choice: TransportChoice,
    ) -> Result<(), Refused> {
        let (server_conn, server_id, tcp_port) = {
            let state = self.state();
            let s = state
                .services
                .get(&(to_q, service.to_owned()))
                .ok_or_else(|| {
                    refuse(
                        Refusal::NoService,
                        format!("no service {service} is offered in {}", to_q.name()),
                    )
                })?;
            (Arc::clone(&s.conn), s.spiffe_id.clone(), s.tcp_port)
        };
        let transport = {
            let rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
            decide::choose_transport(
                rules
                    .live
                    .as_deref()
                    .map(Vec::as_slice)
                    .map_err(String::as_str),
                from_q,
                from_id,
                to_q,
                service,
                choice,
                decide::Offer {
                    has_tcp: tcp_port.is_some(),
                    identity: self.identity.is_some(),
                },
            )?
        };
        let limits = self.config.lanes.limits_of(from_q);
        let max_message = self.config.lanes.max_message_bytes;
        let ring_bytes = if transport == Transport::Shm {
            ring::capacity_for(max_message as usize)
        } else {
            0
        };
        let shm_bytes = ring::mapping_len(ring_bytes) as u64;
        let lane_id = self.next_lane.fetch_add(1, Ordering::Relaxed);

        let io_err = |what: &str, e: io::Error| {
            refuse(Refusal::Io, format!("cannot create the lane's {what}: {e}"))
        };
        let memfd = os::sealed_memfd(
            &format!("quadrant-lane-{lane_id}"),
            ring::mapping_len(ring_bytes),
        )
        .map_err(|e| io_err("memory", e))?;
        let memory = Mapping::new(&memfd, ring::mapping_len(ring_bytes), true)
            .map_err(|e| io_err("memory", e))?;
        // SAFETY: the mapping has exactly this length, is page-aligned and lives in the entry.
        let region = unsafe { Region::new(memory.as_ptr(), memory.len(), ring_bytes) }
            .map_err(|e| refuse(Refusal::Io, e.to_string()))?;
        region.initialize();

        #[expect(
            clippy::cast_possible_truncation,
            reason = "capacity_for(≤ 64 MiB) fits"
        )]
        let grant = |local: &str, peer: &str, tcp: Option<TcpGrant>| LaneGrant {
            lane: lane_id,
            transport,
            service: service.to_owned(),
            quadrant: to_q.name().to_owned(),
            local_id: local.to_owned(),
            peer_id: peer.to_owned(),
            max_message,
            ring_bytes: ring_bytes as u32,
            max_in_flight: limits.max_in_flight,
            tcp,
        };
        let mut client_fds: Vec<OwnedFd> = Vec::new();
        let mut server_fds: Vec<OwnedFd> = Vec::new();
        let (client_grant, server_grant) = match transport {
            Transport::Shm => {
                let efd_c = os::eventfd().map_err(|e| io_err("eventfd", e))?;
                let efd_s = os::eventfd().map_err(|e| io_err("eventfd", e))?;
                let (pc, ps) = os::seqpacket_pair().map_err(|e| io_err("socket pair", e))?;
                let dup = |f: &OwnedFd| f.try_clone().map_err(|e| io_err("descriptor", e));
                client_fds.extend([dup(&memfd)?, dup(&efd_c)?, dup(&efd_s)?, pc]);
                server_fds.extend([memfd, efd_s, efd_c, ps]);
                (
                    grant(from_id, &server_id, None),
                    grant(&server_id, from_id, None),
                )
            }
            Transport::Uds => {
                let (uc, us) = os::stream_pair().map_err(|e| io_err("socket pair", e))?;
                client_fds.extend([memfd.try_clone().map_err(|e| io_err("descriptor", e))?, uc]);
                server_fds.extend([memfd, us]);
                (
                    grant(from_id, &server_id, None),
                    grant(&server_id, from_id, None),
                )
            }
            Transport::Tcp => {
                let mut token = [0u8; 16];
                ring_rand(&mut token)
                    .map_err(|_| refuse(Refusal::Io, "no randomness for the lane token".into()))?;
                let token = crate::artifacts::hex(&token);
                let address = format!(
                    "{}:{}",
                    self.config.addrs(to_q).workload,
                    tcp_port.unwrap_or_default()
                );
                client_fds.push(memfd.try_clone().map_err(|e| io_err("descriptor", e))?);
                server_fds.push(memfd);
                let client_tcp = TcpGrant {
                    address: Some(address),
                    token: token.clone(),
                    svid: self.svid_material(from_id)?,
                };
                let server_tcp = TcpGrant {
                    address: None,
                    token,
                    svid: self.svid_material(&server_id)?,
                };
                (
                    grant(from_id, &server_id, Some(client_tcp)),
                    grant(&server_id, from_id, Some(server_tcp)),
                )
            }
        };

        let mut state = self.state();
        decide::within_limits(from_q, state.usage(from_q), shm_bytes, &limits)?;
        let info = LaneInfo {
            lane: lane_id,
            transport,
            service: service.to_owned(),
            quadrant: to_q.name().to_owned(),
            client: from_id.to_owned(),
            server: server_id.clone(),
            bytes_to_server: 0,
            bytes_to_client: 0,
            messages: 0,
            rtt_ns: 0,
            shm_bytes,
            age_secs: 0,
        };
        // Charged before the lock is released, so concurrent opens cannot overshoot the limits.
        state.lanes.insert(
            lane_id,
            OpenLane {
                info,
                client_quadrant: from_q,
                client_conn: Arc::clone(conn),
                server_conn: Arc::clone(&server_conn),
                opened: Instant::now(),
                region,
                _memory: memory,
            },
        );
        drop(state);
        // The service first: once the opener has its end, the other must exist. A service that
        // does not take its lanes within INCOMING_PATIENCE makes the opener's request fail
        // ("busy") rather than queue without bound.
        let server_refs: Vec<&OwnedFd> = server_fds.iter().collect();
        if let Err(e) = server_conn.send(
            &LaneMessage::Incoming {
                grant: server_grant,
            },
            &server_refs,
            false,
        ) {
            self.state().lanes.remove(&lane_id);
            return Err(refuse(
                Refusal::Busy,
                format!(
                    "service {service} in {} did not take the lane within {} ms: {e}",
                    to_q.name(),
                    INCOMING_PATIENCE.as_millis()
                ),
            ));
        }
        let client_refs: Vec<&OwnedFd> = client_fds.iter().collect();
        if let Err(e) = conn.send(
            &LaneMessage::Opened {
                grant: client_grant,
            },
            &client_refs,
            true,
        ) {
            warn!(lane = lane_id, error = %e, "cannot hand the lane to its opener");
            self.close(conn.id, lane_id);
            return Ok(());
        }
        self.events
            .emit(|seq, at_ms| crate::events::Event::LaneOpened {
                seq,
                at_ms,
                lane: lane_id,
                transport,
                client: from_id.to_owned(),
                service: format!("{}/{service}", to_q.name()),
            });
        Ok(())
    }
}

fn ring_rand(out: &mut [u8]) -> Result<(), ::ring::error::Unspecified> {
    use ::ring::rand::SecureRandom as _;
    ::ring::rand::SystemRandom::new().fill(out)
}
