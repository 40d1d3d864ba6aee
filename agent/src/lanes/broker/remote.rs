//! Lanes between nodes (`crate::peers`): on the opener's node, asking a peer node for one of its
//! instances and handing the opener its end; on the service's node, deciding a peer's open and
//! handing the service its end. Both are TCP + mTLS lanes; each node decides with its own policy
//! and issues its own workload's SVID.

use std::{
    os::fd::OwnedFd,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use dataplane_common::Quadrant;

use super::{
    Broker, Conn, OpenLane,
    decide::{self, Refused, refuse},
    open::{Ask, Wanted, io_err, ring_rand},
    pool::Parts,
    report::LaneInfo,
};
use crate::{
    config::MAX_INSTANCES,
    lanes::{
        Transport, TransportChoice,
        control::{LaneGrant, LaneMessage, Refusal, TcpGrant},
    },
    peers::{
        OPEN_TIMEOUT, Peers,
        wire::{RemoteGrant, RemoteOpen, Reply, Request},
    },
};

/// How instance `k` of the `p`-th peer node appears in lane grants here.
fn remote_instance(p: usize, k: u8) -> u8 {
    u8::try_from((p + 1) * usize::from(MAX_INSTANCES)).unwrap_or(u8::MAX) | (k % MAX_INSTANCES)
}

/// The peer node and its instance a grant's instance number names, if it names one.
fn split_instance(instance: u8) -> Option<(usize, u8)> {
    (instance >= MAX_INSTANCES).then(|| {
        (
            usize::from(instance / MAX_INSTANCES) - 1,
            instance % MAX_INSTANCES,
        )
    })
}

impl Broker {
    /// Opens a lane from a workload here to an instance of a peer node: the first linked node
    /// (in `peers.nodes` order) whose agent grants it. Lanes between nodes are TCP + mTLS.
    pub(super) fn open_remote(
        &self,
        conn: &Arc<Conn>,
        (from_q, from_id): (Quadrant, &str),
        wanted: &Wanted<'_>,
        choice: TransportChoice,
        peers: &Peers,
    ) -> Result<(), Refused> {
        let to_q = wanted.quadrant;
        let service = wanted.service;
        if !matches!(choice, TransportChoice::Auto | TransportChoice::Tcp) {
            return Err(refuse(
                Refusal::Policy,
                format!(
                    "service {service} of {} is offered only on other nodes, and lanes between \
                     nodes are TCP + mTLS; this open asks for {choice:?} only",
                    to_q.name()
                ),
            ));
        }
        {
            let rules = self
                .rules
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
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
                TransportChoice::Tcp,
                decide::Offer {
                    has_tcp: true,
                    identity: self.identity.is_some(),
                    preferred: None,
                },
            )?;
        }
        let avoided = wanted.avoid_instance.and_then(split_instance);
        let mut passed = Vec::new();
        for (p, name) in peers.order() {
            let request = Request::Open(RemoteOpen {
                from_quadrant: from_q.name().to_owned(),
                from_id: from_id.to_owned(),
                quadrant: to_q.name().to_owned(),
                service: service.to_owned(),
                request_ids: wanted.request_ids,
                avoid_instance: avoided.filter(|(ap, _)| *ap == p).map(|(_, k)| k),
                affinity_key: wanted.affinity_key.map(str::to_owned),
            });
            match peers.ask(p, &request, OPEN_TIMEOUT) {
                Ok(Reply::Granted(grant)) => {
                    self.hand_remote(conn, (from_q, from_id), wanted, (p, &name), grant)?;
                    peers.count_lane(p);
                    return Ok(());
                }
                Ok(Reply::Refused {
                    reason,
                    message,
                    retry_after_ms,
                }) => {
                    if matches!(reason, Refusal::NoService | Refusal::Busy) {
                        passed.push(format!("node {name}: {message}"));
                        continue;
                    }
                    return Err(Refused {
                        reason,
                        message: format!("node {name}: {message}"),
                        limit: None,
                        retry_after_ms,
                    });
                }
                Ok(Reply::Hello { .. }) => {
                    passed.push(format!("node {name} answered an open with a hello"));
                }
                Err(e) => passed.push(e),
            }
        }
        Err(refuse(Refusal::NoService, passed.join("; ")))
    }

    /// Gives the opener its end of a lane a peer node granted: the address and token from
    /// there, the opener's SVID from here, and the lane's statistics page.
    fn hand_remote(
        &self,
        conn: &Arc<Conn>,
        (from_q, from_id): (Quadrant, &str),
        wanted: &Wanted<'_>,
        (p, name): (usize, &str),
        remote: RemoteGrant,
    ) -> Result<(), Refused> {
        let limits = self.config.lanes.limits_of(from_q);
        let parts = match self.pool.take(from_q, Transport::Tcp) {
            Some(p) => p,
            None => Parts::make(Transport::Tcp, self.config.lanes.max_message_bytes as usize)
                .map_err(|e| io_err("memory and descriptors", &e))?,
        };
        let lane_id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let instance = remote_instance(p, remote.instance);
        #[expect(clippy::cast_possible_truncation, reason = "a statistics page")]
        let grant = LaneGrant {
            lane: lane_id,
            transport: Transport::Tcp,
            service: wanted.service.to_owned(),
            quadrant: wanted.quadrant.name().to_owned(),
            local_id: from_id.to_owned(),
            peer_id: remote.server_id.clone(),
            max_message: self.config.lanes.max_message_bytes.min(remote.max_message),
            ring_bytes: parts.ring_bytes as u32,
            max_in_flight: limits.max_in_flight,
            tcp: Some(TcpGrant {
                address: Some(remote.address),
                token: remote.token,
                svid: self.svid_material(from_id)?,
                server_lane: Some(remote.lane),
            }),
            mirror: None,
            request_ids: wanted.request_ids,
            instance,
        };
        parts
            .region
            .sli(crate::lanes::ring::Sli::ThresholdNs)
            .store(
                self.threshold_ns(wanted.quadrant, wanted.service),
                Ordering::Relaxed,
            );
        let shm_bytes = crate::lanes::ring::mapping_len(parts.ring_bytes) as u64;
        let mut state = self.state();
        decide::within_limits(from_q, state.usage(from_q), shm_bytes, &limits)?;
        let memfd: OwnedFd = parts
            .memfd
            .try_clone()
            .map_err(|e| io_err("descriptor", &e))?;
        state.lanes.insert(
            lane_id,
            OpenLane {
                info: lane_info(
                    lane_id,
                    (from_id, &remote.server_id),
                    wanted,
                    (instance, name),
                    shm_bytes,
                ),
                client_quadrant: from_q,
                client_conn: Some(Arc::clone(conn)),
                server_conn: None,
                opened: Instant::now(),
                region: parts.region,
                memory: parts.memory,
                sever: None,
            },
        );
        drop(state);
        if let Err(e) = conn.send(&LaneMessage::Opened { grant }, &[&memfd], true) {
            tracing::warn!(lane = lane_id, error = %e, "cannot hand the lane to its opener");
            self.close(conn.id, lane_id);
            return Ok(());
        }
        self.lane_opened.notify_one();
        self.emit_opened(lane_id, from_id, wanted.quadrant, wanted.service);
        Ok(())
    }

    /// Decides an open a workload of peer node `node` asked for, with this node's policy,
    /// breakers and instances, and hands the chosen instance its end: the answer tells the
    /// opener's agent where to connect and with which token.
    ///
    /// # Errors
    /// The refusal, as a local opener would get it.
    pub fn open_for_peer(&self, node: &str, open: &RemoteOpen) -> Result<RemoteGrant, Refused> {
        let (from_q, to_q) = self.peer_opener(node, open)?;
        let service = open.service.as_str();
        let ask = Ask {
            from_q,
            from_id: &open.from_id,
            to_q,
            service,
        };
        let target = self.find_service(
            to_q,
            service,
            (false, open.avoid_instance, open.affinity_key.as_deref()),
        )?;
        self.check_trip(to_q, service)?;
        let transport = self.choose(&ask, TransportChoice::Tcp, &target)?;
        debug_assert_eq!(transport, Transport::Tcp);
        let port = target.tcp_port.unwrap_or_default();
        let parts = Parts::make(Transport::Tcp, self.config.lanes.max_message_bytes as usize)
            .map_err(|e| io_err("memory and descriptors", &e))?;
        let mut token = [0u8; 16];
        ring_rand(&mut token)
            .map_err(|_| refuse(Refusal::Io, "no randomness for the lane token".into()))?;
        let token = crate::artifacts::hex(&token);
        let lane_id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let wanted = Wanted {
            quadrant: to_q,
            service,
            mirror: false,
            request_ids: open.request_ids,
            avoid_instance: None,
            affinity_key: None,
        };
        #[expect(clippy::cast_possible_truncation, reason = "a statistics page")]
        let grant = LaneGrant {
            lane: lane_id,
            transport: Transport::Tcp,
            service: service.to_owned(),
            quadrant: to_q.name().to_owned(),
            local_id: target.id.clone(),
            peer_id: open.from_id.clone(),
            max_message: self.config.lanes.max_message_bytes,
            ring_bytes: parts.ring_bytes as u32,
            max_in_flight: self.config.lanes.limits_of(from_q).max_in_flight,
            tcp: Some(TcpGrant {
                address: None,
                token: token.clone(),
                svid: self.svid_material(&target.id)?,
                server_lane: None,
            }),
            mirror: None,
            request_ids: open.request_ids,
            instance: target.instance,
        };
        let shm_bytes = crate::lanes::ring::mapping_len(parts.ring_bytes) as u64;
        self.state().lanes.insert(
            lane_id,
            OpenLane {
                info: lane_info(
                    lane_id,
                    (&open.from_id, &target.id),
                    &wanted,
                    (target.instance, node),
                    shm_bytes,
                ),
                client_quadrant: from_q,
                client_conn: None,
                server_conn: Some(Arc::clone(&target.conn)),
                opened: Instant::now(),
                region: parts.region,
                memory: parts.memory,
                sever: None,
            },
        );
        if let Err(e) = target
            .conn
            .send(&LaneMessage::Incoming { grant }, &[&parts.memfd], false)
        {
            self.state().lanes.remove(lane_id);
            return Err(refuse(
                Refusal::Busy,
                format!(
                    "service {service} in {} did not take the lane within {} ms: {e}",
                    to_q.name(),
                    super::INCOMING_PATIENCE.as_millis()
                ),
            ));
        }
        self.emit_opened(lane_id, &open.from_id, to_q, service);
        Ok(RemoteGrant {
            lane: lane_id,
            address: format!("{}:{port}", target.addr),
            token,
            server_id: target.id,
            instance: target.instance,
            max_message: self.config.lanes.max_message_bytes,
        })
    }

    /// The opener's and the service's quadrants of a peer's open, once its opener is a workload
    /// of the quadrant it names in this trust domain.
    fn peer_opener(&self, node: &str, open: &RemoteOpen) -> Result<(Quadrant, Quadrant), Refused> {
        let quadrant = |name: &str| {
            Quadrant::from_name(name)
                .ok_or_else(|| refuse(Refusal::Invalid, format!("unknown quadrant {name:?}")))
        };
        let (from_q, to_q) = (quadrant(&open.from_quadrant)?, quadrant(&open.quadrant)?);
        let td = self
            .identity
            .as_ref()
            .map(|i| i.authority().trust_domain().to_owned())
            .ok_or_else(|| refuse(Refusal::Policy, "identity service unavailable".into()))?;
        if !is_workload_of(&open.from_id, &td, from_q) {
            return Err(refuse(
                Refusal::Invalid,
                format!(
                    "node {node} names opener {:?}, which is no workload of {} in trust domain {td}",
                    open.from_id,
                    from_q.name()
                ),
            ));
        }
        Ok((from_q, to_q))
    }

    fn emit_opened(&self, lane: u64, client: &str, q: Quadrant, service: &str) {
        self.events
            .emit(|seq, at_ms| crate::events::Event::LaneOpened {
                seq,
                at_ms,
                lane,
                transport: Transport::Tcp,
                client: client.to_owned(),
                service: format!("{}/{service}", q.name()),
            });
    }
}

