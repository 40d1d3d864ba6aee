#![expect(
    clippy::float_cmp,
    reason = "the figures compared are small integers or powers of two, exact in f64"
)]

use std::{collections::BTreeSet, time::Duration};

use dataplane_common::Quadrant;
use proptest::prelude::*;
use quadrant_lanes::ring::{LATENCY_BUCKETS, latency_bucket};

use super::{
    Format, Live,
    collect::{Sources, families, round_trip_buckets},
    encode,
};
use crate::lanes::broker::sli::SliTotals;

fn all_quadrants() -> Sources {
    Sources {
        quadrants: Quadrant::ALL.to_vec(),
        ..Sources::default()
    }
}

fn scrape(s: &Sources, live: &Live) -> String {
    encode(families(s), live, Format::Prometheus).expect("encode")
}

/// The series names a scrape exposes: every family's name, with `_bucket`, `_sum` and
/// `_count` for histograms.
fn series_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split(' ');
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        out.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{suffix}"));
            }
        }
    }
    out
}

/// The value of the sample line that starts with `series` exactly.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn every_family_is_described_even_without_samples() {
    let text = scrape(&Sources::default(), &Live::default());
    let names = series_names(&text);
    for family in [
        "quadrant_verdicts_total",
        "quadrant_lane_refusals_total",
        "quadrant_lane_round_trip_seconds",
        "quadrant_slo_burn_rate",
        "quadrant_chaos_faults_active",
        "quadrant_admission_decisions_total",
        "quadrant_admission_duration_seconds",
    ] {
        assert!(names.contains(family), "{family} missing from:\n{text}");
    }
}

#[test]
fn verdict_counters_keep_their_labels() {
    let mut s = all_quadrants();
    s.verdicts.push(crate::loader::Counter {
        hook: "tc_ingress".into(),
        quadrant: "dx".into(),
        reason: "deny_policy".into(),
        verdict: "drop".into(),
        count: 7,
    });
    let text = scrape(&s, &Live::default());
    assert_eq!(
        value(
            &text,
            "quadrant_verdicts_total{hook=\"tc_ingress\",quadrant=\"dx\",reason=\"deny_policy\",verdict=\"drop\"}"
        ),
        Some(7.0),
        "{text}"
    );
}

#[test]
fn lanes_are_summed_per_service_quadrant_and_transport() {
    let mut s = all_quadrants();
    let mut a = SliTotals {
        requests: 10,
        failed: 1,
        lanes: [2, 1, 0],
        bytes: [100, 200],
        ..SliTotals::default()
    };
    a.transport_latency[0][latency_bucket(3_000)] = 5;
    a.transport_latency[1][latency_bucket(80_000)] = 4;
    a.transport_latency_sum_ns = [15_000, 320_000, 0];
    let mut b = SliTotals {
        requests: 5,
        lanes: [1, 0, 3],
        bytes: [1, 2],
        ..SliTotals::default()
    };
    b.transport_latency[0][latency_bucket(1_500)] = 5;
    b.transport_latency_sum_ns = [7_500, 0, 0];
    s.sli.insert((Quadrant::Px, "api".into()), a);
    s.sli.insert((Quadrant::Px, "db".into()), b);
    let text = scrape(&s, &Live::default());
    let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(v("quadrant_lane_requests_total{quadrant=\"px\"}"), 15.0);
    assert_eq!(
        v("quadrant_lane_request_failures_total{quadrant=\"px\"}"),
        1.0
    );
    assert_eq!(
        v("quadrant_lanes_opened_total{quadrant=\"px\",transport=\"shm\"}"),
        3.0
    );
    assert_eq!(
        v("quadrant_lanes_opened_total{quadrant=\"px\",transport=\"tcp\"}"),
        3.0
    );
    assert_eq!(
        v("quadrant_lane_bytes_total{quadrant=\"px\",direction=\"to_client\"}"),
        202.0
    );
    let shm = "quadrant_lane_round_trip_seconds";
    assert_eq!(
        v(&format!("{shm}_count{{quadrant=\"px\",transport=\"shm\"}}")),
        10.0
    );
    assert!(
        (v(&format!("{shm}_sum{{quadrant=\"px\",transport=\"shm\"}}")) - 22.5e-6).abs() < 1e-12
    );
    // 1.5 µs and 3 µs: five each at or below 2.048 µs and 4.096 µs.
    assert_eq!(
        v(&format!(
            "{shm}_bucket{{quadrant=\"px\",transport=\"shm\",le=\"2.048e-06\"}}"
        )),
        5.0
    );
    assert_eq!(
        v(&format!(
            "{shm}_bucket{{quadrant=\"px\",transport=\"shm\",le=\"4.096e-06\"}}"
        )),
        10.0
    );
    assert_eq!(
        v(&format!(
            "{shm}_bucket{{quadrant=\"px\",transport=\"uds\",le=\"6.5536e-05\"}}"
        )),
        0.0
    );
    assert_eq!(
        v(&format!(
            "{shm}_bucket{{quadrant=\"px\",transport=\"uds\",le=\"0.000131072\"}}"
        )),
        4.0
    );
}

