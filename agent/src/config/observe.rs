//! The `observe` section: flow events (what the kernel programs report of drops and of the
//! flows they track) and how many of them the agent keeps for `quadrant observe`.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Flow events each CPU may write per second at most (the kernel's budget).
pub const MAX_EVENTS_PER_SEC: u32 = 1_000_000;
/// Flow events the agent keeps at most.
pub const MAX_BUFFER: u32 = 1 << 20;

/// Flow events.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ObserveConfig {
    /// Flow events each CPU's programs may write per second (a token bucket per CPU); beyond it
    /// events are lost and counted (`quadrant_flow_events_lost_total`). 0: no flow events
    /// (`quadrant trace` still reports what it is asked for).
    #[serde(default = "default_events_per_sec")]
    pub events_per_sec: u32,
    /// How many events a CPU may write at once after a quiet spell.
    #[serde(default = "default_events_burst")]
    pub events_burst: u32,
    /// Flow events the agent keeps in memory for `quadrant observe` (the oldest go first).
    #[serde(default = "default_buffer")]
    pub buffer: u32,
}

fn default_events_per_sec() -> u32 {
    1_000
}
fn default_events_burst() -> u32 {
    200
}
fn default_buffer() -> u32 {
    4_096
}

impl Default for ObserveConfig {
    fn default() -> Self {
        Self {
            events_per_sec: default_events_per_sec(),
            events_burst: default_events_burst(),
            buffer: default_buffer(),
        }
    }
}

impl ObserveConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.events_per_sec > MAX_EVENTS_PER_SEC {
            return Err(invalid(
                "observe.events_per_sec",
                format!(
                    "{} is above {MAX_EVENTS_PER_SEC} per CPU",
                    self.events_per_sec
                ),
            ));
        }
        if self.events_per_sec > 0 && !(1..=self.events_per_sec.max(1)).contains(&self.events_burst)
        {
            return Err(invalid(
                "observe.events_burst",
                format!(
                    "{} must be 1 to events_per_sec ({})",
                    self.events_burst, self.events_per_sec
                ),
            ));
        }
        if !(1..=MAX_BUFFER).contains(&self.buffer) {
            return Err(invalid(
                "observe.buffer",
                format!("{} must be 1 to {MAX_BUFFER} events", self.buffer),
            ));
        }
        Ok(())
    }
}
