//! Tests of [`super`].

use super::*;
use crate::policy::ADMISSION_DECISION;

#[expect(
    clippy::needless_pass_by_value,
    reason = "test helper, called with temporaries"
)]
fn review(quadrant: &str, id: &str, labels: Value, artifacts: Value, resources: Value) -> Value {
    json!({"review": {"object": {"quadrant": quadrant, "workload": "api", "spiffe_id": id,
        "labels": labels, "artifacts": artifacts, "resources": resources}}})
}

/// The agent's per-constraint evaluation — in the Rego VM, and in the interpreter — and
/// the Rego decision document agree.
#[test]
fn evaluation_matches_the_rego_decision() {
    let bundle = PolicyBundle::embedded();
    let prepared = Prepared::new(&bundle).unwrap();
    assert!(
        prepared.constraints.iter().all(|c| c.vm.is_some()),
        "every shipped template runs in the Rego VM: {:?}",
        prepared.constraints
    );
    let admission = Admission::new(Ok(prepared), Err("unused".into()));
    let mut prepared = Prepared::new(&bundle).unwrap();
    for c in &mut prepared.constraints {
        c.vm = None;
    }
    let interpreted = Admission::new(Ok(prepared), Err("unused".into()));
    let digest = "ab".repeat(32);
    let good = |q: &str| {
        review(
            q,
            &format!("spiffe://quadrant.local/quadrant/{q}/workload/api"),
            json!({"app": "a", "owner": "o"}),
            json!([format!("api@sha256:{digest}")]),
            json!({"cpu": 1, "memory": 1, "pids": 1}),
        )
    };
    let mut cases = vec![good("px"), good("dx"), good("pg")];
    let mut c = good("px");
    c["review"]["object"]["labels"] = json!({});
    cases.push(c);
    let mut c = good("px");
    c["review"]["object"]["artifacts"] = json!(["api:latest", "x@sha256:12"]);
    cases.push(c);
    let mut c = good("pg");
    c["review"]["object"]["spiffe_id"] = json!("spiffe://quadrant.local/quadrant/dg/workload/api");
    c["review"]["object"]["resources"] = json!({});
    cases.push(c);
    let mut c = good("dg");
    c["review"]["object"]["artifacts"] = json!([]);
    cases.push(c);
    for (i, case) in cases.iter().enumerate() {
        let ours = admission.evaluate(case).unwrap();
        assert_eq!(ours, interpreted.evaluate(case).unwrap(), "case {i}");
        let (q, rego) = bundle.eval(&[], case, Some(ADMISSION_DECISION)).unwrap();
        assert_eq!(q, ADMISSION_DECISION);
        let mut theirs: Vec<Violation> = rego["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Violation {
                constraint: v["constraint"].as_str().unwrap().into(),
                msg: v["msg"].as_str().unwrap().into(),
            })
            .collect();
        theirs.sort_by(|a, b| (&a.constraint, &a.msg).cmp(&(&b.constraint, &b.msg)));
        assert_eq!(ours, theirs, "case {i}");
        assert_eq!(ours.is_empty(), rego["allowed"] == true, "case {i}");
    }
}

/// The direct conversion gives what regorus' own deserialization gives.
#[test]
fn reviews_convert_as_regorus_reads_them() {
    let v = json!({"s": "x", "n": null, "t": true, "f": false, "i": -7, "u": u64::MAX,
        "x": 1.5, "a": [1, "two", [3], {"k": {}}], "o": {"z": [], "": ""}, "e": {}});
    let ours = rego_value(&v);
    let theirs = <regorus::Value as Deserialize>::deserialize(&v).unwrap();
    assert_eq!(ours, theirs);
    assert_eq!(ours.to_string(), theirs.to_string());
}

/// The production identity constraint checks against the configured trust domain, in the
/// Rego VM (which keeps its own `data`) as in the interpreter.
#[test]
fn production_identity_follows_the_configured_trust_domain() {
    let digest = "ab".repeat(32);
    let px = |td: &str| {
        review(
            "px",
            &format!("spiffe://{td}/quadrant/px/workload/api"),
            json!({"app": "a", "owner": "o"}),
            json!([format!("api@sha256:{digest}")]),
            json!({"cpu": 1, "memory": 1, "pids": 1}),
        )
    };
    let bundle = PolicyBundle::embedded().with_trust_domain("prod.example.org");
    for vm in [true, false] {
        let mut prepared = Prepared::new(&bundle).unwrap();
        if !vm {
            for c in &mut prepared.constraints {
                c.vm = None;
            }
        }
        let admission = Admission::new(Ok(prepared), Err("unused".into()));
        assert_eq!(
            admission.evaluate(&px("prod.example.org")).unwrap(),
            [],
            "vm {vm}"
        );
        let refused = admission.evaluate(&px("quadrant.local")).unwrap();
        assert_eq!(
            refused
                .iter()
                .map(|v| v.constraint.as_str())
                .collect::<Vec<_>>(),
            ["production-needs-production-identity"],
            "vm {vm}"
        );
        assert!(
            refused[0].msg.contains("prod.example.org"),
            "{}",
            refused[0].msg
        );
    }
}

#[test]
fn a_missing_template_fails_closed() {
    // In the Rego VM (no such entry point) and in the interpreter (undefined rule).
    for vm in [true, false] {
        let mut prepared = Prepared::new(&PolicyBundle::embedded()).unwrap();
        prepared.constraints[0].rule = format!("{TEMPLATES}.no_such_template.violation");
        if !vm {
            prepared.constraints[0].vm = None;
        }
        let admission = Admission::new(Ok(prepared), Err("unused".into()));
        let r = json!({"review": {"object": {"quadrant": "dx", "labels": {}}}});
        // An undefined template yields no violations in OPA; quadrant refuses to treat a
        // constraint it cannot evaluate as satisfied.
        let e = admission.evaluate(&r);
        assert!(
            e.as_ref().is_err_and(|e| e.contains("no_such_template")),
            "vm {vm}: {e:?}"
        );
    }
}
