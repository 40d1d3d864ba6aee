//! The dataplane's maps. Names are the constants in `dataplane_common::maps`; the agent finds them
//! by those names.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    maps::{
        CGROUPS_MAX, CONNTRACK_MAX, CgroupValue, CtKey, CtValue, DataplaneConfig, IFACES_MAX,
        IfaceValue, POLICY_MAX, PREFIXES_MAX, PolicyValue, PrefixValue, WL_POLICY_MAX, WlPolicyKey,
    },
    reason::STATS_ENTRIES,
};

/// IPv4 prefix (network-order bytes) → identity. Writer: agent.
#[map(name = "PREFIXES")]
pub static PREFIXES: LpmTrie<u32, PrefixValue> = LpmTrie::with_max_entries(PREFIXES_MAX, 0);

/// `PolicyKey::index()` (src identity, dst identity, protocol, scope) → allowed destination port
/// ranges, slot 0. Writer: agent, only while the slot is not live.
#[map(name = "POLICY_A")]
pub static POLICY_A: Array<PolicyValue> = Array::with_max_entries(POLICY_MAX, 0);

/// Slot 1 of the policy (see [`POLICY_A`]); `CONFIG.policy_slot` selects the live one.
#[map(name = "POLICY_B")]
pub static POLICY_B: Array<PolicyValue> = Array::with_max_entries(POLICY_MAX, 0);

/// (workload cgroup id, dst identity, protocol) → allowed destination port ranges, slot 0 of the
/// workload policy (read by the cgroup programs). Writer: agent, only while the slot is not live.
#[map(name = "WL_POLICY_A")]
pub static WL_POLICY_A: HashMap<WlPolicyKey, PolicyValue> =
    HashMap::with_max_entries(WL_POLICY_MAX, 0);

/// Slot 1 of the workload policy (see [`WL_POLICY_A`]).
#[map(name = "WL_POLICY_B")]
pub static WL_POLICY_B: HashMap<WlPolicyKey, PolicyValue> =
    HashMap::with_max_entries(WL_POLICY_MAX, 0);

/// Host-side veth ifindex → quadrant. Writer: agent.
#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, IfaceValue> = HashMap::with_max_entries(IFACES_MAX, 0);

/// Quadrant cgroup id → quadrant. Writer: agent.
#[map(name = "CGROUPS")]
pub static CGROUPS: HashMap<u64, CgroupValue> = HashMap::with_max_entries(CGROUPS_MAX, 0);

/// \[0\] → dataplane configuration. Writer: agent.
#[map(name = "CONFIG")]
pub static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

/// Flow direction → last seen. Writer: tc programs (new allowed flows) and every hit.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CONNTRACK_MAX, 0);

/// `stats_index(hook, quadrant, reason)` → count, per CPU. Writer: every program. Reader: agent.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);
