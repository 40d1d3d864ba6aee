//! The state file `up` writes before it creates anything, so that `down`, `exec` and the next
//! `up` find what it created — also after a crash — and a kept dataplane's hand-over.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use super::DaemonError;
use crate::{config::Config, workloads};

/// What `up` records before it creates anything.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// The configuration the instance runs with.
    pub config: Config,
    /// Whether the agent mounted the cgroup2 hierarchy (then `down` unmounts it).
    pub mounted_cgroup2: bool,
    /// Process id of the agent.
    pub pid: u32,
    /// Whether the agent stopped and left the quadrants and the dataplane running for the next
    /// agent to take over (`quadrant down --keep-dataplane`).
    #[serde(default)]
    pub dataplane_kept: bool,
    /// Map layout of the running dataplane (0: written by an agent that did not record it).
    #[serde(default)]
    pub map_layout: u32,
    /// Running workloads handed to the next agent with the kept dataplane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<workloads::Handover>,
}

impl State {
    /// Reads the state file of `config`'s instance, if there is one.
    pub fn read(config: &Config) -> Result<Option<Self>, DaemonError> {
        let path = config.state_path();
        match fs::read_to_string(&path) {
            Ok(text) => serde_yaml::from_str(&text)
                .map(Some)
                .map_err(|e| DaemonError::State {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DaemonError::State {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Writes the file atomically (root only: it names the workloads handed over with their
    /// environment).
    pub fn write(&self) -> Result<(), DaemonError> {
        let path = self.config.state_path();
        let err = |e: &dyn std::fmt::Display| DaemonError::State {
            path: path.clone(),
            reason: e.to_string(),
        };
        let text = serde_yaml::to_string(self).map_err(|e| err(&e))?;
        let tmp = path.with_extension("tmp");
        // Root only: it names the workloads handed over with their environment.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(&e))?;
        file.write_all(text.as_bytes()).map_err(|e| err(&e))?;
        fs::rename(&tmp, &path).map_err(|e| err(&e))
    }
}

/// Fails unless the process runs as root.
pub fn require_root(command: &'static str) -> Result<(), DaemonError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(DaemonError::NotRoot { command })
    }
}

/// Where the accepted plan generations are kept (beside the audit log: both must persist).
#[must_use]
pub fn generations_path(config: &Config) -> PathBuf {
    config
        .audit_log
        .with_file_name(format!("{}-generations.json", config.instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips_and_is_root_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let mut config = Config::embedded();
        config.state_dir =
            std::env::temp_dir().join(format!("quadrant-state-{}", std::process::id()));
        fs::create_dir_all(&config.state_dir).unwrap();
        assert_eq!(State::read(&config).unwrap(), None);
        let state = State {
            config: config.clone(),
            mounted_cgroup2: true,
            pid: 7,
            dataplane_kept: true,
            map_layout: 5,
            workloads: Vec::new(),
        };
        state.write().unwrap();
        assert_eq!(State::read(&config).unwrap(), Some(state));
        let mode = fs::metadata(config.state_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(config.state_path(), "pid: [").unwrap();
        let e = State::read(&config).unwrap_err().to_string();
        assert!(
            e.contains(&config.state_path().display().to_string()),
            "{e}"
        );
        let _ = fs::remove_dir_all(&config.state_dir);
    }
}
