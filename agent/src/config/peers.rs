//! The `peers` section: the agents of other nodes this one links to over TCP + mTLS, so that a
//! lane to a service no instance on this node can take goes to an instance on another node.

use std::{collections::BTreeMap, net::SocketAddrV4, path::PathBuf};

use dataplane_common::Quadrant;
use ipnet::Ipv4Net;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, invalid};

/// Peer nodes at most: instances of a peer are numbered `16·(p + 1) + k` in lane grants, which
/// must fit a byte.
pub const MAX_PEERS: usize = 14;

/// The agents of other nodes: a static list, and in a Kubernetes cluster the nodes the API lists.
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
    /// Also link to the other nodes of a Kubernetes cluster: this agent writes its peer address
    /// and quadrant prefixes on its own Node object and links to every node whose agent did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesPeers>,
}

/// How the agent reaches the Kubernetes API and which node it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesPeers {
    /// This node's name in the cluster, also the name in its node SVID; default: the
    /// `NODE_NAME` environment variable (the DaemonSet sets it from the pod's `spec.nodeName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// A kubeconfig file; default: the pod's service account (in-cluster configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Quadrant prefixes by node name, for one configuration shared by every node (the
    /// DaemonSet's ConfigMap): a listed node splits its block into four equal prefixes, in the
    /// order dx, dg, px, pg, in place of `quadrants.*.prefix`; a node not listed keeps those.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_prefixes: BTreeMap<String, Ipv4Net>,
}

impl KubernetesPeers {
    /// This node's name: `node_name`, else `NODE_NAME`.
    ///
    /// # Errors
    /// When neither is set, or the name is not one a peer may have.
    pub fn node(&self) -> Result<String, String> {
        let name = match &self.node_name {
            Some(n) => n.clone(),
            None => std::env::var("NODE_NAME").map_err(|_| {
                "peers.kubernetes needs this node's name: set peers.kubernetes.node_name or the \
                 NODE_NAME environment variable (the DaemonSet sets it from spec.nodeName)"
                    .to_owned()
            })?,
        };
        check_name(&name).map_err(|e| format!("peers.kubernetes node name: {e}"))?;
        Ok(name)
    }
}

/// A peer's name: a node name as Kubernetes has them (a DNS subdomain: at most 253 characters
/// of letters, digits, '-' and '.', labels alphanumeric at both ends), since it is also the last
/// segment of its node SVID's path.
///
/// # Errors
/// Naming what is wrong with `name`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && name
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1-253 characters of letters, digits, '-' and '.', in dot-separated \
             labels that begin and end with a letter or digit"
        ))
    }
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
            kubernetes: None,
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
    /// With `peers.kubernetes.node_prefixes` listing this node: its block's four quarters as
    /// the quadrants' prefixes (before the configuration is validated).
    pub(super) fn apply_node_prefixes(&mut self) -> Result<(), ConfigError> {
        let Some(k) = &self.peers.kubernetes else {
            return Ok(());
        };
        let field = "peers.kubernetes.node_prefixes";
        let blocks: Vec<(&String, &Ipv4Net)> = k.node_prefixes.iter().collect();
        for (i, (name, block)) in blocks.iter().enumerate() {
            check_name(name).map_err(|e| invalid(field, e))?;
            if block.prefix_len() > 28 {
                return Err(invalid(
                    format!("{field}.{name}"),
                    format!("{block} is too small: at most /28, so each quadrant has a /30"),
                ));
            }
            if let Some((other, b)) = blocks[..i]
                .iter()
                .find(|(_, b)| b.contains(&block.network()) || block.contains(&b.network()))
            {
                return Err(invalid(
                    format!("{field}.{name}"),
                    format!("{block} overlaps {other}'s {b}; each node needs a block of its own"),
                ));
            }
        }
        if k.node_prefixes.is_empty() {
            return Ok(());
        }
        let Ok(node) = k.node() else {
            return Ok(());
        };
        let Some(block) = k.node_prefixes.get(&node) else {
            return Ok(());
        };
        let quarters: Vec<Ipv4Net> = block
            .subnets(block.prefix_len() + 2)
            .map_err(|e| invalid(format!("{field}.{node}"), e.to_string()))?
            .collect();
        for (q, net) in Quadrant::ALL.iter().zip(quarters) {
            if let Some(qc) = self.quadrants.get_mut(q.name()) {
                qc.prefix = net;
            }
        }
        Ok(())
    }

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
            check_name(&n.name).map_err(|e| invalid(format!("{field}.name"), e))?;
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
        if let Some(k) = &p.kubernetes {
            if p.listen.is_none() {
                return Err(invalid(
                    "peers.kubernetes",
                    "needs peers.listen: the address this agent publishes on its Node object",
                ));
            }
            if let Some(n) = &k.node_name {
                check_name(n).map_err(|e| invalid("peers.kubernetes.node_name", e))?;
            }
        }
        Ok(())
    }
}
