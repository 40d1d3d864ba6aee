//! The load-balancing maps' writer (`LB_SERVICES`, `LB_BACKENDS`), the reader of the
//! kernel's connection counts (`LB_ACTIVE` less `LB_EXPIRED`), and the collector of outside
//! flows that ended without a FIN or RST (`LB_FLOWS`).

use std::{path::Path, time::Duration};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use dataplane_common::{
    lb::{
        LB_ACTIVE, LB_BACKENDS, LB_BACKENDS_MAX, LB_EXPIRED, LB_FLOW_CLOSING, LB_FLOW_REVERSE,
        LB_FLOWS, LB_MAGLEV, LB_PORTS, LB_SERVICES, LbBackend, LbFlow, LbFlowKey, LbPortKey,
        LbService, LbServiceKey, MAGLEV_SIZE,
    },
    maps::{CONNTRACK, CtKey, CtValue},
    policy::PROTO_TCP,
};

use super::{Dataplane, LoaderError, map_err};

impl Dataplane {
    /// Makes `services` the services with a VIP (others are removed), writes `backends`
    /// (slot → backend) and `ports` (which service an instance's listener serves). Backends are
    /// written first, so a service never names slots not yet written.
    pub fn write_lb(
        &mut self,
        services: &[(LbServiceKey, LbService)],
        backends: &[(u32, LbBackend)],
        ports: &[(LbPortKey, u32)],
    ) -> Result<(), LoaderError> {
        let mut by_port: HashMap<_, LbPortKey, u32> =
            HashMap::try_from(self.map_mut(LB_PORTS)?).map_err(map_err(LB_PORTS))?;
        for (k, v) in ports {
            by_port.insert(k, v, 0).map_err(map_err(LB_PORTS))?;
        }
        let mut slots: Array<_, LbBackend> =
            Array::try_from(self.map_mut(LB_BACKENDS)?).map_err(map_err(LB_BACKENDS))?;
        for (slot, b) in backends {
            slots.set(*slot, *b, 0).map_err(map_err(LB_BACKENDS))?;
        }
        let mut map: HashMap<_, LbServiceKey, LbService> =
            HashMap::try_from(self.map_mut(LB_SERVICES)?).map_err(map_err(LB_SERVICES))?;
        let stale: Vec<LbServiceKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !services.iter().any(|(s, _)| s == k))
            .collect();
        for k in stale {
            match map.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(LB_SERVICES)(e)),
            }
        }
        for (k, v) in services {
            map.insert(k, v, 0).map_err(map_err(LB_SERVICES))?;
        }
        Ok(())
    }

    /// Writes Maglev table `table` (`service * 2 + 0 or 1`) of `LB_MAGLEV`; an empty one is
    /// written as all zeros (the service has no ready instance; lookups then fall back).
    pub fn write_maglev(&mut self, table: u32, entries: &[u8]) -> Result<(), LoaderError> {
        let mut map: Array<_, u8> =
            Array::try_from(self.map_mut(LB_MAGLEV)?).map_err(map_err(LB_MAGLEV))?;
        for e in 0..MAGLEV_SIZE {
            let v = entries.get(e as usize).copied().unwrap_or(0);
            map.set(table * MAGLEV_SIZE + e, v, 0)
                .map_err(map_err(LB_MAGLEV))?;
        }
        Ok(())
    }

    /// The weight of every backend slot as the kernel has it now.
    pub fn lb_weights(&self) -> Result<Vec<u16>, LoaderError> {
        let map = self.map_ref(LB_BACKENDS)?;
        let slots: Array<_, LbBackend> = Array::try_from(map).map_err(map_err(LB_BACKENDS))?;
        (0..LB_BACKENDS_MAX)
            .map(|i| {
                slots
                    .get(&i, 0)
                    .map(|b| b.weight)
                    .map_err(map_err(LB_BACKENDS))
            })
            .collect()
    }

    /// The kernel's count of open connections per backend slot.
    pub fn lb_active(&self) -> Result<Vec<u64>, LoaderError> {
        let active = self.u64_array(LB_ACTIVE)?;
        let expired = self.u64_array(LB_EXPIRED)?;
        Ok(active
            .iter()
            .zip(&expired)
            .map(|(a, e)| a.saturating_sub(*e))
            .collect())
    }

    fn u64_array(&self, name: &'static str) -> Result<Vec<u64>, LoaderError> {
        let map = self.map_ref(name)?;
        let counts: Array<_, u64> = Array::try_from(map).map_err(map_err(name))?;
        (0..LB_BACKENDS_MAX)
            .map(|i| counts.get(&i, 0).map_err(map_err(name)))
            .collect()
    }

    /// The bpffs directory of the pins, if the dataplane is pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// Removes the outside flows (`LB_FLOWS`) whose connection the flow table no longer holds —
/// its `CONNTRACK` entry idle for `timeout`, or gone — and releases the count of each TCP flow
/// that ended without a FIN or RST (in `LB_EXPIRED`). Works on the pinned maps under `pins` (a
/// thread of its own, never holding the dataplane's lock while it walks the table). Returns how
/// many flows went.
pub fn expire_flows(pins: &Path, timeout: Duration) -> Result<usize, LoaderError> {
    let open =
        |name: &'static str| MapData::from_pin(pins.join("maps").join(name)).map_err(map_err(name));
    let now = monotonic_ns();
    let timeout = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    let mut flows: HashMap<_, LbFlowKey, LbFlow> =
        HashMap::try_from(Map::LruHashMap(open(LB_FLOWS)?)).map_err(map_err(LB_FLOWS))?;
    let conntrack: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(open(CONNTRACK)?)).map_err(map_err(CONNTRACK))?;
    let mut gone = Vec::new();
    let mut released = std::collections::BTreeMap::<u32, u64>::new();
    for entry in &flows {
        let Ok((k, f)) = entry else { continue };
        if f.flags & LB_FLOW_REVERSE != 0 {
            continue;
        }
        // The connection as the flow table knows it: translated to the backend.
        let (ct, _) = CtKey::of(k.saddr, f.addr, k.sport, f.port, k.proto);
        let live = conntrack
            .get(&ct, 0)
            .is_ok_and(|v| now.saturating_sub(v.last_seen_ns) <= timeout);
        if live {
            continue;
        }
        if k.proto == PROTO_TCP && f.flags & LB_FLOW_CLOSING == 0 {
            *released.entry(f.slot).or_default() += 1;
        }
        let reverse = LbFlowKey {
            saddr: f.addr,
            daddr: k.saddr,
            sport: f.port,
            dport: k.sport,
            proto: k.proto,
            pad: [0; 3],
        };
        gone.push((k, reverse));
    }
    for (k, r) in &gone {
        for key in [k, r] {
            match flows.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(LB_FLOWS)(e)),
            }
        }
    }
    let mut expired: Array<_, u64> =
        Array::try_from(Map::Array(open(LB_EXPIRED)?)).map_err(map_err(LB_EXPIRED))?;
    for (slot, n) in released {
        let was = expired.get(&slot, 0).map_err(map_err(LB_EXPIRED))?;
        expired.set(slot, was + n, 0).map_err(map_err(LB_EXPIRED))?;
    }
    Ok(gone.len())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the programs' `bpf_ktime_get_coarse_ns`
/// (the coarse clock trails by at most a tick).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
