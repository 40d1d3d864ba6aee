//! The agent's event stream: what changed, as it happens (`quadrant events`). Every event is
//! validated against its published schema (`manifests/schemas/event.schema.json`, per kind)
//! before it is sent; subscribers that fall behind lose the oldest events and are told how many.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::error;

use crate::{lanes::Transport, plans::TaggedValidator};

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// A new policy is live.
    PolicyReloaded {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// The policy state line (as in status).
        policy: String,
        /// The live policy slot.
        slot: u32,
    },
    /// A reload was refused; the previous policy stays live.
    PolicyReloadFailed {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// Why.
        message: String,
    },
    /// A workload was admitted and started from a signed plan.
    WorkloadStarted {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// `<quadrant>/<workload>`.
        name: String,
        /// The plan generation.
        generation: u64,
        /// Its SPIFFE ID.
        spiffe_id: String,
    },
    /// A submitted plan was refused.
    SubmitRefused {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// Why.
        message: String,
    },
    /// A lane was opened.
    LaneOpened {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// Lane id.
        lane: u64,
        /// Transport.
        transport: Transport,
        /// The opener's SPIFFE ID.
        client: String,
        /// `<quadrant>/<service>`.
        service: String,
    },
    /// A lane open was refused.
    LaneRefused {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// The opener's quadrant (`none` if unattested).
        quadrant: String,
        /// The refusal reason (as counted in `quadrant lanes`).
        reason: crate::lanes::control::Refusal,
        /// The message the opener got.
        message: String,
    },
    /// A circuit breaker changed state (reported by the kernel programs).
    BreakerChanged {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// The calling quadrant's SPIFFE ID.
        caller_spiffe_id: String,
        /// `address:port`.
        destination: String,
        /// `tcp` or `udp`.
        protocol: String,
        /// Who owns the destination: a quadrant's SPIFFE ID, `host` or `world`.
        destination_identity: String,
        /// State before (`closed`, `open`, `half_open`).
        from: String,
        /// State after.
        to: String,
        /// Why: `consecutive_failures`, `probe_started`, `probe_succeeded`, `probe_failed`.
        cause: String,
        /// Consecutive failed connects at the transition (kernel breakers); failed calls in
        /// the sliding window (the agent's service breakers, protocol `lane`).
        consecutive_failures: u32,
        /// Ejection now in force, ms (0 when closed).
        ejection_ms: u32,
    },
    /// New `auto` lanes to a service go to another transport: its latency SLO burns.
    LaneRerouted {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// `<quadrant>/<service>`.
        service: String,
        /// The burning SLO.
        slo: String,
        /// Transport before.
        from: Transport,
        /// Transport now.
        to: Transport,
        /// Why, with the figures.
        reason: String,
    },
    /// A new generation of a workload started as a shadow beside the live one.
    ShadowStarted {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// `<quadrant>/<workload>`.
        workload: String,
        /// The shadow's generation.
        generation: u64,
        /// The live generation it is compared with.
        live_generation: u64,
        /// The share of lane requests mirrored to it, parts per million.
        fraction_ppm: u32,
        /// Why it runs as a shadow.
        reason: String,
    },
    /// The operator promoted or rejected a shadow generation.
    ShadowDecided {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// `<quadrant>/<workload>`.
        workload: String,
        /// The shadow's generation.
        generation: u64,
        /// Promoted or rejected.
        decision: crate::shadow::Decision,
        /// What the figures said when it was decided.
        verdict: crate::shadow::Verdict,
    },
    /// A subscriber fell behind and missed events.
    Lagged {
        /// Position in the stream.
        seq: u64,
        /// Unix time, milliseconds.
        at_ms: u64,
        /// How many it missed.
        missed: u64,
    },
}

/// The published schema of events.
#[must_use]
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Event)).unwrap_or_default()
}

/// Every way `value` breaks the event schema of its kind.
#[must_use]
pub fn schema_errors(value: &serde_json::Value) -> Vec<String> {
    static VALIDATOR: OnceLock<Result<TaggedValidator, crate::plans::SchemaError>> =
        OnceLock::new();
    match VALIDATOR.get_or_init(|| TaggedValidator::new(&schema(), "event")) {
        Ok(v) => v.errors(value),
        Err(e) => vec![format!("event schema: {e}")],
    }
}

fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Publishes events to every subscriber.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<String>,
    seq: AtomicU64,
}

