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
    /// went) comes last among the candidates. With an affinity key the candidate with the
    /// highest [`rendezvous`] score for the key wins instead of the least-loaded one.
    pub(super) fn pick(
        &self,
        key: &(Quadrant, String),
        draining: &BTreeSet<(Quadrant, u8)>,
        (avoid, affinity): (Option<u8>, Option<&str>),
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
                    .filter(|l| l.server_conn.as_ref().is_some_and(|c| c.id == s.conn.id))
                    .count();
                let by_key = affinity.map_or(0, |k| u64::MAX - rendezvous(k, s.instance));
                (avoid == Some(s.instance), by_key, open, s.instance)
            })
    }

    /// How many instances offer `key`.
    pub(super) fn offers(&self, key: &(Quadrant, String)) -> usize {
        usize::from(self.services.contains_key(key)) + self.replicas.get(key).map_or(0, Vec::len)
    }
}

/// The rendezvous (highest random weight) score of `instance` for affinity key `key`: a 64-bit
/// mix of the key's FNV-1a hash and the instance, the same on every agent and across restarts.
/// Each key goes to its highest-scoring instance among those taking lanes, so an instance
/// coming or going moves only the keys that score it highest (the instances share one
/// capacity, so the scores need no weights).
pub(super) fn rendezvous(key: &str, instance: u8) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ u64::from(instance).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::rendezvous;

    /// The instance a key goes to among `instances`.
    fn home(key: &str, instances: &[u8]) -> u8 {
        *instances
            .iter()
            .max_by_key(|&&k| rendezvous(key, k))
            .expect("an instance")
    }

    #[test]
    fn keys_spread_evenly_and_an_instance_leaving_moves_only_its_own() {
        let keys: Vec<String> = (0..4000).map(|i| format!("user-{i}")).collect();
        let mut counts = [0u32; 4];
        for k in &keys {
            counts[usize::from(home(k, &[0, 1, 2, 3]))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        for k in &keys {
            let before = home(k, &[0, 1, 2, 3]);
            let after = home(k, &[0, 1, 3]);
            assert!(
                before == 2 || before == after,
                "{k} moved from {before} to {after}"
            );
        }
        assert_eq!(rendezvous("user-1", 2), rendezvous("user-1", 2), "stable");
    }
}
