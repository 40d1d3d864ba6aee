//! Tests of [`super`].

use std::{fs, path::Path};

use super::*;

fn port(p: u16) -> PortRange {
    PortRange { lo: p, hi: p }
}

#[test]
fn default_flows_compile_to_the_default_matrix() {
    let config = Config::embedded();
    let p = PolicyBundle::embedded().compile(&config).unwrap();
    assert!(p.contains_key(&(Identity::Dx, Identity::Dg, PROTO_TCP)));
    assert!(p.contains_key(&(Identity::Host, Identity::Pg, PROTO_TCP)));
    assert!(p.contains_key(&(Identity::Px, Identity::Host, PROTO_ICMP)));
    assert!(!p.contains_key(&(Identity::Px, Identity::Host, PROTO_TCP)));
    assert!(!p.contains_key(&(Identity::Dx, Identity::Px, PROTO_TCP)));
    assert!(!p.contains_key(&(Identity::World, Identity::Dx, PROTO_TCP)));
    assert_eq!(
        p.len(),
        4 * 3 * 3 + 4,
        "intra, partner and host -> q on 3 protocols, q -> host icmp"
    );
}

#[test]
fn default_matrix_isolates_development_from_production() {
    let p = PolicyBundle::embedded()
        .compile(&Config::embedded())
        .unwrap();
    for q in Quadrant::ALL {
        let i = Identity::from(q);
        assert!(p.contains_key(&(i, i, PROTO_TCP)), "{q:?} intra");
        assert!(p.contains_key(&(Identity::Host, i, PROTO_TCP)));
        assert!(p.contains_key(&(i, Identity::Host, PROTO_ICMP)));
        assert!(!p.contains_key(&(i, Identity::Host, PROTO_TCP)));
        assert!(!p.contains_key(&(i, Identity::World, PROTO_TCP)));
    }
    assert!(p.contains_key(&(Identity::Dx, Identity::Dg, PROTO_UDP)));
    assert!(p.contains_key(&(Identity::Pg, Identity::Px, PROTO_ICMP)));
    for dev in [Identity::Dx, Identity::Dg] {
        for prod in [Identity::Px, Identity::Pg] {
            for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP] {
                assert!(!p.contains_key(&(dev, prod, proto)));
                assert!(!p.contains_key(&(prod, dev, proto)));
            }
        }
    }
}

#[test]
fn spiffe_ids_map_to_quadrants_and_workloads() {
    let f = |from: &str| Flow {
        from: from.into(),
        to: "dg".into(),
        protocols: vec!["tcp".into()],
        ports: None,
        layer: "dg".into(),
    };
    let (r, w) = flow_to_rule(
        &f("spiffe://quadrant.local/quadrant/dx/workload/*"),
        "quadrant.local",
    )
    .unwrap();
    assert_eq!(r.from, OneOrMany::One("dx".into()));
    assert_eq!(w, None);
    let (r, w) = flow_to_rule(
        &f("spiffe://quadrant.local/quadrant/dx/workload/web"),
        "quadrant.local",
    )
    .unwrap();
    assert_eq!(r.from, OneOrMany::One("dx".into()));
    assert_eq!(w, Some((Quadrant::Dx, "web".into())));
    for bad in [
        "spiffe://quadrant.local/quadrant/dx/workload/../px",
        "spiffe://quadrant.local/quadrant/dx/workload/",
        "spiffe://quadrant.local/quadrant/qq/workload/web",
        "spiffe://quadrant.local/quadrant/dx/web",
    ] {
        let e = flow_to_rule(&f(bad), "quadrant.local").unwrap_err();
        assert!(e.to_string().contains("from"), "{bad}: {e}");
    }
    let e = flow_to_rule(
        &f("spiffe://evil.example/quadrant/dx/workload/*"),
        "quadrant.local",
    )
    .unwrap_err();
    assert!(e.to_string().contains("outside trust domain"), "{e}");
}

