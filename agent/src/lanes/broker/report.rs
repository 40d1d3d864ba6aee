//! `quadrant lanes`: what the broker reports (open lanes, services, usage against limits,
//! refusals by reason) and its text form.

use std::{
    path::PathBuf,
    sync::{PoisonError, atomic::Ordering},
};

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Broker;
use crate::lanes::{Transport, control::Refusal, ring::Stat};

/// One open lane, as `quadrant lanes` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct LaneInfo {
    /// Lane id.
    pub lane: u64,
    /// Transport.
    pub transport: Transport,
    /// The service.
    pub service: String,
    /// The service's quadrant.
    pub quadrant: String,
    /// The opener's SPIFFE ID.
    pub client: String,
    /// The service's SPIFFE ID.
    pub server: String,
    /// Payload bytes client → server.
    pub bytes_to_server: u64,
    /// Payload bytes server → client.
    pub bytes_to_client: u64,
    /// Messages both ways.
    pub messages: u64,
    /// Smoothed round-trip time of the client's requests, in nanoseconds (0: none measured).
    pub rtt_ns: u64,
    /// Shared memory the lane holds.
    pub shm_bytes: u64,
    /// Seconds since it opened.
    pub age_secs: u64,
    /// A lane the client library opened to copy requests to the service's shadow generation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror: bool,
    /// Which instance of the service's quadrant serves it (0: the quadrant's first; on the
    /// opener's node, `16·(p + 1) + k` is instance k of the p-th peer node).
    #[serde(default)]
    pub instance: u8,
    /// A lane between nodes: on the opener's node, the node whose instance serves it; on the
    /// service's node, the node whose workload opened it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A service being offered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct ServiceInfo {
    /// Its quadrant.
    pub quadrant: String,
    /// Its name.
    pub service: String,
    /// The listener's SPIFFE ID.
    pub spiffe_id: String,
    /// Its TCP port, if it takes TCP lanes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// Offered by the workload's shadow generation: the share of requests mirrored to it,
    /// parts per million.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_fraction_ppm: Option<u32>,
    /// The instance of the quadrant whose listener offers it (a service offered by several
    /// instances is listed once per instance).
    #[serde(default)]
    pub instance: u8,
    /// The listener left the broker's last pings unanswered: new lanes pass it over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hung: bool,
}

/// A quadrant's lane usage against its limits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct QuadrantLanes {
    /// The quadrant.
    pub quadrant: String,
    /// Lanes its workloads have open.
    pub lanes: u32,
    /// Their limit.
    pub max_lanes: u32,
    /// Shared memory they hold.
    pub shm_bytes: u64,
    /// Its limit.
    pub max_shm_bytes: u64,
}

/// How often opens were refused, by the opener's quadrant and reason.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Refusals {
    /// The opener's quadrant (`none` for unattested callers).
    pub quadrant: String,
    /// Why (the registry of lane refusals).
    pub reason: Refusal,
    /// How many.
    pub count: u64,
}

/// What `quadrant lanes` prints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct LanesReport {
    /// The broker's socket.
    pub socket: PathBuf,
    /// Where the lane rules come from, or why every lane is refused.
    pub policy: String,
    /// The digest of the policy bundle the lane rules come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
    /// Open lanes.
    pub lanes: Vec<LaneInfo>,
    /// Services offered.
    pub services: Vec<ServiceInfo>,
    /// Usage per quadrant.
    pub quadrants: Vec<QuadrantLanes>,
    /// Refused opens.
    pub refusals: Vec<Refusals>,
    /// Kernel TCP acceleration counters, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_acceleration: Option<Acceleration>,
    /// With `tcp_acceleration: auto`: what the start-up measurement found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_acceleration_probe: Option<crate::lanes::accel_probe::ProbeFigures>,
    /// With `tcp_acceleration: auto`: why there is no measurement (the acceleration is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_acceleration_probe_error: Option<String>,
}

/// What the `sock_ops`/`sk_msg` acceleration did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Acceleration {
    /// Established sockets recorded.
    pub sockets: u64,
    /// Messages handed straight to a local peer socket.
    pub redirected: u64,
    /// Messages that took the normal path.
    pub passed: u64,
    /// Messages of redirected connections refused because a policy reload revoked the flow
    /// that opened the connection.
    pub refused: u64,
}

