# Unit tests of the admission constraints (`quadrant policy test`).
package quadrant.admission_test

import data.quadrant.admission

digest := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

good_px := {
	"quadrant": "px",
	"workload": "api",
	"spiffe_id": "spiffe://quadrant.local/quadrant/px/workload/api",
	"labels": {"app": "api", "owner": "payments"},
	"artifacts": [concat("", ["api@sha256:", digest])],
	"resources": {"cpu": "500m", "memory": "256Mi", "pids": 64},
}

review(obj) := {"review": {"object": obj}}

violated(obj) := {v.constraint | some v in admission.violations with input as review(obj)}

test_a_complete_production_workload_is_admitted if {
	admission.decision.allowed with input as review(good_px)
}

test_missing_label_is_rejected_with_the_constraint_name if {
	obj := json.remove(good_px, ["labels/owner"])
	violated(obj) == {"workloads-are-labelled"}
	some v in admission.violations with input as review(obj)
	v.msg == "missing required label \"owner\""
}

test_tag_references_are_rejected if {
	obj := object.union(good_px, {"artifacts": ["api:latest"]})
	violated(obj) == {"artifacts-are-content-addressed"}
}

test_short_digest_is_rejected if {
	obj := object.union(good_px, {"artifacts": ["api@sha256:0123"]})
	violated(obj) == {"artifacts-are-content-addressed"}
}

test_a_workload_without_artifacts_is_rejected if {
	every obj in [json.remove(good_px, ["artifacts"]), object.union(good_px, {"artifacts": []})] {
		violated(obj) == {"artifacts-are-content-addressed"}
		some v in admission.violations with input as review(obj)
		v.msg == "no artifact referenced"
	}
}

test_every_artifact_is_checked if {
	good := concat("", ["api@sha256:", digest])
	obj := object.union(good_px, {"artifacts": [good, "api:latest", good]})
	msgs := {v.msg | some v in admission.violations with input as review(obj)}
	msgs == {"artifact \"api:latest\" is not a content-addressed reference (<pkg>@sha256:<digest>)"}
}

test_production_needs_limits if {
	obj := json.remove(good_px, ["resources/pids"])
	violated(obj) == {"production-sets-resource-limits"}
}

test_development_does_not_need_limits if {
	obj := object.union(json.remove(good_px, ["resources"]), {"quadrant": "dx", "spiffe_id": "spiffe://quadrant.local/quadrant/dx/workload/api"})
	admission.decision.allowed with input as review(obj)
}

test_development_identity_cannot_enter_production if {
	obj := object.union(good_px, {"spiffe_id": "spiffe://quadrant.local/quadrant/dx/workload/api"})
	violated(obj) == {"production-needs-production-identity"}
}

test_foreign_trust_domain_cannot_enter_production if {
	obj := object.union(good_px, {"spiffe_id": "spiffe://evil.example/quadrant/px/workload/api"})
	violated(obj) == {"production-needs-production-identity"}
}

test_production_identity_follows_the_configured_trust_domain if {
	td := "prod.example.org"
	obj := object.union(good_px, {"spiffe_id": "spiffe://prod.example.org/quadrant/px/workload/api"})
	admission.decision.allowed with input as review(obj) with data.quadrant_agent.trust_domain as td

	# The default trust domain's identity is foreign to an agent configured for another one.
	violated(good_px) == {"production-needs-production-identity"} with data.quadrant_agent.trust_domain as td
}

test_without_a_trust_domain_production_admits_nothing if {
	violated(good_px) == {"production-needs-production-identity"} with data.quadrant_agent as {}
}

test_a_constraint_parameter_names_the_trust_domain_explicitly if {
	c := [object.union(x, {"parameters": {"trust_domain": "pinned.example"}}) |
		some x in data.constraints
		x.template == "production_identity"
	]
	obj := object.union(good_px, {"spiffe_id": "spiffe://pinned.example/quadrant/px/workload/api"})
	admission.decision.allowed with input as review(obj) with data.constraints as c
	{v.constraint | some v in admission.violations with input as review(good_px) with data.constraints as c} == {"production-needs-production-identity"}
}

