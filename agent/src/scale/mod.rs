//! Quadrant instances at run time and the services balanced across them.
//!
//! Instance 0 of every quadrant is the quadrant itself (created with it, never scaled away);
//! instances 1.. are added and removed by `quadrant scale` (and created at start-up from
//! `quadrants.<q>.instances`). Each is its own namespace, veth, cgroup and address with the
//! quadrant's identity, so the policy is unchanged. The agent alone writes the load-balancing
//! maps: a backend's weight is its capacity while the instance is ready (its last probe of the
//! service's port succeeded) and not draining, else 0.
//!
//! A service balanced cluster-wide (`internal_traffic_policy: cluster`, the default) also
//! has the ready instances that linked peer nodes tell for a service of the same name
//! ([`Instances::set_remote`]): they take the slots after this node's instances, with no veth
//! (`LbBackend::ifindex` 0), so the quadrants' sockets reach them at `connect()` through the
//! routes to the peers' prefixes, and tc — which can only hand a packet to a local veth —
//! passes them over for connections from the host and the world.

mod maglev;
pub mod place;
mod probe;

use std::{
    collections::BTreeMap,
    fs,
    sync::{Mutex, PoisonError},
};

use dataplane_common::{
    Quadrant,
    lb::{LB_BACKENDS_PER_SERVICE, LbBackend, LbPortKey, LbService, LbServiceKey, MAGLEV_NONE},
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, InstanceRef, MAX_INSTANCES},
    loader::{AttachedProgram, Dataplane, LoaderError},
    quadrants::{self, QuadrantHandle},
    sys::SysError,
};

pub use probe::probe_round;

/// Errors of scaling.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// A count outside what the quadrant may run.
    #[error("cannot scale {quadrant} to {asked} instances: {reason}")]
    Invalid {
        /// Quadrant name.
        quadrant: &'static str,
        /// The count asked for.
        asked: u8,
        /// Why not.
        reason: String,
    },
    /// Creating or removing an instance failed (what was created for this request is removed
    /// again).
    #[error("cannot scale {quadrant}: {source}")]
    Host {
        /// Quadrant name.
        quadrant: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A probe's view of one (service, instance).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Health {
    /// Its last probe succeeded (and no later one failed three times in a row).
    ready: bool,
    /// Probes in a row that timed out.
    misses: u8,
}

/// Timed-out probes in a row after which a ready instance stops receiving new connections
/// (a refused probe counts at once: nothing listens).
pub const MISSES_TO_UNREADY: u8 = 3;

/// The instances a running agent added beyond each quadrant's first, and their health.
#[derive(Debug, Default)]
pub struct Instances {
    extra: Mutex<BTreeMap<InstanceRef, Extra>>,
    health: Mutex<BTreeMap<(usize, InstanceRef), Health>>,
    /// Per service with affinity: the live Maglev table (0 or 1) and who it was built from.
    maglev: Mutex<BTreeMap<usize, (u8, Vec<maglev::Member>)>>,
    /// The ready instances each peer node tells, by node.
    remote: Mutex<BTreeMap<String, Vec<RemoteBackend>>>,
    /// Where [`Instances::write_lb`] last put each of them (for `quadrant instances`).
    remote_slots: Mutex<Vec<(RemoteBackend, Option<u32>)>>,
}

/// A ready instance of a peer node (or a Kubernetes endpoint) serving service `service` (index
/// in the configuration) at `addr`:`port`, with its capacity weight.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteBackend {
    /// The service (index in `services`).
    pub service: usize,
    /// The peer node (for a Kubernetes endpoint, its `nodeName`, or `kubernetes`).
    pub node: String,
    /// Where it was learned: `peers` (a peer node told it) or `kubernetes` (an
    /// `EndpointSlice`).
    pub source: &'static str,
    /// The instance's address (inside the node's prefix of the service's quadrant).
    pub addr: std::net::Ipv4Addr,
    /// The port it serves the service on.
    pub port: u16,
    /// The host-side veth of a pod of this node (tc may then hand the host's and the world's
    /// connections to it); 0: on another node.
    pub ifindex: u32,
    /// Its capacity weight (above 0).
    pub weight: u16,
}

