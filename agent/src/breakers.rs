//! Circuit breakers, agent side: `quadrant breakers` (each breaker the kernel keeps, with its
//! caller's and destination's identities) and the transitions the programs report, which become
//! events (`breaker_changed`) and audit records (kind `breaker`).

use std::{fmt::Write as _, net::Ipv4Addr, sync::Arc};

use aya::maps::{MapData, RingBuf};
use dataplane_common::{
    Quadrant,
    breaker::{Breaker, BreakerEvent, BreakerKey, OPEN, cause_name, state_name},
    policy::{PROTO_TCP, PROTO_UDP},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    admission::Admission,
    config::{BreakersConfig, Config},
    events::{Event, EventBus},
};

/// The SPIFFE ID of quadrant `q` itself (the caller of its quadrant-wide breakers).
#[must_use]
pub fn quadrant_spiffe_id(trust_domain: &str, q: Quadrant) -> String {
    format!("spiffe://{trust_domain}/quadrant/{}", q.name())
}

/// The SPIFFE ID of a breaker's calling quadrant (empty if the id names none).
fn caller_id(config: &Config, caller: Option<Quadrant>) -> String {
    caller.map_or_else(String::new, |q| {
        quadrant_spiffe_id(&config.identity.trust_domain, q)
    })
}

/// Who owns `addr` (network byte order): a quadrant's SPIFFE ID, `host`, or `world`.
#[must_use]
pub fn identity_of(config: &Config, addr: u32) -> String {
    let ip = Ipv4Addr::from(u32::from_be(addr));
    for q in Quadrant::ALL {
        if config.addrs(q).prefix.contains(&ip) {
            return quadrant_spiffe_id(&config.identity.trust_domain, q);
        }
    }
    if config.host.addresses.iter().any(|n| n.contains(&ip)) {
        "host".into()
    } else {
        "world".into()
    }
}

/// `quadrant breakers`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct BreakersReport {
    /// The thresholds in force.
    pub limits: BreakerThresholds,
    /// The lane services' breakers the agent computes (those that ever opened).
    pub services: Vec<crate::lanes::broker::trip::ServiceBreakerRow>,
    /// Every breaker with an entry (a destination that failed, or that is counted).
    pub breakers: Vec<BreakerRow>,
}

/// The thresholds in force (`breakers` in the configuration).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct BreakerThresholds {
    /// Breakers at all.
    pub enabled: bool,
    /// Failed share of a service's calls in the window that opens its breaker (0: off).
    pub failure_ratio: f64,
    /// Slow-call threshold, ms (0: off).
    pub slow_call_ms: f64,
    /// Slow share that opens the breaker.
    pub slow_call_ratio: f64,
    /// Sliding window, ms.
    pub window_ms: u32,
    /// Calls before a ratio is judged.
    pub min_calls: u32,
    /// Consecutive failed connects that open a breaker (0: never).
    pub consecutive_failures: u32,
    /// Connections per caller quadrant and destination (0: no limit).
    pub max_connections: u32,
    /// First ejection, ms.
    pub base_ejection_ms: u32,
    /// Longest ejection, ms.
    pub max_ejection_ms: u32,
}

impl From<&BreakersConfig> for BreakerThresholds {
    fn from(c: &BreakersConfig) -> Self {
        Self {
            enabled: c.enabled,
            failure_ratio: c.failure_ratio,
            slow_call_ms: c.slow_call_ms,
            slow_call_ratio: c.slow_call_ratio,
            window_ms: c.window_ms,
            min_calls: c.min_calls,
            consecutive_failures: c.consecutive_failures,
            max_connections: c.max_connections,
            base_ejection_ms: c.base_ejection_ms,
            max_ejection_ms: c.max_ejection_ms,
        }
    }
}

/// One breaker.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
pub struct BreakerRow {
    /// The calling quadrant.
    pub caller: String,
    /// Its SPIFFE ID.
    pub caller_spiffe_id: String,
    /// `address:port`.
    pub destination: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Who owns the destination address: a quadrant's SPIFFE ID, `host` or `world`.
    pub destination_identity: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Consecutive failed connects.
    pub consecutive_failures: u32,
    /// The ejection in force (or last in force), ms.
    pub ejection_ms: u32,
    /// How long an open breaker still refuses, ms.
    pub retry_after_ms: Option<u64>,
    /// Times it opened.
    pub opened: u64,
    /// Connections and datagrams it refused.
    pub refused: u64,
    /// Connections counted open (with `max_connections`).
    pub active_connections: u32,
}

fn protocol_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        other => format!("proto {other}"),
    }
}

fn destination(key: BreakerKey) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(key.daddr)),
        u16::from_be(key.dport)
    )
}

