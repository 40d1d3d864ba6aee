//! Taking over a dataplane that an earlier agent left running (`quadrant down --keep-dataplane`,
//! as an upgrade does), so that neither the quadrants' isolation nor their tracked flows are
//! interrupted.
//!
//! Order: open and check the kept maps and links (nothing changes yet) → copy the tracked flows
//! and counters into the new object's maps, which no program reads yet → per quadrant, switch
//! each pinned link to the new program (XDP and tcx links atomically with `BPF_LINK_UPDATE`;
//! cgroup links by attaching the new program before the old link is unpinned, so for a moment
//! both run and both must allow) → copy what the old programs tracked in the meantime → pin
//! the new maps and programs in place of the old ones.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, MapError, MapType, PerCpuArray, PerCpuValues, SockHash};
use aya::programs::{
    ProgramError, SchedClassifier, Xdp,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use dataplane_common::{
    CONNTRACK_LAYOUT_SINCE, DIRECTED_CONNTRACK_LAYOUTS, Hook, MAP_LAYOUT_VERSION, Quadrant,
    STATS_LAYOUT_SINCE,
    maps::{self, CtKey, CtValue, SockKey},
    reason::STATS_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::{AttachedProgram, Dataplane, LoaderError, map_err, programs, quadrant_programs};
use crate::{config::Config, quadrants::QuadrantHandle};

/// `BPF_NOEXIST`: an update that only creates, never overwrites.
const BPF_NOEXIST: u64 = 1;

/// What a takeover carried over from the dataplane it replaced.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
pub struct Carried {
    /// Map layout of the dataplane taken over.
    pub from_map_layout: u32,
    /// Map layout of this agent.
    pub to_map_layout: u32,
    /// Tracked flows copied into the new `CONNTRACK`.
    pub flows: u64,
    /// Whether the counters were carried over (`false`: an older `STATS` layout, they restart
    /// from zero).
    pub counters: bool,
    /// Circuit breakers (`BREAKERS` entries) carried over with their state.
    #[serde(default)]
    pub breakers: u64,
}

/// The maps and links an earlier agent left pinned, opened and checked.
pub struct KeptDataplane {
    dir: PathBuf,
    layout: u32,
    /// The kept `CONNTRACK`; in a directed layout its entries need [`convert_flow`].
    conntrack: HashMap<MapData, CtKey, CtValue>,
    stats: Option<PerCpuArray<MapData, u64>>,
    /// The kept `LANE_SOCKS` (lane acceleration), if the layout has one; emptied by
    /// [`Dataplane::finish_takeover`].
    lane_socks: Option<SockHash<MapData, SockKey>>,
    /// The kept `LANE_SOCK_MODE`: how each kept socket sends (the kept `sk_msg` reads it).
    lane_modes: Option<HashMap<MapData, SockKey, u32>>,
    /// The counters as first copied, to add only what the old programs counted afterwards.
    stats_copied: Vec<Vec<u64>>,
    flows: u64,
    /// The kept circuit breakers (map layout 6 on).
    breakers: Option<super::carry_breakers::KeptBreakers>,
    breakers_copied: u64,
}

impl std::fmt::Debug for KeptDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptDataplane")
            .field("dir", &self.dir)
            .field("layout", &self.layout)
            .field("counters", &self.stats.is_some())
            .field("flows", &self.flows)
            .finish_non_exhaustive()
    }
}

fn refused(reason: String) -> LoaderError {
    LoaderError::Takeover(reason)
}

/// Opens the pinned map `name` of the kept dataplane and checks its type and shape.
fn open_map(
    dir: &Path,
    name: &'static str,
    want: MapType,
    key_size: usize,
    value_size: usize,
    layout: u32,
) -> Result<MapData, LoaderError> {
    let path = dir.join("maps").join(name);
    let data = MapData::from_pin(&path)
        .map_err(|e| refused(format!("cannot open the kept map {}: {e}", path.display())))?;
    let info = data.info().map_err(map_err(name))?;
    let kind = info.map_type().map_err(map_err(name))?;
    let (k, v) = (info.key_size() as usize, info.value_size() as usize);
    if kind != want || k != key_size || v != value_size {
        return Err(refused(format!(
            "the kept map {name} (map layout {layout}) is a {kind:?} with {k}-byte keys and \
             {v}-byte values; this agent (map layout {MAP_LAYOUT_VERSION}) knows no conversion \
             from it to a {want:?} with {key_size}-byte keys and {value_size}-byte values"
        )));
    }
    Ok(data)
}

