//! The kernel's circuit breakers at lane open: a TCP lane connects to the service's address and
//! port from the opener's quadrant, so when the opener quadrant's breaker for that destination is
//! open the kernel would refuse the connect anyway; the broker refuses the open first, with the
//! figures and a retry-after, instead of handing out a lane that cannot connect.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Mutex, PoisonError},
};

use aya::maps::{HashMap, Map, MapData};
use dataplane_common::{
    Quadrant,
    breaker::{self, Breaker, BreakerKey, HALF_OPEN, OPEN},
    policy::PROTO_TCP,
};

use super::decide::Refused;
use crate::lanes::control::Refusal;

/// How long a caller refused by a half-open breaker (its probe in flight) is told to wait, at
/// least.
const HALF_OPEN_RETRY_MS: u64 = 100;

/// Reads the pinned `BREAKERS` map, opened on first use.
#[derive(Default)]
pub struct Breakers {
    pin: Option<PathBuf>,
    map: Mutex<Option<HashMap<MapData, BreakerKey, Breaker>>>,
    /// The pinned `BREAKER_ADMISSION` (beside `BREAKERS`), opened on first use.
    admission: Mutex<Option<HashMap<MapData, BreakerKey, u32>>>,
}

impl Breakers {
    /// The breakers pinned at `pin` (`<bpffs>/<instance>/maps/BREAKERS`).
    pub fn pinned(pin: PathBuf) -> Self {
        Self {
            pin: Some(pin),
            map: Mutex::new(None),
            admission: Mutex::new(None),
        }
    }

    /// The breaker of (`from`, `addr`:`port` over TCP), if the kernel keeps one.
    /// The pinned `BREAKERS`, opened on first use (`None` inside while it cannot be).
    fn opened(&self) -> std::sync::MutexGuard<'_, Option<HashMap<MapData, BreakerKey, Breaker>>> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.is_none()
            && let Some(data) = self.pin.as_ref().and_then(|p| MapData::from_pin(p).ok())
        {
            *map = HashMap::try_from(Map::HashMap(data)).ok();
        }
        map
    }

    fn get(&self, from: Quadrant, addr: Ipv4Addr, port: u16) -> Option<Breaker> {
        self.opened()
            .as_ref()?
            .get(&tcp_key(addr, port, from), 0)
            .ok()
    }

    /// Opens (with `open`: until when, ns, and the ejection, ms) or closes the breakers of
    /// every caller quadrant for `addr`:`port` over TCP — what the agent's service breakers
    /// tell the kernel. Without the pinned map nothing changes.
    pub fn force(&self, addr: Ipv4Addr, port: u16, open: Option<(u64, u32)>) {
        let mut map = self.opened();
        let Some(map) = map.as_mut() else { return };
        for caller in Quadrant::ALL {
            let key = tcp_key(addr, port, caller);
            let old = map.get(&key, 0).ok();
            let b = match (open, old) {
                (Some((until, ejection_ms)), old) => {
                    let old = old.unwrap_or_default();
                    Breaker {
                        state: OPEN,
                        open_until_ns: until,
                        ejection_ms,
                        opened: old.opened + 1,
                        ..old
                    }
                }
                (None, Some(old)) if old.state != breaker::CLOSED => Breaker {
                    state: breaker::CLOSED,
                    failures: 0,
                    ..old
                },
                (None, _) => continue,
            };
            // The kernel may update the same entry meanwhile; the agent's word is the later one.
            let _ = map.insert(key, b, 0);
        }
    }

    /// Refuses a TCP lane from `from` to `service` at `addr`:`port` while the breaker is open.
    /// Sets admission control's refusal probability (ppm; 0 removes it) for `connect`s from
    /// every quadrant to `addr:port` over TCP; each caller's breaker entry is created closed
    /// if it has none, since the kernel consults the probability through it.
    pub fn admission(&self, addr: Ipv4Addr, port: u16, ppm: u32) {
        let Some(dir) = self.pin.as_ref().and_then(|p| p.parent()) else {
            return;
        };
        let mut admission = self
            .admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if admission.is_none() {
            let Ok(data) = MapData::from_pin(dir.join(breaker::BREAKER_ADMISSION)) else {
                return;
            };
            *admission = HashMap::try_from(Map::HashMap(data)).ok();
        }
        let Some(admission) = admission.as_mut() else {
            return;
        };
        let mut breakers = self.opened();
        for caller in Quadrant::ALL {
            let key = tcp_key(addr, port, caller);
            if ppm == 0 {
                let _ = admission.remove(&key);
                continue;
            }
            if let Some(b) = breakers.as_mut() {
                // BPF_NOEXIST: an existing entry keeps its state.
                let _ = b.insert(key, Breaker::default(), 1);
            }
            let _ = admission.insert(key, ppm, 0);
        }
    }

    pub fn check(
        &self,
        from: Quadrant,
        service: &str,
        addr: Ipv4Addr,
        port: u16,
    ) -> Result<(), Refused> {
        match self.get(from, addr, port) {
            Some(b) => refusal(
                from,
                service,
                addr,
                port,
                &b,
                crate::breakers::monotonic_ns(),
            ),
            None => Ok(()),
        }
    }
}

