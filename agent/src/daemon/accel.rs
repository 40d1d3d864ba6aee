//! The lane acceleration at start-up: `sk_msg` forced on, or — with `tcp_acceleration: auto` —
//! measured against the TCP stack in a probe cgroup and kept only where it wins.

use std::{
    fs,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{
    config::Config,
    lanes::accel_probe::{ProbeError, ProbeFigures},
    loader::{Dataplane, LoaderError},
    quadrants,
};

/// The lane acceleration as the agent runs it.
#[derive(Debug, Default)]
pub struct Accel {
    /// `sk_msg` and `sock_ops` attached to the quadrants.
    pub on: bool,
    /// The counters when the quadrants' acceleration began (the probe's messages are not
    /// theirs).
    pub counted_before: [u64; 4],
    /// With `auto`: the measurement, or why there is none.
    pub probe: Option<Result<ProbeFigures, ProbeError>>,
}

/// Runs the acceleration probe with `sock_ops` on the probe cgroup `dir` (taken off again
/// before returning).
fn measure_acceleration(dataplane: &mut Dataplane, dir: &Path) -> Result<ProbeFigures, ProbeError> {
    let ops = dataplane.attach_sock_ops(dir).map_err(|e| e.to_string())?;
    let figures = std::env::current_exe()
        .map_err(|e| ProbeError(format!("cannot find the agent's binary: {e}")))
        .and_then(|bin| {
            crate::lanes::accel_probe::measure(&bin, dir, |ports, remove| {
                dataplane
                    .loopback_pair_in_lane_socks(ports, remove)
                    .map_err(|e| ProbeError(e.to_string()))
            })
        });
    dataplane.detach_sock_ops(ops).map_err(|e| e.to_string())?;
    figures
}

/// Attaches `sock_ops` to every quadrant cgroup; if one fails, detaches those already done.
fn attach_to_quadrants(
    dataplane: &mut Dataplane,
    cgroups: &[PathBuf],
) -> Result<Vec<aya::programs::sock_ops::SockOpsLinkId>, LoaderError> {
    let mut ids = Vec::with_capacity(cgroups.len());
    for cg in cgroups {
        match dataplane.attach_sock_ops(cg) {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in ids {
                    let _ = dataplane.detach_sock_ops(id);
                }
                return Err(e);
            }
        }
    }
    Ok(ids)
}

/// `tcp_acceleration: auto`: measures `sk_msg` against the stack in a probe cgroup and attaches
/// the acceleration to the quadrants only if it wins. A failed measurement leaves it off (it is
/// an optimisation) and says why.
fn probe_acceleration(config: &Config, dataplane: &mut Dataplane, cgroups: &[PathBuf]) -> Accel {
    let dir = config.accel_probe_cgroup_dir();
    let probe = (|| {
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let sk_msg = dataplane.attach_sk_msg().map_err(|e| e.to_string())?;
        let measured = measure_acceleration(dataplane, &dir);
        // On to the quadrants only when all of it is: a failure on the way takes back what was
        // attached, nothing stays half on.
        if !measured.as_ref().is_ok_and(|f| f.on) {
            if let Err(e) = dataplane.detach_sk_msg(sk_msg) {
                warn!(error = %e, "cannot detach sk_msg after the acceleration probe");
            }
            return measured;
        }
        let ops = match attach_to_quadrants(dataplane, cgroups) {
            Ok(ops) => ops,
            Err(e) => {
                let _ = dataplane.detach_sk_msg(sk_msg);
                return Err(ProbeError(format!("cannot turn the acceleration on: {e}")));
            }
        };
        let kept = dataplane.keep_sk_msg(sk_msg).and_then(|()| {
            ops.into_iter()
                .try_for_each(|id| dataplane.keep_sock_ops(id))
        });
        kept.map_err(|e| format!("cannot turn the acceleration on: {e}"))?;
        measured
    })();
    if let Err(e) = quadrants::remove_cgroup(&dir) {
        warn!(error = %e, "cannot remove the acceleration probe's cgroup");
    }
    match &probe {
        Ok(f) => info!(
            sk_msg_p50_ns = f.redirected_p50_ns,
            sk_msg_p99_ns = f.redirected_p99_ns,
            stack_p50_ns = f.stack_p50_ns,
            stack_p99_ns = f.stack_p99_ns,
            on = f.on,
            "lane acceleration measured (auto): on only if sk_msg's p50 <= 0.9x and p99 <= 1.0x the stack's"
        ),
        Err(e) => warn!(error = %e, "lane acceleration probe failed: acceleration off"),
    }
    let on = probe.as_ref().is_ok_and(|f| f.on);
    Accel {
        on,
        counted_before: if on {
            dataplane.lane_accel_counters().unwrap_or_default()
        } else {
            [0; 4]
        },
        probe: Some(probe),
    }
}

/// Attaches the acceleration as `config` asks: off, forced on, or measured (`auto`).
pub fn start(
    config: &Config,
    dataplane: &mut Dataplane,
    cgroups: &[PathBuf],
) -> Result<Accel, LoaderError> {
    Ok(match config.lanes.tcp_acceleration {
        crate::config::TcpAcceleration::Off => Accel::default(),
        crate::config::TcpAcceleration::SkMsg => {
            dataplane.attach_lane_acceleration(cgroups)?;
            info!("lane acceleration on: sock_ops on the quadrant cgroups, sk_msg on LANE_SOCKS");
            Accel {
                on: true,
                ..Accel::default()
            }
        }
        crate::config::TcpAcceleration::Auto => probe_acceleration(config, dataplane, cgroups),
    })
}
