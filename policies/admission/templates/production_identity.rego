# Constraint template: a production quadrant (px, pg) only admits workloads whose SPIFFE ID is a
# production identity of the trust domain in parameters.trust_domain:
# spiffe://<trust domain>/quadrant/<px|pg>/workload/<name>, <name> of lowercase letters, digits,
# '.', '_', '-'. String builtins rather than regex.match (see content_addressed.rego).
package quadrant.admission.templates.production_identity

production_identity(id, trust_domain) if {
	["spiffe:", "", trust_domain, "quadrant", quadrant, "workload", name] = split(id, "/")
	quadrant in {"px", "pg"}
	name != ""
	trim_left(name, "abcdefghijklmnopqrstuvwxyz0123456789._-") == ""
}

violation contains {"msg": msg} if {
	id := object.get(input.review.object, "spiffe_id", "")
	not production_identity(id, input.parameters.trust_domain)
	msg := sprintf("identity %q is not a production identity of %s", [id, input.parameters.trust_domain])
}
