//! A lane service offered by several instances of its quadrant (`quadrant scale`): the first
//! offer is the service's (`State::services`), offers from other instances are its replicas.
//! An open chooses among them — filter (not draining), then score (fewest lanes open to it;
//! the lowest instance on a tie, so the choice is deterministic) — and a replica takes the
//! service's place when the instance that offered first goes away.

use std::collections::BTreeSet;

use dataplane_common::Quadrant;

use super::{Service, State};

impl State {
    /// Records `offered` as another instance's offer of `key`; `false` if that instance
    /// offers it already.
    pub(super) fn add_replica(&mut self, key: (Quadrant, String), offered: Service) -> bool {
        if self
            .services
            .get(&key)
            .is_some_and(|s| s.instance == offered.instance)
        {
            return false;
        }
        let replicas = self.replicas.entry(key).or_default();
        if replicas.iter().any(|r| r.instance == offered.instance) {
            return false;
        }
        replicas.push(offered);
        replicas.sort_by_key(|r| r.instance);
        true
    }

    /// Forgets every offer made over connection `conn_id`; a service whose first offer went
    /// is taken over by its lowest remaining replica.
    pub(super) fn forget_offers(&mut self, conn_id: u64) {
        self.services.retain(|_, s| s.conn.id != conn_id);
        for replicas in self.replicas.values_mut() {
            replicas.retain(|r| r.conn.id != conn_id);
        }
        let keys: Vec<_> = self.replicas.keys().cloned().collect();
        for key in keys {
            if self.services.contains_key(&key) {
                continue;
            }
            if let Some(replicas) = self.replicas.get_mut(&key)
                && !replicas.is_empty()
            {
                let first = replicas.remove(0);
                self.services.insert(key, first);
            }
        }
        self.replicas.retain(|_, r| !r.is_empty());
    }

    /// The offer of `key` a new lane goes to: among the instances neither draining nor hung
    /// (`ping.rs`), the one with the fewest lanes open to it (the lowest instance on a tie).
    /// `None` if every offering instance drains or hangs (or none offers it); a hung listener
    /// that is the only offer keeps it. Instance `avoid` (where a retrying caller's last lane
    /// went) comes last among the candidates.
    pub(super) fn pick(
        &self,
        key: &(Quadrant, String),
        draining: &BTreeSet<(Quadrant, u8)>,
        avoid: Option<u8>,
    ) -> Option<&Service> {
        let first = self.services.get(key)?;
        let replicas = self.replicas.get(key).map_or(&[][..], Vec::as_slice);
        if replicas.is_empty() {
            // One instance offers it: draining leaves nobody else to take the lane.
            return (!draining.contains(&(key.0, first.instance))).then_some(first);
        }
        std::iter::once(first)
            .chain(replicas)
            .filter(|s| !draining.contains(&(key.0, s.instance)) && !self.hung(s.conn.id))
            .min_by_key(|s| {
                let open = self
                    .lanes
                    .values()
                    .filter(|l| l.server_conn.id == s.conn.id)
                    .count();
                (avoid == Some(s.instance), open, s.instance)
            })
    }

    /// How many instances offer `key`.
    pub(super) fn offers(&self, key: &(Quadrant, String)) -> usize {
        usize::from(self.services.contains_key(key)) + self.replicas.get(key).map_or(0, Vec::len)
    }
}
