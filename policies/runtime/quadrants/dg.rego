# Runtime authorization of the development gateway quadrant (dg): the flows it accepts and the flows it may
# open towards the host. Every flow here must involve dg; the global layer can still deny it.
package quadrant.runtime.quadrants.dg

all_protocols := ["tcp", "udp", "icmp"]

# Inside the quadrant.
allow contains {"from": "dg", "to": "dg", "protocols": all_protocols}

# Its partner quadrant.
allow contains {"from": "dx", "to": "dg", "protocols": all_protocols}

# The node reaches every quadrant.
allow contains {"from": "host", "to": "dg", "protocols": all_protocols}

# The quadrant may ping the node.
allow contains {"from": "dg", "to": "host", "protocols": ["icmp"]}

# RTT lanes into DG services (every service, every transport).
lanes contains {"from": "dg", "to": "dg"}

lanes contains {"from": "dx", "to": "dg"}
