//! Loads the embedded eBPF object, pins its programs and maps, attaches the programs to each
//! quadrant (pinning the links), writes the configuration maps and reads the counters.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SchedClassifier, SkMsg,
        SockOps, TcAttachType, Xdp, XdpMode, links::FdLink, sk_msg::SkMsgLinkId,
        sock_ops::SockOpsLinkId,
    },
};
use dataplane_common::{
    Hook, Identity, Quadrant, Reason,
    maps::{
        self, CgroupValue, DataplaneConfig, IfaceValue, MAX_PORT_RANGES, PolicyKey, PolicyValue,
        PrefixValue, QuadrantValue, WlPolicyKey,
    },
    reason::{QUADRANT_SLOTS, stats_index},
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, XdpAttachMode},
    policy::{CompiledPolicy, KernelPolicy},
    quadrants::QuadrantHandle,
};

mod takeover;

pub use takeover::{Carried, KeptDataplane};

/// The dataplane object built by `build.rs` from `dataplane-ebpf`.
pub static DATAPLANE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

/// Program names in the object.
pub mod programs {
    /// XDP on the host-side veth.
    pub const XDP: &str = "quadrant_xdp";
    /// tcx ingress on the host-side veth.
    pub const TC_INGRESS: &str = "quadrant_tc_ingress";
    /// tcx egress on the host-side veth.
    pub const TC_EGRESS: &str = "quadrant_tc_egress";
    /// cgroup connect4.
    pub const CONNECT4: &str = "quadrant_connect4";
    /// cgroup connect6.
    pub const CONNECT6: &str = "quadrant_connect6";
    /// cgroup sendmsg4.
    pub const SENDMSG4: &str = "quadrant_sendmsg4";
    /// cgroup sendmsg6.
    pub const SENDMSG6: &str = "quadrant_sendmsg6";
    /// cgroup `sock_create`.
    pub const SOCK_CREATE: &str = "quadrant_sock_create";
    /// Every program, with the hook it serves.
    pub const ALL: [(&str, dataplane_common::Hook); 8] = [
        (XDP, dataplane_common::Hook::Xdp),
        (TC_INGRESS, dataplane_common::Hook::TcIngress),
        (TC_EGRESS, dataplane_common::Hook::TcEgress),
        (CONNECT4, dataplane_common::Hook::Connect4),
        (CONNECT6, dataplane_common::Hook::Connect6),
        (SENDMSG4, dataplane_common::Hook::Sendmsg4),
        (SENDMSG6, dataplane_common::Hook::Sendmsg6),
        (SOCK_CREATE, dataplane_common::Hook::SockCreate),
    ];
    /// The cgroup programs.
    pub const CGROUP: [&str; 5] = [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, SOCK_CREATE];
    /// `sock_ops` recording established TCP sockets (lane acceleration).
    pub const SOCKOPS: &str = "quadrant_sockops";
    /// `sk_msg` redirecting to a local peer socket (lane acceleration).
    pub const SK_MSG: &str = "quadrant_sk_msg";
    /// The optional lane-acceleration programs, with their kind.
    pub const LANE_ACCEL: [(&str, &str); 2] = [(SOCKOPS, "sock_ops"), (SK_MSG, "sk_msg")];
}

/// SHA-256 of the embedded eBPF object, hex.
#[must_use]
pub fn object_digest() -> String {
    crate::artifacts::hex(ring::digest::digest(&ring::digest::SHA256, DATAPLANE_OBJECT).as_ref())
}

/// What a dataplane signature signs: the object's digest and the versions it carries.
#[must_use]
pub fn object_statement() -> String {
    format!(
        "sha256:{} program-set {} map-layout {}",
        object_digest(),
        dataplane_common::PROGRAM_SET_VERSION,
        dataplane_common::MAP_LAYOUT_VERSION
    )
}

