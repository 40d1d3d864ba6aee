# Combines the layers of the runtime authorization into the flows the agent compiles into the
# kernel's policy map, and answers single questions for `quadrant policy eval`.
#
# A flow: {"from": identity, "to": identity, "protocols": [...], "ports": [...]} where identities
# are dx, dg, px, pg, host, world (as a source also a quadrant-wide SPIFFE ID pattern
# spiffe://<td>/quadrant/<q>/workload/* or one workload's SPIFFE ID, which the kernel enforces at
# that workload's sockets), protocols tcp/udp/icmp, ports "443" or "8000-8080"
# (absent: every port).
package quadrant.runtime

import data.quadrant.runtime.global

all_quadrants := {"dx", "dg", "px", "pg"}

# Every allow of every quadrant layer, with the layer it came from.
candidates contains object.union(f, {"layer": q}) if {
	some q in all_quadrants
	some f in data.quadrant.runtime.quadrants[q].allow
}

# The agent configuration's own rules (`policy:` in its YAML), as the `local` layer.
candidates contains object.union(f, {"layer": "local"}) if {
	some f in data.quadrant_local.allow
}

# A global deny between quadrants also covers rules naming a SPIFFE ID (or pattern) of the source
# quadrant.
denied_by(f) := {d | some d in global.deny; d.from == source_of(f.from); d.to == f.to}

# The flows the kernel enforces: allowed by a quadrant layer and not denied globally.
flows contains f if {
	some f in candidates
	count(denied_by(f)) == 0
}

# A quadrant allow the global layer overrides.
conflicts contains {"allow": f, "deny": d} if {
	some f in candidates
	some d in denied_by(f)
}

# A quadrant layer may only speak about flows that involve its own quadrant.
misplaced contains f if {
	some f in candidates
	f.layer != "local"
	f.layer != source_of(f.from)
	f.layer != f.to
}

port_in(port, spec) if {
	parts := split(spec, "-")
	count(parts) == 1
	port == to_number(parts[0])
}

port_in(port, spec) if {
	parts := split(spec, "-")
	count(parts) == 2
	to_number(parts[0]) <= port
	port <= to_number(parts[1])
}

port_ok(f, _) if not f.ports

port_ok(f, _) if input.protocol == "icmp"

port_ok(f, port) if {
	some spec in f.ports
	port_in(port, spec)
}

# The sources a flow may name to apply to `input.from`: itself and, for one workload's SPIFFE
# ID, its quadrant's pattern (…/workload/*) and its quadrant.
input_sources contains input.from

input_sources contains quadrant_of(input.from) if startswith(input.from, "spiffe://")

input_sources contains concat("/", array.concat(array.slice(parts, 0, 6), ["*"])) if {
	startswith(input.from, "spiffe://")
	parts := split(input.from, "/")
	count(parts) == 7
}

# The flows that allow `input` ({"from", "to", "protocol", "port"}).
matching contains f if {
	some f in flows
	f.from in input_sources
	f.to == input.to
	input.protocol in f.protocols
	port_ok(f, input.port)
}

# Globally denied pairs matching `input`.
matching_denies contains d if {
	some d in global.deny
	d.from == source_of(input.from)
	d.to == input.to
}

decision := {"allowed": count(matching) > 0, "allowed_by": matching, "denied_by": matching_denies}

# RTT lanes. A lane rule: {"from": quadrant | SPIFFE ID | spiffe://<td>/quadrant/<q>/workload/*,
# "to": quadrant, "services": [...] (absent: every service), "transports": shm, uds, tcp (absent:
# every transport)}. Lanes are decided by the agent's lane broker for each opening, so a rule may
# name a single workload's SPIFFE ID. Global denies between quadrants apply to lanes too.
lane_candidates contains object.union(l, {"layer": q}) if {
	some q in all_quadrants
	some l in data.quadrant.runtime.quadrants[q].lanes
}

# The quadrant an identity or SPIFFE ID (pattern) belongs to.
quadrant_of(id) := id if id in all_quadrants

quadrant_of(id) := parts[4] if {
	parts := split(id, "/")
	count(parts) == 7
	parts[0] == "spiffe:"
	parts[3] == "quadrant"
	parts[5] == "workload"
}

# The identity a rule's source stands for: itself, or the quadrant of a SPIFFE ID (pattern).
source_of(id) := id if not startswith(id, "spiffe://")

source_of(id) := quadrant_of(id) if startswith(id, "spiffe://")

lane_denied_by(l) := {d | some d in global.deny; d.from == quadrant_of(l.from); d.to == l.to}

# The lane rules the broker applies.
lane_rules contains l if {
	some l in lane_candidates
	quadrant_of(l.from)
	count(lane_denied_by(l)) == 0
}

# A quadrant lane rule the global layer overrides.
conflicts contains {"allow": l, "deny": d} if {
	some l in lane_candidates
	some d in lane_denied_by(l)
}

# Lane rules must name a known source and be placed in the destination's layer.
misplaced contains l if {
	some l in lane_candidates
	l.layer != l.to
}

misplaced contains l if {
	some l in lane_candidates
	not quadrant_of(l.from)
}

