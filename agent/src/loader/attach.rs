//! Attaching the programs: XDP and tcx on each quadrant's host-side veth, the cgroup hooks on
//! its cgroup (links pinned under `<pin_dir>/links/<quadrant>/`), and the optional lane
//! acceleration (`sock_ops` on cgroups, `sk_msg` on `LANE_SOCKS`).

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SchedClassifier, SkMsg,
        SockOps, TcAttachType, Xdp, XdpMode, links::FdLink, sk_msg::SkMsgLinkId,
        sock_ops::SockOpsLinkId,
    },
};
use dataplane_common::{
    Hook,
    maps::{self},
};

use super::{AttachedProgram, Dataplane, LoaderError, lane_op, map_err, programs};
use crate::{
    config::{Config, InstanceRef, XdpAttachMode},
    quadrants::QuadrantHandle,
};

impl Dataplane {
    /// Registers quadrant `handle` in the maps and attaches every program to its veth and cgroup,
    /// pinning each link under `<pin_dir>/links/<quadrant>/`. Without a pin directory the links
    /// stay attached for the life of the process.
    pub fn attach(
        &mut self,
        config: &Config,
        handle: &QuadrantHandle,
    ) -> Result<Vec<AttachedProgram>, LoaderError> {
        let i = handle.instance();
        self.register(config, handle)?;
        let link_dir = self
            .pin_dir
            .as_ref()
            .map(|d| d.join("links").join(i.name()));
        if let Some(d) = &link_dir {
            fs::create_dir_all(d).map_err(|source| LoaderError::Io {
                what: "cannot create",
                path: d.clone(),
                source,
            })?;
        }
        let mut out = Vec::new();
        for (name, hook, target) in quadrant_programs(config, i) {
            let link = self.attach_one(name, hook, config, i).map_err(|source| {
                LoaderError::ProgramOp {
                    action: "cannot attach",
                    program: name,
                    target: format!(" to {target}"),
                    source: Box::new(source),
                }
            })?;
            let link_pin = if let Some(d) = &link_dir {
                let path = d.join(hook.name());
                link.pin(&path).map_err(|e| LoaderError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                path
            } else {
                // Keep the link attached for the life of the process (tests without bpffs).
                std::mem::forget(link);
                PathBuf::new()
            };
            out.push(AttachedProgram {
                hook: hook.name().to_owned(),
                program: name.to_owned(),
                program_id: self.program_id(name)?,
                target,
                link_pin,
            });
        }
        Ok(out)
    }

    /// Registers instance `handle`'s host-side veth and cgroup as its quadrant's (with the
    /// instance and its address).
    pub(super) fn register(
        &mut self,
        config: &Config,
        handle: &QuadrantHandle,
    ) -> Result<(), LoaderError> {
        let i = handle.instance();
        self.register_iface(handle.host_ifindex, i.quadrant)?;
        self.register_cgroup(
            handle.cgroup_id,
            i.quadrant,
            i.index,
            config.instance_addr(i),
        )
    }

    /// Attaches program `name` to its hook of instance `i`, returning the (not yet pinned) link.
    pub(super) fn attach_one(
        &mut self,
        name: &'static str,
        hook: Hook,
        config: &Config,
        i: InstanceRef,
    ) -> Result<FdLink, ProgramError> {
        let iface = config.instance_iface(i);
        let iface = iface.as_str();
        let cgroup_dir = config.instance_cgroup_dir(i);
        let xdp_mode = if config.xdp_mode == XdpAttachMode::Native {
            XdpMode::Driver
        } else {
            XdpMode::Skb
        };
        let wrong_type = || ProgramError::UnexpectedProgramType;
        if !matches!(hook, Hook::Xdp | Hook::TcIngress | Hook::TcEgress) {
            return self.attach_to_cgroup(name, hook, &cgroup_dir);
        }
        let prog = self.ebpf.program_mut(name).ok_or_else(wrong_type)?;
        let link: FdLink = match hook {
            Hook::Xdp => {
                let p: &mut Xdp = prog.try_into()?;
                let id = p.attach(iface, xdp_mode)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
            Hook::TcIngress | Hook::TcEgress => {
                let p: &mut SchedClassifier = prog.try_into()?;
                let dir = if hook == Hook::TcIngress {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let id = p.attach(iface, dir)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
            _ => return Err(wrong_type()),
        };
        Ok(link)
    }

    /// Attaches cgroup program `name` (of `hook`) to the cgroup `cgroup_dir`, returning the
    /// (not yet pinned) link.
    pub(super) fn attach_to_cgroup(
        &mut self,
        name: &'static str,
        hook: Hook,
        cgroup_dir: &Path,
    ) -> Result<FdLink, ProgramError> {
        let wrong_type = || ProgramError::UnexpectedProgramType;
        let prog = self.ebpf.program_mut(name).ok_or_else(wrong_type)?;
        let link: FdLink = match hook {
            Hook::Connect4
            | Hook::Connect6
            | Hook::Sendmsg4
            | Hook::Sendmsg6
            | Hook::Getpeername4
            | Hook::Recvmsg4 => {
                let p: &mut CgroupSockAddr = prog.try_into()?;
                let cg = fs::File::open(cgroup_dir).map_err(ProgramError::IOError)?;
                // Links on a cgroup always coexist with other programs; no flag is needed.
                let id = p.attach(cg.as_fd(), CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
            Hook::SockCreate | Hook::SockRelease | Hook::PostBind4 => {
                let p: &mut CgroupSock = prog.try_into()?;
                let cg = fs::File::open(cgroup_dir).map_err(ProgramError::IOError)?;
                let id = p.attach(cg.as_fd(), CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
            Hook::SockOps => {
                let p: &mut SockOps = prog.try_into()?;
                let cg = fs::File::open(cgroup_dir).map_err(ProgramError::IOError)?;
                let id = p.attach(cg.as_fd(), CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
            Hook::Xdp | Hook::TcIngress | Hook::TcEgress => return Err(wrong_type()),
        };
        Ok(link)
    }

    /// Turns on lane acceleration: `sk_msg` on the `LANE_SOCKS` sockhash, `sock_ops` on each
    /// quadrant's cgroup. The links live as long as this process (acceleration is an
    /// optimisation; the quadrants' isolation does not depend on it).
    pub fn attach_lane_acceleration(&mut self, cgroups: &[PathBuf]) -> Result<(), LoaderError> {
        let id = self.attach_sk_msg()?;
        self.keep_sk_msg(id)?;
        for dir in cgroups {
            let id = self.attach_sock_ops(dir)?;
            self.keep_sock_ops(id)?;
        }
        Ok(())
    }

    fn sk_msg(&mut self) -> Result<&mut SkMsg, LoaderError> {
        self.ebpf
            .program_mut(programs::SK_MSG)
            .ok_or(LoaderError::Program {
                name: programs::SK_MSG,
            })?
            .try_into()
            .map_err(lane_op("cannot use", programs::SK_MSG, String::new()))
    }

    fn sock_ops(&mut self) -> Result<&mut SockOps, LoaderError> {
        self.ebpf
            .program_mut(programs::SOCKOPS)
            .ok_or(LoaderError::Program {
                name: programs::SOCKOPS,
            })?
            .try_into()
            .map_err(lane_op("cannot use", programs::SOCKOPS, String::new()))
    }

    /// Attaches `sk_msg` to `LANE_SOCKS`.
    pub fn attach_sk_msg(&mut self) -> Result<SkMsgLinkId, LoaderError> {
        let fd = {
            let map = self.map_ref(maps::LANE_SOCKS)?;
            let hash: aya::maps::SockHash<_, maps::SockKey> =
                aya::maps::SockHash::try_from(map).map_err(map_err(maps::LANE_SOCKS))?;
            hash.fd()
                .try_clone()
                .map_err(|e| map_err(maps::LANE_SOCKS)(MapError::from(e)))?
        };
        self.sk_msg()?.attach(&fd).map_err(lane_op(
            "cannot attach",
            programs::SK_MSG,
            " to LANE_SOCKS".into(),
        ))
    }

    /// Leaves `sk_msg` attached beyond this process.
    pub fn keep_sk_msg(&mut self, id: SkMsgLinkId) -> Result<(), LoaderError> {
        let link = self.sk_msg()?.take_link(id).map_err(lane_op(
            "cannot keep",
            programs::SK_MSG,
            " on LANE_SOCKS".into(),
        ))?;
        std::mem::forget(link);
        Ok(())
    }

    /// Detaches `sk_msg` from `LANE_SOCKS`.
    pub fn detach_sk_msg(&mut self, id: SkMsgLinkId) -> Result<(), LoaderError> {
        self.sk_msg()?.detach(id).map_err(lane_op(
            "cannot detach",
            programs::SK_MSG,
            " from LANE_SOCKS".into(),
        ))
    }

    /// Attaches `sock_ops` to the cgroup `dir`.
    pub fn attach_sock_ops(&mut self, dir: &Path) -> Result<SockOpsLinkId, LoaderError> {
        let target = format!(" to {}", dir.display());
        let cg = fs::File::open(dir).map_err(|e| {
            lane_op("cannot attach", programs::SOCKOPS, target.clone())(ProgramError::IOError(e))
        })?;
        self.sock_ops()?
            .attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(lane_op("cannot attach", programs::SOCKOPS, target))
    }

    /// Leaves a `sock_ops` attachment in place beyond this process.
    pub fn keep_sock_ops(&mut self, id: SockOpsLinkId) -> Result<(), LoaderError> {
        let link = self.sock_ops()?.take_link(id).map_err(lane_op(
            "cannot keep",
            programs::SOCKOPS,
            String::new(),
        ))?;
        std::mem::forget(link);
        Ok(())
    }

    /// Detaches a `sock_ops` attachment.
    pub fn detach_sock_ops(&mut self, id: SockOpsLinkId) -> Result<(), LoaderError> {
        self.sock_ops()?.detach(id).map_err(lane_op(
            "cannot detach",
            programs::SOCKOPS,
            String::new(),
        ))
    }

    /// Whether both ends of the loopback connection between ports `client` and `server` are
    /// in `LANE_SOCKS`; with `remove`, takes them out.
    pub fn loopback_pair_in_lane_socks(
        &mut self,
        (client, server): (u16, u16),
        remove: bool,
    ) -> Result<bool, LoaderError> {
        let map = self.map_mut(maps::LANE_SOCKS)?;
        let mut hash: aya::maps::SockHash<_, maps::SockKey> =
            aya::maps::SockHash::try_from(map).map_err(map_err(maps::LANE_SOCKS))?;
        let lo = u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets());
        let mut both = true;
        for (local, remote) in [(client, server), (server, client)] {
            let key = maps::SockKey {
                local_ip4: lo,
                remote_ip4: lo,
                local_port: u32::from(local),
                remote_port: u32::from(remote),
            };
            let found = if remove {
                match hash.remove(&key) {
                    Ok(()) => true,
                    Err(MapError::KeyNotFound) => false,
                    Err(e) => return Err(map_err(maps::LANE_SOCKS)(e)),
                }
            } else {
                hash.keys().filter_map(Result::ok).any(|k| k == key)
            };
            both &= found;
        }
        Ok(both)
    }

    /// Lane acceleration counters, summed over CPUs: sockets added, messages redirected,
    /// messages passed on, messages refused (a revoked flow).
    pub fn lane_accel_counters(&self) -> Result<[u64; 4], LoaderError> {
        const _: () = assert!(maps::lane_accel::COUNT == 4, "one figure per counter slot");
        let map = self.map_ref(maps::LANE_ACCEL)?;
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_err(maps::LANE_ACCEL))?;
        let mut out = [0u64; 4];
        for (slot, v) in out.iter_mut().enumerate() {
            let idx = u32::try_from(slot).unwrap_or_default();
            *v = arr
                .get(&idx, 0)
                .map_err(map_err(maps::LANE_ACCEL))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Detaches every program from every quadrant by unpinning the links (pinned mode only).
    pub fn detach_all(&mut self) -> Result<(), LoaderError> {
        if let Some(dir) = &self.pin_dir {
            let links = dir.join("links");
            if links.exists() {
                fs::remove_dir_all(&links).map_err(|source| LoaderError::Io {
                    what: "cannot unpin links in",
                    path: links.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

/// The programs attached to each quadrant instance under `config` (XDP only when it is on), each
/// with the interface or cgroup it goes to.
pub(super) fn quadrant_programs(
    config: &Config,
    i: InstanceRef,
) -> Vec<(&'static str, Hook, String)> {
    programs::ALL
        .into_iter()
        .filter(|(_, hook)| *hook != Hook::Xdp || config.xdp_mode != XdpAttachMode::Off)
        .map(|(name, hook)| {
            let target = if programs::CGROUP.contains(&name) {
                config.instance_cgroup_dir(i).display().to_string()
            } else {
                config.instance_iface(i)
            };
            (name, hook, target)
        })
        .collect()
}