/// Whether `id` is the SPIFFE ID of a workload of quadrant `q` in trust domain `td`.
fn is_workload_of(id: &str, td: &str, q: Quadrant) -> bool {
    id.strip_prefix(&format!("spiffe://{td}/quadrant/{}/workload/", q.name()))
        .is_some_and(|w| !w.is_empty() && !w.contains('/'))
}

fn lane_info(
    lane: u64,
    (client, server): (&str, &str),
    wanted: &Wanted<'_>,
    (instance, node): (u8, &str),
    shm_bytes: u64,
) -> LaneInfo {
    LaneInfo {
        lane,
        transport: Transport::Tcp,
        service: wanted.service.to_owned(),
        quadrant: wanted.quadrant.name().to_owned(),
        client: client.to_owned(),
        server: server.to_owned(),
        bytes_to_server: 0,
        bytes_to_client: 0,
        messages: 0,
        rtt_ns: 0,
        shm_bytes,
        age_secs: 0,
        mirror: false,
        instance,
        node: Some(node.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_instances_are_numbered_apart_from_local_ones() {
        for p in 0..crate::config::MAX_PEERS {
            for k in 0..MAX_INSTANCES {
                let n = remote_instance(p, k);
                assert!(n >= MAX_INSTANCES, "{p}/{k} → {n} looks local");
                assert_eq!(split_instance(n), Some((p, k)));
            }
        }
        for k in 0..MAX_INSTANCES {
            assert_eq!(split_instance(k), None);
        }
    }

    #[test]
    fn a_peer_may_open_only_for_workloads_of_the_quadrant_it_names() {
        let id = crate::identity::spiffe_id("q.test", Quadrant::Pg, "caller");
        assert!(is_workload_of(&id, "q.test", Quadrant::Pg));
        assert!(
            !is_workload_of(&id, "q.test", Quadrant::Px),
            "another quadrant"
        );
        assert!(
            !is_workload_of(&id, "other.test", Quadrant::Pg),
            "another domain"
        );
        assert!(!is_workload_of(
            "spiffe://q.test/quadrant/pg/workload/",
            "q.test",
            Quadrant::Pg
        ));
        assert!(!is_workload_of(
            "spiffe://q.test/node/pg",
            "q.test",
            Quadrant::Pg
        ));
        assert!(!is_workload_of(
            "spiffe://q.test/quadrant/pg/workload/a/../../px/workload/b",
            "q.test",
            Quadrant::Pg
        ));
    }
}
