# Constraint template: a quadrant whose error budget is spent, or whose fast burn fires, admits
# no new workloads — except plans whose priority is in parameters.exempt_priorities (by default
# p0 and security), and shadow generations when parameters.exempt_shadows (by default true): a
# shadow serves no caller (its replies are dropped) and is how a fix for a burning cost or
# latency SLO is measured before it replaces the live generation. input.slo is the agent's summary of each quadrant's SLOs (`quadrant slo`):
# budget_remaining (the smallest share left among its SLOs with events, null without any),
# fast_burn and slow_burn (a page or ticket rule fires), breaching (the SLOs at fault, with their
# figures). A quadrant without SLO data has nothing to protect and is not held back.
package quadrant.admission.templates.slo_budget

exempt if {
	priorities := object.get(input.parameters, "exempt_priorities", ["p0", "security"])
	input.review.object.priority in priorities
}

exempt if {
	object.get(input.parameters, "exempt_shadows", true) == true
	input.review.object.shadow == true
}

summary := input.slo[input.review.object.quadrant]

violation contains {"msg": msg} if {
	not exempt
	summary.fast_burn == true
	msg := sprintf("quadrant %s burns its error budget too fast for new workloads: %s", [input.review.object.quadrant, concat("; ", summary.breaching)])
}

violation contains {"msg": msg} if {
	not exempt
	not summary.fast_burn
	is_number(summary.budget_remaining)
	summary.budget_remaining <= 0
	msg := sprintf("quadrant %s has spent its error budget: %s", [input.review.object.quadrant, concat("; ", summary.breaching)])
}
