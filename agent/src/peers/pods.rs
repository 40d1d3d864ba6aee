//! Pods across nodes: each agent tells its peers, in every hello, the pods `quadrant-cni`
//! attached on its node (address and quadrant), and writes the pods its peers tell into
//! `PREFIXES` as host entries of their quadrants — so a pod on another node is judged as its
//! quadrant here, as Cilium's ipcache carries other nodes' endpoints. The owning node's agent
//! is the source (it attached the pod and knows its quadrant); the link is authenticated by
//! the node SVIDs. A hello repeats every second, so a pod's arrival or departure reaches the
//! other nodes within about a second.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::PoisonError};

use dataplane_common::{Identity, Quadrant};
use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{Peers, locked, wire::PodAddress};

/// Pods a peer may tell at most (a node's `maxPods` is 110 by default).
pub const MAX_PEER_PODS: usize = 512;

/// A peer's pods: the addresses it told with their quadrants, those written into `PREFIXES`,
/// and why the others were not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct PeerPods {
    told: BTreeMap<Ipv4Addr, Quadrant>,
    pub(super) written: BTreeMap<Ipv4Addr, Quadrant>,
    pub(super) refused: Vec<String>,
}

/// The pods `told`, by address; the ones that cannot be taken, and why.
fn parse(pods: &[PodAddress]) -> (BTreeMap<Ipv4Addr, Quadrant>, Vec<String>) {
    let mut told = BTreeMap::new();
    let mut refused = Vec::new();
    if pods.len() > MAX_PEER_PODS {
        refused.push(format!(
            "{} pods told; at most {MAX_PEER_PODS} are taken",
            pods.len()
        ));
    }
    for p in pods.iter().take(MAX_PEER_PODS) {
        match Quadrant::from_name(&p.quadrant) {
            Some(q) => {
                told.insert(p.address, q);
            }
            None => refused.push(format!("{} (unknown quadrant {:?})", p.address, p.quadrant)),
        }
    }
    (told, refused)
}

fn host(a: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(a)
}

impl Peers {
    /// This node's pods, as it tells them (at most [`MAX_PEER_PODS`] addresses).
    pub(super) fn own_pods(&self) -> Vec<PodAddress> {
        let Some(agent) = self.agent.upgrade() else {
            return Vec::new();
        };
        let mut out: Vec<PodAddress> = agent
            .pods
            .list()
            .into_iter()
            .flat_map(|p| {
                p.spec.addresses.into_iter().map(move |a| PodAddress {
                    address: a.addr(),
                    quadrant: p.spec.quadrant.clone(),
                })
            })
            .collect();
        out.sort();
        out.dedup();
        if out.len() > MAX_PEER_PODS {
            warn!(
                pods = out.len(),
                "more pod addresses than peers take ({MAX_PEER_PODS}); the rest are outside the \
                 node to them"
            );
            out.truncate(MAX_PEER_PODS);
        }
        out
    }

