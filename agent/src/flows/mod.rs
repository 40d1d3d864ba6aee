//! Flow events, agent side: the records the kernel programs write to `TRACE` (drops, flows tc
//! starts tracking, FINs and RSTs of tracked flows, and what `quadrant trace` asks for) become
//! [`FlowLine`]s in Hubble's shape — `{"flow": {...}, "node_name", "time"}` with Hubble's flow
//! field names where they fit — kept in a bounded buffer for `quadrant observe` and handed to
//! its followers as they come. The trace's log lines come from the same records.

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
};

use dataplane_common::{
    Hook, Identity, Quadrant, Reason, Verdict,
    maps::{
        EVENT_FLOW_CLOSE, EVENT_FLOW_OPEN, TRACE_ALL, TRACE_DESTINATION, TRACE_DROPS, TRACE_PACKET,
        TraceRecord,
    },
    policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};
use ipnet::Ipv4Net;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::config::Config;

/// What kind of flow event a record is.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum EventKind {
    /// A packet dropped or an operation refused.
    Drop,
    /// A tc program started tracking a flow (its first allowed packet).
    FlowOpen,
    /// An allowed TCP segment with FIN or RST.
    FlowClose,
    /// Any other verdict (only while `quadrant trace all` asks for every verdict).
    Verdict,
}

impl EventKind {
    /// Every kind, in the order of [`Self::index`].
    pub const ALL: [Self; 4] = [Self::Drop, Self::FlowOpen, Self::FlowClose, Self::Verdict];

    /// The name (as serialised).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::FlowOpen => "flow_open",
            Self::FlowClose => "flow_close",
            Self::Verdict => "verdict",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// A packet's direction relative to the quadrant whose hook saw it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Direction {
    /// Entering the quadrant (tc egress of its host-side veth).
    Ingress,
    /// Leaving it (XDP and tc ingress of its veth, and its sockets' hooks).
    Egress,
}

/// Forwarded or dropped, as Hubble says it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlowVerdict {
    /// Passed.
    Forwarded,
    /// Dropped or refused.
    Dropped,
}

/// Layer 3.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ip {
    /// Source address (absent for a socket operation: only its destination is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Destination address.
    pub destination: String,
    /// `IPv4`.
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

/// TCP flags that were set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one per TCP flag, as Hubble shows them"
)]
pub struct TcpFlags {
    /// FIN.
    #[serde(rename = "FIN", default, skip_serializing_if = "std::ops::Not::not")]
    pub fin: bool,
    /// SYN.
    #[serde(rename = "SYN", default, skip_serializing_if = "std::ops::Not::not")]
    pub syn: bool,
    /// RST.
    #[serde(rename = "RST", default, skip_serializing_if = "std::ops::Not::not")]
    pub rst: bool,
    /// PSH.
    #[serde(rename = "PSH", default, skip_serializing_if = "std::ops::Not::not")]
    pub psh: bool,
    /// ACK.
    #[serde(rename = "ACK", default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
}

/// Ports of TCP and UDP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Ports {
    /// Source port (absent for a socket operation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    /// Destination port.
    pub destination_port: u16,
    /// TCP flags (TCP packets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
}

