//! Carrying the circuit breakers across a takeover (map layout 6 on): the kept `BREAKERS`,
//! `BREAKER_PROBES` and `BREAKER_CONNS` entries are copied into the new object's maps as they
//! are, so an open breaker stays open until its time (the clock is the same kernel's), the
//! probe in flight stays the one probe, and the connections counted against `max_connections`
//! stay counted — and are uncounted when they close. Everything is copied before any new
//! program runs; after the links switched, only the entries the old programs created
//! meanwhile (what the new programs wrote since is newer). A kept map of another shape is left
//! behind with a warning: its breakers start closed again, the takeover goes on.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError, MapType};
use dataplane_common::breaker::{
    BREAKER_CONNS, BREAKER_PROBES, BREAKERS, Breaker, BreakerKey, BreakerProbe,
};

use super::{Dataplane, LoaderError, map_err};

/// The first map layout with the breaker maps.
pub const BREAKERS_LAYOUT_SINCE: u32 = 6;

/// `BPF_NOEXIST`: an update that only creates, never overwrites.
const BPF_NOEXIST: u64 = 1;

const KEY: usize = size_of::<BreakerKey>();
const BREAKER: usize = size_of::<Breaker>();
const PROBE: usize = size_of::<BreakerProbe>();
/// `BREAKER_CONNS`: socket cookie → (breaker key, padding to 8).
const COOKIE: usize = size_of::<u64>();
const CONN: usize = 16;

/// The breaker maps an earlier agent left pinned.
pub struct KeptBreakers {
    maps: Vec<(&'static str, Map)>,
}

impl KeptBreakers {
    /// Opens the kept breaker maps of a dataplane of map layout `layout` under `dir`; `None`
    /// before layout 6.
    #[must_use]
    pub fn open(dir: &Path, layout: u32) -> Option<Self> {
        if layout < BREAKERS_LAYOUT_SINCE {
            return None;
        }
        let mut maps = Vec::new();
        for (name, kind, key, value) in [
            (BREAKERS, MapType::Hash, KEY, BREAKER),
            (BREAKER_PROBES, MapType::Hash, KEY, PROBE),
            (BREAKER_CONNS, MapType::LruHash, COOKIE, CONN),
        ] {
            let path = dir.join("maps").join(name);
            let opened = MapData::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| {
                    let info = d.info().map_err(|e| e.to_string())?;
                    let shape = (
                        info.map_type().map_err(|e| e.to_string())?,
                        info.key_size() as usize,
                        info.value_size() as usize,
                    );
                    if shape == (kind, key, value) {
                        Ok(d)
                    } else {
                        Err(format!(
                            "a {:?} with {}-byte keys and {}-byte values, not a {kind:?} with \
                         {key} and {value}",
                            shape.0, shape.1, shape.2
                        ))
                    }
                });
            match opened {
                Ok(d) if kind == MapType::LruHash => maps.push((name, Map::LruHashMap(d))),
                Ok(d) => maps.push((name, Map::HashMap(d))),
                Err(e) => tracing::warn!(
                    map = name,
                    error = %e,
                    "the kept breaker map is not carried over: its breakers start closed"
                ),
            }
        }
        Some(Self { maps })
    }

    /// Copies the kept entries into `dp`'s maps (with `only_new`, the keys `dp` does not hold
    /// yet); returns the `BREAKERS` entries copied.
    pub fn copy_into(&self, dp: &mut Dataplane, only_new: bool) -> Result<u64, LoaderError> {
        let mut breakers = 0;
        for (name, kept) in &self.maps {
            let new = dp.map_mut(name)?;
            let copied = match *name {
                BREAKERS => copy::<KEY, BREAKER>(name, kept, new, only_new)?,
                BREAKER_PROBES => copy::<KEY, PROBE>(name, kept, new, only_new)?,
                _ => copy::<COOKIE, CONN>(name, kept, new, only_new)?,
            };
            if *name == BREAKERS {
                breakers = copied;
            }
        }
        Ok(breakers)
    }
}

/// Copies every entry of `from` into `to` as bytes; returns how many were written.
fn copy<const K: usize, const V: usize>(
    name: &'static str,
    from: &Map,
    to: &mut Map,
    only_new: bool,
) -> Result<u64, LoaderError> {
    let from: HashMap<&MapData, [u8; K], [u8; V]> =
        HashMap::try_from(from).map_err(map_err(name))?;
    let mut to: HashMap<&mut MapData, [u8; K], [u8; V]> =
        HashMap::try_from(to).map_err(map_err(name))?;
    let flags = if only_new { BPF_NOEXIST } else { 0 };
    let mut copied = 0;
    // An entry removed while the keys are walked is skipped: the old programs dropped it.
    for key in from.keys().filter_map(Result::ok) {
        let Ok(value) = from.get(&key, 0) else {
            continue;
        };
        match to.insert(key, value, flags) {
            Ok(()) => copied += 1,
            Err(MapError::SyscallError(e))
                if only_new
                    && e.io_error.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(copied)
}
