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
    pool::{Ends, Parts},
    report::LaneInfo,
};
use crate::lanes::{
    Transport, TransportChoice,
    control::{self, LaneGrant, LaneMessage, Refusal, TcpGrant},
    os::Mapping,
    ring::Region,
    tls::Svid,
};

impl Broker {
    pub(super) fn svid_material(&self, id: &str) -> Result<control::SvidMaterial, Refused> {
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

    /// Opens a lane from `from_id` in `from_q` to `service` in `to_q`: finds the service,
    /// chooses the transport the rules allow, builds the lane, charges it against the opener's
    /// limits and hands each end its part — the service first.
    ///
    /// A `mirror` lane goes to the service's shadow generation instead (the client library
    /// opens one to copy requests to it); it is kept out of the service's SLIs and breakers.
    pub(super) fn open(
        &self,
        conn: &Arc<Conn>,
        (from_q, from_id): (Quadrant, &str),
        wanted: &Wanted<'_>,
        choice: TransportChoice,
    ) -> Result<(), Refused> {
        let Wanted {
            quadrant: to_q,
            service,
            mirror,
            request_ids,
            avoid_instance,
            affinity_key,
        } = *wanted;
        let ask = Ask {
            from_q,
            from_id,
            to_q,
            service,
        };
        let local = self.find_service(to_q, service, (mirror, avoid_instance, affinity_key));
        if let Some(done) = self.elsewhere(conn, (from_q, from_id), wanted, choice, &local) {
            return done;
        }
        let target = local?;
        if !mirror {
            self.check_trip(to_q, service)?;
        }
        let transport = self.choose(&ask, choice, &target)?;
        if transport == Transport::Tcp
            && let Some(port) = target.tcp_port
        {
            self.breakers.check(from_q, service, target.addr, port)?;
        }
        let lane_id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        let built = self.build(lane_id, &ask, transport, &target)?;
        let Built {
            memory,
            region,
            shm_bytes,
            mut client,
            mut server,
            client_copy,
        } = built;
        client.grant.request_ids = request_ids;
        server.grant.request_ids = request_ids;
        client.grant.instance = target.instance;
        server.grant.instance = target.instance;
        client.grant.mirror = target
            .mirror_ppm
            .map(|fraction_ppm| control::MirrorGrant { fraction_ppm });
        region
            .sli(crate::lanes::ring::Sli::ThresholdNs)
            .store(self.threshold_ns(to_q, service), Ordering::Relaxed);
        let mut state = self.state();
        decide::within_limits(
            from_q,
            state.usage(from_q),
            shm_bytes,
            &self.config.lanes.limits_of(from_q),
        )?;
        let info = LaneInfo {
            lane: lane_id,
            transport,
            service: service.to_owned(),
            quadrant: to_q.name().to_owned(),
            client: from_id.to_owned(),
            server: target.id.clone(),
            bytes_to_server: 0,
            bytes_to_client: 0,
            messages: 0,
            rtt_ns: 0,
            shm_bytes,
            age_secs: 0,
            mirror,
            instance: target.instance,
            node: None,
        };
        // Charged before the lock is released, so concurrent opens cannot overshoot the limits.
        state.lanes.insert(
            lane_id,
            OpenLane {
                info,
                client_quadrant: from_q,
                client_conn: Some(Arc::clone(conn)),
                server_conn: Some(Arc::clone(&target.conn)),
                opened: Instant::now(),
                region,
                memory,
                sever: client_copy,
            },
        );
        drop(state);
        if !self.hand_over(conn, lane_id, &ask, &target, client, server)? {
            return Ok(());
        }
        self.lane_opened.notify_one();
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

    /// A lane to another node's instance when none here can take it, or only the one the
    /// caller passes over (or a hung one) could; `None` to go on with `local`.
    fn elsewhere(
        &self,
        conn: &Arc<Conn>,
        from: (Quadrant, &str),
        wanted: &Wanted<'_>,
        choice: TransportChoice,
        local: &Result<Target, Refused>,
    ) -> Option<Result<(), Refused>> {
        let peers = self
            .peers
            .get()
            .filter(|p| !wanted.mirror && p.any_linked())?;
        let needed = match local {
            Err(r) => r.reason == Refusal::NoService,
            Ok(t) => t.weak,
        };
        if !needed {
            return None;
        }
        match (self.open_remote(conn, from, wanted, choice, peers), local) {
            (Ok(()), _) => Some(Ok(())),
            (Err(e), Err(l)) => Some(Err(if e.reason == Refusal::NoService {
                refuse(
                    Refusal::NoService,
                    format!("{}, nor on a peer node: {}", l.message, e.message),
                )
            } else {
                e
            })),
            (Err(_), Ok(_)) => None,
        }
    }

    /// The service's listener (its shadow generation's, for a `mirror` lane) and, for a lane
    /// to a service with a shadow, the share of requests to copy to it.
    pub(super) fn find_service(
        &self,
        to_q: Quadrant,
        service: &str,
        (mirror, avoid, affinity): (bool, Option<u8>, Option<&str>),
    ) -> Result<Target, Refused> {
        let state = self.state();
        let key = (to_q, service.to_owned());
        let shadow = state.shadows.get(&key);
        let draining = self.draining.lock().unwrap_or_else(PoisonError::into_inner);
        let (s, mirror_ppm) = if mirror {
            (shadow.map(|s| &s.service), None)
        } else {
            (
                state.pick(&key, &draining, (avoid, affinity)),
                shadow.map(|s| s.fraction_ppm),
            )
        };
        if s.is_none() && !mirror && state.offers(&key) > 0 {
            return Err(refuse(
                Refusal::NoService,
                format!(
                    "every instance of {} offering service {service} is draining or hung \
                     (its listener misses the broker's pings)",
                    to_q.name()
                ),
            ));
        }
        let s = s.ok_or_else(|| {
            refuse(
                Refusal::NoService,
                format!(
                    "no {}service {service} is offered in {}",
                    if mirror { "shadow generation of " } else { "" },
                    to_q.name()
                ),
            )
        })?;
        Ok(Target {
            weak: avoid == Some(s.instance) || state.hung(s.conn.id),
            conn: Arc::clone(&s.conn),
            id: s.spiffe_id.clone(),
            tcp_port: s.tcp_port,
            mirror_ppm,
            addr: self
                .config
                .instance_addr(crate::config::InstanceRef::new(to_q, s.instance)),
            instance: s.instance,
        })
    }

    pub(super) fn choose(
        &self,
        ask: &Ask<'_>,
        choice: TransportChoice,
        target: &Target,
    ) -> Result<Transport, Refused> {
        // The policy engine out (a chaos fault) for either end: the decision fails closed.
        if let Some(m) = [ask.from_q, ask.to_q]
            .into_iter()
            .find_map(|q| self.policy_outages.refusal(q))
        {
            return Err(refuse(Refusal::Policy, m));
        }
        // A chaos partition (or refusal) between the two quadrants: no lane around it.
        if let Some(m) = self
            .cuts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refusal(ask.from_q, ask.to_q, crate::breakers::monotonic_ns())
        {
            return Err(refuse(Refusal::Policy, m));
        }
        let rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        decide::choose_transport(
            rules
                .live
                .as_deref()
                .map(Vec::as_slice)
                .map_err(String::as_str),
            ask.from_q,
            ask.from_id,
            ask.to_q,
            ask.service,
            choice,
            decide::Offer {
                has_tcp: target.tcp_port.is_some(),
                identity: self.identity.is_some(),
                preferred: self.preferred_transport(ask.to_q, ask.service),
            },
        )
    }

    /// The lane's memory (a sealed memfd holding the rings, empty but for the header unless
    /// the transport is shared memory) and each end's grant and descriptors.
    fn build(
        &self,
        lane_id: u64,
        ask: &Ask<'_>,
        transport: Transport,
        target: &Target,
    ) -> Result<Built, Refused> {
        let &Ask {
            from_q,
            from_id,
            to_q,
            service,
        } = ask;
        let limits = self.config.lanes.limits_of(from_q);
        let max_message = self.config.lanes.max_message_bytes;
        // A prepared lane if the pool has one; else its parts are made here.
        let parts = match self.pool.take(from_q, transport) {
            Some(p) => p,
            None => Parts::make(transport, max_message as usize)
                .map_err(|e| io_err("memory and descriptors", &e))?,
        };
        let Parts {
            memfd,
            memory,
            region,
            ring_bytes,
            ends,
        } = parts;
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
            mirror: None,
            request_ids: false,
            instance: 0,
        };
        let dup = |f: &OwnedFd| f.try_clone().map_err(|e| io_err("descriptor", &e));
        let client_copy = client_socket_copy(&ends)?;
        let (client, server) = match ends {
            Ends::Shm {
                efd_client,
                efd_server,
                sock_client,
                sock_server,
            } => (
                End {
                    grant: grant(from_id, &target.id, None),
                    fds: vec![
                        dup(&memfd)?,
                        dup(&efd_client)?,
                        dup(&efd_server)?,
                        sock_client,
                    ],
                },
                End {
                    grant: grant(&target.id, from_id, None),
                    fds: vec![memfd, efd_server, efd_client, sock_server],
                },
            ),
            Ends::Uds {
                sock_client,
                sock_server,
            } => (
                End {
                    grant: grant(from_id, &target.id, None),
                    fds: vec![dup(&memfd)?, sock_client],
                },
                End {
                    grant: grant(&target.id, from_id, None),
                    fds: vec![memfd, sock_server],
                },
            ),
            Ends::Tcp => {
                let (client_tcp, server_tcp) = self.tcp_grants(ask, target)?;
                (
                    End {
                        grant: grant(from_id, &target.id, Some(client_tcp)),
                        fds: vec![dup(&memfd)?],
                    },
                    End {
                        grant: grant(&target.id, from_id, Some(server_tcp)),
                        fds: vec![memfd],
                    },
                )
            }
        };
        Ok(Built {
            memory,
            region,
            shm_bytes: crate::lanes::ring::mapping_len(ring_bytes) as u64,
            client,
            server,
            client_copy,
        })
    }

    /// Where the opener connects (the service's port at the offering instance's address), the
    /// token both ends check, and each end's SVID.
    fn tcp_grants(&self, ask: &Ask<'_>, target: &Target) -> Result<(TcpGrant, TcpGrant), Refused> {
        let mut token = [0u8; 16];
        ring_rand(&mut token)
            .map_err(|_| refuse(Refusal::Io, "no randomness for the lane token".into()))?;
        let token = crate::artifacts::hex(&token);
        let address = format!("{}:{}", target.addr, target.tcp_port.unwrap_or_default());
        let client = TcpGrant {
            address: Some(address),
            token: token.clone(),
            svid: self.svid_material(ask.from_id)?,
            server_lane: None,
        };
        let server = TcpGrant {
            address: None,
            token,
            svid: self.svid_material(&target.id)?,
            server_lane: None,
        };
        Ok((client, server))
    }

    /// Hands the service its end, then the opener; `false` if the opener could not take its
    /// end (the lane is closed again). A service that does not take its lanes within
    /// [`INCOMING_PATIENCE`] makes the opener's request fail ("busy") rather than queue without
    /// bound; once the opener has its end, the other exists. After an open that came after a
    /// quiet spell this thread then lets the opener run first.
    fn hand_over(
        &self,
        conn: &Arc<Conn>,
        lane_id: u64,
        ask: &Ask<'_>,
        target: &Target,
        client: End,
        server: End,
    ) -> Result<bool, Refused> {
        let server_refs: Vec<&OwnedFd> = server.fds.iter().collect();
        if let Err(e) = target.conn.send(
            &LaneMessage::Incoming {
                grant: server.grant,
            },
            &server_refs,
            false,
        ) {
            self.state().lanes.remove(lane_id);
            return Err(refuse(
                Refusal::Busy,
                format!(
                    "service {} in {} did not take the lane within {} ms: {e}",
                    ask.service,
                    ask.to_q.name(),
                    INCOMING_PATIENCE.as_millis()
                ),
            ));
        }
        let client_refs: Vec<&OwnedFd> = client.fds.iter().collect();
        if let Err(e) = conn.send(
            &LaneMessage::Opened {
                grant: client.grant,
            },
            &client_refs,
            true,
        ) {
            warn!(lane = lane_id, error = %e, "cannot hand the lane to its opener");
            self.close(conn.id, lane_id);
            return Ok(false);
        }
        // An open after a quiet spell: the opener polls for its answer, often on this CPU
        // (its request woke this thread beside it), and would otherwise wait for what follows
        // here — the announcements, waking the pool's filler, the service's accept queued
        // behind this thread — so it goes first. Not within a burst: there the opener is back
        // at once, and its next request would wait behind everything a yield lets run first
        // (measured both ways in BENCHMARKS.md, "Lane opens 5 ms apart").
        if conn.after_quiet.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        Ok(true)
    }
}

/// The lane an opener asks for.
#[derive(Clone, Copy)]
pub(super) struct Wanted<'a> {
    /// The service's quadrant.
    pub(super) quadrant: Quadrant,
    /// The service.
    pub(super) service: &'a str,
    /// A lane to the service's shadow generation.
    pub(super) mirror: bool,
    /// Every message carries a request envelope.
    pub(super) request_ids: bool,
    /// An instance to pass over if another offers the service.
    pub(super) avoid_instance: Option<u8>,
    /// Lanes with the same key go to the same instance.
    pub(super) affinity_key: Option<&'a str>,
}