/// Layer 4.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum L4 {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp(Ports),
    /// UDP.
    #[serde(rename = "UDP")]
    Udp(Ports),
    /// ICMP.
    #[serde(rename = "ICMPv4")]
    Icmp {
        /// ICMP type (absent for a socket operation).
        #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
        icmp_type: Option<u8>,
    },
}

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Endpoint {
    /// The identity number the kernel uses (0–3 the quadrants, 4 host, 5 world).
    pub identity: u8,
    /// `quadrant:<q>`, `reserved:host` or `reserved:world`.
    pub labels: Vec<String>,
    /// A Kubernetes pod's namespace (pods attached by `quadrant-cni`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

/// A flow event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Flow {
    /// When the agent read it (RFC 3339, UTC).
    pub time: String,
    /// `FORWARDED` or `DROPPED`.
    pub verdict: FlowVerdict,
    /// Why it was dropped (the verdict reason registry), for drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    /// The verdict's reason (the registry's name; `quadrant status` counts them).
    pub reason: String,
    /// What kind of event.
    pub event: EventKind,
    /// Addresses (absent when nothing was parsed).
    #[serde(rename = "IP", default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ip>,
    /// Ports and flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<L4>,
    /// Where it came from (absent for a socket operation: the calling quadrant, `quadrant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Endpoint>,
    /// Where it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Endpoint>,
    /// `L3_L4`.
    #[serde(rename = "Type")]
    pub flow_type: String,
    /// The agent's instance.
    pub node_name: String,
    /// Relative to `quadrant`.
    pub traffic_direction: Direction,
    /// The quadrant whose hook decided (`unattributed` when none).
    pub quadrant: String,
    /// The hook that decided (`xdp`, `tc_ingress`, `tc_egress`, `connect4`, …).
    pub hook: String,
    /// One line, as the agent's trace log writes it.
    #[serde(rename = "Summary")]
    pub summary: String,
}

/// What `quadrant observe --output json` prints per flow, as `hubble observe -o json` does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FlowLine {
    /// The flow.
    pub flow: Flow,
    /// The agent's instance.
    pub node_name: String,
    /// As `flow.time`.
    pub time: String,
}

/// Which flows `quadrant observe` shows (every given condition must hold).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowFilter {
    /// The quadrant that decided, or either end's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quadrant: Option<String>,
    /// Forwarded or dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
    /// The verdict's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Relative to the deciding quadrant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// The kind of event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventKind>,
    /// A pod at either end: `<namespace>/<name>`, or a name in any namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl FlowFilter {
    /// Checks the names it holds.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(q) = &self.quadrant
            && Quadrant::from_name(q).is_none()
        {
            return Err(format!("unknown quadrant {q:?}: dx, dg, px or pg"));
        }
        if let Some(r) = &self.reason
            && !Reason::ALL.iter().any(|x| x.name() == r)
        {
            return Err(format!(
                "unknown reason {r:?}; `quadrant status` lists the reasons counted so far"
            ));
        }
        Ok(())
    }

    /// Whether `f` passes.
    #[must_use]
    pub fn matches(&self, f: &Flow) -> bool {
        let label = |q: &str| format!("quadrant:{q}");
        let names_quadrant = |q: &str| {
            f.quadrant == q
                || [&f.source, &f.destination]
                    .into_iter()
                    .flatten()
                    .any(|e| e.labels.contains(&label(q)))
        };
        let names_pod = |p: &str| {
            [&f.source, &f.destination].into_iter().flatten().any(|e| {
                let (Some(ns), Some(name)) = (&e.namespace, &e.pod_name) else {
                    return false;
                };
                p.split_once('/')
                    .map_or(p == name, |(pn, pname)| pn == ns && pname == name)
            })
        };
        self.quadrant.as_deref().is_none_or(names_quadrant)
            && self.pod.as_deref().is_none_or(names_pod)
            && self.verdict.is_none_or(|v| v == f.verdict)
            && self.reason.as_deref().is_none_or(|r| r == f.reason)
            && self.direction.is_none_or(|d| d == f.traffic_direction)
            && self.event.is_none_or(|e| e == f.event)
    }
}

/// Kept flow events and their followers.
#[derive(Debug)]
pub struct FlowLog {
    node: String,
    prefixes: Vec<(Ipv4Net, Identity)>,
    /// The addresses of the pods attached (CNI chaining): their quadrants, and their
    /// `<namespace>/<name>` if the runtime gave it.
    pods: std::sync::RwLock<Vec<(Ipv4Addr, Identity, Option<String>)>>,
    capacity: usize,
    kept: Mutex<VecDeque<Arc<FlowLine>>>,
    tx: broadcast::Sender<Arc<FlowLine>>,
    /// The trace mode (`CONFIG.trace`): which records also go to the log.
    trace: AtomicU16,
    /// Events read, by [`EventKind::index`].
    read: [AtomicU64; 4],
}

