//! Hung listeners: every [`PING_INTERVAL`] the broker pings each listener that offered with
//! `pings` (the client library's do; it answers while the service waits in `accept`). A
//! listener that leaves [`HUNG_AFTER`] pings in a row unanswered — 300 ms — is hung: alive (its
//! connection is open, so it is not gone) but not taking lanes. New lanes to a service offered
//! by several instances pass it over (as they pass over a draining one) until it answers again;
//! `quadrant lanes` marks its offer `hung`. A listener that is the only offer keeps its lanes:
//! there is nowhere else for them.

use std::{collections::BTreeMap, sync::Arc};

use tracing::{info, warn};

use super::{Broker, Conn, State};
use crate::lanes::control::LaneMessage;

/// How often listeners are pinged.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Pings in a row a listener leaves unanswered before it counts as hung.
pub const HUNG_AFTER: u32 = 3;

/// One listener's pings.
#[derive(Debug, Default)]
pub(super) struct Pinged {
    /// The last ping sent.
    sent: u64,
    /// The last ping answered.
    answered: u64,
    /// Rounds in a row that found the last ping unanswered.
    misses: u32,
}

impl Pinged {
    fn hung(&self) -> bool {
        self.misses >= HUNG_AFTER
    }

    /// Judges the last ping (answered or missed) and numbers the next one; returns whether
    /// the listener was hung before and whether it is now.
    fn next_round(&mut self) -> (bool, bool) {
        let was = self.hung();
        if self.answered < self.sent {
            self.misses += 1;
        } else {
            self.misses = 0;
        }
        self.sent += 1;
        (was, self.hung())
    }
}

impl State {
    /// Whether the listener on connection `conn_id` is hung.
    pub(super) fn hung(&self, conn_id: u64) -> bool {
        self.pings.get(&conn_id).is_some_and(Pinged::hung)
    }

    /// Every listener connection, by id.
    fn listener_conns(&self) -> BTreeMap<u64, Arc<Conn>> {
        self.services
            .values()
            .chain(self.replicas.values().flatten())
            .chain(self.shadows.values().map(|s| &s.service))
            .map(|s| (s.conn.id, Arc::clone(&s.conn)))
            .collect()
    }
}

impl Broker {
    /// One round: counts the listeners whose last ping went unanswered (logging those that
    /// became hung or came back) and sends each its next ping. A ping that does not fit in the
    /// listener's queue is not sent and counts as missed at the next round.
    pub fn ping_listeners(&self) {
        let mut sends = Vec::new();
        {
            let mut state = self.state();
            let conns = state.listener_conns();
            state.pings.retain(|id, _| conns.contains_key(id));
            for (id, p) in &mut state.pings {
                let (was_hung, hung) = p.next_round();
                if hung && !was_hung {
                    warn!(
                        listener = id,
                        "a lane listener left {HUNG_AFTER} pings unanswered: hung, passed over \
                         for new lanes"
                    );
                } else if was_hung && !hung {
                    info!(listener = id, "a hung lane listener answers again");
                }
                if let Some(conn) = conns.get(id) {
                    sends.push((Arc::clone(conn), p.sent));
                }
            }
        }
        for (conn, seq) in sends {
            let _ = conn.try_send(&LaneMessage::Ping { seq });
        }
    }

    /// Starts pinging the listener on connection `conn_id`.
    pub(super) fn watch_listener(&self, conn_id: u64) {
        self.state().pings.entry(conn_id).or_default();
    }

    /// Records the listener's answer to ping `seq`.
    pub(super) fn pong(&self, conn_id: u64, seq: u64) {
        if let Some(p) = self.state().pings.get_mut(&conn_id) {
            // Only pings that were sent count: a listener cannot answer ahead.
            p.answered = p.answered.max(seq.min(p.sent));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_unanswered_pings_in_a_row_make_a_listener_hung_and_an_answer_ends_it() {
        let mut p = Pinged::default();
        let round = |p: &mut Pinged, answer: bool| {
            if answer {
                p.answered = p.sent;
            }
            p.next_round().1
        };
        assert!(!round(&mut p, true));
        assert!(!round(&mut p, false));
        assert!(!round(&mut p, false));
        assert!(round(&mut p, false), "third miss");
        assert!(round(&mut p, false));
        assert!(!round(&mut p, true), "answered again");
    }
}
