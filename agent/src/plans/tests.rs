//! Tests of [`super`].

use super::*;

const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn good() -> Value {
    serde_json::json!({
        "api_version": "quadrant/v1",
        "quadrant": "px",
        "workload": "api",
        "generation": 3,
        "artifacts": [format!("api@sha256:{DIGEST}")],
        "args": ["--port", "8080"],
        "env": {"RUST_LOG": "info"},
        "resources": {"cpu_millis": 500, "memory_bytes": 268_435_456, "pids": 64},
        "lanes": [{"peer": "pg/edge", "transport": "shm"}],
        "slo": {"p99_latency_ms": 1.5, "availability": 0.995},
        "labels": {"app": "api", "owner": "payments"},
        "constraints": ["zone=a"],
        "restart": "on_failure",
    })
}

fn errors_of(v: &Value) -> Vec<String> {
    match from_value(v) {
        Err(PlanError::Schema(e)) => e,
        other => panic!("expected schema errors, got {other:?}"),
    }
}

#[test]
fn a_complete_plan_validates_and_round_trips() {
    let plan = from_value(&good()).unwrap();
    assert_eq!(plan.quadrant, QuadrantName::Px);
    assert_eq!(serde_json::to_value(&plan).unwrap(), good());
    let yaml = serde_yaml::to_string(&good()).unwrap();
    assert_eq!(parse(&yaml).unwrap(), plan);
}

#[test]
fn schema_violations_point_at_the_field() {
    let mut v = good();
    v.as_object_mut().unwrap().remove("resources");
    assert!(
        errors_of(&v)
            .iter()
            .any(|e| e.starts_with("/: ") && e.contains("\"resources\" is a required property")),
        "{:?}",
        errors_of(&v)
    );
    let mut v = good();
    v["generation"] = serde_json::json!("three");
    assert!(errors_of(&v).iter().any(|e| e.starts_with("/generation:")));
    let mut v = good();
    v["colour"] = serde_json::json!("blue");
    assert!(
        errors_of(&v).iter().any(|e| e.contains("colour")),
        "{:?}",
        errors_of(&v)
    );
    let mut v = good();
    v["resources"]["pids"] = serde_json::json!(0);
    assert!(
        errors_of(&v)
            .iter()
            .any(|e| e.starts_with("/resources/pids:"))
    );
    let mut v = good();
    v["artifacts"] = serde_json::json!(["api:latest"]);
    assert!(errors_of(&v).iter().any(|e| e.starts_with("/artifacts/0:")));
    let mut v = good();
    v["args"] = serde_json::json!(["x".repeat(5000)]);
    assert!(errors_of(&v).iter().any(|e| e.starts_with("/args/0:")));
    let mut v = good();
    v["quadrant"] = serde_json::json!("qa");
    assert!(errors_of(&v).iter().any(|e| e.starts_with("/quadrant:")));
    let mut v = good();
    v["env"] = serde_json::json!({"lower": "x"});
    assert!(!errors_of(&v).is_empty());
    assert!(matches!(
        parse(&"x".repeat(MAX_PLAN_BYTES + 1)),
        Err(PlanError::TooLarge(_))
    ));
    assert!(matches!(parse("{ not: [json"), Err(PlanError::Syntax(_))));
}