impl Broker {
    /// The report `quadrant lanes` prints.
    #[must_use]
    pub fn report(&self) -> LanesReport {
        let (policy, policy_digest) = {
            let r = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
            let line = match &r.live {
                Ok(rules) => format!("{} lane rules from {}", rules.len(), r.origin),
                Err(e) => format!("every lane refused: {e}"),
            };
            (line, r.digest.clone())
        };
        let state = self.state();
        let lanes = state
            .lanes
            .values()
            .map(|l| {
                let s = |side, stat| l.region.stat(side, stat).load(Ordering::Relaxed);
                let mut info = l.info.clone();
                info.bytes_to_server = s(0, Stat::BytesSent);
                info.bytes_to_client = s(1, Stat::BytesSent);
                info.messages = s(0, Stat::MessagesSent) + s(1, Stat::MessagesSent);
                info.rtt_ns = s(0, Stat::RttEwmaNs);
                info.age_secs = l.opened.elapsed().as_secs();
                info
            })
            .collect();
        let info = |(q, name): &(Quadrant, String), s: &super::Service, shadow| ServiceInfo {
            quadrant: q.name().to_owned(),
            service: name.clone(),
            spiffe_id: s.spiffe_id.clone(),
            tcp_port: s.tcp_port,
            shadow_fraction_ppm: shadow,
            instance: s.instance,
            hung: state.hung(s.conn.id),
        };
        let services = state
            .services
            .iter()
            .map(|(k, s)| info(k, s, None))
            .chain(
                state
                    .replicas
                    .iter()
                    .flat_map(|(k, r)| r.iter().map(move |s| (k, s)))
                    .map(|(k, s)| info(k, s, None)),
            )
            .chain(
                state
                    .shadows
                    .iter()
                    .map(|(k, s)| info(k, &s.service, Some(s.fraction_ppm))),
            )
            .collect();
        let quadrants = Quadrant::ALL
            .iter()
            .map(|&q| {
                let (lanes, shm_bytes) = state.usage(q);
                let limits = self.config.lanes.limits_of(q);
                QuadrantLanes {
                    quadrant: q.name().to_owned(),
                    lanes,
                    max_lanes: limits.max_lanes,
                    shm_bytes,
                    max_shm_bytes: limits.max_shm_bytes,
                }
            })
            .collect();
        let refusals = state
            .refusals
            .iter()
            .map(|((quadrant, reason), count)| Refusals {
                quadrant: quadrant.clone(),
                reason: *reason,
                count: *count,
            })
            .collect();
        LanesReport {
            policy_digest,
            socket: self.config.lane_socket(),
            policy,
            lanes,
            services,
            quadrants,
            refusals,
            tcp_acceleration: None,
            tcp_acceleration_probe: None,
            tcp_acceleration_probe_error: None,
        }
    }
}

/// The text form of `quadrant lanes`.
#[must_use]
pub fn render(r: &LanesReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "lane broker {} ({})", r.socket.display(), r.policy);
    let _ = writeln!(out, "\nservices:");
    if r.services.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for s in &r.services {
        let tcp = s.tcp_port.map(|p| format!(", tcp {p}")).unwrap_or_default();
        let shadow = s
            .shadow_fraction_ppm
            .map(|f| format!(", shadow generation ({:.1} % mirrored)", f64::from(f) / 1e4))
            .unwrap_or_default();
        let instance = if s.instance > 0 {
            format!(" (instance {})", s.instance)
        } else {
            String::new()
        };
        let hung = if s.hung {
            ", HUNG (misses the broker's pings)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {}/{}{instance}  {}{tcp}{shadow}{hung}",
            s.quadrant, s.service, s.spiffe_id
        );
    }
    let _ = writeln!(out, "\nlanes:");
    if r.lanes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for l in &r.lanes {
        lane_line(&mut out, l);
    }
    let _ = writeln!(out, "\nusage (lanes opened by each quadrant):");
    for q in &r.quadrants {
        let _ = writeln!(
            out,
            "  {}: {}/{} lanes, {}/{} bytes of lane memory",
            q.quadrant, q.lanes, q.max_lanes, q.shm_bytes, q.max_shm_bytes
        );
    }
    if let Some(p) = &r.tcp_acceleration_probe {
        let _ = writeln!(
            out,
            "\ntcp acceleration probe ({} round trips of {} bytes each way): sk_msg p50 {} ns p99 {} ns, stack p50 {} ns p99 {} ns: {}",
            p.rounds,
            p.bytes,
            p.redirected_p50_ns,
            p.redirected_p99_ns,
            p.stack_p50_ns,
            p.stack_p99_ns,
            if p.on {
                "on"
            } else {
                "off (needs p50 <= 0.9x and p99 <= 1.0x the stack's)"
            }
        );
    }
    if let Some(e) = &r.tcp_acceleration_probe_error {
        let _ = writeln!(out, "\ntcp acceleration off: the probe failed: {e}");
    }
    if let Some(a) = &r.tcp_acceleration {
        let _ = writeln!(
            out,
            "\ntcp acceleration (sk_msg): {} sockets, {} messages redirected, {} passed, {} refused (flow revoked)",
            a.sockets, a.redirected, a.passed, a.refused
        );
    }
    if !r.refusals.is_empty() {
        let _ = writeln!(out, "\nrefused opens:");
        for f in &r.refusals {
            let _ = writeln!(out, "  {} {}: {}", f.quadrant, f.reason.name(), f.count);
        }
    }
    out
}

fn lane_line(out: &mut String, l: &LaneInfo) {
    use std::fmt::Write as _;
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let rtt = if l.rtt_ns == 0 {
        "-".to_owned()
    } else {
        format!("{:.1} us", l.rtt_ns as f64 / 1000.0)
    };
    let _ = writeln!(
        out,
        "  #{} {:<3} {} -> {}/{}{}{} ({})  sent {} B / received {} B, {} messages, rtt {rtt}, {} s",
        l.lane,
        l.transport.name(),
        l.client,
        l.quadrant,
        l.service,
        if l.mirror { " (mirror to shadow)" } else { "" },
        l.node
            .as_ref()
            .map(|n| format!(" [between nodes: {n}]"))
            .unwrap_or_default(),
        l.server,
        l.bytes_to_server,
        l.bytes_to_client,
        l.messages,
        l.age_secs
    );
}
