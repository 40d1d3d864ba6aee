# Constraint template: every artifact is referenced by content, <pkg>@sha256:<64 hex digits>.
package quadrant.admission.templates.content_addressed

reference := `^[a-z0-9][a-z0-9._-]*@sha256:[0-9a-f]{64}$`

violation contains {"msg": "no artifact referenced"} if {
	count(object.get(input.review.object, "artifacts", [])) == 0
}

violation contains {"msg": msg} if {
	some artifact in input.review.object.artifacts
	not regex.match(reference, artifact)
	msg := sprintf("artifact %q is not a content-addressed reference (<pkg>@sha256:<digest>)", [artifact])
}