#[test]
fn no_label_names_a_workload_a_service_or_an_identity() {
    let mut s = all_quadrants();
    s.sli.insert(
        (Quadrant::Dg, "secret-service".into()),
        SliTotals::default(),
    );
    s.workloads.push(crate::workloads::Status {
        name: "dx/secret-workload".into(),
        generation: 1,
        pid: Some(1),
        state: "running".into(),
        last_exit: None,
        restarts: 0,
        restart_pending: false,
        limits: "cgroup v2".into(),
        log: "/tmp/x".into(),
    });
    let text = scrape(&s, &Live::default());
    assert!(!text.contains("secret"), "{text}");
    assert!(!text.contains("spiffe://"), "{text}");
    assert_eq!(
        value(
            &text,
            "quadrant_workloads{quadrant=\"dx\",state=\"running\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn admission_decisions_count_by_result() {
    let live = Live::default();
    live.admission(true, false, Duration::from_micros(150));
    live.admission(false, true, Duration::from_millis(3));
    live.admission(false, false, Duration::from_millis(3));
    live.admission(false, true, Duration::from_millis(3));
    let text = scrape(&Sources::default(), &live);
    let v = |series: &str| value(&text, series);
    assert_eq!(
        v("quadrant_admission_decisions_total{result=\"allowed\"}"),
        Some(1.0)
    );
    assert_eq!(
        v("quadrant_admission_decisions_total{result=\"denied\"}"),
        Some(2.0)
    );
    assert_eq!(
        v("quadrant_admission_decisions_total{result=\"error\"}"),
        Some(1.0)
    );
    assert_eq!(
        v("quadrant_admission_duration_seconds_bucket{le=\"0.0002\"}"),
        Some(1.0)
    );
    assert_eq!(v("quadrant_admission_duration_seconds_count"), Some(4.0));
}

#[test]
fn the_scraper_chooses_the_format() {
    assert_eq!(Format::from_accept(None), Format::Prometheus);
    assert_eq!(
        Format::from_accept(Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")),
        Format::Prometheus
    );
    let om = Format::from_accept(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    ));
    assert_eq!(om, Format::OpenMetrics);
    let text = encode(families(&all_quadrants()), &Live::default(), om).expect("encode");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

proptest! {
    /// A round trip of `ns` lands, after merging the lanes' buckets, in the first Prometheus
    /// bucket whose bound is above it (the lanes' bounds are exclusive), and none is lost.
    #[test]
    fn merged_buckets_keep_every_round_trip_in_its_bucket(ns in 0u64..200_000_000) {
        let mut counts = [0u64; LATENCY_BUCKETS];
        counts[latency_bucket(ns)] += 1;
        let merged = round_trip_buckets(&counts);
        prop_assert_eq!(merged.iter().map(|(_, c)| c).sum::<u64>(), 1);
        let (i, _) = merged.iter().enumerate().find(|(_, (_, c))| *c == 1).unwrap();
        #[expect(clippy::cast_precision_loss, reason = "test values below 2^28")]
        let secs = ns as f64 / 1e9;
        prop_assert!(merged[i].0 > secs, "{} not below bound {}", secs, merged[i].0);
        if i > 0 {
            prop_assert!(merged[i - 1].0 <= secs);
        }
    }
}

/// Every metric name in the shipped alerting rules and Grafana dashboard is one the agent
/// exports (or a recording rule of the rules file).
#[test]
fn the_shipped_rules_and_dashboard_use_only_exported_metrics() {
    let exported = series_names(&scrape(&all_quadrants(), &Live::default()));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = std::fs::read_to_string(root.join("manifests/prometheus/quadrant-rules.yaml"))
        .expect("rules");
    let dashboard = std::fs::read_to_string(root.join("manifests/grafana/quadrant-dashboard.json"))
        .expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let exprs: Vec<&str> = parsed["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets"))
        .map(|t| t["expr"].as_str().expect("expr"))
        .collect();
    assert!(exprs.len() > 15, "{} queries", exprs.len());
    let mut checked = 0;
    for (file, text) in [
        ("quadrant-rules.yaml", rules.clone()),
        ("quadrant-dashboard.json", exprs.join("\n")),
    ] {
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} uses no metric");
        for name in used {
            assert!(
                exported.contains(&name) || rules.contains(&format!("record: {name}")),
                "{file} uses {name}, which the agent does not export"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} names found");
}

/// The words of `text` that start with `quadrant_` or `quadrant:` (metric and recording-rule
/// names).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for (start, _) in text.match_indices("quadrant") {
        let next = bytes.get(start + "quadrant".len());
        if start > 0 && is_ident(bytes[start - 1]) || !matches!(next, Some(b'_' | b':')) {
            continue;
        }
        let len = bytes[start..].iter().take_while(|b| is_ident(**b)).count();
        out.insert(text[start..start + len].to_owned());
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

#[test]
fn a_services_backends_are_counted_on_this_node_and_on_peers() {
    let s = Sources {
        service_backends: vec![super::collect::ServiceBackends {
            service: "api".into(),
            node: 1,
            peers: 3,
            kubernetes: 2,
        }],
        ..all_quadrants()
    };
    let text = scrape(&s, &Live::default());
    for (source, want) in [("node", 1.0), ("peers", 3.0), ("kubernetes", 2.0)] {
        assert_eq!(
            value(
                &text,
                &format!("quadrant_service_backends{{service=\"api\",source=\"{source}\"}}")
            ),
            Some(want),
            "{text}"
        );
    }
}

#[test]
fn peer_nodes_are_counted_by_source_and_state() {
    let peer = |source: &str, linked: bool, waiting: bool| crate::peers::PeerStatus {
        name: format!("n-{source}-{linked}-{waiting}"),
        source: source.to_owned(),
        linked,
        waiting,
        ..crate::peers::PeerStatus::default()
    };
    let s = Sources {
        peers: Some(vec![
            peer("kubernetes", true, false),
            peer("kubernetes", true, false),
            peer("kubernetes", false, true),
            peer("peers.nodes", false, false),
        ]),
        kubernetes_up: Some(false),
        ..all_quadrants()
    };
    let text = scrape(&s, &Live::default());
    for (labels, want) in [
        ("source=\"kubernetes\",state=\"linked\"", 2.0),
        ("source=\"kubernetes\",state=\"waiting\"", 1.0),
        ("source=\"kubernetes\",state=\"down\"", 0.0),
        ("source=\"peers.nodes\",state=\"down\"", 1.0),
        ("source=\"peers.nodes\",state=\"linked\"", 0.0),
    ] {
        assert_eq!(
            value(&text, &format!("quadrant_peer_nodes{{{labels}}}")),
            Some(want),
            "{labels}\n{text}"
        );
    }
    assert_eq!(
        value(&text, "quadrant_kubernetes_api_up"),
        Some(0.0),
        "{text}"
    );
    // Without a peers section: described, no samples.
    let none = scrape(&all_quadrants(), &Live::default());
    assert!(none.contains("# TYPE quadrant_peer_nodes gauge"), "{none}");
    assert!(!none.contains("quadrant_peer_nodes{"), "{none}");
    assert!(!none.contains("\nquadrant_kubernetes_api_up "), "{none}");
}