/// The monotonic clock the programs read, in ns.
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// One map entry as a row, at monotonic time `now_ns`.
#[must_use]
pub fn row(config: &Config, key: &BreakerKey, b: &Breaker, now_ns: u64) -> BreakerRow {
    let caller = Quadrant::from_id(key.caller);
    BreakerRow {
        caller: caller.map_or("?", Quadrant::name).to_owned(),
        caller_spiffe_id: caller_id(config, caller),
        destination: destination(*key),
        protocol: protocol_name(key.proto),
        destination_identity: identity_of(config, key.daddr),
        state: state_name(b.state).to_owned(),
        consecutive_failures: b.failures,
        ejection_ms: b.ejection_ms,
        retry_after_ms: (b.state == OPEN && b.open_until_ns > now_ns)
            .then(|| (b.open_until_ns - now_ns).div_ceil(1_000_000)),
        opened: b.opened,
        refused: b.refused,
        active_connections: b.active,
    }
}

/// The report as text.
#[must_use]
pub fn render(report: &BreakersReport) -> String {
    let l = &report.limits;
    if !l.enabled {
        return "circuit breakers are off (breakers.enabled: false)\n".to_owned();
    }
    let mut out = format!(
        "thresholds: {} consecutive failures, max connections {}, ejection {} ms doubling to {} ms\n",
        l.consecutive_failures,
        if l.max_connections == 0 {
            "unlimited".to_owned()
        } else {
            l.max_connections.to_string()
        },
        l.base_ejection_ms,
        l.max_ejection_ms
    );
    for s in &report.services {
        let _ = writeln!(
            out,
            "service {}: {} ({} calls, {} failed, {} slow in the window; ejection {} ms{}; opened {} times{}{})",
            s.service,
            s.state,
            s.calls,
            s.failed,
            s.slow,
            s.ejection_ms,
            s.retry_after_ms
                .map_or_else(String::new, |ms| format!(", retry after {ms} ms")),
            s.opened,
            if s.rejection_probability > 0.0 {
                format!(
                    "; admission control refuses {:.1} %",
                    s.rejection_probability * 100.0
                )
            } else {
                String::new()
            },
            s.plan
                .as_ref()
                .map_or_else(String::new, |p| format!("; thresholds of {p}'s plan"))
        );
    }
    if report.breakers.is_empty() {
        out.push_str("no kernel breakers (no destination has failed yet)\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<6} {:<24} {:<5} {:<10} {:>8} {:>10} {:>12} {:>7} {:>8} {:>6}",
        "CALLER",
        "DESTINATION",
        "PROTO",
        "STATE",
        "FAILURES",
        "EJECTION",
        "RETRY AFTER",
        "OPENED",
        "REFUSED",
        "ACTIVE"
    );
    for r in &report.breakers {
        let _ = writeln!(
            out,
            "{:<6} {:<24} {:<5} {:<10} {:>8} {:>7} ms {:>12} {:>7} {:>8} {:>6}",
            r.caller,
            r.destination,
            r.protocol,
            r.state,
            r.consecutive_failures,
            r.ejection_ms,
            r.retry_after_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms")),
            r.opened,
            r.refused,
            r.active_connections
        );
    }
    out
}

/// A transition as the event the bus carries.
fn event_of(config: &Config, e: &BreakerEvent, seq: u64, at_ms: u64) -> Event {
    let caller = Quadrant::from_id(e.key.caller);
    Event::BreakerChanged {
        seq,
        at_ms,
        caller_spiffe_id: caller_id(config, caller),
        destination: destination(e.key),
        protocol: protocol_name(e.key.proto),
        destination_identity: identity_of(config, e.key.daddr),
        from: state_name(u32::from(e.from)).to_owned(),
        to: state_name(u32::from(e.to)).to_owned(),
        cause: cause_name(e.cause).to_owned(),
        consecutive_failures: e.failures,
        ejection_ms: e.ejection_ms,
    }
}

/// Reports one transition: log line, event, audit record.
fn report(config: &Config, events: &EventBus, admission: &Admission, e: &BreakerEvent) {
    let mut published = None;
    events.emit(|seq, at_ms| {
        let event = event_of(config, e, seq, at_ms);
        published = Some(event.clone());
        event
    });
    let Some(event) = published else { return };
    let mut value = serde_json::to_value(&event).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("seq");
        map.remove("at_ms");
        map.remove("event");
    }
    info!(
        target: "quadrant::breakers",
        "breaker {} -> {}: {} -> {} ({}, {} consecutive failures, ejection {} ms)",
        value["caller_spiffe_id"].as_str().unwrap_or_default(),
        value["destination"].as_str().unwrap_or_default(),
        state_name(u32::from(e.from)),
        state_name(u32::from(e.to)),
        cause_name(e.cause),
        e.failures,
        e.ejection_ms,
    );
    if let Err(err) = admission.record("breaker", value) {
        warn!(error = %err, "breaker transition not audited");
    }
}

