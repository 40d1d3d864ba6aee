use std::net::Ipv4Addr;

use dataplane_common::{
    Hook, Reason,
    maps::{EVENT_FLOW_CLOSE, EVENT_FLOW_OPEN, EVENT_VERDICT, TRACE_DESTINATION, TRACE_PACKET},
    policy::{PROTO_TCP, PROTO_UDP},
};

use super::*;

fn log() -> FlowLog {
    let mut c = Config::embedded();
    c.observe.buffer = 3;
    FlowLog::new(&c)
}

fn be(a: [u8; 4]) -> u32 {
    u32::from(Ipv4Addr::from(a)).to_be()
}

fn record(hook: Hook, reason: Reason, event: u8, proto: u8, flags: u8) -> TraceRecord {
    TraceRecord {
        saddr: be([10, 240, 0, 2]),
        daddr: be([10, 240, 2, 2]),
        sport: 40512u16.to_be(),
        dport: 80u16.to_be(),
        hook: hook as u8,
        slot: 0,
        reason: reason as u8,
        proto,
        kind: TRACE_PACKET,
        event,
        l4_flags: flags,
        pad: 0,
    }
}

#[test]
fn a_drop_reads_as_hubble_writes_it() {
    let l = log();
    let f = l.flow(
        &record(
            Hook::TcIngress,
            Reason::DenyPolicy,
            EVENT_VERDICT,
            PROTO_TCP,
            0x02,
        ),
        "2026-12-07T00:00:00Z",
    );
    let json = serde_json::to_value(&f).expect("json");
    assert_eq!(json["verdict"], "DROPPED");
    assert_eq!(json["drop_reason_desc"], "deny_policy");
    assert_eq!(json["event"], "drop");
    assert_eq!(json["IP"]["source"], "10.240.0.2");
    assert_eq!(json["IP"]["destination"], "10.240.2.2");
    assert_eq!(json["IP"]["ipVersion"], "IPv4");
    assert_eq!(json["l4"]["TCP"]["source_port"], 40512);
    assert_eq!(json["l4"]["TCP"]["destination_port"], 80);
    assert_eq!(json["l4"]["TCP"]["flags"], serde_json::json!({"SYN": true}));
    assert_eq!(json["source"]["labels"][0], "quadrant:dx");
    assert_eq!(json["destination"]["labels"][0], "quadrant:px");
    assert_eq!(json["traffic_direction"], "EGRESS");
    assert_eq!(json["Type"], "L3_L4");
    assert_eq!(json["quadrant"], "dx");
    assert!(
        f.summary
            .starts_with("tc_ingress dx drop deny_policy tcp 10.240.0.2:40512 -> 10.240.2.2:80"),
        "{}",
        f.summary
    );
}

#[test]
fn opens_and_closes_are_named_and_a_drop_is_always_a_drop() {
    let l = log();
    let kind = |hook, reason, event| {
        l.flow(&record(hook, reason, event, PROTO_TCP, 0), "t")
            .event
    };
    assert_eq!(
        kind(Hook::TcEgress, Reason::AllowPolicy, EVENT_FLOW_OPEN),
        EventKind::FlowOpen
    );
    assert_eq!(
        kind(Hook::TcEgress, Reason::AllowEstablished, EVENT_FLOW_CLOSE),
        EventKind::FlowClose
    );
    assert_eq!(
        kind(Hook::TcIngress, Reason::AllowEstablished, EVENT_VERDICT),
        EventKind::Verdict
    );
    assert_eq!(
        kind(Hook::TcIngress, Reason::DropChaos, EVENT_VERDICT),
        EventKind::Drop
    );
    let f = l.flow(
        &record(
            Hook::TcEgress,
            Reason::AllowPolicy,
            EVENT_FLOW_OPEN,
            PROTO_UDP,
            0,
        ),
        "t",
    );
    assert_eq!(f.traffic_direction, Direction::Ingress);
    assert_eq!(f.drop_reason_desc, None);
    assert!(matches!(f.l4, Some(L4::Udp(Ports { flags: None, .. }))));
}

#[test]
fn a_socket_operation_has_only_its_destination() {
    let l = log();
    let mut r = record(
        Hook::Connect4,
        Reason::DenyPolicy,
        EVENT_VERDICT,
        PROTO_TCP,
        0,
    );
    r.kind = TRACE_DESTINATION;
    r.saddr = 0;
    r.sport = 0;
    let f = l.flow(&r, "t");
    assert_eq!(f.source, None);
    assert_eq!(f.ip.as_ref().and_then(|i| i.source.clone()), None);
    assert!(matches!(
        f.l4,
        Some(L4::Tcp(Ports {
            source_port: None,
            destination_port: 80,
            flags: None
        }))
    ));
}

