# Constraint template: a production quadrant (px, pg) only admits workloads whose SPIFFE ID is a
# production identity of the trust domain in parameters.trust_domain.
package quadrant.admission.templates.production_identity

violation contains {"msg": msg} if {
	id := object.get(input.review.object, "spiffe_id", "")
	pattern := sprintf(`^spiffe://%s/quadrant/(px|pg)/workload/[a-z0-9._-]+$`, [replace(input.parameters.trust_domain, ".", `\.`)])
	not regex.match(pattern, id)
	msg := sprintf("identity %q is not a production identity of %s", [id, input.parameters.trust_domain])
}
