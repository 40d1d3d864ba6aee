//! Re-routing lane services whose latency SLO burns: new `auto` lanes to such a service go first
//! to the transport whose lanes met the latency threshold most often since the last decision
//! (or, without measurements of the others, to the next transport the service offers, to
//! measure it). At most one switch per `lanes.reroute_hold_secs` per service (hysteresis), and
//! during that hold only `lanes.reroute_fraction` of the new `auto` lanes go to the new
//! transport (the first of them among them; the rest keep the old one), so one switch never
//! moves all of a service's new lanes; open lanes keep their transport and drain as their ends
//! close them; lanes that ask for a transport get it.

use std::collections::BTreeMap;

use dataplane_common::Quadrant;

use super::{
    Broker,
    sli::{SliTotals, transport_index},
};
use crate::lanes::Transport;

#[derive(Debug, Default)]
struct Route {
    preferred: Option<Transport>,
    /// What `auto` lanes went to before the last switch.
    previous: Option<Transport>,
    /// Parts per million of new lanes owed to the new transport during the hold.
    credit: u64,
    switched_at_ns: Option<u64>,
    /// Per transport (answered, within) at the last decision.
    seen: [(u64, u64); 3],
}

/// One switch, for the event and the audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rerouted {
    /// The service's quadrant.
    pub quadrant: Quadrant,
    /// The service.
    pub service: String,
    /// The transport new `auto` lanes went to.
    pub from: Transport,
    /// The transport they go to now.
    pub to: Transport,
    /// Why, with the figures.
    pub reason: String,
}

/// The services' routes.
#[derive(Debug, Default)]
pub struct Routes {
    by_service: BTreeMap<(Quadrant, String), Route>,
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn share(within: u64, answered: u64) -> f64 {
    within as f64 / answered as f64
}

impl Routes {
    /// The transport the next `auto` lane to the service tries first, if re-routed: within
    /// `hold_ns` of the switch, `fraction_ppm` of them the new transport (the first one
    /// included) and the others the old; after it, the new one.
    pub fn preferred(
        &mut self,
        q: Quadrant,
        service: &str,
        now_ns: u64,
        (hold_ns, fraction_ppm): (u64, u64),
    ) -> Option<Transport> {
        let r = self.by_service.get_mut(&(q, service.to_owned()))?;
        let holding = r
            .switched_at_ns
            .is_some_and(|at| now_ns.saturating_sub(at) < hold_ns);
        match r.previous {
            Some(previous) if holding => {
                let new = r.credit >= 1_000_000;
                if new {
                    r.credit -= 1_000_000;
                }
                r.credit += fraction_ppm;
                if new { r.preferred } else { Some(previous) }
            }
            _ => r.preferred,
        }
    }

