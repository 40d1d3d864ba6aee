//! Validation of a whole configuration, before anything is created: each error names the field
//! at fault and what is expected.

use ipnet::Ipv4Net;

use dataplane_common::Quadrant;

use super::{Config, ConfigError, IFNAMSIZ_MAX, MAX_LANE_MESSAGE, MIN_LANE_MESSAGE, invalid};

impl Config {
    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.instance.is_empty()
            || self.instance.len() > 32
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "instance",
                format!(
                    "{:?} must be 1-32 characters of a-z, 0-9 and '-'",
                    self.instance
                ),
            ));
        }
        let longest = self.interface_prefix.len() + 3;
        if self.interface_prefix.is_empty()
            || longest > IFNAMSIZ_MAX
            || !self
                .interface_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "interface_prefix",
                format!(
                    "{:?} must be 1-{} characters of a-z, 0-9 and '-' (interface names are at most {IFNAMSIZ_MAX})",
                    self.interface_prefix,
                    IFNAMSIZ_MAX - 3
                ),
            ));
        }
        for (field, path) in [
            ("bpffs", &self.bpffs),
            ("cgroup2", &self.cgroup2),
            ("state_dir", &self.state_dir),
        ] {
            if !path.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} must be an absolute path", path.display()),
                ));
            }
        }
        self.identity.validate()?;
        if self.conntrack_timeout_secs == 0 {
            return Err(invalid("conntrack_timeout_secs", "must be at least 1"));
        }
        for name in self.quadrants.keys() {
            if Quadrant::from_name(name).is_none() {
                return Err(invalid(
                    format!("quadrants.{name}"),
                    "unknown quadrant; expected dx, dg, px or pg",
                ));
            }
        }
        let mut seen: Vec<(Quadrant, Ipv4Net)> = Vec::new();
        for q in Quadrant::ALL {
            let Some(qc) = self.quadrants.get(q.name()) else {
                return Err(invalid(
                    format!("quadrants.{}", q.name()),
                    "missing; all four quadrants need a prefix",
                ));
            };
            let field = format!("quadrants.{}.prefix", q.name());
            if qc.prefix != qc.prefix.trunc() {
                return Err(invalid(
                    field,
                    format!(
                        "{} has host bits set; did you mean {}?",
                        qc.prefix,
                        qc.prefix.trunc()
                    ),
                ));
            }
            if qc.prefix.prefix_len() > 30 {
                return Err(invalid(
                    field,
                    format!("{} is too small; use /30 or larger", qc.prefix),
                ));
            }
            for (other, net) in &seen {
                if net.contains(&qc.prefix) || qc.prefix.contains(net) {
                    return Err(invalid(
                        field,
                        format!("{} overlaps {}'s prefix {net}", qc.prefix, other.name()),
                    ));
                }
            }
            seen.push((q, qc.prefix));
        }
        self.validate_paths()?;
        self.validate_instances()?;
        self.validate_lanes()?;
        self.validate_peers()?;
        self.validate_sections()?;
        self.compile_policy()?;
        Ok(())
    }

    /// The sections that check themselves.
    fn validate_sections(&self) -> Result<(), ConfigError> {
        self.breakers.validate()?;
        self.shadows.validate()?;
        self.observe.validate()?;
        self.cni.validate()?;
        crate::slo::spec::validate(&self.slos)
    }

    fn validate_lanes(&self) -> Result<(), ConfigError> {
        let m = self.lanes.max_message_bytes;
        if !(MIN_LANE_MESSAGE..=MAX_LANE_MESSAGE).contains(&m) {
            return Err(invalid(
                "lanes.max_message_bytes",
                format!("{m} is outside {MIN_LANE_MESSAGE}..={MAX_LANE_MESSAGE}"),
            ));
        }
        if !(self.lanes.reroute_fraction > 0.0 && self.lanes.reroute_fraction <= 1.0) {
            return Err(invalid(
                "lanes.reroute_fraction",
                format!(
                    "{} is outside (0, 1]: the share of new lanes a re-route moves during its hold",
                    self.lanes.reroute_fraction
                ),
            ));
        }
        if !(1..=86_400).contains(&self.lanes.reroute_hold_secs) {
            return Err(invalid(
                "lanes.reroute_hold_secs",
                format!("{} is outside 1..=86400", self.lanes.reroute_hold_secs),
            ));
        }
        for (name, l) in &self.lanes.limits {
            if Quadrant::from_name(name).is_none() {
                return Err(invalid(
                    format!("lanes.limits.{name}"),
                    "unknown quadrant; expected dx, dg, px or pg",
                ));
            }
            if l.max_in_flight == 0 {
                return Err(invalid(
                    format!("lanes.limits.{name}.max_in_flight"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    fn validate_paths(&self) -> Result<(), ConfigError> {
        if !self.trust_store.is_absolute() {
            return Err(invalid(
                "trust_store",
                format!("{} must be an absolute path", self.trust_store.display()),
            ));
        }
        if !self.artifacts_root.is_absolute() {
            return Err(invalid(
                "artifacts_root",
                format!("{} must be an absolute path", self.artifacts_root.display()),
            ));
        }
        if !self.audit_log.is_absolute() {
            return Err(invalid(
                "audit_log",
                format!("{} must be an absolute path", self.audit_log.display()),
            ));
        }
        if let Some(dir) = &self.policy_dir
            && !dir.is_absolute()
        {
            return Err(invalid(
                "policy_dir",
                format!("{} must be an absolute path", dir.display()),
            ));
        }
        Ok(())
    }
}