/// An instance of a peer node as `quadrant instances` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct RemoteInstanceStatus {
    /// The service it serves here.
    pub service: String,
    /// The peer node it runs on (for a Kubernetes endpoint, its `nodeName`, or `kubernetes`).
    pub node: String,
    /// Where it was learned: `peers` (its node told it) or `kubernetes` (an `EndpointSlice`).
    pub source: String,
    /// Its address.
    pub address: String,
    /// The port it serves the service on.
    pub port: u16,
    /// Its weight in load balancing, as its node tells it.
    pub weight: u16,
    /// Connections from this node's quadrants to it through the VIP that are open now.
    pub connections: u64,
    /// It has a backend slot (a service balances over at most 16 instances; this node's come
    /// first).
    pub balanced: bool,
}

#[derive(Debug)]
struct Extra {
    handle: QuadrantHandle,
    programs: Vec<AttachedProgram>,
    draining: bool,
}

/// One instance as `quadrant instances` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
pub struct InstanceStatus {
    /// Quadrant name.
    pub quadrant: String,
    /// Index (0: the quadrant's first).
    pub index: u8,
    /// Its address.
    pub address: String,
    /// Network namespace.
    pub netns: String,
    /// Host-side veth.
    pub host_interface: String,
    /// Cgroup directory.
    pub cgroup: String,
    /// CPUs it may use (none: unlimited).
    pub cpu: Option<f64>,
    /// Bytes of memory it may use (none: unlimited).
    pub memory_bytes: Option<u64>,
    /// Weight in load balancing.
    pub weight: u16,
    /// Draining: receives no new connections.
    pub draining: bool,
    /// Each service of its quadrant and whether this instance is ready for it.
    pub services: BTreeMap<String, bool>,
    /// Connections to it through a service VIP that are open now.
    pub connections: u64,
}

/// `quadrant instances`.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq)]
pub struct InstancesReport {
    /// Every instance of every quadrant.
    pub instances: Vec<InstanceStatus>,
    /// The peer nodes (`peers`), whose instances take lanes none here can.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<crate::peers::PeerStatus>,
    /// The peer nodes' instances behind this node's VIPs (services balanced cluster-wide).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteInstanceStatus>,
    /// Kubernetes endpoints (`services[].kubernetes_service`) not balanced to, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_refused: Vec<String>,
    /// With `peers.kubernetes`: why the Kubernetes API cannot be followed, while it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_error: Option<String>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Instances {
    /// Instances quadrant `q` runs now (its first included).
    #[must_use]
    pub fn count(&self, q: Quadrant) -> u8 {
        let extra = locked(&self.extra);
        1 + u8::try_from(extra.keys().filter(|i| i.quadrant == q).count()).unwrap_or(0)
    }

    /// Every instance running now, the first of each quadrant included.
    #[must_use]
    pub fn all(&self) -> Vec<InstanceRef> {
        let mut out: Vec<InstanceRef> = Quadrant::ALL
            .into_iter()
            .map(|q| InstanceRef::new(q, 0))
            .collect();
        out.extend(locked(&self.extra).keys().copied());
        out.sort();
        out
    }

    /// At start-up: takes over the added instances a kept dataplane runs (`kept`), or creates
    /// the configured ones, and writes the load-balancing maps.
    pub fn start(
        &self,
        config: &Config,
        dp: &mut Dataplane,
        kept: bool,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for q in Quadrant::ALL {
            if kept {
                for i in possible(q) {
                    if !quadrants::instance_exists(config, i) {
                        break;
                    }
                    let handle = quadrants::adopt_instance(config, i)?;
                    let programs = dp.take_over(config, &handle)?;
                    self.insert(handle, programs);
                }
            } else {
                crate::workloads::apply_capacity(
                    &config.instance_cgroup_dir(InstanceRef::new(q, 0)),
                    &config.instance,
                    q.name(),
                    &config.capacity(q),
                )?;
                for k in 1..config.instances(q) {
                    let (handle, programs) = add(config, dp, InstanceRef::new(q, k))?;
                    self.insert(handle, programs);
                }
            }
        }
        self.write_lb(config, dp)?;
        route_vips(config)?;
        Ok(())
    }

