//! The broker's open lanes, with what each quadrant's lanes hold kept in atomics beside them.
//! The pool's filler runs at idle priority and reads the usage from there: if it took the
//! broker's lock instead, a filler preempted while holding it would hold up every open until
//! the scheduler gave idle work a turn again — hundreds of milliseconds on a busy node.

use std::{
    collections::BTreeMap,
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use dataplane_common::{QUADRANT_COUNT, Quadrant};

use super::OpenLane;

/// Lanes and shared-memory bytes per opener quadrant, readable without the broker's lock.
#[derive(Debug, Default)]
pub(super) struct Usage {
    lanes: [AtomicU32; QUADRANT_COUNT],
    bytes: [AtomicU64; QUADRANT_COUNT],
}

impl Usage {
    /// Open lanes of `q` and the shared memory they map.
    pub(super) fn of(&self, q: Quadrant) -> (u32, u64) {
        let i = q as usize;
        (
            self.lanes[i].load(Ordering::Relaxed),
            self.bytes[i].load(Ordering::Relaxed),
        )
    }

    fn add(&self, q: Quadrant, bytes: u64) {
        let i = q as usize;
        self.lanes[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, q: Quadrant, bytes: u64) {
        let i = q as usize;
        self.lanes[i].fetch_sub(1, Ordering::Relaxed);
        self.bytes[i].fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Open lanes by id; reads go to the map, changes through [`Self::insert`] and
/// [`Self::remove`], which keep [`Usage`] in step.
#[derive(Default)]
pub(super) struct OpenLanes {
    map: BTreeMap<u64, OpenLane>,
    usage: Arc<Usage>,
}

impl OpenLanes {
    /// The usage counters, to read without the lock that guards the lanes.
    pub(super) fn counters(&self) -> Arc<Usage> {
        Arc::clone(&self.usage)
    }

    /// Open lanes of `q` and the shared memory they map.
    pub(super) fn usage(&self, q: Quadrant) -> (u32, u64) {
        self.usage.of(q)
    }

    /// Records a lane; one a workload of this node opened is charged to its quadrant (a lane
    /// another node's workload opened is charged there).
    pub(super) fn insert(&mut self, id: u64, lane: OpenLane) {
        if lane.client_conn.is_some() {
            self.usage.add(lane.client_quadrant, lane.info.shm_bytes);
        }
        if let Some(old) = self.map.insert(id, lane)
            && old.client_conn.is_some()
        {
            self.usage.sub(old.client_quadrant, old.info.shm_bytes);
        }
    }

    /// Takes lane `id`'s copy of its client's socket (to shut it down), if it still has one.
    pub(super) fn take_sever(&mut self, id: u64) -> Option<std::os::fd::OwnedFd> {
        self.map.get_mut(&id)?.sever.take()
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<OpenLane> {
        let lane = self.map.remove(&id)?;
        if lane.client_conn.is_some() {
            self.usage.sub(lane.client_quadrant, lane.info.shm_bytes);
        }
        Some(lane)
    }
}

impl Deref for OpenLanes {
    type Target = BTreeMap<u64, OpenLane>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}