impl KeptDataplane {
    /// Opens what the agent that ran `config`'s instance with map layout `layout` left pinned
    /// and checks that this agent can take it over: the layout is known and not newer, the
    /// stateful maps have the shapes that layout defines, and each quadrant's links are pinned
    /// (a hook the kept program set lacked is attached fresh by [`Dataplane::take_over`]).
    /// Changes nothing.
    pub fn open(config: &Config, layout: u32) -> Result<Self, LoaderError> {
        let dir = config.bpffs_dir();
        if layout == 0 || layout > MAP_LAYOUT_VERSION {
            return Err(refused(format!(
                "the kept dataplane has map layout {layout}; this agent knows layouts 1 to \
                 {MAP_LAYOUT_VERSION}"
            )));
        }
        if layout < CONNTRACK_LAYOUT_SINCE && !DIRECTED_CONNTRACK_LAYOUTS.contains(&layout) {
            return Err(refused(format!(
                "no conversion of {} entries from map layout {layout}",
                maps::CONNTRACK
            )));
        }
        for q in Quadrant::ALL {
            let path = dir.join("links").join(q.name());
            if !path.is_dir() {
                return Err(refused(format!(
                    "the kept links of quadrant {} ({}) are missing",
                    q.name(),
                    path.display()
                )));
            }
        }
        let ct = open_map(
            &dir,
            maps::CONNTRACK,
            MapType::LruHash,
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            layout,
        )?;
        let conntrack = HashMap::try_from(Map::LruHashMap(ct)).map_err(map_err(maps::CONNTRACK))?;
        let stats = if layout >= STATS_LAYOUT_SINCE {
            let data = open_map(
                &dir,
                maps::STATS,
                MapType::PerCpuArray,
                size_of::<u32>(),
                size_of::<u64>(),
                layout,
            )?;
            // Later layouts only append hooks: the kept indices mean the same, its map may be
            // smaller than this one, never larger.
            let entries = data.info().map_err(map_err(maps::STATS))?.max_entries();
            if entries > STATS_ENTRIES {
                return Err(refused(format!(
                    "the kept map {} has {entries} entries, more than the {STATS_ENTRIES} this \
                     agent knows",
                    maps::STATS
                )));
            }
            Some(PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(maps::STATS))?)
        } else {
            None
        };
        let lane_socks = if dir.join("maps").join(maps::LANE_SOCKS).exists() {
            let data = open_map(
                &dir,
                maps::LANE_SOCKS,
                MapType::SockHash,
                size_of::<SockKey>(),
                size_of::<u32>(),
                layout,
            )?;
            Some(SockHash::try_from(Map::SockHash(data)).map_err(map_err(maps::LANE_SOCKS))?)
        } else {
            None
        };
        let lane_modes = if dir.join("maps").join(maps::LANE_SOCK_MODE).exists() {
            let data = open_map(
                &dir,
                maps::LANE_SOCK_MODE,
                MapType::LruHash,
                size_of::<SockKey>(),
                size_of::<u32>(),
                layout,
            )?;
            Some(HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(maps::LANE_SOCK_MODE))?)
        } else {
            None
        };
        Ok(Self {
            lane_modes,
            breakers: super::carry_breakers::KeptBreakers::open(&dir, layout),
            dir,
            layout,
            conntrack,
            stats,
            lane_socks,
            stats_copied: Vec::new(),
            flows: 0,
            breakers_copied: 0,
        })
    }

    /// The map layout of the kept dataplane.
    #[must_use]
    pub const fn layout(&self) -> u32 {
        self.layout
    }
}

/// How long the kept sockets stay in the kept `LANE_SOCKS` once their messages take the stack
/// ([`send_kept_sockets_by_the_stack`]): what the kept `sk_msg` handed to a peer's queue before
/// is read by then. The kernel drops what a socket's queue still holds when the socket leaves
/// the map: taken out at once, a message under way was lost (a round trip through an agent
/// upgrade that never came back, seen under load).
const KEPT_SOCKETS_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Turns every kept socket's sending mode to the stack in the kept `LANE_SOCK_MODE`, keeping
/// which end opened its connection: the kept `sk_msg` passes their next messages to the TCP
/// stack, where this agent's programs decide, instead of a peer's queue (a peer reads what its
/// queue holds before what the stack brings, so the order holds). Returns how many it turned.
fn send_kept_sockets_by_the_stack(
    socks: &SockHash<MapData, SockKey>,
    modes: &mut HashMap<MapData, SockKey, u32>,
) -> Result<u64, LoaderError> {
    use dataplane_common::maps::lane_accel::{MODE_MASK, MODE_STACK};
    let keys = socks
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(maps::LANE_SOCKS))?;
    let mut turned = 0;
    for key in keys {
        let state = match modes.get(&key, 0) {
            Ok(v) => v,
            // Evicted or never recorded: the kept sk_msg sends it by the stack already.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(maps::LANE_SOCK_MODE)(e)),
        };
        if state & MODE_MASK == MODE_STACK {
            continue;
        }
        modes
            .insert(key, (state & !MODE_MASK) | MODE_STACK, 0)
            .map_err(map_err(maps::LANE_SOCK_MODE))?;
        turned += 1;
    }
    Ok(turned)
}

