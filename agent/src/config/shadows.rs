//! The `shadows` section: how a shadow generation is run and judged (`quadrant shadow`).

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Shadow deployments: a new generation of a workload runs beside the live one, receives a
/// share of its services' lane requests mirrored (its replies reach no caller), and is judged
/// against the live generation over the same traffic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowsConfig {
    /// The share of lane requests copied to a shadow generation (0 < fraction <= 1).
    #[serde(default = "default_fraction")]
    pub fraction: f64,
    /// Mirrored requests a shadow must have answered or failed before it is judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// How much worse than the live generation a shadow may be and still be promoted: CPU
    /// time per 1,000 requests and p99 latency up to `1 + tolerance` times the live one's,
    /// failures up to `tolerance` percentage points more.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// A new generation of a workload whose service has a cost SLO is started as a shadow when
    /// the last measured CPU time per 1,000 requests is at least this share of the objective,
    /// or the SLO's error budget is spent; 0: never automatically.
    #[serde(default = "default_approach")]
    pub approach: f64,
}

impl Default for ShadowsConfig {
    fn default() -> Self {
        Self {
            fraction: default_fraction(),
            min_requests: default_min_requests(),
            tolerance: default_tolerance(),
            approach: default_approach(),
        }
    }
}

const fn default_fraction() -> f64 {
    0.1
}
const fn default_min_requests() -> u64 {
    100
}
const fn default_tolerance() -> f64 {
    0.1
}
const fn default_approach() -> f64 {
    0.8
}

/// Most mirrored requests a verdict may wait for.
pub const MAX_MIN_REQUESTS: u64 = 10_000_000;

impl ShadowsConfig {
    /// The share mirrored, in parts per million (as lane grants carry it).
    #[must_use]
    pub fn fraction_ppm(&self) -> u32 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "validated to 0 < fraction <= 1"
        )]
        let ppm = (self.fraction * 1e6).round() as u32;
        ppm.clamp(1, 1_000_000)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(invalid(
                "shadows.fraction",
                format!(
                    "{} is outside (0, 1]: the share of requests mirrored",
                    self.fraction
                ),
            ));
        }
        if self.min_requests == 0 || self.min_requests > MAX_MIN_REQUESTS {
            return Err(invalid(
                "shadows.min_requests",
                format!("{} is outside 1..={MAX_MIN_REQUESTS}", self.min_requests),
            ));
        }
        for (field, v, max) in [
            ("shadows.tolerance", self.tolerance, 10.0),
            ("shadows.approach", self.approach, 1.0),
        ] {
            if !(0.0..=max).contains(&v) {
                return Err(invalid(field, format!("{v} is outside 0..={max}")));
            }
        }
        Ok(())
    }
}