/// Followers that fall this far behind lose the oldest events (and are told how many).
const FOLLOW_BACKLOG: usize = 4_096;

impl FlowLog {
    /// An empty log for the agent of `config`.
    #[must_use]
    pub fn new(config: &Config) -> Self {
        let mut prefixes = crate::loader::prefix_entries(config);
        // Longest prefix first: the first match is the identity.
        prefixes.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self {
            node: config.instance.clone(),
            prefixes,
            pods: std::sync::RwLock::default(),
            capacity: config.observe.buffer as usize,
            kept: Mutex::new(VecDeque::new()),
            tx: broadcast::channel(FOLLOW_BACKLOG).0,
            trace: AtomicU16::new(dataplane_common::maps::TRACE_OFF),
            read: Default::default(),
        }
    }

    /// Follows the trace mode the agent set.
    pub fn set_trace(&self, mode: u16) {
        self.trace.store(mode, Ordering::Relaxed);
    }

    /// Events read so far, by kind.
    #[must_use]
    pub fn read_counts(&self) -> [(EventKind, u64); 4] {
        EventKind::ALL.map(|k| (k, self.read[k.index()].load(Ordering::Relaxed)))
    }

    /// Names the attached pods' addresses as their quadrants' (the kernel's `PREFIXES` has
    /// them as /32 entries).
    pub fn set_pods(&self, pods: &[crate::pods::PodStatus]) {
        let addrs = pods
            .iter()
            .filter_map(|p| {
                let q = Quadrant::from_name(&p.spec.quadrant)?;
                let name = p.spec.pod.clone();
                Some(
                    p.spec
                        .addresses
                        .iter()
                        .map(move |a| (a.addr(), Identity::from(q), name.clone())),
                )
            })
            .flatten()
            .collect();
        *self.pods.write().unwrap_or_else(PoisonError::into_inner) = addrs;
    }

