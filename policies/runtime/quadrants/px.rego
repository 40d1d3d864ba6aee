# Runtime authorization of the production quadrant (px): the flows it accepts and the flows it may
# open towards the host. Every flow here must involve px; the global layer can still deny it.
package quadrant.runtime.quadrants.px

all_protocols := ["tcp", "udp", "icmp"]

# Inside the quadrant.
allow contains {"from": "px", "to": "px", "protocols": all_protocols}

# Its partner quadrant.
allow contains {"from": "pg", "to": "px", "protocols": all_protocols}

# The node reaches every quadrant.
allow contains {"from": "host", "to": "px", "protocols": all_protocols}

# The quadrant may ping the node.
allow contains {"from": "px", "to": "host", "protocols": ["icmp"]}

# RTT lanes into PX services (every service, every transport).
lanes contains {"from": "px", "to": "px"}

lanes contains {"from": "pg", "to": "px"}
