//! Offline work with a bundle: its Rego unit tests (as `opa test` runs them), the conflicts and
//! misplaced rules `quadrant policy check` reports, and `quadrant policy eval`.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use super::{
    ADMISSION_DECISION, CONFLICTS_QUERY, MISPLACED_QUERY, PolicyBundle, PolicyError,
    RUNTIME_DECISION, eval_err, query,
};
use crate::config::PolicyRule;

/// One Rego unit test result.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TestResult {
    /// `data.<package>.<rule>`.
    pub name: String,
    /// Whether the rule evaluated to true.
    pub passed: bool,
    /// Evaluation error, if any.
    pub error: Option<String>,
}

/// What `quadrant policy check` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CheckReport {
    /// Quadrant allows overridden by a global deny, with both sides.
    pub conflicts: Vec<Value>,
    /// Flows placed in a layer that does not own them.
    pub misplaced: Vec<Value>,
    /// Flows the kernel will enforce.
    pub flows: usize,
}

impl PolicyBundle {
    /// Conflicts and misplaced rules.
    pub fn check(&self, local: &[PolicyRule]) -> Result<CheckReport, PolicyError> {
        let mut engine = self.engine(local)?;
        let as_vec = |v: Value| match v {
            Value::Array(a) => a,
            _ => vec![],
        };
        let conflicts = as_vec(query(&mut engine, CONFLICTS_QUERY)?);
        let misplaced = as_vec(query(&mut engine, MISPLACED_QUERY)?);
        Ok(CheckReport {
            conflicts,
            misplaced,
            flows: self.flows(local)?.len(),
        })
    }

    /// Evaluates `query` (default: the admission decision for inputs with a `review`, else the
    /// runtime decision) for `input`.
    pub fn eval(
        &self,
        local: &[PolicyRule],
        input: &Value,
        query_text: Option<&str>,
    ) -> Result<(String, Value), PolicyError> {
        let q = query_text.map_or_else(
            || {
                if input.get("review").is_some() {
                    ADMISSION_DECISION
                } else {
                    RUNTIME_DECISION
                }
                .to_owned()
            },
            ToOwned::to_owned,
        );
        let mut engine = self.engine(local)?;
        engine.set_input(
            regorus::Value::from_json_str(&input.to_string()).map_err(|e| eval_err("input", &e))?,
        );
        let v = query(&mut engine, &q)?;
        Ok((q, v))
    }

    /// Runs every `test_*` rule of the bundle, as `opa test` does: a test passes when it
    /// evaluates to true.
    pub fn run_tests(&self) -> Result<Vec<TestResult>, PolicyError> {
        let mut engine = self.engine(&[])?;
        let mut results = Vec::new();
        for (_, text) in &self.rego {
            let Some(package) = text.lines().find_map(|l| l.trim().strip_prefix("package ")) else {
                continue;
            };
            let names: BTreeSet<&str> = text
                .lines()
                .filter(|l| l.starts_with("test_"))
                .filter_map(|l| {
                    l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .next()
                })
                .collect();
            for name in names {
                let full = format!("data.{}.{name}", package.trim());
                let (passed, error) = match engine.eval_rule(full.clone()) {
                    Ok(regorus::Value::Bool(true)) => (true, None),
                    Ok(other) => (false, Some(format!("evaluated to {other}"))),
                    Err(e) => (false, Some(e.to_string())),
                };
                results.push(TestResult {
                    name: full,
                    passed,
                    error,
                });
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{Identity, policy::PROTO_TCP};

    use super::*;
    use crate::config::Config;

    #[test]
    fn every_rego_unit_test_passes() {
        let results = PolicyBundle::embedded().run_tests().unwrap();
        assert!(results.len() >= 15, "found {} tests", results.len());
        let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn local_rules_are_subject_to_global_denies() {
        let mut config = Config::embedded();
        config.policy = serde_yaml::from_str(
            "- { from: dx, to: host, protocols: [tcp], ports: [22] }\n- { from: dx, to: px, protocols: [tcp], ports: [443] }\n",
        )
        .unwrap();
        let bundle = PolicyBundle::embedded();
        let p = bundle.compile(&config).unwrap();
        assert!(
            p.contains_key(&(Identity::Dx, Identity::Host, PROTO_TCP)),
            "a local allow is added"
        );
        assert!(
            !p.contains_key(&(Identity::Dx, Identity::Px, PROTO_TCP)),
            "a global deny wins over it"
        );
        let report = bundle.check(&config.policy).unwrap();
        assert_eq!(report.conflicts.len(), 1, "{report:?}");
        assert_eq!(report.conflicts[0]["allow"]["layer"], "local");
    }

    #[test]
    fn eval_explains_its_decision() {
        let bundle = PolicyBundle::embedded();
        let (q, v) = bundle
            .eval(
                &[],
                &serde_json::json!({"from": "dx", "to": "px", "protocol": "tcp", "port": 443}),
                None,
            )
            .unwrap();
        assert_eq!(q, RUNTIME_DECISION);
        assert_eq!(v["allowed"], false);
        assert_eq!(
            v["denied_by"][0]["reason"],
            "development and production are isolated"
        );
        let (_, v) = bundle
            .eval(
                &[],
                &serde_json::json!({"from": "dg", "to": "dx", "protocol": "udp", "port": 53}),
                None,
            )
            .unwrap();
        assert_eq!(v["allowed"], true);
        assert_eq!(v["allowed_by"][0]["layer"], "dx");
        let review = serde_json::json!({"review": {"object": {"quadrant": "px", "labels": {}, "artifacts": ["x:latest"]}}});
        let (q, v) = bundle.eval(&[], &review, None).unwrap();
        assert_eq!(q, ADMISSION_DECISION);
        assert_eq!(v["allowed"], false);
        assert!(v["violations"].as_array().unwrap().len() >= 4, "{v}");
    }
}