/// Empties the kept `LANE_SOCKS`. Its sockets keep running the kept `sk_msg` program, with the
/// kept policy maps, for as long as they are in it — a reload of this agent's policy would never
/// reach them; out of it they take the TCP stack, where this agent's programs decide. Returns
/// how many sockets were released.
fn release_kept_sockets(socks: &mut SockHash<MapData, SockKey>) -> Result<u64, LoaderError> {
    let keys = socks
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(maps::LANE_SOCKS))?;
    let mut released = 0;
    for key in keys {
        match socks.remove(&key) {
            Ok(()) => released += 1,
            // Closed in the meantime: the kernel took it out already.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::LANE_SOCKS)(e)),
        }
    }
    Ok(released)
}

/// A kept `CONNTRACK` entry of map layout `layout` as today's entry.
///
/// Layouts 1 to 3 have the same sizes, but their key is one direction of the flow — the one
/// that opened it — with source address, destination address, source port and destination
/// port where today's key holds the lower and the higher endpoint; their value's byte after the
/// identities was padding (zero). Later layouts are today's entries.
fn convert_flow(layout: u32, key: CtKey, value: CtValue) -> (CtKey, CtValue) {
    if !DIRECTED_CONNTRACK_LAYOUTS.contains(&layout) {
        return (key, value);
    }
    let (key, src_is_hi) = CtKey::of(
        key.lo_addr,
        key.hi_addr,
        key.lo_port,
        key.hi_port,
        key.proto,
    );
    let value = CtValue {
        opened_by_hi: u8::from(src_is_hi),
        pad: [0; 5],
        ..value
    };
    (key, value)
}

/// Copies every tracked flow of `old` (map layout `layout`, converted to today's entries) into
/// `new`; where `new` holds the flow already (both directions of a flow were tracked apart
/// before layout 4, or the new programs saw it first), the entry seen last stays. Returns how
/// many flows were added.
fn copy_flows(
    layout: u32,
    old: &HashMap<MapData, CtKey, CtValue>,
    new: &mut HashMap<&mut MapData, CtKey, CtValue>,
) -> Result<u64, LoaderError> {
    let mut copied = 0;
    // An entry evicted while the keys are walked is skipped: the old programs dropped it.
    for kept_key in old.keys().filter_map(Result::ok) {
        let Ok(kept_value) = old.get(&kept_key, 0) else {
            continue;
        };
        let (key, value) = convert_flow(layout, kept_key, kept_value);
        match new.insert(key, value, BPF_NOEXIST) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32) =>
            {
                if new
                    .get(&key, 0)
                    .is_ok_and(|held| held.last_seen_ns < value.last_seen_ns)
                {
                    new.insert(key, value, 0)
                        .map_err(map_err(maps::CONNTRACK))?;
                }
            }
            Err(e) => return Err(map_err(maps::CONNTRACK)(e)),
        }
    }
    Ok(copied)
}

fn conntrack_of(dp: &mut Dataplane) -> Result<HashMap<&mut MapData, CtKey, CtValue>, LoaderError> {
    HashMap::try_from(dp.map_mut(maps::CONNTRACK)?).map_err(map_err(maps::CONNTRACK))
}

fn stats_of(dp: &mut Dataplane) -> Result<PerCpuArray<&mut MapData, u64>, LoaderError> {
    PerCpuArray::try_from(dp.map_mut(maps::STATS)?).map_err(map_err(maps::STATS))
}

fn per_cpu(values: Vec<u64>) -> Result<PerCpuValues<u64>, LoaderError> {
    PerCpuValues::try_from(values).map_err(|e| map_err(maps::STATS)(MapError::from(e)))
}

impl Dataplane {
    /// Loads the object for a takeover: nothing is pinned until [`Self::finish_takeover`],
    /// the kept pins stay where they are.
    pub fn load_for_takeover(pin_dir: &Path, chaos: bool) -> Result<Self, LoaderError> {
        let mut dp = Self::load_with(None, chaos)?;
        dp.pin_dir = Some(pin_dir.to_owned());
        Ok(dp)
    }

