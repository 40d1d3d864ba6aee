//! Loads the embedded eBPF object, pins its programs and maps, attaches the programs to each
//! quadrant (pinning the links), writes the configuration maps and reads the counters.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapError, PerCpuArray},
    programs::ProgramError,
};
use dataplane_common::{
    Hook, Quadrant, Reason,
    maps::{self, DataplaneConfig, PolicyValue},
    reason::{QUADRANT_SLOTS, stats_index},
};
use serde::{Deserialize, Serialize};

mod attach;
mod breakers;
mod carry_breakers;
mod lb;
mod pods;
pub use lb::expire_flows;
mod takeover;
mod writers;

use attach::quadrant_programs;
pub use pods::pod_link_dir;
pub use takeover::{Carried, KeptDataplane};
use writers::empty_policy_slot;
pub use writers::{lpm_key, prefix_entries};

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
    /// cgroup `sock_ops` of the circuit breakers.
    pub const BREAKER_SOCKOPS: &str = "quadrant_breaker_sockops";
    /// cgroup getpeername4 (service VIPs).
    pub const GETPEERNAME4: &str = "quadrant_getpeername4";
    /// cgroup recvmsg4 (service VIPs).
    pub const RECVMSG4: &str = "quadrant_recvmsg4";
    /// cgroup `sock_release` (service VIPs: a listener going takes its instance out).
    pub const SOCK_RELEASE: &str = "quadrant_sock_release";
    /// cgroup `post_bind4` (service VIPs: records an instance's listener).
    pub const POST_BIND4: &str = "quadrant_post_bind4";
    /// Every program, with the hook it serves.
    pub const ALL: [(&str, dataplane_common::Hook); 13] = [
        (XDP, dataplane_common::Hook::Xdp),
        (TC_INGRESS, dataplane_common::Hook::TcIngress),
        (TC_EGRESS, dataplane_common::Hook::TcEgress),
        (CONNECT4, dataplane_common::Hook::Connect4),
        (CONNECT6, dataplane_common::Hook::Connect6),
        (SENDMSG4, dataplane_common::Hook::Sendmsg4),
        (SENDMSG6, dataplane_common::Hook::Sendmsg6),
        (SOCK_CREATE, dataplane_common::Hook::SockCreate),
        (BREAKER_SOCKOPS, dataplane_common::Hook::SockOps),
        (GETPEERNAME4, dataplane_common::Hook::Getpeername4),
        (RECVMSG4, dataplane_common::Hook::Recvmsg4),
        (SOCK_RELEASE, dataplane_common::Hook::SockRelease),
        (POST_BIND4, dataplane_common::Hook::PostBind4),
    ];
    /// The cgroup programs.
    pub const CGROUP: [&str; 10] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        SOCK_CREATE,
        BREAKER_SOCKOPS,
        GETPEERNAME4,
        RECVMSG4,
        SOCK_RELEASE,
        POST_BIND4,
    ];
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
    /// Loads every program into the kernel with chaos faults checked. With `pin_dir`, pins
    /// programs under `progs/` and maps under `maps/` there (the directory must not hold an
    /// older pin set).
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, LoaderError> {
        Self::load_with(pin_dir, true)
    }

    /// [`Dataplane::load`]; with `chaos` false, the programs' read-only `CHAOS_ENABLED` is 0 and
    /// the verifier removes every fault check (`chaos.enabled: false`).
    pub fn load_with(pin_dir: Option<&Path>, chaos: bool) -> Result<Self, LoaderError> {
        let mut ebpf = EbpfLoader::new()
            .override_global(
                dataplane_common::chaos::CHAOS_ENABLED,
                &u8::from(chaos),
                true,
            )
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
            let map = self.map_ref(name)?;
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

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map, LoaderError> {
        self.ebpf.map(name).ok_or(LoaderError::MissingMap { name })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, LoaderError> {
        self.ebpf
            .map_mut(name)
            .ok_or(LoaderError::MissingMap { name })
    }

    /// Every non-zero counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, LoaderError> {
        let map = self.map_ref(maps::STATS)?;
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
        let map = self.map_ref(maps::STATS)?;
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