    /// What a pod address of node `name` may not be, and why: this node's (inside its
    /// quadrants' prefixes, a host address, one of its pods) or another peer's (inside its
    /// prefixes, or a pod it told first).
    fn claimed(
        &self,
        name: &str,
        local: &[Ipv4Addr],
        all: &BTreeMap<String, PeerPods>,
    ) -> impl Fn(&Ipv4Addr) -> Option<String> {
        let mut taken = self.own_nets();
        for (other, nets) in locked(&self.learned)
            .iter()
            .filter(|(n, _)| n.as_str() != name)
        {
            taken.extend(
                nets.values()
                    .map(|n| (format!("node {other}'s prefixes"), *n)),
            );
        }
        let others: BTreeMap<Ipv4Addr, String> = all
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(n, p)| p.written.keys().map(move |a| (*a, n.clone())))
            .collect();
        let local = local.to_vec();
        move |a| {
            if local.contains(a) {
                Some("a pod of this node".to_owned())
            } else if let Some(o) = others.get(a) {
                Some(format!("a pod of node {o}"))
            } else {
                taken
                    .iter()
                    .find(|(_, n)| n.contains(a))
                    .map(|(what, _)| what.clone())
            }
        }
    }

    /// Writes the pods node `name` tells into `PREFIXES` as their quadrants and takes out the
    /// ones it no longer tells; an address that is this node's or another peer's, or that the
    /// full map cannot take, is left out and reported (`quadrant instances`). Nothing is half
    /// written.
    pub(crate) fn learn_pods(&self, name: &str, pods: &[PodAddress]) {
        let (told, mut refused) = parse(pods);
        let Some(agent) = self.agent.upgrade() else {
            return;
        };
        let mut all = locked(&self.pods);
        let before = all.get(name).cloned().unwrap_or_default();
        if before.told == told && refused.is_empty() && before.refused.is_empty() {
            return;
        }
        let local: Vec<Ipv4Addr> = agent
            .pods
            .list()
            .iter()
            .flat_map(|p| p.spec.addresses.iter().map(Ipv4Net::addr))
            .collect();
        let claimed = self.claimed(name, &local, &all);
        let mut written = BTreeMap::new();
        for (a, q) in &told {
            match claimed(a) {
                Some(why) => refused.push(format!("{a} ({why})")),
                None => {
                    written.insert(*a, *q);
                }
            }
        }
        drop(claimed);
        let add: Vec<(Ipv4Net, Identity)> = written
            .iter()
            .filter(|(a, q)| before.written.get(*a) != Some(*q))
            .map(|(a, q)| (host(*a), Identity::from(*q)))
            .collect();
        // A former pod's entry goes, unless a pod of this node has the address by now.
        let gone: Vec<Ipv4Net> = before
            .written
            .keys()
            .filter(|a| !written.contains_key(*a) && !local.contains(*a))
            .map(|a| host(*a))
            .collect();
        let mut dp = agent
            .dataplane
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = dp.add_prefixes(&add) {
            let new: Vec<Ipv4Net> = add
                .iter()
                .filter(|(n, _)| !before.written.contains_key(&n.addr()))
                .map(|(n, _)| *n)
                .collect();
            let _ = dp.remove_prefixes(&new);
            for n in &new {
                written.remove(&n.addr());
            }
            refused.push(format!(
                "{} pods not written: {e} (PREFIXES holds {} entries)",
                new.len(),
                dataplane_common::maps::PREFIXES_MAX
            ));
        }
        if let Err(e) = dp.remove_prefixes(&gone) {
            warn!(node = name, error = %e, "cannot remove a peer's former pods");
        }
        drop(dp);
        if !refused.is_empty() && refused != before.refused {
            warn!(
                node = name,
                ?refused,
                "peer's pods not judged as their quadrants"
            );
        }
        if written != before.written {
            info!(
                node = name,
                pods = written.len(),
                "peer node's pods written"
            );
        }
        all.insert(
            name.to_owned(),
            PeerPods {
                told,
                written,
                refused,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn told_pods_are_read_within_the_limit() {
        let pod = |a: &str, q: &str| PodAddress {
            address: a.parse().expect("ip"),
            quadrant: q.into(),
        };
        let (told, refused) = parse(&[pod("10.243.0.5", "px"), pod("10.243.0.6", "qa")]);
        assert_eq!(
            told.get(&"10.243.0.5".parse().expect("ip")),
            Some(&Quadrant::Px)
        );
        assert_eq!(refused, ["10.243.0.6 (unknown quadrant \"qa\")"]);
        let many: Vec<PodAddress> = (0..=MAX_PEER_PODS)
            .map(|i| {
                pod(
                    &Ipv4Addr::from(0x0af3_0000 + u32::try_from(i).expect("i")).to_string(),
                    "dx",
                )
            })
            .collect();
        let (told, refused) = parse(&many);
        assert_eq!(told.len(), MAX_PEER_PODS);
        assert_eq!(refused, ["513 pods told; at most 512 are taken"]);
    }
}