    /// Decides for a service whose latency SLO burns: `offered` are the transports it takes
    /// (in `auto` order), `totals` its cumulative counts; a transport is judged from
    /// `min_answered` answered requests since the last decision, and one that meets `target`
    /// stays (the SLO may still burn on what came before it).
    pub fn reroute(
        &mut self,
        (q, service): (Quadrant, &str),
        now_ns: u64,
        totals: &SliTotals,
        offered: &[Transport],
        (hold_ns, min_answered, target): (u64, u64, f64),
    ) -> Option<Rerouted> {
        let route = self.by_service.entry((q, service.to_owned())).or_default();
        if route
            .switched_at_ns
            .is_some_and(|at| now_ns.saturating_sub(at) < hold_ns)
        {
            return None;
        }
        let current = route.preferred.or_else(|| offered.first().copied())?;
        let measured = |t: Transport| {
            let i = transport_index(t);
            let (a, w) = totals.by_transport[i];
            let (a0, w0) = route.seen[i];
            let (a, w) = (a.saturating_sub(a0), w.saturating_sub(w0));
            (a >= min_answered).then(|| (share(w, a), w, a))
        };
        let mine = measured(current);
        if mine.is_some_and(|(share_mine, ..)| share_mine >= target) {
            return None;
        }
        let best = offered
            .iter()
            .filter(|t| **t != current)
            .filter_map(|t| measured(*t).map(|m| (*t, m)))
            .max_by(|a, b| a.1.0.total_cmp(&b.1.0));
        let (to, reason) = match (best, mine) {
            (Some((other, (share_other, within, answered))), Some((share_mine, mw, ma)))
                if share_other > share_mine =>
            {
                (
                    other,
                    format!(
                        "{}: {within} of {answered} round trips within the threshold, {}: {mw} of {ma}",
                        other.name(),
                        current.name()
                    ),
                )
            }
            (Some(_), _) | (None, None) => return None,
            (None, Some((_, mw, ma))) => {
                let at = offered.iter().position(|t| *t == current).unwrap_or(0);
                let next = offered[(at + 1) % offered.len()];
                if next == current {
                    return None;
                }
                (
                    next,
                    format!(
                        "{}: {mw} of {ma} round trips within the threshold; no measurements of {} yet, trying it",
                        current.name(),
                        next.name()
                    ),
                )
            }
        };
        route.previous = Some(current);
        route.preferred = Some(to);
        // The first new lane after the switch goes to the new transport.
        route.credit = 1_000_000;
        route.switched_at_ns = Some(now_ns);
        route.seen = totals.by_transport;
        Some(Rerouted {
            quadrant: q,
            service: service.to_owned(),
            from: current,
            to,
            reason,
        })
    }
}

impl Broker {
    /// The transport `auto` lanes to `service` in `q` try first, if re-routed.
    pub(super) fn preferred_transport(&self, q: Quadrant, service: &str) -> Option<Transport> {
        let lanes = &self.config.lanes;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "validated to (0, 1]"
        )]
        let fraction_ppm = (lanes.reroute_fraction * 1e6).round() as u64;
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .preferred(
                q,
                service,
                crate::breakers::monotonic_ns(),
                (
                    u64::from(lanes.reroute_hold_secs) * 1_000_000_000,
                    fraction_ppm,
                ),
            )
    }

    /// Re-routes `service` in `q`, whose latency SLO burns, if the figures say so (see the
    /// module).
    pub fn reroute_burning(
        &self,
        (q, service): (Quadrant, &str),
        now_ns: u64,
        totals: &SliTotals,
        (min_answered, target): (u64, f64),
    ) -> Option<Rerouted> {
        let tcp = self
            .state()
            .services
            .get(&(q, service.to_owned()))
            .is_some_and(|s| s.tcp_port.is_some())
            && self.identity.is_some();
        let offered: Vec<Transport> = Transport::ALL
            .into_iter()
            .filter(|t| *t != Transport::Tcp || tcp)
            .collect();
        let hold_ns = u64::from(self.config.lanes.reroute_hold_secs) * 1_000_000_000;
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reroute(
                (q, service),
                now_ns,
                totals,
                &offered,
                (hold_ns, min_answered, target),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const OFFERED: [Transport; 3] = [Transport::Shm, Transport::Uds, Transport::Tcp];

    fn totals(by_transport: [(u64, u64); 3]) -> SliTotals {
        SliTotals {
            by_transport,
            ..SliTotals::default()
        }
    }

    #[test]
    fn explores_then_follows_the_measurements_with_hysteresis() {
        let mut r = Routes::default();
        let key = (Quadrant::Dg, "echo");
        // Too few shared-memory round trips: nothing to decide.
        assert_eq!(
            r.reroute(
                key,
                0,
                &totals([(3, 0), (0, 0), (0, 0)]),
                &OFFERED,
                (60 * S, 5, 0.9)
            ),
            None
        );
        // 10 slow shm round trips, nothing measured elsewhere: try uds.
        let t = r
            .reroute(
                key,
                S,
                &totals([(10, 0), (0, 0), (0, 0)]),
                &OFFERED,
                (60 * S, 5, 0.9),
            )
            .unwrap();
        assert_eq!((t.from, t.to), (Transport::Shm, Transport::Uds));
        assert!(
            t.reason.contains("no measurements of uds yet"),
            "{}",
            t.reason
        );
        // Within the hold a third of the new lanes go to uds (the first of them), the others
        // keep shm; after it all go to uds.
        let hold = (60 * S, 333_334);
        let picks: Vec<Transport> = (0..6)
            .map(|i| r.preferred(Quadrant::Dg, "echo", S + i, hold).unwrap())
            .collect();
        assert_eq!(
            picks,
            [
                Transport::Uds,
                Transport::Shm,
                Transport::Shm,
                Transport::Uds,
                Transport::Shm,
                Transport::Shm
            ]
        );
        assert_eq!(
            r.preferred(Quadrant::Dg, "echo", 61 * S, hold),
            Some(Transport::Uds)
        );
        assert_eq!(r.preferred(Quadrant::Dg, "other", S, hold), None);
        // Within the hold nothing moves, whatever the figures.
        let worse = totals([(10, 0), (30, 0), (0, 0)]);
        assert_eq!(
            r.reroute(key, 30 * S, &worse, &OFFERED, (60 * S, 5, 0.9)),
            None
        );
        // After it: uds met the threshold 0 of 30 times since the switch, tcp 9 of 10: tcp.
        let t = r
            .reroute(
                key,
                70 * S,
                &totals([(10, 0), (30, 0), (10, 9)]),
                &OFFERED,
                (60 * S, 5, 0.9),
            )
            .unwrap();
        assert_eq!((t.from, t.to), (Transport::Uds, Transport::Tcp));
        assert_eq!(
            t.reason,
            "tcp: 9 of 10 round trips within the threshold, uds: 0 of 30"
        );
        // A service without TCP lanes cycles between the local transports only.
        let mut r = Routes::default();
        let local = [Transport::Shm, Transport::Uds];
        let t = r
            .reroute(
                key,
                0,
                &totals([(10, 0), (0, 0), (0, 0)]),
                &local,
                (S, 5, 0.9),
            )
            .unwrap();
        assert_eq!(t.to, Transport::Uds);
        let t = r
            .reroute(
                key,
                2 * S,
                &totals([(10, 0), (10, 0), (0, 0)]),
                &local,
                (S, 5, 0.9),
            )
            .unwrap();
        assert_eq!(t.to, Transport::Shm);
        // A transport that meets the target stays, though the SLO still burns on older calls.
        let mut r = Routes::default();
        assert!(
            r.reroute(
                key,
                0,
                &totals([(10, 10), (0, 0), (0, 0)]),
                &local,
                (S, 5, 0.9)
            )
            .is_none()
        );
    }
}
