# Constraint template: the workload carries every label in parameters.labels.
package quadrant.admission.templates.required_labels

violation contains {"msg": msg} if {
	some label in input.parameters.labels
	not input.review.object.labels[label]
	msg := sprintf("missing required label %q", [label])
}