/// The refusal for breaker `b` at monotonic time `now_ns`, if it refuses.
/// The breaker key of `caller`'s TCP connects to `addr:port`.
fn tcp_key(addr: Ipv4Addr, port: u16, caller: Quadrant) -> BreakerKey {
    BreakerKey {
        daddr: u32::from_ne_bytes(addr.octets()),
        dport: port.to_be(),
        proto: PROTO_TCP,
        caller: caller as u8,
    }
}

pub fn refusal(
    from: Quadrant,
    service: &str,
    addr: Ipv4Addr,
    port: u16,
    b: &Breaker,
    now_ns: u64,
) -> Result<(), Refused> {
    let retry_after_ms = match b.state {
        OPEN if b.open_until_ns > now_ns => (b.open_until_ns - now_ns).div_ceil(1_000_000),
        HALF_OPEN => (u64::from(b.ejection_ms) / 10).max(HALF_OPEN_RETRY_MS),
        _ => return Ok(()),
    };
    Err(Refused {
        reason: Refusal::BreakerOpen,
        message: format!(
            "circuit breaker of {} for {service} ({addr}:{port}) is {} after {} consecutive failed connects; retry after {retry_after_ms} ms",
            from.name(),
            breaker::state_name(b.state),
            b.failures,
        ),
        limit: None,
        retry_after_ms: Some(retry_after_ms),
    })
}

#[cfg(test)]
mod tests {
    use dataplane_common::breaker::CLOSED;

    use super::*;

    #[test]
    fn open_and_half_open_breakers_refuse_with_a_retry_after() {
        let addr = Ipv4Addr::new(10, 240, 1, 2);
        let open = Breaker {
            open_until_ns: 2_500_000_000,
            state: OPEN,
            failures: 5,
            ejection_ms: 1000,
            ..Breaker::default()
        };
        let r = refusal(Quadrant::Dx, "echo", addr, 7100, &open, 2_000_000_000).unwrap_err();
        assert_eq!(
            (r.reason, r.retry_after_ms),
            (Refusal::BreakerOpen, Some(500))
        );
        assert_eq!(
            r.message,
            "circuit breaker of dx for echo (10.240.1.2:7100) is open after 5 consecutive failed connects; retry after 500 ms"
        );
        // Past its ejection the next connect is the kernel's probe: no refusal here.
        assert!(refusal(Quadrant::Dx, "echo", addr, 7100, &open, 3_000_000_000).is_ok());
        let half = Breaker {
            state: HALF_OPEN,
            ..open
        };
        let r = refusal(Quadrant::Dx, "echo", addr, 7100, &half, 3_000_000_000).unwrap_err();
        assert_eq!(r.retry_after_ms, Some(100));
        let closed = Breaker {
            state: CLOSED,
            ..open
        };
        assert!(refusal(Quadrant::Dx, "echo", addr, 7100, &closed, 0).is_ok());
        // No pinned map (no dataplane): nothing to refuse.
        assert!(
            Breakers::default()
                .check(Quadrant::Dx, "echo", addr, 7100)
                .is_ok()
        );
    }
}
