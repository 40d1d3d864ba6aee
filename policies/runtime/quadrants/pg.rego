# Runtime authorization of the production gateway quadrant (pg): the flows it accepts and the flows it may
# open towards the host. Every flow here must involve pg; the global layer can still deny it.
package quadrant.runtime.quadrants.pg

all_protocols := ["tcp", "udp", "icmp"]

# Inside the quadrant.
allow contains {"from": "pg", "to": "pg", "protocols": all_protocols}

# Its partner quadrant.
allow contains {"from": "px", "to": "pg", "protocols": all_protocols}

# The node reaches every quadrant.
allow contains {"from": "host", "to": "pg", "protocols": all_protocols}

# The quadrant may ping the node.
allow contains {"from": "pg", "to": "host", "protocols": ["icmp"]}

# RTT lanes into PG services (every service, every transport).
lanes contains {"from": "pg", "to": "pg"}

lanes contains {"from": "px", "to": "pg"}
