//! The `lane_exhaustion` fault: a quadrant's lane capacity (`lanes.limits.<q>.max_lanes`) taken
//! by a hog inside it, so its workloads' lane opens are refused with `MaxLanes` until the
//! expiry. The hog (`quadrant chaos lane-hog`, run in the quadrant as workload `chaos-lanes`)
//! offers a sink service in its own quadrant, opens Unix-socket lanes to it until the broker
//! refuses for the limit, holds them, asks for one more five times a second (each refusal is the
//! fault's effect) and exits at the expiry, closing them. It dies with an experiment's
//! controller; one armed with `chaos inject` outlives it until the expiry, and `recover --all`
//! kills it.

use std::{
    io::{BufRead as _, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use quadrant_lanes::{LaneClient, LaneError, LaneListener, TransportChoice, control::Refusal};

use super::ChaosError;
use crate::config::Config;

/// The workload (cgroup) name the hog runs as.
pub const HOG_WORKLOAD: &str = "chaos-lanes";
/// The service it offers and opens lanes to.
const SINK: &str = "chaos-lane-sink";
/// How often a full hog asks for one more lane.
const ASK_EVERY: Duration = Duration::from_millis(200);

/// A running hog.
#[derive(Debug)]
pub struct Hog {
    /// Its process (`quadrant exec`, then the hog).
    pub child: Child,
    /// Lanes it holds.
    pub held: u64,
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Hog {
    /// Opens refused for the limit since it filled the quadrant.
    #[must_use]
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Starts a hog in `q` for `seconds` and waits until it holds the quadrant's lanes. `detach`:
/// in a session of its own, to outlive the controller (`inject`); else it dies with it.
///
/// # Errors
/// The hog cannot start, or stops before the quadrant is full (its reason: the policy lets
/// `q` open no lanes to itself, the agent is down…).
pub fn start(
    (config, config_path): (&Config, Option<&Path>),
    q: Quadrant,
    seconds: u64,
    detach: bool,
) -> Result<Hog, ChaosError> {
    let until = crate::breakers::monotonic_ns() + seconds * 1_000_000_000;
    let me = std::env::current_exe().map_err(|e| ChaosError::Sys(e.to_string()))?;
    let mut c = Command::new(&me);
    if let Some(p) = config_path {
        c.arg("--config").arg(p);
    }
    c.args(["exec", q.name(), "--workload", HOG_WORKLOAD, "--"])
        .arg(&me)
        .args(["chaos", "lane-hog", q.name(), &seconds.to_string()])
        .arg(if detach { "--detached" } else { "--tied" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if detach {
        // SAFETY: setsid is async-signal-safe; the hog outlives the controller until expiry.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                let _ = nix::unistd::setsid();
                Ok(())
            });
        }
    }
    let mut child = c
        .spawn()
        .map_err(|e| ChaosError::Sys(format!("cannot start the lane hog in {}: {e}", q.name())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ChaosError::Sys("the lane hog has no stdout".into()))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    let Some(held) = first.strip_prefix("held ").and_then(|n| n.parse().ok()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ChaosError::Sys(format!(
            "lane_exhaustion: the hog in {} did not fill its lanes: {}",
            q.name(),
            if first.is_empty() {
                "it stopped (is the agent running?)"
            } else {
                &first
            }
        )));
    };
    // For `chaos status`: when it ends (listed while its group holds a process).
    let _ = std::fs::write(lease(config, q), until.to_string());
    let refused: std::sync::Arc<std::sync::atomic::AtomicU64> = std::sync::Arc::default();
    {
        let refused = std::sync::Arc::clone(&refused);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("refused ").and_then(|n| n.parse().ok()) {
                    refused.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    Ok(Hog {
        child,
        held,
        refused,
    })
}

fn limit_refusal(e: &LaneError) -> bool {
    matches!(
        e,
        LaneError::Refused {
            reason: Some(Refusal::MaxLanes | Refusal::MaxShmBytes),
            ..
        }
    )
}

/// `quadrant chaos lane-hog Q SECONDS` (inside `q`): fills `q`'s lanes, holds them and keeps
/// asking until `seconds` passed. Prints `held N` once full, then `refused M` (cumulative).
///
/// # Errors
/// The sink cannot be offered, or an open is refused for another reason than the limit.
pub fn hog(q: Quadrant, seconds: u64, tied: bool) -> Result<(), ChaosError> {
    if tied {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        // The controller of an `inject` is gone by then: nobody reads, and that is fine.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let err = |e: LaneError| ChaosError::Sys(format!("lane_exhaustion in {}: {e}", q.name()));
    let mut listener = LaneListener::listen(None, SINK, None).map_err(err)?;
    std::thread::spawn(move || {
        let mut accepted = Vec::new();
        while let Ok(lane) = listener.accept() {
            accepted.push(lane);
        }
    });
    let mut client = LaneClient::connect(None).map_err(err)?;
    let mut held = Vec::new();
    loop {
        match client.open(q.name(), SINK, TransportChoice::Uds) {
            Ok(lane) => held.push(lane),
            Err(e) if limit_refusal(&e) => break,
            Err(e) => {
                say(format!("not filled: {e}"));
                return Err(err(e));
            }
        }
    }
    say(format!("held {}", held.len()));
    let mut refused = 0u64;
    while Instant::now() < until {
        std::thread::sleep(ASK_EVERY.min(until.saturating_duration_since(Instant::now())));
        match client.open(q.name(), SINK, TransportChoice::Uds) {
            Ok(lane) => held.push(lane),
            Err(e) if limit_refusal(&e) => {
                refused += 1;
                say(format!("refused {refused}"));
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fn lease(config: &Config, q: Quadrant) -> std::path::PathBuf {
    config
        .state_dir
        .join(format!("{}-chaos-lanes-{}", config.instance, q.name()))
}

/// The hog groups of `q` that hold a process.
fn busy_groups(config: &Config, q: Quadrant) -> Vec<std::path::PathBuf> {
    super::freeze::cgroups_of(config, q)
        .into_iter()
        .map(|d| d.join(HOG_WORKLOAD))
        .filter(|g| {
            std::fs::read_to_string(g.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        })
        .collect()
}

/// The quadrants a hog runs in now, with its expiry (monotonic ns; 0: unknown).
#[must_use]
pub fn running(config: &Config) -> Vec<(Quadrant, u64)> {
    Quadrant::ALL
        .into_iter()
        .filter(|q| !busy_groups(config, *q).is_empty())
        .map(|q| {
            let until = std::fs::read_to_string(lease(config, q))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            (q, until)
        })
        .collect()
}

/// Kills every lane hog of `config`'s quadrants (`recover --all`); returns how many groups held
/// one.
#[must_use]
pub fn kill_all(config: &Config) -> usize {
    let mut n = 0;
    for q in Quadrant::ALL {
        for group in busy_groups(config, q) {
            if std::fs::write(group.join("cgroup.kill"), "1").is_ok() {
                n += 1;
            }
        }
        let _ = std::fs::remove_file(lease(config, q));
    }
    n
}
