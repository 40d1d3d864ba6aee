# Constraint template: every artifact is referenced by content, <pkg>@sha256:<64 hex digits>
# (<pkg>: a lowercase letter or digit, then lowercase letters, digits, '.', '_', '-').
#
# Written with string builtins rather than regex.match: each regex.match call costs regorus a
# fresh lazy-DFA build (its cache hands out clones of the compiled regex, and a clone of a
# `regex::Regex` starts with an empty cache), several microseconds per admission.
package quadrant.admission.templates.content_addressed

lower_alnum := "abcdefghijklmnopqrstuvwxyz0123456789"

pkg_chars := "abcdefghijklmnopqrstuvwxyz0123456789._-"

content_addressed(ref) if {
	parts := split(ref, "@sha256:")
	count(parts) == 2
	pkg := parts[0]
	digest := parts[1]
	count(pkg) > 0
	contains(lower_alnum, substring(pkg, 0, 1))
	trim(pkg, pkg_chars) == ""
	count(digest) == 64
	trim(digest, "0123456789abcdef") == ""
}

violation contains {"msg": "no artifact referenced"} if {
	count(object.get(input.review.object, "artifacts", [])) == 0
}

violation contains {"msg": msg} if {
	some artifact in input.review.object.artifacts
	not content_addressed(artifact)
	msg := sprintf("artifact %q is not a content-addressed reference (<pkg>@sha256:<digest>)", [artifact])
}