/// Errors of loading, attaching and map access.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// An operation that needs the dataplane configured, asked for before.
    #[error("{0} needs the dataplane configured first")]
    NotReady(&'static str),
    /// The object could not be parsed or its maps created.
    #[error("cannot load the eBPF object: {0}")]
    Load(Box<aya::EbpfError>),
    /// A program is missing from the object or has another type.
    #[error("program {name} missing from the eBPF object or of the wrong type")]
    Program {
        /// Program name.
        name: &'static str,
    },
    /// A map is missing from the object.
    #[error("map {name} missing from the eBPF object")]
    MissingMap {
        /// Map name.
        name: &'static str,
    },
    /// The kernel refused to load or attach a program.
    #[error("{action} {program}{target}: {source}")]
    ProgramOp {
        /// What was being done.
        action: &'static str,
        /// Program name.
        program: &'static str,
        /// Where (` to qh-dx`), may be empty.
        target: String,
        /// Cause (includes the verifier log on load).
        source: Box<ProgramError>,
    },
    /// A policy entry with a key the policy maps have no room for.
    #[error(
        "no policy entry for identity {src} → identity {dst}, protocol {proto}: the kernel policy holds ICMP, TCP and UDP between at most {slots} identities",
        slots = maps::POLICY_IDENTITY_SLOTS
    )]
    PolicyKey {
        /// Source identity id.
        src: u8,
        /// Destination identity id.
        dst: u8,
        /// Protocol number.
        proto: u8,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        source: Box<MapError>,
    },
    /// Pinning failed.
    #[error("cannot pin {path}: {reason}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The dataplane an earlier agent kept running cannot be taken over; it stays as it was.
    #[error("cannot take over the kept dataplane: {0}")]
    Takeover(String),
    /// A file-system step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// An error of one of the lane acceleration programs.
fn lane_op(
    action: &'static str,
    program: &'static str,
    target: String,
) -> impl FnOnce(ProgramError) -> LoaderError {
    move |e: ProgramError| LoaderError::ProgramOp {
        action,
        program,
        target,
        source: Box::new(e),
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> LoaderError {
    move |source| LoaderError::Map {
        name,
        source: Box::new(source),
    }
}

/// One attached, pinned link.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct AttachedProgram {
    /// Hook name (`xdp`, `tc_ingress`, …).
    pub hook: String,
    /// Program name.
    pub program: String,
    /// Kernel program id.
    pub program_id: u32,
    /// Interface name or cgroup path the program is attached to.
    pub target: String,
    /// Pin path of the link.
    pub link_pin: PathBuf,
}

/// A counter row: (hook, quadrant, reason) → count summed over CPUs.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Counter {
    /// Hook name.
    pub hook: String,
    /// Quadrant name, or `unattributed`.
    pub quadrant: String,
    /// Reason name.
    pub reason: String,
    /// Verdict (`pass` or `drop`).
    pub verdict: String,
    /// Count.
    pub count: u64,
}

/// The loaded dataplane.
#[derive(Debug)]
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// What CONFIG holds, once written.
    live: Option<DataplaneConfig>,
    /// Whether a policy was made live yet.
    policy_written: bool,
    /// What each policy slot holds, index by index (the arrays start zeroed: all empty), so a
    /// change writes only the entries that differ; `None`: unknown after a failed write.
    policy_slots: [Option<Vec<PolicyValue>>; 2],
    /// The digest of the bundle the live policy was compiled from.
    policy_digest: Option<String>,
}

