//! The load-balancing maps' writer (`LB_SERVICES`, `LB_BACKENDS`) and the reader of the
//! kernel's connection counts (`LB_ACTIVE`).

use aya::maps::{Array, HashMap, MapError};
use dataplane_common::lb::{
    LB_ACTIVE, LB_BACKENDS, LB_BACKENDS_MAX, LB_MAGLEV, LB_PORTS, LB_SERVICES, LbBackend,
    LbPortKey, LbService, LbServiceKey, MAGLEV_SIZE,
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
        let map = self
            .ebpf
            .map(LB_BACKENDS)
            .ok_or(LoaderError::MissingMap { name: LB_BACKENDS })?;
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
        let map = self
            .ebpf
            .map(LB_ACTIVE)
            .ok_or(LoaderError::MissingMap { name: LB_ACTIVE })?;
        let counts: Array<_, u64> = Array::try_from(map).map_err(map_err(LB_ACTIVE))?;
        (0..LB_BACKENDS_MAX)
            .map(|i| counts.get(&i, 0).map_err(map_err(LB_ACTIVE)))
            .collect()
    }

    /// The bpffs directory of the pins, if the dataplane is pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pin_dir.as_deref()
    }
}
