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

/// Callers that keep asking while a service's breaker is open are refused (`breaker_open`):
/// those refusals count against the service's SLOs, but the breaker does not judge its
/// half-open probe by them, or it would never close while anyone retries.
#[test]
fn a_half_open_breaker_is_not_judged_by_the_opens_it_refused() {
    use trip::TripState;
    const MS: u64 = 1_000_000;
    let b = broker();
    let key = (Quadrant::Px, "api".to_owned());
    let min_calls = u64::from(b.config.breakers.min_calls);
    for _ in 0..min_calls {
        b.count_open_failure(Quadrant::Px, "api", Refusal::Io);
    }
    let t0 = 1_000 * MS;
    let opened = b.judge_trips(t0, &b.sli_totals());
    assert!(
        matches!(opened[..], [ref t] if matches!(t.to, TripState::Open { .. })),
        "{opened:?}"
    );
    let t1 = t0 + u64::from(b.config.breakers.base_ejection_ms) * 2 * MS;
    let half = b.judge_trips(t1, &b.sli_totals());
    assert!(
        matches!(half[..], [ref t] if t.to == TripState::HalfOpen),
        "{half:?}"
    );
    // Meanwhile callers were refused by the breaker, and the probe lane answered every call.
    for _ in 0..3 * min_calls {
        b.count_open_failure(Quadrant::Px, "api", Refusal::BreakerOpen);
    }
    let mut totals = b.sli_totals();
    let t = totals.get_mut(&key).expect("api's totals");
    assert_eq!(
        (t.open_failures, t.breaker_refusals),
        (min_calls, 3 * min_calls)
    );
    t.requests += min_calls;
    t.within += min_calls;
    let closed = b.judge_trips(t1 + 500 * MS, &totals);
    assert!(
        matches!(closed[..], [ref t] if t.to == TripState::Closed && t.cause == "probe_succeeded"),
        "{closed:?}"
    );
}
