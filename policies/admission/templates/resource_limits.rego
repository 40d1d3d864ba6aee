# Constraint template: the workload sets every resource limit in parameters.required.
package quadrant.admission.templates.resource_limits

violation contains {"msg": msg} if {
	some resource in input.parameters.required
	not input.review.object.resources[resource]
	msg := sprintf("resource limit %q is not set", [resource])
}