    /// Records an instance created (or taken over) at start-up.
    pub fn insert(&self, handle: QuadrantHandle, programs: Vec<AttachedProgram>) {
        locked(&self.extra).insert(
            handle.instance(),
            Extra {
                handle,
                programs,
                draining: false,
            },
        );
    }

    /// The programs attached for each added instance (status).
    #[must_use]
    pub fn programs(&self) -> Vec<(QuadrantHandle, Vec<AttachedProgram>)> {
        locked(&self.extra)
            .values()
            .map(|e| (e.handle.clone(), e.programs.clone()))
            .collect()
    }

    /// Marks instance `i` draining (or not): it receives no new connections; those it has go on.
    pub fn set_draining(&self, i: InstanceRef, draining: bool) -> bool {
        locked(&self.extra)
            .get_mut(&i)
            .map(|e| e.draining = draining)
            .is_some()
    }

    fn draining(&self, i: InstanceRef) -> bool {
        locked(&self.extra).get(&i).is_some_and(|e| e.draining)
    }

    /// Whether instance `i` is draining (`quadrant drain`).
    #[must_use]
    pub fn is_draining(&self, i: InstanceRef) -> bool {
        self.draining(i)
    }

    /// Whether instance `i` is ready for service `s` (by index in the configuration).
    fn ready(&self, s: usize, i: InstanceRef) -> bool {
        locked(&self.health).get(&(s, i)).is_some_and(|h| h.ready)
    }

    /// Records a probe; returns whether readiness changed.
    fn observe(&self, s: usize, i: InstanceRef, outcome: probe::Outcome) -> bool {
        let mut health = locked(&self.health);
        let h = health.entry((s, i)).or_default();
        let before = h.ready;
        match outcome {
            probe::Outcome::Up => {
                *h = Health {
                    ready: true,
                    misses: 0,
                }
            }
            probe::Outcome::Refused => *h = Health::default(),
            probe::Outcome::TimedOut => {
                h.misses = h.misses.saturating_add(1);
                if h.misses >= MISSES_TO_UNREADY {
                    h.ready = false;
                }
            }
        }
        before != h.ready
    }

    fn forget(&self, i: InstanceRef) {
        locked(&self.health).retain(|(_, j), _| *j != i);
    }

    /// Adds instances of `q` until it runs `n`, or removes the highest ones until it does.
    /// Instances added by this call are removed again if a later one fails.
    pub fn scale(
        &self,
        config: &Config,
        dataplane: &Mutex<Dataplane>,
        q: Quadrant,
        n: u8,
    ) -> Result<u8, ScaleError> {
        let invalid = |reason: String| ScaleError::Invalid {
            quadrant: q.name(),
            asked: n,
            reason,
        };
        if !(1..=MAX_INSTANCES).contains(&n) {
            return Err(invalid(format!("the count must be 1..={MAX_INSTANCES}")));
        }
        let room = config.addrs(q).prefix.hosts().count().saturating_sub(1);
        if usize::from(n) > room {
            return Err(invalid(format!(
                "its prefix {} has room for {room} instance addresses",
                config.addrs(q).prefix
            )));
        }
        let now = self.count(q);
        let host = |e: Box<dyn std::error::Error + Send + Sync>| ScaleError::Host {
            quadrant: q.name(),
            source: e,
        };
        if n > now {
            let mut added = Vec::new();
            for k in now..n {
                let i = InstanceRef::new(q, k);
                // The dataplane's lock ends with this statement: undoing a failed add below
                // takes it again.
                let made = add(config, &mut locked(dataplane), i);
                match made {
                    Ok((handle, programs)) => {
                        added.push(i);
                        self.insert(handle, programs);
                    }
                    Err(e) => {
                        for i in added.into_iter().rev() {
                            let _ = self.remove(config, dataplane, i);
                        }
                        return Err(host(e));
                    }
                }
            }
        } else {
            for k in (n..now).rev() {
                self.remove(config, dataplane, InstanceRef::new(q, k))
                    .map_err(|e| host(Box::new(e)))?;
            }
        }
        self.write_lb(config, &mut locked(dataplane))
            .map_err(|e| host(Box::new(e)))?;
        Ok(n)
    }

