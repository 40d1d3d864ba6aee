# Constraint template: every artifact is referenced by content, <pkg>@sha256:<64 hex digits>
# (<pkg>: a lowercase letter or digit, then lowercase letters, digits, '.', '_', '-').
#
# Written with string builtins rather than regex.match: each regex.match call costs regorus a
# fresh lazy-DFA build (its cache hands out clones of the compiled regex, and a clone of a
# `regex::Regex` starts with an empty cache), several microseconds per admission. Every builtin
# call costs the Rego VM a few hundred nanoseconds, so the check uses as few as it can.
package quadrant.admission.templates.content_addressed

content_addressed(ref) if {
	[pkg, digest] := split(ref, "@sha256:")
	count(digest) == 64
	trim_left(digest, "0123456789abcdef") == ""

	# A first character that is a lowercase letter or digit (so pkg is not empty either) ...
	trim_left(pkg, "abcdefghijklmnopqrstuvwxyz0123456789") != pkg

	# ... and nothing outside the package alphabet after it.
	trim_left(pkg, "abcdefghijklmnopqrstuvwxyz0123456789._-") == ""
}

violation contains {"msg": "no artifact referenced"} if {
	not input.review.object.artifacts[0]
}

violation contains {"msg": msg} if {
	some artifact in input.review.object.artifacts
	not content_addressed(artifact)
	msg := sprintf("artifact %q is not a content-addressed reference (<pkg>@sha256:<digest>)", [artifact])
}