    /// Copies the kept dataplane's tracked flows and counters into this object's maps. Call
    /// before any program of this object is attached (no program writes the maps yet).
    pub fn carry_state(&mut self, kept: &mut KeptDataplane) -> Result<(), LoaderError> {
        kept.flows = copy_flows(kept.layout, &kept.conntrack, &mut conntrack_of(self)?)?;
        if let Some(b) = &kept.breakers {
            kept.breakers_copied = b.copy_into(self, false)?;
        }
        if let Some(old) = &kept.stats {
            let mut new = stats_of(self)?;
            for index in 0..old.len() {
                let values: Vec<u64> = old
                    .get(&index, 0)
                    .map_err(map_err(maps::STATS))?
                    .iter()
                    .copied()
                    .collect();
                new.set(index, per_cpu(values.clone())?, 0)
                    .map_err(map_err(maps::STATS))?;
                kept.stats_copied.push(values);
            }
        }
        Ok(())
    }

    /// Registers quadrant `handle` in this object's maps and switches each of its pinned links
    /// to this object's programs. The quadrant is enforced throughout: by the old programs
    /// until a link is switched, by the new ones after.
    pub fn take_over(
        &mut self,
        config: &Config,
        handle: &QuadrantHandle,
    ) -> Result<Vec<AttachedProgram>, LoaderError> {
        let i = handle.instance();
        self.register(config, handle)?;
        let dir = self
            .pin_dir
            .as_ref()
            .ok_or_else(|| refused("no pin directory".into()))?
            .join("links")
            .join(i.name());
        let mut out = Vec::new();
        for (name, hook, target) in quadrant_programs(config, i) {
            let cgroup = programs::CGROUP.contains(&name);
            let path = dir.join(hook.name());
            let fresh = !path.exists();
            let op = |source: ProgramError| LoaderError::ProgramOp {
                action: "cannot switch",
                program: name,
                target: format!(" on {target} to the new program"),
                source: Box::new(source),
            };
            let pin_err = |reason: String| LoaderError::Pin {
                path: path.clone(),
                reason,
            };
            if cgroup || fresh {
                // A hook the kept program set did not have is attached like on a fresh start.
                let link = self.attach_one(name, hook, config, i).map_err(op)?;
                if !fresh {
                    fs::remove_file(&path).map_err(|e| pin_err(e.to_string()))?;
                }
                link.pin(&path).map_err(|e| pin_err(e.to_string()))?;
            } else {
                let old = PinnedLink::from_pin(&path).map_err(|e| pin_err(e.to_string()))?;
                let old = FdLink::from(old);
                let prog = self
                    .ebpf
                    .program_mut(name)
                    .ok_or(LoaderError::Program { name })?;
                // The link stays pinned; it now runs the new program. The handle returned by
                // the program is dropped without detaching (only its fd is closed).
                if hook == Hook::Xdp {
                    let p: &mut Xdp = prog.try_into().map_err(op)?;
                    let link = XdpLink::try_from(old).map_err(|e| pin_err(e.to_string()))?;
                    let id = p.attach_to_link(link).map_err(op)?;
                    drop(p.take_link(id).map_err(op)?);
                } else {
                    let p: &mut SchedClassifier = prog.try_into().map_err(op)?;
                    let link =
                        SchedClassifierLink::try_from(old).map_err(|e| pin_err(e.to_string()))?;
                    let id = p.attach_to_link(link).map_err(op)?;
                    drop(p.take_link(id).map_err(op)?);
                }
            }
            out.push(AttachedProgram {
                hook: hook.name().to_owned(),
                program: name.to_owned(),
                program_id: self.program_id(name)?,
                target,
                link_pin: path,
            });
        }
        Ok(out)
    }