    /// Removes added instance `i`: out of the maps first, then its processes, links and host
    /// resources.
    fn remove(
        &self,
        config: &Config,
        dataplane: &Mutex<Dataplane>,
        i: InstanceRef,
    ) -> Result<(), SysError> {
        // Out of the registry first, its lock released: the dataplane's lock is never taken
        // while holding it (the probe thread takes them the other way round).
        let removed = locked(&self.extra).remove(&i);
        if let Some(e) = removed {
            let mut dp = locked(dataplane);
            if let Err(err) = dp.unregister(e.handle.host_ifindex, e.handle.cgroup_id) {
                tracing::warn!(instance = %i.name(), error = %err, "cannot unregister");
            }
            if let Some(pins) = dp.pin_dir() {
                let _ = fs::remove_dir_all(pins.join("links").join(i.name()));
            }
        }
        self.forget(i);
        quadrants::remove_instance(config, i)?;
        crate::workloads::remove_v1_group(&config.instance, &i.name());
        Ok(())
    }

    /// Makes `backends` the ready instances node `node` tells (empty: none, or it is gone);
    /// when they changed, returns the ones before (the caller then writes the maps, and puts
    /// those back if it cannot).
    pub fn set_remote(
        &self,
        node: &str,
        mut backends: Vec<RemoteBackend>,
    ) -> Option<Vec<RemoteBackend>> {
        backends.sort();
        let mut remote = locked(&self.remote);
        let before = remote.get(node).cloned().unwrap_or_default();
        if before == backends {
            return None;
        }
        if backends.is_empty() {
            remote.remove(node);
        } else {
            remote.insert(node.to_owned(), backends);
        }
        Some(before)
    }

    /// This node's instances ready for each service, with their weights: what it tells its
    /// peers.
    #[must_use]
    pub fn ready_here(&self, config: &Config) -> Vec<(usize, InstanceRef, u16)> {
        let mut out = Vec::new();
        for (n, s) in config.services.iter().enumerate() {
            let q = s.quadrant();
            let weight = config.capacity(q).weight();
            for k in 0..self.count(q) {
                let i = InstanceRef::new(q, k);
                if self.ready(n, i) && !self.draining(i) {
                    out.push((n, i, weight));
                }
            }
        }
        out
    }

