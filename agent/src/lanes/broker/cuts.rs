//! Chaos faults on lanes. A lane over shared memory or a Unix socket never crosses the packet
//! path, so a partition in the dataplane alone would leave it working — a fault "running with
//! no effect". The broker therefore reads the pinned chaos maps too: while a drop fault takes
//! every packet between two quadrants (either way), a lane between them is cut (its client's
//! socket shut down, so both ends see the peer gone) and none is opened; while a refuse fault
//! takes every connect from one quadrant to another, no lane is opened that way. Faults that
//! take a share only (loss), delays and resets stay on the packet path.

use std::path::PathBuf;

use dataplane_common::Quadrant;

use crate::chaos::{Action, Faults};

/// One live fault that cuts lanes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cut {
    action: Action,
    from: String,
    to: String,
    expires_ns: u64,
}

impl Cut {
    fn names(&self, from: Quadrant, to: Quadrant) -> bool {
        let is = |side: &str, q: Quadrant| side == "any" || side == q.name();
        is(&self.from, from) && is(&self.to, to)
    }
}

/// The faults of the dataplane's chaos maps that act on lanes, refreshed from the pins when the
/// armed horizon moves.
#[derive(Debug)]
pub(super) struct Cuts {
    pins: PathBuf,
    faults: Option<FaultsHandle>,
    /// When opening the maps last failed (tried again a second later, not on every open).
    failed_at: Option<std::time::Instant>,
    /// The armed horizon the live list was read at.
    horizon: u64,
    live: Vec<Cut>,
}

/// [`Faults`] with a `Debug` that says nothing.
struct FaultsHandle(Faults);

impl std::fmt::Debug for FaultsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

impl Cuts {
    /// The chaos maps pinned under `pins` (opened when first needed: the dataplane may come
    /// later, or never for a broker without one).
    pub(super) fn new(pins: PathBuf) -> Self {
        Self {
            pins,
            faults: None,
            failed_at: None,
            horizon: 0,
            live: Vec::new(),
        }
    }

    /// Reads the armed horizon (one map lookup) and, when it moved, the faults.
    fn refresh(&mut self, now_ns: u64) {
        if self.faults.is_none()
            && self
                .failed_at
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1))
        {
            self.faults = Faults::open(&self.pins).ok().map(FaultsHandle);
            self.failed_at = self.faults.is_none().then(std::time::Instant::now);
        }
        let Some(FaultsHandle(faults)) = &self.faults else {
            return;
        };
        let horizon = faults.armed_until().unwrap_or(0);
        if horizon <= now_ns {
            self.horizon = horizon;
            self.live.clear();
            return;
        }
        if horizon != self.horizon {
            self.horizon = horizon;
            self.live = faults
                .status(now_ns)
                .into_iter()
                .filter(|f| matches!(f.action, Action::Drop | Action::Refuse) && f.percent >= 100.0)
                .map(|f| Cut {
                    action: f.action,
                    from: f.from,
                    to: f.to,
                    expires_ns: f.expires_ns,
                })
                .collect();
        }
        self.live.retain(|c| c.expires_ns > now_ns);
    }

    /// Why a lane from `client` to a service in `service` may not open now, if a fault says so.
    pub(super) fn refusal(
        &mut self,
        client: Quadrant,
        service: Quadrant,
        now_ns: u64,
    ) -> Option<String> {
        self.refresh(now_ns);
        self.live.iter().find_map(|c| {
            let cuts =
                c.names(client, service) || (c.action == Action::Drop && c.names(service, client));
            cuts.then(|| {
                format!(
                    "chaos {} {} -> {} takes every {} between {} and {} for {} ms more: no lane \
                     is opened across it",
                    c.action.name(),
                    c.from,
                    c.to,
                    if c.action == Action::Drop {
                        "packet"
                    } else {
                        "connect"
                    },
                    client.name(),
                    service.name(),
                    (c.expires_ns - now_ns).div_ceil(1_000_000)
                )
            })
        })
    }

    /// Whether a live fault cuts an open lane between `client` and `service` (a drop fault
    /// either way).
    pub(super) fn severs(&mut self, client: Quadrant, service: Quadrant, now_ns: u64) -> bool {
        self.refresh(now_ns);
        self.live.iter().any(|c| {
            c.action == Action::Drop && (c.names(client, service) || c.names(service, client))
        })
    }

    /// Whether any fault acts on lanes now (as of the last refresh).
    pub(super) fn any(&mut self, now_ns: u64) -> bool {
        self.refresh(now_ns);
        !self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuts(live: &[(Action, &str, &str)]) -> Cuts {
        Cuts {
            pins: PathBuf::from("/nonexistent"),
            faults: None,
            failed_at: None,
            horizon: 0,
            live: live
                .iter()
                .map(|(action, from, to)| Cut {
                    action: *action,
                    from: (*from).into(),
                    to: (*to).into(),
                    expires_ns: u64::MAX,
                })
                .collect(),
        }
    }

    #[test]
    fn a_drop_cuts_both_ways_and_a_refuse_one_way() {
        use Quadrant::*;
        // Without maps nothing is refreshed: the list stands as written.
        let mut c = cuts(&[(Action::Drop, "px", "pg"), (Action::Refuse, "dx", "dg")]);
        assert!(
            c.refusal(Px, Pg, 0)
                .is_some_and(|m| m.contains("every packet between px and pg"))
        );
        assert!(
            c.refusal(Pg, Px, 0).is_some(),
            "a drop either way cuts the lane"
        );
        assert!(c.severs(Pg, Px, 0) && c.severs(Px, Pg, 0));
        assert!(
            c.refusal(Dx, Dg, 0)
                .is_some_and(|m| m.contains("every connect"))
        );
        assert!(c.refusal(Dg, Dx, 0).is_none(), "a refuse is one way");
        assert!(!c.severs(Dx, Dg, 0), "a refuse leaves open lanes alone");
        assert!(c.refusal(Dx, Px, 0).is_none() && !c.severs(Dg, Pg, 0));
        let mut any = cuts(&[(Action::Drop, "any", "dx")]);
        assert!(any.severs(Dg, Dx, 0) && any.severs(Dx, Dx, 0) && !any.severs(Dg, Pg, 0));
    }
}