test_malformed_references_are_rejected if {
	bad := [
		concat("", ["api@sha256:", upper(digest)]),
		concat("", ["api@sha256:", digest, "0"]),
		concat("", ["-api@sha256:", digest]),
		concat("", ["Api@sha256:", digest]),
		concat("", [".api@sha256:", digest]),
		concat("", ["_api@sha256:", digest]),
		concat("", ["a/b@sha256:", digest]),
		concat("", ["api@sha256:", substring(digest, 0, 63), "g"]),
		concat("", ["api@sha256:", substring(digest, 0, 63)]),
		concat("", ["@sha256:", digest]),
		concat("", ["api@sha256:", digest, "@sha256:", digest]),
		concat("", ["api@sha512:", digest]),
	]
	every ref in bad {
		violated(object.union(good_px, {"artifacts": [ref]})) == {"artifacts-are-content-addressed"}
	}
}

test_well_formed_references_are_admitted if {
	every ref in [concat("", ["0pkg.v2_x-y@sha256:", digest]), concat("", ["a@sha256:", digest])] {
		admission.decision.allowed with input as review(object.union(good_px, {"artifacts": [ref]}))
	}
}

test_malformed_production_identities_are_rejected if {
	every id in [
		"spiffe://quadrant.local/quadrant/px/workload/",
		"spiffe://quadrant.local/quadrant/px/workload/api/extra",
		"spiffe://quadrant.local/quadrant/px/workload/API",
		"spiffe://quadrantXlocal/quadrant/px/workload/api",
		"spiffe://quadrant.local/quadrant/pxx/workload/api",
		"spiffe://quadrant.local.evil/quadrant/px/workload/api",
		"spiffe://quadrant.local/quadrant/dx/workload/api",
		"spiffe://quadrant.local/quadrant/px/service/api",
		"spiffe://quadrant.local/Quadrant/px/workload/api",
		"https://quadrant.local/quadrant/px/workload/api",
		"spiffe:/quadrant.local/quadrant/px/workload/api/x",
		"spiffe://quadrant.local/quadrant/px/workload/a:b",
		"",
	] {
		violated(object.union(good_px, {"spiffe_id": id})) == {"production-needs-production-identity"}
	}
}

test_a_production_gateway_identity_is_admitted_into_pg if {
	obj := object.union(good_px, {"quadrant": "pg", "spiffe_id": "spiffe://quadrant.local/quadrant/pg/workload/edge-1.v2_x"})
	admission.decision.allowed with input as review(obj)
}

burning := {"px": {"budget_remaining": 0.4, "fast_burn": true, "slow_burn": false, "breaching": ["api-up (availability of px/api): 80 good of 100"]}}

spent := {"px": {"budget_remaining": -0.5, "fast_burn": false, "slow_burn": true, "breaching": ["api-up: spent"]}}

with_slo(obj, slo) := {"review": {"object": obj}, "slo": slo}

test_a_fast_burn_holds_back_new_production_workloads if {
	violated_slo := {v.constraint | some v in admission.violations with input as with_slo(good_px, burning)}
	violated_slo == {"production-keeps-its-error-budget"}
	some v in admission.violations with input as with_slo(good_px, burning)
	contains(v.msg, "quadrant px burns its error budget too fast for new workloads: api-up (availability of px/api): 80 good of 100")
}

test_a_spent_budget_holds_back_new_production_workloads if {
	some v in admission.violations with input as with_slo(good_px, spent)
	v.msg == "quadrant px has spent its error budget: api-up: spent"
}

test_p0_and_security_plans_are_exempt if {
	admission.decision.allowed with input as with_slo(object.union(good_px, {"priority": "p0"}), burning)
	admission.decision.allowed with input as with_slo(object.union(good_px, {"priority": "security"}), spent)
	not admission.decision.allowed with input as with_slo(object.union(good_px, {"priority": "p2"}), burning)
}

test_shadow_generations_are_exempt if {
	admission.decision.allowed with input as with_slo(object.union(good_px, {"shadow": true}), burning)
	admission.decision.allowed with input as with_slo(object.union(good_px, {"shadow": true}), spent)
	not admission.decision.allowed with input as with_slo(object.union(good_px, {"shadow": false}), burning)
}

test_no_slo_data_and_development_are_not_held_back if {
	admission.decision.allowed with input as with_slo(good_px, {"px": {"budget_remaining": null, "fast_burn": false, "slow_burn": false, "breaching": []}})
	admission.decision.allowed with input as review(good_px)
	dx := object.union(good_px, {"quadrant": "dx", "spiffe_id": "spiffe://quadrant.local/quadrant/dx/workload/api"})
	not "production-keeps-its-error-budget" in {v.constraint | some v in admission.violations with input as with_slo(dx, {"dx": burning.px})}
}
