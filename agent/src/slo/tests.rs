//! Unit tests of the SLO service: windows, budgets, alerts, plan SLOs, cost slices.

use super::*;

fn spec(yaml: &str) -> SloSpec {
    serde_yaml::from_str(yaml).unwrap()
}

const S: u64 = 1_000_000_000;

#[test]
fn cost_slos_count_one_second_slices_of_cpu_per_thousand_requests() {
    assert_eq!(
        cpu_usage_usec("usage_usec 1234\nuser_usec 1000\n"),
        Some(1234)
    );
    assert_eq!(cpu_usage_usec("user_usec 1\n"), None);
    // At most 0.5 CPU-seconds per 1,000 requests.
    let cost = spec(
        "{name: echo-cost, quadrant: dg, service: echo, indicator: cost, \
         objectives: [{target: 0.9, value: 0.5}], timeWindow: [{duration: 1h}]}",
    );
    let svc = SloService::new(&[cost]);
    assert_eq!(svc.cost_services(), [(Quadrant::Dg, "echo".to_owned())]);
    let key = (Quadrant::Dg, "echo".to_owned());
    let at = |requests, cpu_usec| {
        (
            BTreeMap::from([(
                key.clone(),
                SliTotals {
                    requests,
                    ..SliTotals::default()
                },
            )]),
            BTreeMap::from([(
                key.clone(),
                CgroupUsage {
                    cpu_usec: Some(cpu_usec),
                    memory_bytes: None,
                },
            )]),
        )
    };
    let (t, c) = at(0, 0);
    svc.observe(S, &t, &c);
    // 2,000 requests for 0.8 CPU-seconds: 0.4 per 1,000, good; half a second is no slice.
    let (t, c) = at(2000, 800_000);
    svc.observe(S + S / 2, &t, &c);
    assert_eq!(svc.report(2 * S).slos[0].events.total, 0);
    svc.observe(2 * S, &t, &c);
    assert_eq!(
        svc.report(2 * S).slos[0].events,
        Events { good: 1, total: 1 }
    );
    // The next second: 1,000 requests for 0.6 CPU-seconds, bad.
    let (t, c) = at(3000, 1_400_000);
    svc.observe(3 * S, &t, &c);
    assert_eq!(
        svc.report(3 * S).slos[0].events,
        Events { good: 1, total: 2 }
    );
    // A second without requests is no data.
    svc.observe(4 * S, &t, &c);
    assert_eq!(svc.report(4 * S).slos[0].events.total, 2);
    // Invalid without a value.
    let bad = spec(
        "{name: c, quadrant: dg, service: echo, indicator: cost, objectives: [{target: 0.9}]}",
    );
    let e = spec::validate(&[bad]).unwrap_err().to_string();
    assert!(e.contains("CPU-seconds per 1000 requests"), "{e}");
}

#[test]
fn memory_slos_count_one_second_slices_of_what_the_workload_holds() {
    // At most 64 MiB.
    let memory = spec(
        "{name: echo-memory, quadrant: dg, service: echo, indicator: memory, \
         objectives: [{target: 0.9, value: 64}], timeWindow: [{duration: 1h}]}",
    );
    let svc = SloService::new(&[memory]);
    assert_eq!(svc.cost_services(), [(Quadrant::Dg, "echo".to_owned())]);
    let key = (Quadrant::Dg, "echo".to_owned());
    let at = |mib: u64| {
        BTreeMap::from([(
            key.clone(),
            CgroupUsage {
                cpu_usec: None,
                memory_bytes: Some(mib << 20),
            },
        )])
    };
    let none = BTreeMap::new();
    svc.observe(S, &none, &at(10));
    svc.observe(2 * S, &none, &at(64));
    svc.observe(3 * S, &none, &at(65));
    let s = &svc.report(3 * S).slos[0];
    assert_eq!(s.events, Events { good: 1, total: 2 });
    assert_eq!(
        s.memory_mib,
        Some(CostFigure {
            last: 65.0,
            limit: 64.0
        })
    );
    assert_eq!(s.cost_per_1000, None);
    // A workload that is not running opens no slice.
    svc.observe(4 * S, &none, &BTreeMap::new());
    svc.observe(5 * S, &none, &BTreeMap::new());
    assert_eq!(svc.report(5 * S).slos[0].events.total, 2);
    // Near the limit: a new generation of its workload would start as a shadow.
    let why = svc
        .cost_near_limit(5 * S, Quadrant::Dg, "echo", 0.8)
        .unwrap();
    assert!(why.starts_with("memory SLO echo-memory"), "{why}");
    // Invalid without MiB, or beyond 1 TiB.
    for bad in ["", ", value: 2000000"] {
        let bad = spec(&format!(
            "{{name: m, quadrant: dg, service: echo, indicator: memory, objectives: [{{target: 0.9{bad}}}]}}"
        ));
        let e = spec::validate(&[bad]).unwrap_err().to_string();
        assert!(e.contains("a memory SLO needs MiB"), "{e}");
    }
}

