//! The `chaos` section: whether this agent's dataplane can take chaos faults at all.

use serde::{Deserialize, Serialize};

/// Chaos faults on this node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    /// Whether faults may be injected. false: the programs are loaded with their fault checks
    /// removed by the verifier (no map write can make them drop, delay, refuse or reset), and
    /// `quadrant chaos inject` and `run` refuse against this agent; `status` and `recover` still
    /// work.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

const fn enabled() -> bool {
    true
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}
