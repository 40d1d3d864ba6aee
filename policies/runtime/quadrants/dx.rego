# Runtime authorization of the development quadrant (dx): the flows it accepts and the flows it may
# open towards the host. Every flow here must involve dx; the global layer can still deny it.
package quadrant.runtime.quadrants.dx

all_protocols := ["tcp", "udp", "icmp"]

# Inside the quadrant.
allow contains {"from": "dx", "to": "dx", "protocols": all_protocols}

# Its partner quadrant.
allow contains {"from": "dg", "to": "dx", "protocols": all_protocols}

# The node reaches every quadrant.
allow contains {"from": "host", "to": "dx", "protocols": all_protocols}

# The quadrant may ping the node.
allow contains {"from": "dx", "to": "host", "protocols": ["icmp"]}

# RTT lanes into DX services (every service, every transport).
lanes contains {"from": "dx", "to": "dx"}

lanes contains {"from": "dg", "to": "dx"}
