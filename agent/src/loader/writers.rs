//! The map writers: the configuration (prefixes, quadrants, `CONFIG`), the double-buffered
//! policy, registrations of interfaces and cgroups, the verdict trace's mode and ring buffer.
//! One writer per map: nothing else in the agent writes them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::maps::{
    Array, HashMap, LpmTrie, MapError, PerCpuArray, PerCpuValues, RingBuf, lpm_trie::Key,
};
use dataplane_common::{
    Identity, Quadrant,
    maps::{
        self, CgroupValue, DataplaneConfig, EventsLimit, IfaceValue, MAX_PORT_RANGES, PolicyKey,
        PolicyValue, PrefixValue, WlPolicyKey,
    },
};
use ipnet::Ipv4Net;

use super::{Dataplane, LoaderError, map_err};
use crate::{
    config::Config,
    policy::{CompiledPolicy, KernelPolicy},
};

impl Dataplane {
    /// Writes PREFIXES and CONFIG from the configuration; the policy stays deny-all (its live
    /// slot empty) until [`Self::apply_policy`].
    pub fn write_config(&mut self, config: &Config, cgroup_level: u32) -> Result<(), LoaderError> {
        self.write_prefixes(&prefix_entries(config))?;
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
        self.set_events_limit(config.observe.events_per_sec, config.observe.events_burst)
    }

    /// Sets every CPU's flow-event budget (`EVENTS_LIMIT`): `per_sec` events a second, `burst`
    /// at once (0 per second: no flow events); the counts start from zero.
    pub fn set_events_limit(&mut self, per_sec: u32, burst: u32) -> Result<(), LoaderError> {
        let mut map: PerCpuArray<_, EventsLimit> =
            PerCpuArray::try_from(self.map_mut(maps::EVENTS_LIMIT)?)
                .map_err(map_err(maps::EVENTS_LIMIT))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| LoaderError::Io {
            what: "cannot count the possible CPUs in",
            path: "/sys/devices/system/cpu/possible".into(),
            source: e,
        })?;
        let value = EventsLimit::new(per_sec, burst);
        let values =
            PerCpuValues::try_from(vec![value; cpus]).map_err(|source| LoaderError::Io {
                what: "cannot build one value per possible CPU for",
                path: maps::EVENTS_LIMIT.into(),
                source,
            })?;
        map.set(0, values, 0).map_err(map_err(maps::EVENTS_LIMIT))
    }

    /// What every CPU wrote and lost of flow events, summed.
    pub fn events_counts(&self) -> Result<EventsLimit, LoaderError> {
        let map = self.map_ref(maps::EVENTS_LIMIT)?;
        let map: PerCpuArray<_, EventsLimit> =
            PerCpuArray::try_from(map).map_err(map_err(maps::EVENTS_LIMIT))?;
        let values = map.get(&0, 0).map_err(map_err(maps::EVENTS_LIMIT))?;
        Ok(values.iter().fold(EventsLimit::default(), |mut sum, v| {
            sum.per_sec = v.per_sec;
            sum.burst = v.burst;
            sum.written += v.written;
            sum.lost_rate_limit += v.lost_rate_limit;
            sum.lost_ring_full += v.lost_ring_full;
            sum
        }))
    }

    /// Adds (or replaces) PREFIXES entries, keeping the others: another node's quadrant
    /// prefixes (`peers`).
    pub fn add_prefixes(&mut self, entries: &[(Ipv4Net, Identity)]) -> Result<(), LoaderError> {
        let mut trie: LpmTrie<_, u32, PrefixValue> =
            LpmTrie::try_from(self.map_mut(maps::PREFIXES)?).map_err(map_err(maps::PREFIXES))?;
        for (net, id) in entries {
            trie.insert(
                &lpm_key(*net),
                PrefixValue {
                    identity: *id as u8,
                    pad: [0; 3],
                },
                0,
            )
            .map_err(map_err(maps::PREFIXES))?;
        }
        Ok(())
    }

    /// The identity this node's kernel gives `addr` (the longest `PREFIXES` entry holding it;
    /// none: the world).
    pub fn identity_of(&self, addr: Ipv4Addr) -> Result<Identity, LoaderError> {
        let map = self.map_ref(maps::PREFIXES)?;
        let trie: LpmTrie<_, u32, PrefixValue> =
            LpmTrie::try_from(map).map_err(map_err(maps::PREFIXES))?;
        match trie.get(&lpm_key(Ipv4Net::from(addr)), 0) {
            Ok(v) => Ok(Identity::from_id(v.identity).unwrap_or(Identity::World)),
            Err(MapError::KeyNotFound) => Ok(Identity::World),
            Err(e) => Err(map_err(maps::PREFIXES)(e)),
        }
    }

    /// Removes these PREFIXES entries (a former peer node's prefixes), keeping the others; one
    /// already gone is no error.
    pub fn remove_prefixes(&mut self, nets: &[Ipv4Net]) -> Result<(), LoaderError> {
        let mut trie: LpmTrie<_, u32, PrefixValue> =
            LpmTrie::try_from(self.map_mut(maps::PREFIXES)?).map_err(map_err(maps::PREFIXES))?;
        for net in nets {
            match trie.remove(&lpm_key(*net)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::PREFIXES)(e)),
            }
        }
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
    /// `TRACE_DROPS` or `TRACE_ALL`); the records reach the agent's log through the ring buffer
    /// [`Self::take_trace`] hands out. Refused before the first policy is written (CONFIG is
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
        let m = self.map_ref(name)?;
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

    /// Registers a cgroup (by id) as belonging to instance `index` of quadrant `q`, whose
    /// address is `addr`.
    pub fn register_cgroup(
        &mut self,
        cgroup_id: u64,
        q: Quadrant,
        index: u8,
        addr: Ipv4Addr,
    ) -> Result<(), LoaderError> {
        let mut map: HashMap<_, u64, CgroupValue> =
            HashMap::try_from(self.map_mut(maps::CGROUPS)?).map_err(map_err(maps::CGROUPS))?;
        map.insert(
            cgroup_id,
            CgroupValue {
                quadrant: q as u8,
                instance: index,
                pad: [0; 2],
                addr: u32::from_ne_bytes(addr.octets()),
            },
            0,
        )
        .map_err(map_err(maps::CGROUPS))
    }

    /// Forgets a host-side veth and a cgroup (an instance scaled away).
    pub fn unregister(&mut self, ifindex: u32, cgroup_id: u64) -> Result<(), LoaderError> {
        let mut ifaces: HashMap<_, u32, IfaceValue> =
            HashMap::try_from(self.map_mut(maps::IFACES)?).map_err(map_err(maps::IFACES))?;
        match ifaces.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::IFACES)(e)),
        }
        let mut cgroups: HashMap<_, u64, CgroupValue> =
            HashMap::try_from(self.map_mut(maps::CGROUPS)?).map_err(map_err(maps::CGROUPS))?;
        match cgroups.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::CGROUPS)(e)),
        }
    }
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
pub(super) fn empty_policy_slot() -> Vec<PolicyValue> {
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