#[test]
fn the_buffer_keeps_the_newest_and_filters_apply() {
    let l = log();
    let records = [
        record(
            Hook::TcIngress,
            Reason::DenyPolicy,
            EVENT_VERDICT,
            PROTO_TCP,
            0,
        ),
        record(
            Hook::TcEgress,
            Reason::AllowPolicy,
            EVENT_FLOW_OPEN,
            PROTO_TCP,
            2,
        ),
        record(Hook::Xdp, Reason::DenySpoofed, EVENT_VERDICT, PROTO_UDP, 0),
        record(
            Hook::TcIngress,
            Reason::DenyPolicy,
            EVENT_VERDICT,
            PROTO_UDP,
            0,
        ),
    ];
    l.take(&records, "t");
    let (all, _) = l.snapshot(&FlowFilter::default(), 10);
    assert_eq!(all.len(), 3, "the buffer holds 3");
    assert_eq!(
        all[0].flow.event,
        EventKind::FlowOpen,
        "the oldest went first"
    );
    let drops = FlowFilter {
        verdict: Some(FlowVerdict::Dropped),
        ..FlowFilter::default()
    };
    let (d, _) = l.snapshot(&drops, 10);
    assert_eq!(d.len(), 2);
    let (last, _) = l.snapshot(&drops, 1);
    assert_eq!(last[0].flow.reason, "deny_policy", "the newest of them");
    let spoofed = FlowFilter {
        reason: Some("deny_spoofed".into()),
        direction: Some(Direction::Egress),
        ..FlowFilter::default()
    };
    assert_eq!(l.snapshot(&spoofed, 10).0.len(), 1);
    let touching_px = FlowFilter {
        quadrant: Some("px".into()),
        ..FlowFilter::default()
    };
    assert_eq!(
        l.snapshot(&touching_px, 10).0.len(),
        3,
        "px is every flow's destination"
    );
    let nothing_of_pg = FlowFilter {
        quadrant: Some("pg".into()),
        ..FlowFilter::default()
    };
    assert!(l.snapshot(&nothing_of_pg, 10).0.is_empty());
    let counts = l.read_counts();
    assert_eq!(counts[0], (EventKind::Drop, 3));
    assert_eq!(counts[1], (EventKind::FlowOpen, 1));
}

#[test]
fn a_pods_address_names_the_pod_and_the_filter_finds_it() {
    let l = log();
    let pod = crate::pods::PodStatus {
        spec: crate::pods::PodSpec {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/p".into(),
            host_ifname: "veth1".into(),
            host_ifindex: 9,
            quadrant: "dg".into(),
            addresses: vec!["10.250.0.7/24".parse().unwrap()],
            pod: Some("shop/web-0".into()),
            cgroup: None,
        },
        programs: Vec::new(),
        cgroup_id: None,
    };
    l.set_pods(&[pod]);
    let mut r = record(
        Hook::TcIngress,
        Reason::DenyPolicy,
        EVENT_VERDICT,
        PROTO_TCP,
        0,
    );
    r.saddr = be([10, 250, 0, 7]);
    l.take(&[r], "t");
    let (lines, _) = l.snapshot(&FlowFilter::default(), 1);
    let src = lines[0].flow.source.clone().expect("source");
    assert_eq!(src.labels, ["quadrant:dg"]);
    assert_eq!(
        (src.namespace.as_deref(), src.pod_name.as_deref()),
        (Some("shop"), Some("web-0"))
    );
    for (pod, hits) in [
        ("shop/web-0", 1),
        ("web-0", 1),
        ("other/web-0", 0),
        ("web-1", 0),
    ] {
        let f = FlowFilter {
            pod: Some(pod.into()),
            ..FlowFilter::default()
        };
        assert_eq!(l.snapshot(&f, 10).0.len(), hits, "{pod}");
    }
}

#[test]
fn followers_get_what_comes_after_their_snapshot() {
    let l = log();
    l.take(
        &[record(
            Hook::TcIngress,
            Reason::DenyPolicy,
            EVENT_VERDICT,
            PROTO_TCP,
            0,
        )],
        "t1",
    );
    let (before, mut rx) = l.snapshot(&FlowFilter::default(), 10);
    assert_eq!(before.len(), 1);
    l.take(
        &[record(
            Hook::TcEgress,
            Reason::AllowPolicy,
            EVENT_FLOW_OPEN,
            PROTO_TCP,
            2,
        )],
        "t2",
    );
    let next = rx.try_recv().expect("the next flow");
    assert_eq!(next.time, "t2");
    assert!(rx.try_recv().is_err());
}

#[test]
fn filters_name_what_they_do_not_know() {
    let bad_q = FlowFilter {
        quadrant: Some("zz".into()),
        ..FlowFilter::default()
    };
    assert!(bad_q.validate().unwrap_err().contains("zz"));
    let bad_r = FlowFilter {
        reason: Some("nope".into()),
        ..FlowFilter::default()
    };
    assert!(bad_r.validate().unwrap_err().contains("nope"));
    assert!(FlowFilter::default().validate().is_ok());
}

#[test]
fn the_published_flow_schema_accepts_a_flow_line() {
    let l = log();
    l.take(
        &[record(
            Hook::TcIngress,
            Reason::DenyPolicy,
            EVENT_VERDICT,
            PROTO_TCP,
            0x12,
        )],
        &now_rfc3339(),
    );
    let (lines, _) = l.snapshot(&FlowFilter::default(), 1);
    let value = serde_json::to_value(&*lines[0]).expect("json");
    let validator = jsonschema::validator_for(&schema()).expect("schema");
    assert!(validator.is_valid(&value), "{value}");
    assert!(lines[0].time.ends_with('Z'), "{}", lines[0].time);
}
