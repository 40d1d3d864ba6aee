//! Pods of a Kubernetes node (CNI chaining, `quadrant-cni`): the packet programs — XDP, tcx
//! ingress and egress — on a pod's host-side veth, as on a quadrant's, with the links pinned
//! under `<pin_dir>/links/pods/<key>/`; the veth registered in `IFACES` and the pod's addresses
//! in `PREFIXES` as its quadrant's, so that the policy judges the pod as that quadrant. When the
//! runtime names the pod's cgroup, the cgroup programs go on it too (links pinned beside the
//! veth's) and the cgroup is registered in `CGROUPS` as the quadrant's, so its sockets are judged
//! at `connect()`/`sendmsg()` as a quadrant's processes are (the programs find a pod's cgroup at
//! whatever level it sits).

use std::{fs, path::PathBuf};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use dataplane_common::{Hook, Identity, Quadrant, maps};
use ipnet::Ipv4Net;

use super::{AttachedProgram, Dataplane, LoaderError, map_err, programs};
use crate::config::XdpAttachMode;

/// The packet programs of a host-side veth, with their hooks.
const PACKET_PROGRAMS: [(&str, Hook); 3] = [
    (programs::XDP, Hook::Xdp),
    (programs::TC_INGRESS, Hook::TcIngress),
    (programs::TC_EGRESS, Hook::TcEgress),
];

/// Where a pod's links are pinned: `<pin_dir>/links/pods/<key>`.
#[must_use]
pub fn pod_link_dir(pin_dir: &std::path::Path, key: &str) -> PathBuf {
    pin_dir.join("links").join("pods").join(key)
}

impl Dataplane {
    /// Registers the pod's veth `ifname` (`ifindex`) and `addresses` as quadrant `q`'s and
    /// puts the packet programs on the veth. A link already pinned for `key` (a pod an earlier
    /// agent attached) is switched to this object's program atomically; a missing one is
    /// attached and pinned.
    pub fn attach_pod(
        &mut self,
        key: &str,
        ifname: &str,
        ifindex: u32,
        q: Quadrant,
        addresses: &[Ipv4Net],
        xdp_mode: XdpAttachMode,
    ) -> Result<Vec<AttachedProgram>, LoaderError> {
        self.register_iface(ifindex, q)?;
        let host: Vec<(Ipv4Net, Identity)> = addresses
            .iter()
            .map(|a| (Ipv4Net::new(a.addr(), 32).unwrap_or(*a), Identity::from(q)))
            .collect();
        self.add_prefixes(&host)?;
        let dir = self.pod_links(key)?;
        let mode = if xdp_mode == XdpAttachMode::Native {
            XdpMode::Driver
        } else {
            XdpMode::Skb
        };
        let mut out = Vec::new();
        for (name, hook) in PACKET_PROGRAMS {
            if hook == Hook::Xdp && xdp_mode == XdpAttachMode::Off {
                continue;
            }
            let path = dir.join(hook.name());
            let op = |source: ProgramError| LoaderError::ProgramOp {
                action: "cannot attach",
                program: name,
                target: format!(" to pod veth {ifname}"),
                source: Box::new(source),
            };
            let pin_err = |reason: String| LoaderError::Pin {
                path: path.clone(),
                reason,
            };
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or(LoaderError::Program { name })?;
            let switch = path.exists();
            if hook == Hook::Xdp {
                let p: &mut Xdp = prog.try_into().map_err(op)?;
                if switch {
                    let old = FdLink::from(
                        PinnedLink::from_pin(&path).map_err(|e| pin_err(e.to_string()))?,
                    );
                    let link = XdpLink::try_from(old).map_err(|e| pin_err(e.to_string()))?;
                    let id = p.attach_to_link(link).map_err(op)?;
                    drop(p.take_link(id).map_err(op)?);
                } else {
                    let id = p.attach(ifname, mode).map_err(op)?;
                    let link: FdLink = p
                        .take_link(id)
                        .map_err(op)?
                        .try_into()
                        .map_err(|_| op(ProgramError::UnexpectedProgramType))?;
                    link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
                }
            } else {
                let p: &mut SchedClassifier = prog.try_into().map_err(op)?;
                if switch {
                    let old = FdLink::from(
                        PinnedLink::from_pin(&path).map_err(|e| pin_err(e.to_string()))?,
                    );
                    let link =
                        SchedClassifierLink::try_from(old).map_err(|e| pin_err(e.to_string()))?;
                    let id = p.attach_to_link(link).map_err(op)?;
                    drop(p.take_link(id).map_err(op)?);
                } else {
                    let dir = if hook == Hook::TcIngress {
                        TcAttachType::Ingress
                    } else {
                        TcAttachType::Egress
                    };
                    let id = p.attach(ifname, dir).map_err(op)?;
                    let link: FdLink = p
                        .take_link(id)
                        .map_err(op)?
                        .try_into()
                        .map_err(|_| op(ProgramError::UnexpectedProgramType))?;
                    link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
                }
            }
            out.push(AttachedProgram {
                hook: hook.name().to_owned(),
                program: name.to_owned(),
                program_id: self.program_id(name)?,
                target: format!("pod veth {ifname}"),
                link_pin: path,
            });
        }
        Ok(out)
    }

