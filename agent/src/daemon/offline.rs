//! What the CLI does to an instance itself, with or without a running agent: `down` (asking
//! the agent, or cleaning up after a crash), `down --keep-dataplane`, and `exec` into a quadrant.

use std::{
    fs,
    io::{self, Write as _},
    path::Path,
};

use dataplane_common::Quadrant;

use super::{DaemonError, State, require_root, teardown};
use crate::{
    config::Config,
    control::{Client, client::Kept},
    identity::attest,
    sys::{self, SysError},
};

/// `quadrant down`: asks a running agent to tear down, or removes the leftovers of one that is
/// gone. Returns what was removed.
pub fn down(config: &Config) -> Result<Vec<String>, DaemonError> {
    require_root("down")?;
    let client = Client::new(config.socket_path());
    if client.agent_running() {
        return Ok(client.down()?);
    }
    match State::read(config)? {
        Some(stale) => teardown(&stale.config, stale.mounted_cgroup2),
        None => teardown(config, false),
    }
}

/// `quadrant down --keep-dataplane`: stops the running agent and leaves the quadrants, the eBPF
/// dataplane and the running workloads going until the next `quadrant up` takes them over.
pub fn down_keep_dataplane(config: &Config) -> Result<Kept, DaemonError> {
    require_root("down")?;
    let client = Client::new(config.socket_path());
    if !client.agent_running() {
        return Err(match State::read(config)? {
            Some(s) if s.dataplane_kept => DaemonError::Refused(format!(
                "no agent is running for instance {}; its dataplane is already kept (in {})",
                config.instance,
                config.bpffs_dir().display()
            )),
            _ => DaemonError::NotUp {
                instance: config.instance.clone(),
                path: config.state_path(),
            },
        });
    }
    Ok(client.down_keep_dataplane()?)
}

/// `quadrant exec`: enters quadrant `q` as workload `workload` (cgroup, then network
/// namespace), sets `SPIFFE_ENDPOINT_SOCKET` to the quadrant's Workload API, and replaces the
/// process with `argv`. Returns only on failure.
#[must_use]
pub fn exec(
    config: &Config,
    q: Quadrant,
    index: u8,
    workload: Option<&str>,
    argv: &[String],
) -> DaemonError {
    if let Err(e) = require_root("exec") {
        return e;
    }
    let state = match State::read(config) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return DaemonError::NotUp {
                instance: config.instance.clone(),
                path: config.state_path(),
            };
        }
        Err(e) => return e,
    };
    let c = &state.config;
    let instance = crate::config::InstanceRef::new(q, index);
    if !sys::netns_exists(&c.instance_netns(instance)) {
        return DaemonError::Refused(format!(
            "{} has no instance {index} (network namespace {} is missing); `quadrant instances` \
             lists them",
            q.name(),
            c.instance_netns(instance)
        ));
    }
    let mut cgroup = c.instance_cgroup_dir(instance);
    // On a hybrid host the instance's capacity lives in v1 groups; the process joins them here
    // (the v2 group at `enter_and_exec`).
    for procs in crate::workloads::capacity_v1_procs(&c.instance, &instance.name()) {
        if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
            return SysError::Io {
                what: "cannot join",
                path: procs,
                source: e,
            }
            .into();
        }
    }
    if let Some(w) = workload {
        if !attest::valid_workload_name(w) {
            return DaemonError::Refused(format!(
                "invalid workload name {w:?}: use 1-64 characters of a-z, 0-9, '-', '_', '.'"
            ));
        }
        cgroup = cgroup.join(w);
        if let Err(e) = fs::create_dir_all(&cgroup) {
            return SysError::Io {
                what: "cannot create cgroup",
                path: cgroup,
                source: e,
            }
            .into();
        }
    }
    let endpoint = format!("unix://{}", c.workload_socket(q).display());
    let lanes = c.lane_socket().display().to_string();
    // Where the policy names single workloads, no process the agent starts may forge their
    // packets: without CAP_NET_RAW there are no raw IP or packet sockets. If the live setting
    // cannot be read, the capability goes (fail closed).
    let drop_raw = crate::loader::raw_sockets_denied_pinned(&c.bpffs_dir(), q).unwrap_or(true);
    let _ = io::stdout().flush();
    sys::enter_and_exec(
        &cgroup,
        &c.instance_netns(instance),
        argv,
        &[
            ("SPIFFE_ENDPOINT_SOCKET", &endpoint),
            (crate::lanes::SOCKET_ENV, &lanes),
        ],
        drop_raw,
    )
    .into()
}

/// Where the configuration of a CLI call comes from: `--config FILE` or the embedded default.
pub fn load_config(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    match path {
        Some(p) => Config::from_file(p),
        None => Ok(Config::embedded()),
    }
}