    /// Writes `LB_SERVICES` and `LB_BACKENDS` for every configured service: one slot per
    /// instance index, weighted by capacity while ready and not draining; then, for a service
    /// balanced cluster-wide, one per instance the peer nodes tell, while slots remain.
    pub fn write_lb(&self, config: &Config, dp: &mut Dataplane) -> Result<(), LoaderError> {
        let mut services = Vec::new();
        let mut backends = Vec::new();
        let mut ports = Vec::new();
        let remote: Vec<RemoteBackend> = locked(&self.remote).values().flatten().cloned().collect();
        let mut placed = Vec::new();
        for (n, s) in config.services.iter().enumerate() {
            let q = s.quadrant();
            let count = self.count(q);
            let index = u32::try_from(n).unwrap_or(u32::MAX);
            ports.push((
                LbPortKey {
                    quadrant: q as u8,
                    proto: s.proto(),
                    port: s.port.to_be(),
                },
                index,
            ));
            let weight = config.capacity(q).weight();
            let mut members = Vec::new();
            // Balanced locally, a service keeps the backends with a veth here (its Kubernetes
            // Service's pods on this node), as Kubernetes' `internalTrafficPolicy: Local`.
            let others: Vec<&RemoteBackend> = remote
                .iter()
                .filter(|r| r.service == n && (s.cluster_wide() || r.ifindex != 0))
                .collect();
            let mut used = count;
            for k in 0..u8::try_from(LB_BACKENDS_PER_SERVICE).unwrap_or(MAX_INSTANCES) {
                let slot = index * LB_BACKENDS_PER_SERVICE + u32::from(k);
                if k >= count {
                    // A peer node's instance, or an empty slot.
                    let r = others.get(usize::from(k - count));
                    if let Some(r) = r {
                        members.push(maglev::Member {
                            slot: k,
                            name: format!("{}/{}", r.node, r.addr),
                            weight: r.weight,
                        });
                        placed.push(((*r).clone(), Some(slot)));
                        used = k + 1;
                    }
                    backends.push((
                        slot,
                        LbBackend {
                            addr: r.map_or(0, |r| u32::from_ne_bytes(r.addr.octets())),
                            port: r.map_or(s.port, |r| r.port).to_be(),
                            weight: r.map_or(0, |r| r.weight),
                            ifindex: r.map_or(0, |r| r.ifindex),
                        },
                    ));
                    continue;
                }
                let i = InstanceRef::new(q, k);
                let live = self.ready(n, i) && !self.draining(i);
                if live {
                    members.push(maglev::Member {
                        slot: k,
                        name: i.name(),
                        weight,
                    });
                }
                backends.push((
                    slot,
                    LbBackend {
                        addr: u32::from_ne_bytes(config.instance_addr(i).octets()),
                        port: s.port.to_be(),
                        weight: if live { weight } else { 0 },
                        // Where tc sends the packets of outside connections it gave this
                        // backend.
                        ifindex: crate::sys::ifindex(&config.instance_iface(i)).unwrap_or(0),
                    },
                ));
            }
            let room = usize::from(
                u8::try_from(LB_BACKENDS_PER_SERVICE)
                    .unwrap_or(0)
                    .saturating_sub(count),
            );
            placed.extend(others.iter().skip(room).map(|r| ((*r).clone(), None)));
            let maglev = if s.affinity == "workload" {
                self.maglev_table(dp, n, members)?
            } else {
                MAGLEV_NONE
            };
            services.push((
                LbServiceKey {
                    vip: u32::from_ne_bytes(s.vip.octets()),
                    port: s.port.to_be(),
                    proto: s.proto(),
                    pad: 0,
                },
                LbService {
                    index,
                    backends: u16::from(used),
                    maglev,
                    pad: 0,
                },
            ));
        }
        dp.write_lb(&services, &backends, &ports)?;
        *locked(&self.remote_slots) = placed;
        Ok(())
    }

    /// The live Maglev table of service `n` for `members` (as `LbService::maglev`): the one in
    /// use while its members are unchanged, else a new one written into the other table, which
    /// the service's entry then names (one map update: no lookup sees half a table).
    fn maglev_table(
        &self,
        dp: &mut Dataplane,
        n: usize,
        members: Vec<maglev::Member>,
    ) -> Result<u8, LoaderError> {
        let mut tables = locked(&self.maglev);
        if let Some((live, built)) = tables.get(&n)
            && *built == members
        {
            return Ok(1 + live);
        }
        let next = tables.get(&n).map_or(0, |(live, _)| 1 - live);
        let entries = maglev::table(&members);
        let service = u32::try_from(n).unwrap_or(u32::MAX);
        dp.write_maglev(service * 2 + u32::from(next), &entries)?;
        tables.insert(n, (next, members));
        Ok(1 + next)
    }

