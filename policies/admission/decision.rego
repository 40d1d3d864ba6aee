# Gatekeeper-style admission: each constraint in data.constraints (policies/admission/
# constraints.json) instantiates a template from quadrant.admission.templates with its
# parameters, for the quadrants it matches. A workload is admitted when no constraint reports a
# violation.
package quadrant.admission

applies(c) if input.review.object.quadrant in c.match.quadrants

violations contains {"constraint": c.name, "template": c.template, "msg": v.msg} if {
	some c in data.constraints
	applies(c)
	some v in data.quadrant.admission.templates[c.template].violation with input.parameters as c.parameters
}

decision := {"allowed": count(violations) == 0, "violations": violations}