/// Who asks for a lane to what.
pub(super) struct Ask<'a> {
    pub(super) from_q: Quadrant,
    pub(super) from_id: &'a str,
    pub(super) to_q: Quadrant,
    pub(super) service: &'a str,
}

/// The service a lane goes to.
pub(super) struct Target {
    /// The instance the caller passes over, or a hung one: the only one here that offers it.
    pub(super) weak: bool,
    pub(super) conn: Arc<Conn>,
    pub(super) id: String,
    pub(super) tcp_port: Option<u16>,
    /// The share of requests the client copies to the service's shadow generation.
    pub(super) mirror_ppm: Option<u32>,
    /// The address of the instance offering it (where TCP lanes connect).
    pub(super) addr: std::net::Ipv4Addr,
    /// Which instance of the quadrant offers it.
    pub(super) instance: u8,
}

/// One end of a lane: what its workload is told and the descriptors it receives.
struct End {
    grant: LaneGrant,
    fds: Vec<OwnedFd>,
}

/// A lane built but not yet charged or handed over.
struct Built {
    memory: Mapping,
    region: Region,
    shm_bytes: u64,
    client: End,
    server: End,
    /// A copy of the client's socket (shared memory, Unix socket), to cut the lane.
    client_copy: Option<OwnedFd>,
}

/// A copy of the client's end of the lane's socket, for lanes that have one.
fn client_socket_copy(ends: &Ends) -> Result<Option<OwnedFd>, Refused> {
    match ends {
        Ends::Shm { sock_client, .. } | Ends::Uds { sock_client, .. } => sock_client
            .try_clone()
            .map(Some)
            .map_err(|e| io_err("descriptor", &e)),
        Ends::Tcp => Ok(None),
    }
}

pub(super) fn io_err(what: &str, e: &io::Error) -> Refused {
    refuse(Refusal::Io, format!("cannot create the lane's {what}: {e}"))
}

pub(super) fn ring_rand(out: &mut [u8]) -> Result<(), ::ring::error::Unspecified> {
    use ::ring::rand::SecureRandom as _;
    ::ring::rand::SystemRandom::new().fill(out)
}