    /// Takes the kernel's word for instances it took out (`sock_release` saw their listener go):
    /// a backend the agent holds ready whose weight the kernel set to 0 is not ready until its
    /// next probe succeeds.
    pub(crate) fn reconcile(&self, config: &Config, weights: &[u16]) {
        // One lock at a time: the draining set first, then the health.
        let draining: Vec<InstanceRef> = locked(&self.extra)
            .iter()
            .filter(|(_, e)| e.draining)
            .map(|(i, _)| *i)
            .collect();
        let mut health = locked(&self.health);
        for ((n, i), h) in health.iter_mut() {
            if !h.ready || draining.contains(i) || config.services.get(*n).is_none() {
                continue;
            }
            let slot = u32::try_from(*n).unwrap_or(u32::MAX) * LB_BACKENDS_PER_SERVICE
                + u32::from(i.index);
            if weights.get(slot as usize) == Some(&0) {
                *h = Health::default();
            }
        }
    }

    /// `quadrant instances`.
    #[must_use]
    pub fn report(&self, config: &Config, dp: &Dataplane) -> InstancesReport {
        let active = dp.lb_active().unwrap_or_default();
        let instances = self
            .all()
            .into_iter()
            .map(|i| {
                let cap = config.capacity(i.quadrant);
                let mut services = BTreeMap::new();
                let mut connections = 0;
                for (n, s) in config.services.iter().enumerate() {
                    if s.quadrant() != i.quadrant {
                        continue;
                    }
                    services.insert(s.name.clone(), self.ready(n, i));
                    let slot = u32::try_from(n).unwrap_or(u32::MAX) * LB_BACKENDS_PER_SERVICE
                        + u32::from(i.index);
                    connections += active.get(slot as usize).copied().unwrap_or(0);
                }
                InstanceStatus {
                    quadrant: i.quadrant.name().to_owned(),
                    index: i.index,
                    address: config.instance_addr(i).to_string(),
                    netns: config.instance_netns(i),
                    host_interface: config.instance_iface(i),
                    cgroup: config.instance_cgroup_dir(i).display().to_string(),
                    cpu: cap.cpu,
                    memory_bytes: cap.memory_bytes,
                    weight: cap.weight(),
                    draining: self.draining(i),
                    services,
                    connections,
                }
            })
            .collect();
        let remote = locked(&self.remote_slots)
            .iter()
            .map(|(r, slot)| RemoteInstanceStatus {
                service: config
                    .services
                    .get(r.service)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                node: r.node.clone(),
                source: r.source.to_owned(),
                address: r.addr.to_string(),
                port: r.port,
                weight: r.weight,
                connections: slot
                    .and_then(|s| active.get(s as usize).copied())
                    .unwrap_or(0),
                balanced: slot.is_some(),
            })
            .collect();
        InstancesReport {
            instances,
            peers: Vec::new(),
            remote,
            endpoints_refused: Vec::new(),
            kubernetes_error: None,
        }
    }
}

