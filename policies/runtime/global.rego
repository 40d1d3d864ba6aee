# Global layer of the runtime authorization. A deny here overrides any quadrant's allow
# (`quadrant policy check` reports each such conflict with both sources).
package quadrant.runtime.global

development := {"dx", "dg"}

production := {"px", "pg"}

# Development and production never open flows to each other, in either direction.
deny contains {"from": src, "to": dst, "reason": "development and production are isolated"} if {
	some src in development
	some dst in production
}

deny contains {"from": src, "to": dst, "reason": "development and production are isolated"} if {
	some src in production
	some dst in development
}

# Nothing outside the node opens flows into a quadrant.
deny contains {"from": "world", "to": q, "reason": "no ingress from outside the node"} if {
	some q in development | production
}