    /// Registers the pod cgroup `dir` as quadrant `q`'s (its sockets answer from `addr`) and
    /// puts the cgroup programs on it, pinned under the pod's link directory; returns its
    /// cgroup id and the programs. A link an earlier agent pinned is replaced (cgroup links
    /// cannot be switched in place: for that moment the pod's packets are still judged at its
    /// veth).
    pub fn attach_pod_cgroup(
        &mut self,
        key: &str,
        dir: &std::path::Path,
        q: Quadrant,
        addr: std::net::Ipv4Addr,
    ) -> Result<(u64, Vec<AttachedProgram>), LoaderError> {
        let id = crate::sys::cgroup_id(dir).map_err(|e| LoaderError::Io {
            what: "cannot read the cgroup of",
            path: dir.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.register_cgroup(id, q, 0, addr)?;
        let links = self.pod_links(key)?;
        let mut out = Vec::new();
        for (name, hook) in programs::ALL {
            if matches!(hook, Hook::Xdp | Hook::TcIngress | Hook::TcEgress) {
                continue;
            }
            let path = links.join(hook.name());
            if path.exists() {
                fs::remove_file(&path).map_err(|source| LoaderError::Io {
                    what: "cannot unpin",
                    path: path.clone(),
                    source,
                })?;
            }
            let link = self.attach_to_cgroup(name, hook, dir).map_err(|source| {
                LoaderError::ProgramOp {
                    action: "cannot attach",
                    program: name,
                    target: format!(" to pod cgroup {}", dir.display()),
                    source: Box::new(source),
                }
            })?;
            link.pin(&path).map_err(|e| LoaderError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.push(AttachedProgram {
                hook: hook.name().to_owned(),
                program: name.to_owned(),
                program_id: self.program_id(name)?,
                target: format!("pod cgroup {}", dir.display()),
                link_pin: path,
            });
        }
        Ok((id, out))
    }

    /// The pod's link directory, made if it is not there.
    fn pod_links(&self, key: &str) -> Result<PathBuf, LoaderError> {
        let dir = self
            .pin_dir
            .as_ref()
            .map(|d| pod_link_dir(d, key))
            .ok_or(LoaderError::NotReady("attaching a pod (no pin directory)"))?;
        fs::create_dir_all(&dir).map_err(|source| LoaderError::Io {
            what: "cannot create",
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Takes the pod's programs off its veth and cgroup (removing the pins ends the links; a
    /// veth or cgroup already gone took them with it) and forgets the veth, the pod's addresses
    /// and its cgroup (`cgroup_id`). Nothing there is not an error.
    pub fn detach_pod(
        &mut self,
        key: &str,
        ifindex: u32,
        addresses: &[Ipv4Net],
        cgroup_id: Option<u64>,
    ) -> Result<(), LoaderError> {
        if let Some(id) = cgroup_id {
            let mut cgroups: aya::maps::HashMap<_, u64, maps::CgroupValue> =
                aya::maps::HashMap::try_from(self.map_mut(maps::CGROUPS)?)
                    .map_err(map_err(maps::CGROUPS))?;
            match cgroups.remove(&id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::CGROUPS)(e)),
            }
        }
        if let Some(dir) = self.pin_dir.as_ref().map(|d| pod_link_dir(d, key))
            && dir.exists()
        {
            fs::remove_dir_all(&dir).map_err(|source| LoaderError::Io {
                what: "cannot unpin the links of",
                path: dir.clone(),
                source,
            })?;
        }
        let mut ifaces: aya::maps::HashMap<_, u32, maps::IfaceValue> =
            aya::maps::HashMap::try_from(self.map_mut(maps::IFACES)?)
                .map_err(map_err(maps::IFACES))?;
        match ifaces.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::IFACES)(e)),
        }
        let mut trie: aya::maps::LpmTrie<_, u32, maps::PrefixValue> =
            aya::maps::LpmTrie::try_from(self.map_mut(maps::PREFIXES)?)
                .map_err(map_err(maps::PREFIXES))?;
        for a in addresses {
            let key = super::lpm_key(Ipv4Net::new(a.addr(), 32).unwrap_or(*a));
            match trie.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::PREFIXES)(e)),
            }
        }
        Ok(())
    }
}
