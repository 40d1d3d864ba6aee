//! The circuit breaker maps, agent side: the thresholds it writes, the state it reads, the ring
//! buffer of transitions it drains.

use aya::maps::{Array, HashMap, MapData, RingBuf};
use dataplane_common::breaker::{self, Breaker, BreakerKey, BreakerLimits};

use super::{Dataplane, LoaderError, map_err};

impl Dataplane {
    /// Writes the thresholds every breaker uses (`BREAKER_LIMITS`).
    pub fn write_breaker_limits(&mut self, limits: BreakerLimits) -> Result<(), LoaderError> {
        let mut arr: Array<_, BreakerLimits> =
            Array::try_from(self.map_mut(breaker::BREAKER_LIMITS)?)
                .map_err(map_err(breaker::BREAKER_LIMITS))?;
        arr.set(0, limits, 0)
            .map_err(map_err(breaker::BREAKER_LIMITS))
    }

    /// Every breaker entry, in key order.
    pub fn breakers(&self) -> Result<Vec<(BreakerKey, Breaker)>, LoaderError> {
        let map = self.map_ref(breaker::BREAKERS)?;
        let hash: HashMap<_, BreakerKey, Breaker> =
            HashMap::try_from(map).map_err(map_err(breaker::BREAKERS))?;
        // An entry removed while iterating is left out, not an error of the listing.
        let mut out: Vec<_> = hash.iter().flatten().collect();
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// The reader of the `BREAKER_EVENTS` ring buffer, once.
    pub fn take_breaker_events(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self
            .ebpf
            .take_map(breaker::BREAKER_EVENTS)
            .ok_or(LoaderError::MissingMap {
                name: breaker::BREAKER_EVENTS,
            })?;
        RingBuf::try_from(map).map_err(map_err(breaker::BREAKER_EVENTS))
    }
}
