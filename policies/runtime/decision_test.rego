# Unit tests of the runtime authorization (`quadrant policy test`).
package quadrant.runtime_test

import data.quadrant.runtime

allowed(from, to, protocol, port) if {
	runtime.decision.allowed with input as {"from": from, "to": to, "protocol": protocol, "port": port}
}

test_inside_a_quadrant_is_allowed if allowed("px", "px", "tcp", 8080)

test_development_pair_is_allowed if {
	allowed("dx", "dg", "tcp", 443)
	allowed("dg", "dx", "udp", 53)
}

test_production_pair_is_allowed if allowed("pg", "px", "icmp", 0)

test_development_cannot_reach_production if {
	not allowed("dx", "px", "tcp", 443)
	not allowed("dg", "pg", "udp", 53)
	not allowed("dx", "pg", "icmp", 0)
}

test_production_cannot_reach_development if {
	not allowed("px", "dx", "tcp", 22)
	not allowed("pg", "dg", "icmp", 0)
}

test_host_reaches_every_quadrant if {
	every q in runtime.all_quadrants {
		allowed("host", q, "tcp", 22)
	}
}

test_quadrants_only_ping_the_host if {
	allowed("dx", "host", "icmp", 0)
	not allowed("dx", "host", "tcp", 22)
}

test_world_reaches_nothing if {
	every q in runtime.all_quadrants {
		not allowed("world", q, "tcp", 443)
	}
}

test_a_global_deny_overrides_a_quadrant_allow if {
	decision := runtime.decision with data.quadrant.runtime.quadrants.px.allow as {{"from": "dx", "to": "px", "protocols": ["tcp"]}}
		with input as {"from": "dx", "to": "px", "protocol": "tcp", "port": 443}
	not decision.allowed
	count(decision.denied_by) == 1
}

test_conflicts_name_both_sides if {
	c := runtime.conflicts with data.quadrant.runtime.quadrants.px.allow as {{"from": "dx", "to": "px", "protocols": ["tcp"]}}
	some conflict in c
	conflict.allow.layer == "px"
	conflict.deny.reason == "development and production are isolated"
}

test_port_ranges if {
	f := {{"from": "dx", "to": "dg", "protocols": ["tcp"], "ports": ["443", "8000-8080"]}}
	d := runtime.decision with data.quadrant.runtime.quadrants.dg.allow as f with data.quadrant.runtime.quadrants.dx.allow as set()
		with input as {"from": "dx", "to": "dg", "protocol": "tcp", "port": 8080}
	d.allowed
	not runtime.decision.allowed with data.quadrant.runtime.quadrants.dg.allow as f with data.quadrant.runtime.quadrants.dx.allow as set()
		with input as {"from": "dx", "to": "dg", "protocol": "tcp", "port": 8081}
}

test_the_default_layers_are_well_placed if count(runtime.misplaced) == 0

lane_allowed(from, to) if {
	some l in runtime.lane_rules
	l.from == from
	l.to == to
}

test_lanes_follow_the_quadrant_pairs if {
	lane_allowed("dx", "dg")
	lane_allowed("dg", "dx")
	lane_allowed("pg", "px")
	lane_allowed("px", "px")
	not lane_allowed("dx", "px")
	not lane_allowed("pg", "dg")
}

test_a_lane_rule_across_the_divide_is_dropped_and_reported if {
	extra := {{"from": "spiffe://quadrant.local/quadrant/dx/workload/tool", "to": "px"}}
	rules := runtime.lane_rules with data.quadrant.runtime.quadrants.px.lanes as extra
	count({l | some l in rules; l.to == "px"}) == 0
	c := runtime.conflicts with data.quadrant.runtime.quadrants.px.lanes as extra
	some conflict in c
	conflict.allow.from == "spiffe://quadrant.local/quadrant/dx/workload/tool"
}

test_a_workload_lane_rule_is_kept if {
	extra := {{"from": "spiffe://quadrant.local/quadrant/dg/workload/api", "to": "dx", "services": ["echo"]}}
	rules := runtime.lane_rules with data.quadrant.runtime.quadrants.dx.lanes as extra
	some l in rules
	l.from == "spiffe://quadrant.local/quadrant/dg/workload/api"
	l.services == ["echo"]
}

test_a_lane_rule_with_an_unknown_source_is_misplaced if {
	m := runtime.misplaced with data.quadrant.runtime.quadrants.dx.lanes as {{"from": "everyone", "to": "dx"}}
	some l in m
	l.from == "everyone"
}


test_a_global_deny_overrides_an_allow_from_spiffe_ids if {
	every from in ["spiffe://quadrant.local/quadrant/dx/workload/*", "spiffe://quadrant.local/quadrant/dx/workload/api"] {
		f := runtime.flows with data.quadrant.runtime.quadrants.px.allow as {{"from": from, "to": "px", "protocols": ["tcp"]}}
		count({x | some x in f; x.from == from}) == 0
		c := runtime.conflicts with data.quadrant.runtime.quadrants.px.allow as {{"from": from, "to": "px", "protocols": ["tcp"]}}
		count(c) == 1
	}
}

test_a_workload_rule_in_its_own_quadrant_layer_is_not_misplaced if {
	m := runtime.misplaced with data.quadrant.runtime.quadrants.dx.allow as {{"from": "spiffe://quadrant.local/quadrant/dx/workload/api", "to": "host", "protocols": ["tcp"], "ports": ["7300"]}}
	count(m) == 0
}

test_a_workload_is_decided_by_its_own_rules_and_its_quadrant_rules if {
	api := "spiffe://quadrant.local/quadrant/dx/workload/api"
	web := "spiffe://quadrant.local/quadrant/dx/workload/web"
	rule := {"from": api, "to": "host", "protocols": ["tcp"], "ports": ["7310"]}
	runtime.decision.allowed with data.quadrant.runtime.quadrants.dx.allow as {rule}
		with input as {"from": api, "to": "host", "protocol": "tcp", "port": 7310}
	not runtime.decision.allowed with data.quadrant.runtime.quadrants.dx.allow as {rule}
		with input as {"from": web, "to": "host", "protocol": "tcp", "port": 7310}
	allowed(api, "dg", "tcp", 443)
	not allowed(api, "px", "tcp", 443)
	d := runtime.decision with input as {"from": api, "to": "px", "protocol": "tcp", "port": 443}
	count(d.denied_by) == 1
}
