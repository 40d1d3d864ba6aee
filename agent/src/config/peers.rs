//! The `peers` section: the agents of other nodes this one links to over TCP + mTLS, so that a
//! lane to a service no instance on this node can take goes to an instance on another node.

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, invalid};

/// Peer nodes at most: instances of a peer are numbered `16·(p + 1) + k` in lane grants, which
/// must fit a byte.
pub const MAX_PEERS: usize = 14;

/// The agents of other nodes (a static list; in a Kubernetes cluster the API would supply it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// Where this agent accepts its peers' links (TCP + mTLS, its node SVID). None: it only
    /// links out, and peers cannot open lanes to its instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddrV4>,
    /// The other nodes, in the order lanes fail over to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PeerNode>,
    /// Route each peer's quadrant prefixes via its address (nodes on one link, as Cilium's
    /// direct routing does); off where the network routes them already.
    #[serde(default = "yes")]
    pub routes: bool,
}

fn yes() -> bool {
    true
}

impl Default for PeersConfig {
    fn default() -> Self {
        Self {
            listen: None,
            nodes: Vec::new(),
            routes: true,
        }
    }
}

/// One other node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerNode {
    /// Its agent's `instance`: its node SVID is `spiffe://<trust domain>/node/<name>`.
    pub name: String,
    /// Where its agent accepts peers (its `peers.listen`).
    pub address: SocketAddrV4,
}

/// The SPIFFE ID of the agent of node `name` (its `instance`) in `trust_domain`.
#[must_use]
pub fn node_id(trust_domain: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/node/{name}")
}

impl Config {
    pub(super) fn validate_peers(&self) -> Result<(), ConfigError> {
        let p = &self.peers;
        if p.nodes.len() > MAX_PEERS {
            return Err(invalid(
                "peers.nodes",
                format!("{} nodes; at most {MAX_PEERS}", p.nodes.len()),
            ));
        }
        for (i, n) in p.nodes.iter().enumerate() {
            let field = format!("peers.nodes[{i}]");
            if n.name.is_empty()
                || n.name.len() > 32
                || !n
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} must be 1-32 characters of a-z, 0-9 and '-'", n.name),
                ));
            }
            if n.name == self.instance {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is this agent's own instance", n.name),
                ));
            }
            if p.nodes[..i].iter().any(|o| o.name == n.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is listed twice", n.name),
                ));
            }
            if n.address.port() == 0 || n.address.ip().is_unspecified() {
                return Err(invalid(
                    format!("{field}.address"),
                    format!("{} needs an address and a port", n.address),
                ));
            }
        }
        if let Some(l) = p.listen
            && l.port() == 0
        {
            return Err(invalid("peers.listen", format!("{l} needs a port")));
        }
        Ok(())
    }
}