#[test]
fn plans_add_replace_and_remove_their_slos() {
    let config = spec(
        "{name: echo-fast, quadrant: px, service: echo, indicator: latency, \
         objectives: [{target: 0.99, value: 1}]}",
    );
    let svc = SloService::new(std::slice::from_ref(&config));
    let declared = plans::Slo {
        service: Some("api".into()),
        window: Some("1h".into()),
        p99_latency_ms: Some(2.0),
        availability: Some(0.999),
    };
    let specs = plan_slos(Quadrant::Px, "api", &declared);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["px-api-availability", "px-api-latency"]);
    svc.set_owned("px/api", specs.clone()).unwrap();
    assert_eq!(
        svc.latency_thresholds(),
        BTreeMap::from([
            ((Quadrant::Px, "echo".to_owned()), 1_000_000),
            ((Quadrant::Px, "api".to_owned()), 2_000_000),
        ])
    );
    // History stays across a new generation with the same SLOs.
    let key = (Quadrant::Px, "api".to_owned());
    let t = SliTotals {
        requests: 10,
        within: 10,
        ..SliTotals::default()
    };
    svc.observe(S, &BTreeMap::from([(key, t)]), &BTreeMap::new());
    svc.set_owned("px/api", specs).unwrap();
    assert_eq!(svc.report(S).slos[1].events.total, 10);
    // A second latency SLO for echo is refused, and changes nothing.
    let clash = plan_slos(
        Quadrant::Px,
        "other",
        &plans::Slo {
            service: Some("echo".into()),
            window: None,
            p99_latency_ms: Some(1.0),
            availability: None,
        },
    );
    let e = svc.check_owned("px/other", &clash).unwrap_err().to_string();
    assert!(
        e.contains("px-other-latency.service: px/echo has a latency SLO already"),
        "{e}"
    );
    assert!(svc.set_owned("px/other", clash).is_err());
    assert_eq!(svc.report(S).slos.len(), 3);
    // Stopped: its SLOs go, the configuration's stay.
    svc.set_owned("px/api", Vec::new()).unwrap();
    let left: Vec<String> = svc.report(S).slos.into_iter().map(|s| s.name).collect();
    assert_eq!(left, ["echo-fast"]);
}

#[test]
fn totals_become_windowed_events_budgets_and_alerts() {
    let avail = spec(
        "{name: echo-up, quadrant: px, service: echo, indicator: availability, \
         objectives: [{target: 0.99}], timeWindow: [{duration: 28m}]}",
    );
    let fast = spec(
        "{name: echo-fast, quadrant: px, service: echo, indicator: latency, \
         objectives: [{target: 0.9, value: 1}], timeWindow: [{duration: 28m}]}",
    );
    let svc = SloService::new(&[avail, fast]);
    assert_eq!(svc.tick(), Duration::from_millis(100));
    let key = (Quadrant::Px, "echo".to_owned());
    // 100 answered requests, all within the threshold, then 20 that failed.
    let mut t = SliTotals {
        requests: 100,
        within: 100,
        ..SliTotals::default()
    };
    svc.observe(
        100 * S,
        &BTreeMap::from([(key.clone(), t)]),
        &BTreeMap::new(),
    );
    t.requests = 120;
    t.failed = 20;
    svc.observe(101 * S, &BTreeMap::from([(key, t)]), &BTreeMap::new());
    let r = svc.report(101 * S);
    let up = &r.slos[0];
    assert_eq!(
        up.events,
        Events {
            good: 100,
            total: 120
        }
    );
    // 20 bad of 120 with 1 % allowed: burn 16.7, budget -15.7.
    assert!(
        (up.budget_remaining.unwrap() + 15.666_666).abs() < 1e-3,
        "{up:?}"
    );
    // The fast rule looks at 2.5 s and 0.21 s: both hold the 20 failures (and the short
    // one only those, burn 100).
    assert_eq!(up.burn_rates[0].state, State::Firing, "{up:?}");
    assert_eq!(up.burn_rates[0].short_events, 20);
    let fastest = &r.slos[1];
    assert_eq!(
        fastest.events,
        Events {
            good: 100,
            total: 100
        }
    );
    assert_eq!(fastest.budget_remaining, Some(1.0));
    let px = &r.quadrants["px"];
    assert!(px.fast_burn && px.budget_remaining.unwrap() < 0.0);
    assert_eq!(px.breaching.len(), 1);
    assert!(
        px.breaching[0].starts_with("echo-up (availability of px/echo): 100 good of 120"),
        "{}",
        px.breaching[0]
    );
    assert!(!r.quadrants["dx"].fast_burn && r.quadrants["dx"].budget_remaining.is_none());
    // Half an hour later the window holds nothing: no data, nothing fires.
    let later = svc.report(101 * S + 30 * 60 * S);
    assert_eq!(later.slos[0].events, Events::default());
    assert!(
        later.slos[0]
            .burn_rates
            .iter()
            .all(|b| b.state == State::NoData)
    );
    assert!(!later.quadrants["px"].fast_burn);
    assert!(render(&later).contains("echo-up (px/echo"));
}