    /// The identity of `addr`, and the pod it is, if one.
    fn identity(&self, addr: Ipv4Addr) -> (Identity, Option<String>) {
        let pods = self.pods.read().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, id, pod)) = pods.iter().find(|(a, ..)| *a == addr) {
            return (*id, pod.clone());
        }
        let id = self
            .prefixes
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map_or(Identity::World, |(_, id)| *id);
        (id, None)
    }

    fn endpoint(&self, addr: Ipv4Addr) -> Endpoint {
        let (id, pod) = self.identity(addr);
        let (namespace, pod_name) = match pod.as_deref().and_then(|p| p.split_once('/')) {
            Some((ns, name)) => (Some(ns.to_owned()), Some(name.to_owned())),
            None => (None, None),
        };
        let label = match Quadrant::from_id(id as u8) {
            Some(q) => format!("quadrant:{}", q.name()),
            None => format!("reserved:{}", id.name()),
        };
        Endpoint {
            identity: id as u8,
            labels: vec![label],
            namespace,
            pod_name,
        }
    }

    /// The flow of one record, read at `time`.
    #[must_use]
    pub fn flow(&self, r: &TraceRecord, time: &str) -> Flow {
        let reason = Reason::from_id(u32::from(r.reason));
        let dropped = matches!(reason.map(Reason::verdict), Some(Verdict::Drop));
        let reason_name = reason.map_or("unknown", Reason::name).to_owned();
        let event = match r.event {
            _ if dropped => EventKind::Drop,
            EVENT_FLOW_OPEN => EventKind::FlowOpen,
            EVENT_FLOW_CLOSE => EventKind::FlowClose,
            _ => EventKind::Verdict,
        };
        let hook = Hook::from_id(u32::from(r.hook));
        let ip = |a: u32| Ipv4Addr::from(u32::from_be(a));
        let (src, dst) = match r.kind {
            TRACE_PACKET => (Some(ip(r.saddr)), Some(ip(r.daddr))),
            TRACE_DESTINATION => (None, Some(ip(r.daddr))),
            _ => (None, None),
        };
        let packet = r.kind == TRACE_PACKET;
        let ports = || Ports {
            source_port: packet.then(|| u16::from_be(r.sport)),
            destination_port: u16::from_be(r.dport),
            flags: (packet && r.proto == PROTO_TCP).then(|| tcp_flags(r.l4_flags)),
        };
        let l4 = dst.and(match r.proto {
            PROTO_TCP => Some(L4::Tcp(ports())),
            PROTO_UDP => Some(L4::Udp(ports())),
            PROTO_ICMP => Some(L4::Icmp {
                icmp_type: packet.then_some(r.l4_flags),
            }),
            _ => None,
        });
        Flow {
            time: time.to_owned(),
            verdict: if dropped {
                FlowVerdict::Dropped
            } else {
                FlowVerdict::Forwarded
            },
            drop_reason_desc: dropped.then(|| reason_name.clone()),
            reason: reason_name,
            event,
            ip: dst.map(|d| Ip {
                source: src.map(|s| s.to_string()),
                destination: d.to_string(),
                ip_version: "IPv4".into(),
            }),
            l4,
            source: src.map(|s| self.endpoint(s)),
            destination: dst.map(|d| self.endpoint(d)),
            flow_type: "L3_L4".into(),
            node_name: self.node.clone(),
            traffic_direction: if matches!(hook, Some(Hook::TcEgress)) {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            quadrant: Quadrant::from_id(r.slot)
                .map_or("unattributed", Quadrant::name)
                .to_owned(),
            hook: hook.map_or("unknown", Hook::name).to_owned(),
            summary: crate::trace::render(r),
        }
    }

    /// Takes a batch of records read at `time`: each is kept (the oldest beyond the buffer
    /// go) and sent to the followers; those the trace mode asks for are logged.
    pub fn take(&self, records: &[TraceRecord], time: &str) {
        let mode = self.trace.load(Ordering::Relaxed);
        let mut lines = Vec::with_capacity(records.len());
        for r in records {
            let flow = self.flow(r, time);
            self.read[flow.event.index()].fetch_add(1, Ordering::Relaxed);
            let logged =
                mode == TRACE_ALL || (mode == TRACE_DROPS && flow.event == EventKind::Drop);
            if logged {
                tracing::info!(target: "quadrant::trace", "{}", flow.summary);
            }
            lines.push(Arc::new(FlowLine {
                node_name: self.node.clone(),
                time: flow.time.clone(),
                flow,
            }));
        }
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        for line in lines {
            if kept.len() == self.capacity {
                kept.pop_front();
            }
            kept.push_back(Arc::clone(&line));
            // No follower: nothing to do.
            let _ = self.tx.send(line);
        }
    }

    /// The last `n` kept flows `filter` passes (oldest first) and, atomically with them, a
    /// receiver of every later one.
    #[must_use]
    pub fn snapshot(
        &self,
        filter: &FlowFilter,
        n: usize,
    ) -> (Vec<Arc<FlowLine>>, broadcast::Receiver<Arc<FlowLine>>) {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = self.tx.subscribe();
        let mut out: Vec<Arc<FlowLine>> = kept
            .iter()
            .rev()
            .filter(|l| filter.matches(&l.flow))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        (out, rx)
    }
}

fn tcp_flags(b: u8) -> TcpFlags {
    TcpFlags {
        fin: b & 0x01 != 0,
        syn: b & 0x02 != 0,
        rst: b & 0x04 != 0,
        psh: b & 0x08 != 0,
        ack: b & 0x10 != 0,
    }
}

/// Now, as RFC 3339 UTC with nanoseconds.
#[must_use]
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Drains the ring buffer into `log` until `stop` fires.
pub async fn follow(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    log: Arc<FlowLog>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let what = "the flow event ring buffer: no flow events and no trace";
    crate::ringbuf::drain(ring, stop, what, move |batch: Vec<TraceRecord>| {
        log.take(&batch, &now_rfc3339());
        std::future::ready(())
    })
    .await;
}

/// The published schema of a flow line.
#[must_use]
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(FlowLine)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
