//! The `cni` section: chaining `quadrant-cni` into the node's CNI configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// Kubernetes nodes: the agent chains `quadrant-cni` into the primary conflist of `conf_dir`
/// at start and takes its entry out again at `down` (not at `down --keep-dataplane`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CniConfig {
    /// Chain it in at start.
    #[serde(default)]
    pub install: bool,
    /// The runtime's CNI configuration directory.
    #[serde(default = "default_conf_dir")]
    pub conf_dir: PathBuf,
    /// The quadrant of pods without the `quadrant.io/quadrant` annotation (none: such pods do
    /// not start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quadrant: Option<String>,
}

fn default_conf_dir() -> PathBuf {
    "/etc/cni/net.d".into()
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            install: false,
            conf_dir: default_conf_dir(),
            quadrant: None,
        }
    }
}

impl CniConfig {
    /// Checks the quadrant's name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(q) = &self.quadrant
            && dataplane_common::Quadrant::from_name(q).is_none()
        {
            return Err(invalid(
                "cni.quadrant",
                format!("unknown quadrant {q:?}: dx, dg, px or pg"),
            ));
        }
        Ok(())
    }
}