/// Events a subscriber may fall behind by before it loses the oldest.
const BACKLOG: usize = 1024;

/// Whether the event `line` concerns quadrant `q`: one of its strings names `q` (is `q`, starts
/// with `q/`, or is a SPIFFE ID under `/quadrant/q/`), or none names any quadrant (a policy
/// reload concerns every quadrant).
#[must_use]
pub fn concerns(line: &str, q: dataplane_common::Quadrant) -> bool {
    fn named(s: &str, q: &str) -> bool {
        s == q
            || s.strip_prefix(q).is_some_and(|rest| rest.starts_with('/'))
            || s.contains(&format!("/quadrant/{q}/"))
            || s.ends_with(&format!("/quadrant/{q}"))
    }
    fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
        return true;
    };
    let mut all = Vec::new();
    strings(&value, &mut all);
    let names =
        |quadrant: dataplane_common::Quadrant| all.iter().any(|s| named(s, quadrant.name()));
    names(q) || !dataplane_common::Quadrant::ALL.into_iter().any(names)
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            seq: AtomicU64::new(1),
        }
    }
}

impl EventBus {
    /// Publishes the event `make` builds from its sequence number and time, after checking it
    /// against the schema (an event that does not validate is logged, not sent).
    pub fn emit(&self, make: impl FnOnce(u64, u64) -> Event) {
        let event = make(self.seq.fetch_add(1, Ordering::Relaxed), now_ms());
        let value = match serde_json::to_value(&event) {
            Ok(v) => v,
            Err(e) => {
                error!(error = %e, "event not serializable");
                return;
            }
        };
        let errors = schema_errors(&value);
        if !errors.is_empty() {
            error!(?errors, "event does not match its schema; not sent");
            return;
        }
        // No subscriber is not an error.
        let _ = self.tx.send(value.to_string());
    }

    /// A new subscription (events from now on).
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.tx.subscribe()
    }

    /// The line telling a subscriber it missed `missed` events.
    #[must_use]
    pub fn lagged(&self, missed: u64) -> String {
        serde_json::to_string(&Event::Lagged {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            at_ms: now_ms(),
            missed,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_checked_against_their_schema() {
        let ok = serde_json::json!({"event": "lane_refused", "seq": 1, "at_ms": 2,
            "quadrant": "px", "reason": "policy", "message": "no"});
        assert!(schema_errors(&ok).is_empty(), "{:?}", schema_errors(&ok));
        let missing = serde_json::json!({"event": "lane_refused", "seq": 1, "at_ms": 2});
        assert!(
            schema_errors(&missing)
                .iter()
                .any(|e| e.contains("quadrant"))
        );
        let unknown = serde_json::json!({"event": "exploded", "seq": 1, "at_ms": 2});
        assert!(schema_errors(&unknown).iter().any(|e| e.contains("/event")));
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        bus.emit(|seq, at_ms| Event::PolicyReloadFailed {
            seq,
            at_ms,
            message: "bad".into(),
        });
        let line = rx.try_recv().unwrap();
        assert!(schema_errors(&serde_json::from_str(&line).unwrap()).is_empty());
    }

    #[test]
    fn an_event_concerns_the_quadrants_it_names_or_every_one() {
        use dataplane_common::Quadrant::{Dg, Dx, Pg, Px};
        let refused = r#"{"event":"lane_refused","seq":1,"at_ms":2,"quadrant":"px","reason":"policy","message":"no"}"#;
        assert!(concerns(refused, Px));
        assert!(!concerns(refused, Dx));
        let started =
            r#"{"event":"workload_started","seq":1,"at_ms":2,"workload":"dg/api","generation":3}"#;
        assert!(concerns(started, Dg));
        assert!(!concerns(started, Pg));
        let breaker = r#"{"event":"breaker_changed","caller":"spiffe://quadrant.local/quadrant/dx","destination_identity":"spiffe://quadrant.local/quadrant/pg"}"#;
        assert!(concerns(breaker, Dx) && concerns(breaker, Pg));
        assert!(!concerns(breaker, Px));
        // "dxy/…" is not DX's.
        assert!(!concerns(r#"{"workload":"dxy/a","quadrant":"pg"}"#, Dx));
        let reload = r#"{"event":"policy_reloaded","seq":1,"at_ms":2,"policy":"enforced: 40 map entries","slot":1}"#;
        assert!(
            dataplane_common::Quadrant::ALL
                .iter()
                .all(|q| concerns(reload, *q))
        );
    }
}