/// Creates instance `i` and attaches the programs; removes what it created if that fails.
fn add(
    config: &Config,
    dataplane: &mut Dataplane,
    i: InstanceRef,
) -> Result<(QuadrantHandle, Vec<AttachedProgram>), Box<dyn std::error::Error + Send + Sync>> {
    let made = quadrants::create_instance(config, i).and_then(|h| {
        crate::workloads::apply_capacity(
            &config.instance_cgroup_dir(i),
            &config.instance,
            &i.name(),
            &config.capacity(i.quadrant),
        )
        .map_err(|e| SysError::Io {
            what: "cannot set the capacity of",
            path: config.instance_cgroup_dir(i),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(h)
    });
    let handle = match made {
        Ok(h) => h,
        Err(e) => {
            let _ = quadrants::remove_instance(config, i);
            return Err(Box::new(e));
        }
    };
    match dataplane.attach(config, &handle) {
        Ok(programs) => Ok((handle, programs)),
        Err(e) => {
            let _ = quadrants::remove_instance(config, i);
            Err(Box::new(e))
        }
    }
}

/// Every added instance quadrant `q` may run (teardown looks for each).
pub fn possible(q: Quadrant) -> impl Iterator<Item = InstanceRef> {
    (1..MAX_INSTANCES).map(move |k| InstanceRef::new(q, k))
}

/// `quadrant instances` as a table.
#[must_use]
pub fn render(report: &InstancesReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "INSTANCE  ADDRESS          CPU    MEMORY      WEIGHT  STATE     CONNS  SERVICES\n",
    );
    for i in &report.instances {
        let name = InstanceRef::new(
            Quadrant::from_name(&i.quadrant).unwrap_or(Quadrant::Px),
            i.index,
        )
        .name();
        let services: Vec<String> = i
            .services
            .iter()
            .map(|(s, ready)| format!("{s}:{}", if *ready { "ready" } else { "not-ready" }))
            .collect();
        let _ = writeln!(
            out,
            "{name:<9} {:<16} {:<6} {:<11} {:<7} {:<9} {:<6} {}",
            i.address,
            i.cpu.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            i.memory_bytes
                .map_or_else(|| "-".to_owned(), |m| format!("{} MiB", m >> 20)),
            i.weight,
            if i.draining { "draining" } else { "up" },
            i.connections,
            if services.is_empty() {
                "-".to_owned()
            } else {
                services.join(" ")
            },
        );
    }
    if !report.remote.is_empty() {
        out.push_str(
            "\nVIP BACKEND            SERVICE          SOURCE      NODE              WEIGHT  CONNS  \
             STATE\n",
        );
        for r in &report.remote {
            let _ = writeln!(
                out,
                "{:<22} {:<16} {:<11} {:<17} {:<7} {:<6} {}",
                format!("{}:{}", r.address, r.port),
                r.service,
                r.source,
                r.node,
                r.weight,
                r.connections,
                if r.balanced {
                    "balanced"
                } else {
                    "no slot left"
                },
            );
        }
    }
    if let Some(e) = &report.kubernetes_error {
        let _ = writeln!(out, "\nKubernetes API: {e}");
    }
    for r in &report.endpoints_refused {
        let _ = writeln!(out, "Kubernetes endpoint not balanced to: {r}");
    }
    if !report.peers.is_empty() {
        out.push_str(
            "\nPEER NODE         SOURCE       ADDRESS                LINK     LANES  PODS  PREFIXES\n",
        );
        for p in &report.peers {
            let prefixes: Vec<String> =
                p.prefixes.iter().map(|(q, n)| format!("{q}={n}")).collect();
            let _ = writeln!(
                out,
                "{:<17} {:<12} {:<22} {:<8} {:<6} {:<5} {}{}{}",
                p.name,
                p.source,
                p.address,
                p.state(),
                p.lanes_opened,
                p.pods,
                if prefixes.is_empty() {
                    "-".to_owned()
                } else {
                    prefixes.join(" ")
                },
                p.error
                    .as_ref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default(),
                if p.pods_refused.is_empty() {
                    String::new()
                } else {
                    format!("  (pods not judged: {})", p.pods_refused.join(", "))
                },
            );
        }
    }
    out
}

/// Routes each service's VIP to the host-side veth of its quadrant's first instance, where tc
/// translates the connections of the host and of the world forwarded by it (the quadrants'
/// processes are translated at the socket and never route to a VIP). The route goes with the
/// veth at `down`.
fn route_vips(config: &Config) -> Result<(), SysError> {
    let filtering =
        fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").is_ok_and(|v| v.trim() != "0");
    if filtering && !config.services.is_empty() {
        tracing::warn!(
            "net.ipv4.conf.all.rp_filter is on: the host drops the answers of outside \
             connections to a service VIP that reach instances other than the first (their veths \
             have no host address); set it to 0 to balance those over every instance"
        );
    }
    for s in &config.services {
        let first = InstanceRef::new(s.quadrant(), 0);
        crate::sys::ip(&[
            "route",
            "replace",
            &format!("{}/32", s.vip),
            "via",
            &config.instance_addr(first).to_string(),
            "dev",
            &config.instance_iface(first),
        ])?;
    }
    Ok(())
}
