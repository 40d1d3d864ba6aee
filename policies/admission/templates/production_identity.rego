# Constraint template: a production quadrant (px, pg) only admits workloads whose SPIFFE ID is a
# production identity of the trust domain: spiffe://<trust domain>/quadrant/<px|pg>/workload/<name>,
# <name> of lowercase letters, digits, '.', '_', '-'. The trust domain is parameters.trust_domain
# when the constraint sets it, else the one the agent is configured with (identity.trust_domain,
# given as data.quadrant_agent.trust_domain). String builtins rather than regex.match (see
# content_addressed.rego).
package quadrant.admission.templates.production_identity

production_identity(id, trust_domain) if {
	["spiffe:", "", trust_domain, "quadrant", quadrant, "workload", name] = split(id, "/")
	quadrant in {"px", "pg"}
	name != ""
	trim_left(name, "abcdefghijklmnopqrstuvwxyz0123456789._-") == ""
}

violation contains {"msg": msg} if {
	id := object.get(input.review.object, "spiffe_id", "")
	trust_domain := object.get(input.parameters, "trust_domain", data.quadrant_agent.trust_domain)
	not production_identity(id, trust_domain)
	msg := sprintf("identity %q is not a production identity of %s", [id, trust_domain])
}

# Fail-closed: with no trust domain to check against, nothing is admitted. (Written as its own
# rule: regorus' Rego VM does not evaluate `else` chains of complete rules correctly.)
violation contains {"msg": "no trust domain to check the identity against (parameters.trust_domain, or the agent's identity.trust_domain)"} if {
	not input.parameters.trust_domain
	not data.quadrant_agent.trust_domain
}