    /// Once every link runs this object's programs: copies the flows and counts the old
    /// programs added since [`Self::carry_state`], takes every socket out of the kept
    /// `LANE_SOCKS`, then pins this object's maps and programs in place of the kept ones (which
    /// the kernel frees once nothing refers to them).
    pub fn finish_takeover(&mut self, mut kept: KeptDataplane) -> Result<Carried, LoaderError> {
        kept.flows += copy_flows(kept.layout, &kept.conntrack, &mut conntrack_of(self)?)?;
        if let Some(b) = &kept.breakers {
            kept.breakers_copied += b.copy_into(self, true)?;
        }
        if let Some(old) = &kept.stats {
            let mut new = stats_of(self)?;
            for (index, copied) in (0..old.len()).zip(&kept.stats_copied) {
                let now = old.get(&index, 0).map_err(map_err(maps::STATS))?;
                let cur = new.get(&index, 0).map_err(map_err(maps::STATS))?;
                let sum: Vec<u64> = cur
                    .iter()
                    .zip(now.iter())
                    .zip(copied)
                    .map(|((c, n), before)| c + n.saturating_sub(*before))
                    .collect();
                if sum.iter().zip(cur.iter()).any(|(s, c)| s != c) {
                    new.set(index, per_cpu(sum)?, 0)
                        .map_err(map_err(maps::STATS))?;
                }
            }
        }
        // Not a reason to stop the takeover half-way: the sockets are released in any case.
        if let (Some(socks), Some(modes)) = (kept.lane_socks.as_ref(), kept.lane_modes.as_mut()) {
            match send_kept_sockets_by_the_stack(socks, modes) {
                Ok(0) => {}
                Ok(turned) => tracing::info!(
                    sockets = turned,
                    "connections on the kept sk_msg redirect send by the TCP stack now, under this agent's programs"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the kept sk_msg's sockets go on redirecting until they are released"
                ),
            }
        }
        if let Some(mut socks) = kept.lane_socks.take() {
            // Its own handle keeps the kept map (and its sk_msg) until then; unpinned below.
            let release = move || {
                std::thread::sleep(KEPT_SOCKETS_GRACE);
                match release_kept_sockets(&mut socks) {
                    Ok(n) => tracing::info!(sockets = n, "the kept sk_msg's sockets released"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot release the kept sk_msg's sockets");
                    }
                }
            };
            // Without the thread the kept map goes once unpinned, its sockets with it at once.
            if let Err(e) = std::thread::Builder::new()
                .name("kept-sockets".into())
                .spawn(release)
            {
                tracing::warn!(error = %e, "the kept sk_msg's sockets are released without a grace");
            }
        }
        for sub in ["maps", "progs"] {
            let path = kept.dir.join(sub);
            if path.exists() {
                fs::remove_dir_all(&path).map_err(|source| LoaderError::Io {
                    what: "cannot unpin the kept",
                    path,
                    source,
                })?;
            }
        }
        let dir = kept.dir.clone();
        self.pin_all(&dir)?;
        Ok(Carried {
            from_map_layout: kept.layout,
            to_map_layout: MAP_LAYOUT_VERSION,
            flows: kept.flows,
            counters: kept.stats.is_some(),
            breakers: kept.breakers_copied,
        })
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{
        MAP_LAYOUT_VERSION,
        maps::{CtKey, CtValue},
    };

    use super::convert_flow;

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    fn value(last_seen_ns: u64) -> CtValue {
        CtValue {
            last_seen_ns,
            src: 4,
            dst: 1,
            opened_by_hi: 0,
            pad: [0; 5],
        }
    }

    #[test]
    fn a_directed_flow_of_layout_3_becomes_one_flow_keyed_by_its_ends() {
        let (host, dg) = (addr([10, 240, 1, 1]), addr([10, 240, 1, 2]));
        let (sport, dport) = (40_000u16.to_be(), 9000u16.to_be());
        // Layout 3: opened by the host towards DG's UDP port 9000, source first.
        let directed = CtKey {
            lo_addr: host,
            hi_addr: dg,
            lo_port: sport,
            hi_port: dport,
            proto: 17,
            pad: [0; 3],
        };
        let (key, v) = convert_flow(3, directed, value(77));
        let (want, host_is_hi) = CtKey::of(host, dg, sport, dport, 17);
        assert_eq!(key, want);
        // DG's reply finds the same flow.
        assert_eq!(CtKey::of(dg, host, dport, sport, 17).0, key);
        assert_eq!(v.opened_by_hi, u8::from(host_is_hi));
        assert_eq!((v.last_seen_ns, v.src, v.dst), (77, 4, 1));
        // Opened the other way round, the other end is recorded as the opener.
        let reverse = CtKey {
            lo_addr: dg,
            hi_addr: host,
            lo_port: dport,
            hi_port: sport,
            proto: 17,
            pad: [0; 3],
        };
        let (key_r, v_r) = convert_flow(3, reverse, value(78));
        assert_eq!(key_r, key);
        assert_ne!(v_r.opened_by_hi, v.opened_by_hi);
    }

    #[test]
    fn a_flow_of_the_current_layout_is_carried_as_it_is() {
        let (key, _) = CtKey::of(2, 1, 3, 4, 6);
        let v = CtValue {
            opened_by_hi: 1,
            ..value(5)
        };
        assert_eq!(convert_flow(MAP_LAYOUT_VERSION, key, v), (key, v));
    }
}