#[test]
fn a_workload_rule_compiles_to_its_workload_and_the_quadrant_union() {
    use std::fmt::Write as _;
    let tmp = std::env::temp_dir().join(format!("quadrant-policy-wl-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    assert!(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&src)
            .arg(&tmp)
            .status()
            .unwrap()
            .success()
    );
    let dx = tmp.join("runtime/quadrants/dx.rego");
    let mut text = fs::read_to_string(&dx).unwrap();
    for (workload, port) in [("api", "7310"), ("web", "8080")] {
        let _ = write!(
            text,
            "\nallow contains {{\"from\": \"spiffe://quadrant.local/quadrant/dx/workload/{workload}\", \"to\": \"host\", \"protocols\": [\"tcp\"], \"ports\": [\"{port}\"]}}\n"
        );
    }
    // A workload rule towards production is overridden by the global deny.
    text.push_str("\nallow contains {\"from\": \"spiffe://quadrant.local/quadrant/dx/workload/api\", \"to\": \"px\", \"protocols\": [\"tcp\"]}\n");
    fs::write(&dx, text).unwrap();
    let compiled = PolicyBundle::from_dir(&tmp)
        .unwrap()
        .compile_all(&Config::embedded())
        .unwrap();
    let _ = fs::remove_dir_all(&tmp);
    let tcp_host = |w: &str| {
        compiled
            .workloads
            .get(&(Quadrant::Dx, w.to_owned(), Identity::Host, PROTO_TCP))
            .cloned()
    };
    assert_eq!(
        tcp_host("api"),
        Some(vec![PortRange { lo: 7310, hi: 7310 }])
    );
    assert_eq!(
        tcp_host("web"),
        Some(vec![PortRange { lo: 8080, hi: 8080 }])
    );
    assert_eq!(compiled.workloads.len(), 2, "{:?}", compiled.workloads);
    assert_eq!(
        compiled
            .some_workload
            .get(&(Identity::Dx, Identity::Host, PROTO_TCP)),
        Some(&vec![
            PortRange { lo: 7310, hi: 7310 },
            PortRange { lo: 8080, hi: 8080 }
        ])
    );
    // Not widened to the quadrant.
    assert!(
        !compiled
            .quadrant
            .contains_key(&(Identity::Dx, Identity::Host, PROTO_TCP))
    );
}

#[test]
fn the_packet_scope_joins_quadrant_and_workload_rules() {
    let quadrant = CompiledPolicy::from([
        ((Identity::Dx, Identity::Dg, PROTO_TCP), vec![port(80)]),
        ((Identity::Dx, Identity::Px, PROTO_UDP), vec![port(53)]),
    ]);
    let workloads = CompiledPolicy::from([
        (
            (Identity::Dx, Identity::Dg, PROTO_TCP),
            vec![port(80), port(443)],
        ),
        ((Identity::Dx, Identity::Host, PROTO_TCP), vec![port(7310)]),
    ]);
    let joined = join(&quadrant, &workloads, "packet scope").expect("fits");
    assert_eq!(
        joined,
        CompiledPolicy::from([
            (
                (Identity::Dx, Identity::Dg, PROTO_TCP),
                vec![port(80), port(443)]
            ),
            ((Identity::Dx, Identity::Px, PROTO_UDP), vec![port(53)]),
            ((Identity::Dx, Identity::Host, PROTO_TCP), vec![port(7310)]),
        ])
    );
}

#[test]
fn a_packet_scope_that_does_not_fit_is_refused_by_name() {
    let key = (Identity::Dx, Identity::Dg, PROTO_TCP);
    let quadrant = CompiledPolicy::from([(key, (1..=5).map(port).collect())]);
    let workloads = CompiledPolicy::from([(
        key,
        (6..=u16::try_from(MAX_PORT_RANGES).unwrap() + 1)
            .map(port)
            .collect(),
    )]);
    let err = join(&quadrant, &workloads, "packet scope").expect_err("too many ranges");
    assert_eq!(
        err.to_string(),
        ConfigError::Invalid {
            field: "packet scope".into(),
            reason: "dx → dg tcp: more than 8 port ranges across all rules".into()
        }
        .to_string()
    );
}

#[test]
fn workloads_resolve_to_their_cgroups_and_mark_their_quadrants() {
    let flows = CompiledFlows {
        some_workload: CompiledPolicy::from([(
            (Identity::Px, Identity::Host, PROTO_TCP),
            vec![port(9100)],
        )]),
        workloads: WorkloadPolicy::from([(
            (Quadrant::Px, "api".to_owned(), Identity::Host, PROTO_TCP),
            vec![port(9100)],
        )]),
        ..CompiledFlows::default()
    };
    let mut asked = Vec::new();
    let k = for_kernel(flows.clone(), |q, w| {
        asked.push((q, w.to_owned()));
        Ok(42)
    })
    .unwrap();
    assert_eq!(asked, [(Quadrant::Px, "api".to_owned())]);
    assert_eq!(
        k.workloads,
        [WorkloadEntry {
            cgroup_id: 42,
            dst: Identity::Host,
            proto: PROTO_TCP,
            ranges: vec![port(9100)]
        }]
    );
    assert_eq!(k.raw_sockets_denied, 1 << (Quadrant::Px as u16));
    let e = for_kernel(flows, |_, _| {
        Err(PolicyError::Cgroup {
            path: "/x".into(),
            reason: "no".into(),
        })
    })
    .unwrap_err();
    assert!(e.to_string().contains("/x"), "{e}");
}