/// Reports one transition of a service breaker the agent computes: log line, event (caller:
/// every quadrant, the trust domain's ID), audit record.
pub fn report_service(
    config: &Config,
    events: &EventBus,
    admission: &Admission,
    t: &crate::lanes::broker::trip::Transition,
) {
    let mut published = None;
    events.emit(|seq, at_ms| {
        let event = Event::BreakerChanged {
            seq,
            at_ms,
            caller_spiffe_id: format!("spiffe://{}", config.identity.trust_domain),
            destination: format!("{}/{}", t.quadrant.name(), t.service),
            protocol: "lane".into(),
            destination_identity: quadrant_spiffe_id(&config.identity.trust_domain, t.quadrant),
            from: t.from.name().into(),
            to: t.to.name().into(),
            cause: t.cause.into(),
            consecutive_failures: u32::try_from(t.window.failed).unwrap_or(u32::MAX),
            ejection_ms: t.ejection_ms,
        };
        published = Some(event.clone());
        event
    });
    info!(
        target: "quadrant::breakers",
        "service breaker {}/{}: {} -> {} ({}: {} calls, {} failed, {} slow in the window; ejection {} ms)",
        t.quadrant.name(),
        t.service,
        t.from.name(),
        t.to.name(),
        t.cause,
        t.window.calls,
        t.window.failed,
        t.window.slow,
        t.ejection_ms
    );
    let Some(event) = published else { return };
    let mut value = serde_json::to_value(&event).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("seq");
        map.remove("at_ms");
        map.remove("event");
        map.insert("calls".into(), t.window.calls.into());
        map.insert("slow".into(), t.window.slow.into());
    }
    if let Err(err) = admission.record("breaker", value) {
        warn!(error = %err, "breaker transition not audited");
    }
}

/// Drains the transitions until `stop` fires.
pub async fn follow(
    ring: RingBuf<MapData>,
    config: Config,
    events: Arc<EventBus>,
    admission: Arc<Admission>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let what = "the breaker ring buffer: transitions are not reported";
    crate::ringbuf::drain(ring, stop, what, |batch: Vec<BreakerEvent>| {
        let (config, events, admission) =
            (config.clone(), Arc::clone(&events), Arc::clone(&admission));
        async move {
            // The audit log is a file: written on a blocking thread.
            let _ = tokio::task::spawn_blocking(move || {
                for e in &batch {
                    report(&config, &events, &admission, e);
                }
            })
            .await;
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use dataplane_common::breaker::{CAUSE_FAILURES, CLOSED, HALF_OPEN};

    use super::*;

    fn key(caller: Quadrant, addr: [u8; 4], port: u16) -> BreakerKey {
        BreakerKey {
            daddr: u32::from_ne_bytes(addr),
            dport: port.to_be(),
            proto: PROTO_TCP,
            caller: caller as u8,
        }
    }

    #[test]
    fn rows_name_both_ends_and_the_time_left() {
        let config = Config::embedded();
        let dg = config.addrs(Quadrant::Dg).workload.octets();
        let b = Breaker {
            open_until_ns: 5_000_000_001,
            refused: 3,
            opened: 1,
            state: OPEN,
            failures: 5,
            ejection_ms: 1000,
            active: 0,
        };
        let r = row(&config, &key(Quadrant::Dx, dg, 7000), &b, 4_000_000_000);
        assert_eq!(r.caller, "dx");
        assert_eq!(r.caller_spiffe_id, "spiffe://quadrant.local/quadrant/dx");
        assert_eq!(r.destination, format!("{}:7000", Ipv4Addr::from(dg)));
        assert_eq!(
            r.destination_identity,
            "spiffe://quadrant.local/quadrant/dg"
        );
        assert_eq!((r.state.as_str(), r.retry_after_ms), ("open", Some(1001)));
        let past = row(
            &config,
            &key(Quadrant::Dx, [192, 0, 2, 1], 53),
            &b,
            6_000_000_000,
        );
        assert_eq!(
            (past.destination_identity.as_str(), past.retry_after_ms),
            ("world", None)
        );
        let half = Breaker {
            state: HALF_OPEN,
            ..b
        };
        assert_eq!(
            row(&config, &key(Quadrant::Px, dg, 1), &half, 0).state,
            "half_open"
        );
        let text = render(&BreakersReport {
            limits: (&config.breakers).into(),
            services: Vec::new(),
            breakers: vec![r],
        });
        assert!(text.contains("5 consecutive failures"), "{text}");
        assert!(text.contains("open"), "{text}");
    }

    #[test]
    fn transitions_become_events_that_match_their_schema() {
        let config = Config::embedded();
        let e = BreakerEvent {
            at_ns: 1,
            key: key(
                Quadrant::Dx,
                config.addrs(Quadrant::Dg).workload.octets(),
                7000,
            ),
            failures: 5,
            ejection_ms: 1000,
            from: u8::try_from(CLOSED).unwrap(),
            to: u8::try_from(OPEN).unwrap(),
            cause: CAUSE_FAILURES,
            pad: [0; 5],
        };
        let value = serde_json::to_value(event_of(&config, &e, 1, 2)).unwrap();
        assert!(crate::events::schema_errors(&value).is_empty(), "{value}");
        assert_eq!(value["cause"], "consecutive_failures");
        assert_eq!(
            (value["from"].as_str(), value["to"].as_str()),
            (Some("closed"), Some("open"))
        );
    }
}
