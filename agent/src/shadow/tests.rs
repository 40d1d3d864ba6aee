//! Unit tests of the shadow comparison.

use super::*;

fn figures_of(
    requests: u64,
    failed: u64,
    p99_ms: Option<f64>,
    per_1000: Option<f64>,
) -> GenerationFigures {
    GenerationFigures {
        generation: Some(1),
        requests,
        failed,
        p99_ms,
        cpu_seconds: 0.0,
        cpu_seconds_per_1000: per_1000,
        memory_bytes: None,
    }
}

#[test]
fn a_shadow_is_judged_only_with_enough_requests_and_within_tolerance() {
    let cfg = ShadowsConfig::default();
    let live = figures_of(1000, 0, Some(0.2), Some(0.05));
    // 99 of the 100 mirrored requests it needs.
    let (v, why) = judge(&live, &figures_of(99, 0, Some(0.2), Some(0.05)), &cfg);
    assert_eq!(v, Verdict::InsufficientData);
    assert!(why[0].contains("99 of 100"), "{why:?}");
    // As good, and 10 % worse: promote.
    assert_eq!(
        judge(&live, &figures_of(100, 0, Some(0.2), Some(0.05)), &cfg).0,
        Verdict::Promote
    );
    assert_eq!(
        judge(&live, &figures_of(100, 0, Some(0.22), Some(0.055)), &cfg).0,
        Verdict::Promote
    );
    // Slower beyond the tolerance.
    let (v, why) = judge(&live, &figures_of(100, 0, Some(0.23), Some(0.05)), &cfg);
    assert_eq!(v, Verdict::Reject);
    assert!(
        why.iter()
            .any(|f| f.starts_with("p99 latency") && f.ends_with("(worse)")),
        "{why:?}"
    );
    // Costlier beyond it.
    let (v, why) = judge(&live, &figures_of(100, 0, Some(0.2), Some(0.06)), &cfg);
    assert_eq!(v, Verdict::Reject);
    assert!(
        why.iter()
            .any(|f| f.starts_with("CPU per 1,000") && f.ends_with("(worse)")),
        "{why:?}"
    );
    // Failing more: 1 in 100 against none, above 0.1 percentage points.
    let (v, why) = judge(&live, &figures_of(100, 1, Some(0.2), Some(0.05)), &cfg);
    assert_eq!(v, Verdict::Reject);
    assert!(why[0].contains("shadow 1.00 %"), "{why:?}");
    // What was not measured on both sides does not decide.
    let (v, why) = judge(
        &figures_of(1000, 0, None, None),
        &figures_of(100, 0, Some(9.0), Some(9.0)),
        &cfg,
    );
    assert_eq!(v, Verdict::Promote);
    assert!(
        why.iter().any(|f| f.contains("not measured for both")),
        "{why:?}"
    );
}

#[test]
fn p99_is_the_bucket_holding_the_99th_percentile() {
    use crate::lanes::ring::latency_bucket;
    let mut h = [0u64; LATENCY_BUCKETS];
    assert_eq!(p99_ms(&h), None);
    // 99 fast round trips and one slow: the p99 is still the fast bucket.
    h[latency_bucket(50_000)] = 99;
    h[latency_bucket(5_000_000)] = 1;
    let p = p99_ms(&h).unwrap();
    assert!((0.05..0.07).contains(&p), "{p}");
    // Two slow ones in a hundred: the slow bucket.
    h[latency_bucket(50_000)] = 98;
    h[latency_bucket(5_000_000)] = 2;
    let p = p99_ms(&h).unwrap();
    assert!((5.0..7.0).contains(&p), "{p}");
}

#[test]
fn a_shadow_runs_in_its_own_cgroup_under_its_own_key() {
    let config = Config::embedded();
    let live = workloads::Spec {
        key: "px/api".into(),
        instance: config.instance.clone(),
        quadrant: "px".into(),
        workload: "api".into(),
        generation: 2,
        executable: "/opt/mcp/api".into(),
        args: Vec::new(),
        env: BTreeMap::new(),
        resources: crate::plans::Resources {
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            pids: 64,
        },
        restart: crate::plans::RestartPolicy::default(),
        cgroup: config.cgroup_dir(Quadrant::Px).join("api"),
        netns: config.netns(Quadrant::Px),
        endpoint: String::new(),
        lane_socket: config.lane_socket(),
        log: "/var/log/q/px-api.log".into(),
        drop_net_raw: false,
    };
    let s = shadow_spec(&config, Quadrant::Px, &live);
    assert_eq!(
        (s.key.as_str(), s.workload.as_str()),
        ("px/api@shadow", "api@shadow")
    );
    assert_eq!(s.cgroup, config.cgroup_dir(Quadrant::Px).join("api@shadow"));
    assert_eq!(
        s.log,
        std::path::PathBuf::from("/var/log/q/px-api@shadow.log")
    );
    assert_eq!((s.generation, &s.netns), (2, &live.netns));
    // Its processes attest as the same workload, marked as the shadow.
    let path = format!("/{}/px/api@shadow", config.instance);
    let caller = crate::identity::attest::caller_of_cgroup(&path, &config.instance).unwrap();
    assert_eq!((caller.workload.as_str(), caller.shadow), ("api", true));
}
