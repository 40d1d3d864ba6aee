//! Unit tests of the broker's request parsing.

use super::*;

#[test]
fn requests_are_validated_with_field_names() {
    let ok = parse_request(br#"{"kind":"open","quadrant":"dg","service":"echo"}"#).unwrap();
    assert_eq!(
        ok,
        LaneRequest::Open {
            quadrant: "dg".into(),
            service: "echo".into(),
            transport: TransportChoice::Auto,
            mirror: false,
            request_ids: false,
            avoid_instance: None,
            affinity_key: None,
        }
    );
    for (bad, needle) in [
        (
            &br#"{"kind":"open","quadrant":"zz","service":"echo"}"#[..],
            "/quadrant",
        ),
        (
            br#"{"kind":"open","quadrant":"dg","service":"Echo!"}"#,
            "/service",
        ),
        (
            br#"{"kind":"open","quadrant":"dg","service":"e","transport":"udp"}"#,
            "/transport",
        ),
        (
            br#"{"kind":"listen","service":"e","tcp_port":0}"#,
            "/tcp_port",
        ),
        (
            br#"{"kind":"open","quadrant":"dg","service":"e","extra":1}"#,
            "extra",
        ),
        (br#"{"kind":"fly"}"#, "kind"),
        (b"not json", "not JSON"),
    ] {
        let e = parse_request(bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{e} should name {needle}");
    }
}

fn broker() -> Broker {
    Broker::new(
        &Config::embedded(),
        None,
        Arc::new(crate::events::EventBus::default()),
    )
}

#[test]
fn the_filler_ends_when_the_pool_stops_in_the_middle_of_a_fill() {
    let b = broker();
    // The filler read the kinds, then the broker stopped: the pool takes no more parts, and
    // the filler must see that rather than prepare lanes for ever.
    let kinds = [(Quadrant::Dx, Transport::Uds)];
    assert!(b.fill(&kinds));
    assert_eq!(b.pool.held(Quadrant::Dx, Transport::Uds).1, pool::DEPTH);
    b.pool.stop();
    assert!(!b.fill(&kinds));
    assert_eq!(b.pool.held(Quadrant::Dx, Transport::Uds).1, 0);
}

#[test]
fn an_open_does_not_wait_for_the_pool_lock() {
    let b = broker();
    assert!(b.fill(&[(Quadrant::Dx, Transport::Uds)]));
    let held = b.pool.lock_for_test();
    assert!(b.pool.take(Quadrant::Dx, Transport::Uds).is_none());
    drop(held);
    assert!(b.pool.take(Quadrant::Dx, Transport::Uds).is_some());
}