impl Dataplane {
    /// Loads every program into the kernel. With `pin_dir`, pins programs under `progs/` and
    /// maps under `maps/` there (the directory must not hold an older pin set).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, LoaderError> {
        let mut ebpf = EbpfLoader::new()
            .load(DATAPLANE_OBJECT)
            .map_err(|e| LoaderError::Load(Box::new(e)))?;
        let names = programs::ALL
            .iter()
            .map(|(n, _)| *n)
            .chain(programs::LANE_ACCEL.iter().map(|(n, _)| *n));
        for name in names {
            let prog = ebpf
                .program_mut(name)
                .ok_or(LoaderError::Program { name })?;
            let load = |e: ProgramError| LoaderError::ProgramOp {
                action: "cannot load",
                program: name,
                target: String::new(),
                source: Box::new(e),
            };
            match prog {
                aya::programs::Program::Xdp(p) => p.load().map_err(load)?,
                aya::programs::Program::SchedClassifier(p) => p.load().map_err(load)?,
                aya::programs::Program::CgroupSockAddr(p) => p.load().map_err(load)?,
                aya::programs::Program::CgroupSock(p) => p.load().map_err(load)?,
                aya::programs::Program::SockOps(p) => p.load().map_err(load)?,
                aya::programs::Program::SkMsg(p) => p.load().map_err(load)?,
                _ => return Err(LoaderError::Program { name }),
            }
        }
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_owned),
            live: None,
            policy_written: false,
            policy_slots: [Some(empty_policy_slot()), Some(empty_policy_slot())],
            policy_digest: None,
        };
        if let Some(dir) = pin_dir {
            dp.pin_all(dir)?;
        }
        Ok(dp)
    }

    fn pin_all(&mut self, dir: &Path) -> Result<(), LoaderError> {
        let maps_dir = dir.join("maps");
        let progs_dir = dir.join("progs");
        for d in [&maps_dir, &progs_dir] {
            fs::create_dir_all(d).map_err(|source| LoaderError::Io {
                what: "cannot create",
                path: d.clone(),
                source,
            })?;
        }
        for name in maps::ALL {
            let map = self
                .ebpf
                .map(name)
                .ok_or(LoaderError::MissingMap { name })?;
            let path = maps_dir.join(name);
            map.pin(&path).map_err(|e| LoaderError::Pin {
                path,
                reason: e.to_string(),
            })?;
        }
        for (name, _) in programs::ALL {
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or(LoaderError::Program { name })?;
            let path = progs_dir.join(name);
            prog.pin(&path).map_err(|e| LoaderError::Pin {
                path,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// The underlying object, for tests that drive programs with `test_run`.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Kernel id of a program.
    pub fn program_id(&self, name: &'static str) -> Result<u32, LoaderError> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or(LoaderError::Program { name })?;
        let info = prog.info().map_err(|source| LoaderError::ProgramOp {
            action: "cannot read info of",
            program: name,
            target: String::new(),
            source: Box::new(source),
        })?;
        Ok(info.id())
    }

    /// Verified instruction count of each program (the hook programs, then the lane
    /// acceleration ones), as the kernel reports it.
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, Option<u32>)>, LoaderError> {
        programs::ALL
            .iter()
            .map(|(name, _)| name)
            .chain(programs::LANE_ACCEL.iter().map(|(name, _)| name))
            .map(|name| {
                let prog = self
                    .ebpf
                    .program(name)
                    .ok_or(LoaderError::Program { name })?;
                let info = prog.info().map_err(|source| LoaderError::ProgramOp {
                    action: "cannot read info of",
                    program: name,
                    target: String::new(),
                    source: Box::new(source),
                })?;
                Ok((*name, info.verified_instruction_count()))
            })
            .collect()
    }

    /// Writes PREFIXES, QUADRANTS and CONFIG from the configuration; the policy stays deny-all
    /// (its live slot empty) until [`Self::apply_policy`].
    pub fn write_config(&mut self, config: &Config, cgroup_level: u32) -> Result<(), LoaderError> {
        self.write_prefixes(&prefix_entries(config))?;
        let mut quads: Array<_, QuadrantValue> =
            Array::try_from(self.map_mut(maps::QUADRANTS)?).map_err(map_err(maps::QUADRANTS))?;
        for q in Quadrant::ALL {
            let addr = u32::from_ne_bytes(config.addrs(q).workload.octets());
            quads
                .set(u32::from(q as u8), QuadrantValue { addr }, 0)
                .map_err(map_err(maps::QUADRANTS))?;
        }
        let slot = self.live.map_or(0, |c| c.policy_slot);
        let live = DataplaneConfig {
            cgroup_level,
            ct_timeout_secs: config.conntrack_timeout_secs,
            policy_slot: slot,
            raw_sockets_denied: 0,
            trace: maps::TRACE_OFF,
        };
        // Deny-all until a policy is made live: the live slot is still empty.
        let mut cfg: Array<_, DataplaneConfig> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        cfg.set(0, live, 0).map_err(map_err(maps::CONFIG))?;
        self.live = Some(live);
        Ok(())
    }

    /// Replaces the PREFIXES entries.
    pub fn write_prefixes(&mut self, entries: &[(Ipv4Net, Identity)]) -> Result<(), LoaderError> {
        let mut trie: LpmTrie<_, u32, PrefixValue> =
            LpmTrie::try_from(self.map_mut(maps::PREFIXES)?).map_err(map_err(maps::PREFIXES))?;
        let wanted: Vec<Key<u32>> = entries.iter().map(|(net, _)| lpm_key(*net)).collect();
        for ((_, id), key) in entries.iter().zip(&wanted) {
            trie.insert(
                key,
                PrefixValue {
                    identity: *id as u8,
                    pad: [0; 3],
                },
                0,
            )
            .map_err(map_err(maps::PREFIXES))?;
        }
        let stale: Vec<Key<u32>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        for k in stale {
            trie.remove(&k).map_err(map_err(maps::PREFIXES))?;
        }
        Ok(())
    }

    /// Makes `policy` live at once: fills the policy slot the programs are not reading with
    /// exactly these entries, then flips `CONFIG.policy_slot` with one array update. The slot
    /// that was live is left as it was until the next change. Returns the new live slot.
    pub fn apply_policy(&mut self, policy: &KernelPolicy) -> Result<u32, LoaderError> {
        let mut live = self.live.unwrap_or(DataplaneConfig {
            cgroup_level: 0,
            ct_timeout_secs: 0,
            policy_slot: 0,
            raw_sockets_denied: 0,
            trace: maps::TRACE_OFF,
        });
        // First write: fill slot 0, empty until now (deny-all), before any program is attached.
        // Later writes: the slot that is not live.
        let target = if self.policy_written {
            1 - live.policy_slot
        } else {
            0
        };
        let (name, wl_name) = if target == 0 {
            (maps::POLICY_A, maps::WL_POLICY_A)
        } else {
            (maps::POLICY_B, maps::WL_POLICY_B)
        };
        let scoped = |scope: u8, p: &CompiledPolicy| -> Vec<(PolicyKey, PolicyValue)> {
            p.iter()
                .map(|((src, dst, proto), ranges)| {
                    let key = PolicyKey {
                        src: *src as u8,
                        dst: *dst as u8,
                        proto: *proto,
                        scope,
                    };
                    (key, policy_value(ranges))
                })
                .collect()
        };
        let mut entries = scoped(maps::SCOPE_QUADRANT, &policy.quadrant);
        entries.extend(scoped(maps::SCOPE_PACKET, &policy.packet));
        let wl_entries: Vec<(WlPolicyKey, PolicyValue)> = policy
            .workloads
            .iter()
            .map(|w| {
                let key = WlPolicyKey {
                    cgroup_id: w.cgroup_id,
                    dst: w.dst as u8,
                    proto: w.proto,
                    pad: [0; 6],
                };
                (key, policy_value(&w.ranges))
            })
            .collect();
        let mut wanted = empty_policy_slot();
        for (key, value) in &entries {
            let index = key.index().ok_or(LoaderError::PolicyKey {
                src: key.src,
                dst: key.dst,
                proto: key.proto,
            })?;
            wanted[index as usize] = *value;
        }
        let slot = usize::from(target != 0);
        // Until the write succeeds the slot's content is unknown (the next change then writes
        // every entry). The slot is not live: a failed write takes no effect.
        let held = self.policy_slots[slot].take();
        let mut map: Array<_, PolicyValue> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (index, value) in (0u32..).zip(&wanted) {
            if held.as_ref().is_none_or(|h| h[index as usize] != *value) {
                map.set(index, value, 0).map_err(map_err(name))?;
            }
        }
        self.policy_slots[slot] = Some(wanted);
        let mut map: HashMap<_, WlPolicyKey, PolicyValue> =
            HashMap::try_from(self.map_mut(wl_name)?).map_err(map_err(wl_name))?;
        replace_entries(&mut map, &wl_entries).map_err(map_err(wl_name))?;
        live.policy_slot = target;
        live.raw_sockets_denied = policy.raw_sockets_denied;
        let mut cfg: Array<_, DataplaneConfig> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        cfg.set(0, live, 0).map_err(map_err(maps::CONFIG))?;
        self.live = Some(live);
        self.policy_written = true;
        self.policy_digest.clone_from(&policy.bundle_digest);
        Ok(target)
    }

    /// The digest of the bundle the live policy was compiled from (`None`: deny-all, or a
    /// policy not compiled from a bundle).
    #[must_use]
    pub fn policy_digest(&self) -> Option<&str> {
        self.policy_digest.as_deref()
    }

    /// Sets the verdict trace (`CONFIG.trace`: [`maps::TRACE_OFF`],
    /// `TRACE_DROPS` or `TRACE_ALL`); the records reach the agent's log through the logger
    /// [`Self::take_logger`] hands out. Refused before the first policy is written (CONFIG is
    /// then still empty, which the programs read as deny-all).
    pub fn set_trace(&mut self, mode: u16) -> Result<(), LoaderError> {
        let Some(mut live) = self.live else {
            return Err(LoaderError::NotReady("the verdict trace"));
        };
        live.trace = mode;
        let mut cfg: Array<_, DataplaneConfig> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        cfg.set(0, live, 0).map_err(map_err(maps::CONFIG))?;
        self.live = Some(live);
        Ok(())
    }

    /// The live trace mode.
    #[must_use]
    pub fn trace(&self) -> u16 {
        self.live.map_or(maps::TRACE_OFF, |c| c.trace)
    }

    /// The reader of the [`maps::TRACE`] ring buffer, once: the caller drains it for as long
    /// as the programs run.
    pub fn take_trace(&mut self) -> Result<RingBuf<aya::maps::MapData>, LoaderError> {
        let map = self
            .ebpf
            .take_map(maps::TRACE)
            .ok_or(LoaderError::MissingMap { name: maps::TRACE })?;
        RingBuf::try_from(map).map_err(map_err(maps::TRACE))
    }

    /// Whether the live policy refuses raw sockets in quadrant `q` (it names single workloads).
    #[must_use]
    pub fn raw_sockets_denied(&self, q: Quadrant) -> bool {
        self.live
            .is_some_and(|c| c.raw_sockets_denied & (1 << (q as u32)) != 0)
    }

    /// The policy slot the programs read (0 = `POLICY_A`, 1 = `POLICY_B`).
    #[must_use]
    pub fn live_policy_slot(&self) -> u32 {
        self.live.map_or(0, |c| c.policy_slot)
    }

    /// Number of entries in policy slot `slot`.
    pub fn policy_entries(&self, slot: u32) -> Result<usize, LoaderError> {
        let name = if slot == 0 {
            maps::POLICY_A
        } else {
            maps::POLICY_B
        };
        let m = self
            .ebpf
            .map(name)
            .ok_or(LoaderError::MissingMap { name })?;
        let map: Array<_, PolicyValue> = Array::try_from(m).map_err(map_err(name))?;
        Ok(map
            .iter()
            .filter(|v| v.as_ref().is_ok_and(|v| v.count > 0))
            .count())
    }

    /// Registers a host-side veth as belonging to quadrant `q`.
    pub fn register_iface(&mut self, ifindex: u32, q: Quadrant) -> Result<(), LoaderError> {
        let mut map: HashMap<_, u32, IfaceValue> =
            HashMap::try_from(self.map_mut(maps::IFACES)?).map_err(map_err(maps::IFACES))?;
        map.insert(
            ifindex,
            IfaceValue {
                quadrant: q as u8,
                pad: [0; 3],
            },
            0,
        )
        .map_err(map_err(maps::IFACES))
    }

    /// Registers a cgroup (by id) as belonging to quadrant `q`.
    pub fn register_cgroup(&mut self, cgroup_id: u64, q: Quadrant) -> Result<(), LoaderError> {
        let mut map: HashMap<_, u64, CgroupValue> =
            HashMap::try_from(self.map_mut(maps::CGROUPS)?).map_err(map_err(maps::CGROUPS))?;
        map.insert(
            cgroup_id,
            CgroupValue {
                quadrant: q as u8,
                pad: [0; 3],
            },
            0,
        )
        .map_err(map_err(maps::CGROUPS))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, LoaderError> {
        self.ebpf
            .map_mut(name)
            .ok_or(LoaderError::MissingMap { name })
    }

    /// Registers quadrant `handle` in the maps and attaches every program to its veth and cgroup,
    /// pinning each link under `<pin_dir>/links/<quadrant>/`. Without a pin directory the links
    /// stay attached for the life of the process.
    pub fn attach(
        &mut self,
        config: &Config,
        handle: &QuadrantHandle,
    ) -> Result<Vec<AttachedProgram>, LoaderError> {
        let q = handle.quadrant;
        self.register_iface(handle.host_ifindex, q)?;
        self.register_cgroup(handle.cgroup_id, q)?;
        let link_dir = self
            .pin_dir
            .as_ref()
            .map(|d| d.join("links").join(q.name()));
        if let Some(d) = &link_dir {
            fs::create_dir_all(d).map_err(|source| LoaderError::Io {
                what: "cannot create",
                path: d.clone(),
                source,
            })?;
        }
        let mut out = Vec::new();
        for (name, hook, target) in quadrant_programs(config, q) {
            let link = self.attach_one(name, hook, config, q).map_err(|source| {
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

    /// Attaches program `name` to its hook of quadrant `q`, returning the (not yet pinned) link.
    fn attach_one(
        &mut self,
        name: &'static str,
        hook: Hook,
        config: &Config,
        q: Quadrant,
    ) -> Result<FdLink, ProgramError> {
        let iface = config.host_iface(q);
        let iface = iface.as_str();
        let cgroup_dir = config.cgroup_dir(q);
        let xdp_mode = if config.xdp_mode == XdpAttachMode::Native {
            XdpMode::Driver
        } else {
            XdpMode::Skb
        };
        let wrong_type = || ProgramError::UnexpectedProgramType;
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
            Hook::Connect4 | Hook::Connect6 | Hook::Sendmsg4 | Hook::Sendmsg6 => {
                let p: &mut CgroupSockAddr = prog.try_into()?;
                let cg = fs::File::open(cgroup_dir).map_err(ProgramError::IOError)?;
                // Links on a cgroup always coexist with other programs; no flag is needed.
                let id = p.attach(cg.as_fd(), CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
            Hook::SockCreate => {
                let p: &mut CgroupSock = prog.try_into()?;
                let cg = fs::File::open(cgroup_dir).map_err(ProgramError::IOError)?;
                let id = p.attach(cg.as_fd(), CgroupAttachMode::Single)?;
                p.take_link(id)?.try_into().map_err(|_| wrong_type())?
            }
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
            let map = self
                .ebpf
                .map(maps::LANE_SOCKS)
                .ok_or(LoaderError::MissingMap {
                    name: maps::LANE_SOCKS,
                })?;
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
        let map = self
            .ebpf
            .map_mut(maps::LANE_SOCKS)
            .ok_or(LoaderError::MissingMap {
                name: maps::LANE_SOCKS,
            })?;
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
        let map = self
            .ebpf
            .map(maps::LANE_ACCEL)
            .ok_or(LoaderError::MissingMap {
                name: maps::LANE_ACCEL,
            })?;
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

    /// Every non-zero counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, LoaderError> {
        let map = self
            .ebpf
            .map(maps::STATS)
            .ok_or(LoaderError::MissingMap { name: maps::STATS })?;
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_err(maps::STATS))?;
        let mut out = Vec::new();
        for hook in Hook::ALL {
            for slot in 0..QUADRANT_SLOTS {
                for reason in Reason::ALL {
                    let values = stats
                        .get(&stats_index(hook, slot, *reason), 0)
                        .map_err(map_err(maps::STATS))?;
                    let count: u64 = values.iter().sum();
                    if count > 0 {
                        out.push(Counter {
                            hook: hook.name().to_owned(),
                            quadrant: Quadrant::from_id(u8::try_from(slot).unwrap_or(u8::MAX))
                                .map_or("unattributed", Quadrant::name)
                                .to_owned(),
                            reason: reason.name().to_owned(),
                            verdict: match reason.verdict() {
                                dataplane_common::Verdict::Pass => "pass",
                                dataplane_common::Verdict::Drop => "drop",
                            }
                            .to_owned(),
                            count,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// The counter of one (hook, quadrant slot, reason), summed over CPUs.
    pub fn counter(&self, hook: Hook, slot: u32, reason: Reason) -> Result<u64, LoaderError> {
        let map = self
            .ebpf
            .map(maps::STATS)
            .ok_or(LoaderError::MissingMap { name: maps::STATS })?;
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_err(maps::STATS))?;
        let values = stats
            .get(&stats_index(hook, slot, reason), 0)
            .map_err(map_err(maps::STATS))?;
        Ok(values.iter().sum())
    }
}

/// Whether the pinned dataplane under `pin_dir` refuses raw sockets in quadrant `q` (its live
/// policy names single workloads), read from the pinned `CONFIG` map.
pub fn raw_sockets_denied_pinned(pin_dir: &Path, q: Quadrant) -> Result<bool, LoaderError> {
    let path = pin_dir.join("maps").join(maps::CONFIG);
    let data = aya::maps::MapData::from_pin(&path).map_err(map_err(maps::CONFIG))?;
    let config: Array<_, DataplaneConfig> =
        Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(maps::CONFIG))?;
    let live = config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
    Ok(live.raw_sockets_denied & (1 << (q as u32)) != 0)
}

/// The programs attached to each quadrant under `config` (XDP only when it is on), each with the
/// interface or cgroup it goes to.
fn quadrant_programs(config: &Config, q: Quadrant) -> Vec<(&'static str, Hook, String)> {
    programs::ALL
        .into_iter()
        .filter(|(_, hook)| *hook != Hook::Xdp || config.xdp_mode != XdpAttachMode::Off)
        .map(|(name, hook)| {
            let target = if programs::CGROUP.contains(&name) {
                config.cgroup_dir(q).display().to_string()
            } else {
                config.host_iface(q)
            };
            (name, hook, target)
        })
        .collect()
}

/// A policy value holding `ranges` (at most [`MAX_PORT_RANGES`]: the compilers refuse more).
fn policy_value(ranges: &[dataplane_common::policy::PortRange]) -> PolicyValue {
    let mut value = PolicyValue::EMPTY;
    for (slot, r) in value
        .ranges
        .iter_mut()
        .zip(ranges.iter().take(MAX_PORT_RANGES))
    {
        *slot = *r;
    }
    value.count = u32::try_from(ranges.len().min(MAX_PORT_RANGES)).unwrap_or(0);
    value
}

/// A policy slot with every entry empty (what a new array map holds).
fn empty_policy_slot() -> Vec<PolicyValue> {
    vec![PolicyValue::EMPTY; maps::POLICY_MAX as usize]
}

/// Makes `map` hold exactly `entries`.
fn replace_entries<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &mut HashMap<&mut aya::maps::MapData, K, V>,
    entries: &[(K, V)],
) -> Result<(), MapError> {
    for (k, v) in entries {
        map.insert(*k, *v, 0)?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !entries.iter().any(|(w, _)| w == k))
        .collect();
    for k in stale {
        map.remove(&k)?;
    }
    Ok(())
}

/// LPM key of an IPv4 prefix (address bytes in network order).
#[must_use]
pub fn lpm_key(net: Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

/// Every PREFIXES entry the configuration implies: each quadrant's prefix, each gateway address
/// (host), and the configured host addresses.
#[must_use]
pub fn prefix_entries(config: &Config) -> Vec<(Ipv4Net, Identity)> {
    let mut out = BTreeMap::new();
    for q in Quadrant::ALL {
        let a = config.addrs(q);
        out.insert(a.prefix, Identity::from(q));
        out.insert(host_net(a.gateway), Identity::Host);
    }
    for net in &config.host.addresses {
        out.insert(net.trunc(), Identity::Host);
    }
    out.into_iter().collect()
}

fn host_net(addr: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(addr, 32).unwrap_or_else(|_| unreachable!("/32 is a valid prefix length"))
}