#[test]
fn canonical_bytes_do_not_depend_on_key_order() {
    let a: Value =
        serde_json::from_str(r#"{"b": 1, "a": {"d": 2, "c": [3, {"f": 4, "e": 5}]}}"#).unwrap();
    assert_eq!(
        canonical(&a),
        br#"{"a":{"c":[3,{"e":5,"f":4}],"d":2},"b":1}"#.to_vec()
    );
}

#[test]
fn plans_are_signed_per_quadrant() {
    use base64::Engine as _;
    let (dev, _) = SigningKey::generate("dev").unwrap();
    let (prod, _) = SigningKey::generate("prod").unwrap();
    let trust = TrustStore::new(vec![
        dev.trusted(vec![Role::Plan], &[Quadrant::Dx, Quadrant::Dg]),
        prod.trusted(vec![Role::Plan], &[Quadrant::Px, Quadrant::Pg]),
    ]);
    let plan = from_value(&good()).unwrap();
    let (checked, key) = verify(&sign(&plan, &prod), &trust).unwrap();
    assert_eq!((checked, key.as_str()), (plan.clone(), "prod"));
    let e = verify(&sign(&plan, &dev), &trust).unwrap_err().to_string();
    assert!(
        e.contains("key dev may not sign plan for quadrant px"),
        "{e}"
    );
    // An envelope whose payload was edited (generation bumped) no longer verifies.
    let mut env = sign(&plan, &prod);
    let mut bumped = plan.clone();
    bumped.generation += 1;
    env.payload = base64::engine::general_purpose::STANDARD
        .encode(canonical(&serde_json::to_value(&bumped).unwrap()));
    assert!(
        verify(&env, &trust)
            .unwrap_err()
            .to_string()
            .contains("does not verify")
    );
}

#[test]
fn rollbacks_need_a_live_break_glass_signature() {
    let (bg, _) = SigningKey::generate("bg").unwrap();
    let (prod, _) = SigningKey::generate("prod").unwrap();
    let trust = TrustStore::new(vec![
        bg.trusted(vec![Role::BreakGlass], &[Quadrant::Px]),
        prod.trusted(vec![Role::Plan], &[Quadrant::Px]),
    ]);
    let r = Rollback {
        quadrant: QuadrantName::Px,
        workload: "api".into(),
        target_generation: 1,
        reason: "generation 2 corrupts orders".into(),
        expires_at: 2_000,
    };
    assert_eq!(
        verify_rollback(&sign_rollback(&r, &bg), &trust, 1_000).unwrap(),
        (r.clone(), "bg".into())
    );
    let e = verify_rollback(&sign_rollback(&r, &bg), &trust, 2_000)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expired"), "{e}");
    let e = verify_rollback(&sign_rollback(&r, &prod), &trust, 1_000)
        .unwrap_err()
        .to_string();
    assert!(e.contains("may not sign break-glass"), "{e}");
    let mut short = r.clone();
    short.reason = "oops".into();
    let e = verify_rollback(&sign_rollback(&short, &bg), &trust, 1_000)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/reason"), "{e}");
    // A plan signature cannot be passed off as a rollback authorization.
    let plan = from_value(&good()).unwrap();
    assert!(verify_rollback(&sign(&plan, &bg), &trust, 1_000).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Arbitrary input never panics the plan parser; it is a plan or a named error.
    #[test]
    fn the_plan_parser_never_panics(text in "\\PC{0,400}") {
        let _ = parse(&text);
    }

    /// Arbitrary JSON-ish plans never panic validation, and whatever validates round-trips.
    #[test]
    fn validated_plans_round_trip(generation in 0u64..10, pids in 0u32..40_000, workload in "[a-zA-Z0-9._/-]{0,70}") {
        let mut v = good();
        v["generation"] = serde_json::json!(generation);
        v["resources"]["pids"] = serde_json::json!(pids);
        v["workload"] = serde_json::json!(workload);
        if let Ok(plan) = from_value(&v) {
            proptest::prop_assert_eq!(serde_json::to_value(&plan).unwrap(), v);
            proptest::prop_assert!(plan.generation >= 1 && (1..=32_768).contains(&plan.resources.pids));
        }
    }

    /// Arbitrary envelopes never panic verification and are never accepted unsigned.
    #[test]
    fn the_envelope_decoder_never_panics(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300), sig in "[A-Za-z0-9+/=]{0,120}", json in "\\PC{0,200}") {
        let trust = TrustStore::new(vec![]);
        let env = Envelope {
            payload_type: PLAN_PAYLOAD_TYPE.into(),
            payload: { use base64::Engine as _; base64::engine::general_purpose::STANDARD.encode(&payload) },
            signatures: vec![crate::signing::Signature { keyid: "k".into(), sig }],
        };
        proptest::prop_assert!(verify(&env, &trust).is_err());
        if let Ok(env) = serde_json::from_str::<Envelope>(&json) {
            proptest::prop_assert!(verify(&env, &trust).is_err());
        }
    }
}
