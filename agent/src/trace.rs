//! The verdict trace, agent side: `quadrant trace off|drops|all` sets `CONFIG.trace`; the
//! programs then write a [`TraceRecord`] per verdict asked for into the `TRACE` ring buffer,
//! which `crate::flows` drains with the flow events and logs, one line per traced verdict
//! (target `quadrant::trace`), e.g.
//! `tc_ingress dx drop deny_policy tcp 10.240.1.2:40512 -> 10.240.3.2:80`.

use std::net::Ipv4Addr;

use dataplane_common::{
    Hook, Quadrant, Reason, Verdict,
    maps::{TRACE_ALL, TRACE_DESTINATION, TRACE_DROPS, TRACE_OFF, TRACE_PACKET, TraceRecord},
    policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

/// What `quadrant trace` turns on.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum TraceMode {
    /// No records.
    Off,
    /// One record per dropped packet or refused operation.
    Drops,
    /// One record per verdict.
    All,
}

impl TraceMode {
    /// The `CONFIG.trace` value.
    #[must_use]
    pub const fn value(self) -> u16 {
        match self {
            Self::Off => TRACE_OFF,
            Self::Drops => TRACE_DROPS,
            Self::All => TRACE_ALL,
        }
    }

    /// The mode of a `CONFIG.trace` value (an unknown one reads as off).
    #[must_use]
    pub const fn of(value: u16) -> Self {
        match value {
            TRACE_DROPS => Self::Drops,
            TRACE_ALL => Self::All,
            _ => Self::Off,
        }
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        PROTO_ICMP => "icmp".into(),
        other => format!("proto {other}"),
    }
}

/// One record as a line.
#[must_use]
pub fn render(r: &TraceRecord) -> String {
    let hook = Hook::from_id(u32::from(r.hook)).map_or("?", Hook::name);
    let quadrant = Quadrant::from_id(r.slot).map_or("unattributed", Quadrant::name);
    let reason = Reason::from_id(u32::from(r.reason));
    let verdict = match reason.map(Reason::verdict) {
        Some(Verdict::Pass) => "pass",
        Some(Verdict::Drop) => "drop",
        None => "?",
    };
    let reason = reason.map_or("?", Reason::name);
    let ip = |a: u32| Ipv4Addr::from(u32::from_be(a));
    let head = format!("{hook} {quadrant} {verdict} {reason}");
    match r.kind {
        TRACE_PACKET => format!(
            "{head} {} {}:{} -> {}:{}",
            proto_name(r.proto),
            ip(r.saddr),
            u16::from_be(r.sport),
            ip(r.daddr),
            u16::from_be(r.dport)
        ),
        TRACE_DESTINATION => format!(
            "{head} {} -> {}:{}",
            proto_name(r.proto),
            ip(r.daddr),
            u16::from_be(r.dport)
        ),
        _ => head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, hook: Hook, slot: u8, reason: Reason, proto: u8) -> TraceRecord {
        TraceRecord {
            saddr: u32::from(Ipv4Addr::new(10, 240, 1, 2)).to_be(),
            daddr: u32::from(Ipv4Addr::new(10, 240, 3, 2)).to_be(),
            sport: 40512u16.to_be(),
            dport: 80u16.to_be(),
            hook: hook as u8,
            slot,
            reason: reason as u8,
            proto,
            kind,
            event: 0,
            l4_flags: 0,
            pad: 0,
        }
    }

    #[test]
    fn records_render_with_names() {
        assert_eq!(
            render(&record(
                TRACE_PACKET,
                Hook::TcIngress,
                0,
                Reason::DenyPolicy,
                PROTO_TCP
            )),
            "tc_ingress dx drop deny_policy tcp 10.240.1.2:40512 -> 10.240.3.2:80"
        );
        assert_eq!(
            render(&record(
                TRACE_DESTINATION,
                Hook::Connect4,
                2,
                Reason::AllowPolicy,
                PROTO_UDP
            )),
            "connect4 px pass allow_policy udp -> 10.240.3.2:80"
        );
        assert_eq!(
            render(&record(
                dataplane_common::maps::TRACE_NOTHING,
                Hook::SockCreate,
                4,
                Reason::DenyUnknownCgroup,
                0
            )),
            "sock_create unattributed drop deny_unknown_cgroup"
        );
        assert_eq!(crate::ringbuf::read::<TraceRecord>(&[0; 3]), None);
    }

    #[test]
    fn modes_round_trip() {
        for m in [TraceMode::Off, TraceMode::Drops, TraceMode::All] {
            assert_eq!(TraceMode::of(m.value()), m);
        }
    }
}
