//! `quadrant chaos`: the controller of faults in the dataplane, run in its own process.

use clap::Subcommand;
use quadrant::{
    chaos::{self, Action, FaultSpec},
    config::Config,
};

use super::Output;

/// `quadrant chaos …`.
#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Arm one fault in the dataplane for SECONDS; it ends by itself at its expiry (the programs
    /// check it against the kernel clock), whatever happens to this process or the agent.
    Inject {
        /// drop (packets into the destination quadrant), delay (them), reset (its TCP
        /// connections), refuse (connects),
        /// freeze or kill (its processes), cpu-, memory- or pids-pressure (inside it),
        /// kill-agent (`--to agent`), identity-outage (its Workload API), lane-exhaustion (its
        /// lanes), policy-outage (its lane decisions).
        #[arg(value_enum)]
        action: Action,
        /// Source: dx, dg, px, pg, host, world or any (for refuse: the calling quadrant).
        #[arg(long, default_value = "any")]
        from: String,
        /// Destination: a quadrant or any (for refuse: any identity).
        #[arg(long)]
        to: String,
        /// Share of the matched traffic dropped or refused, percent (cpu-pressure: the
        /// quadrant's CPU, percent of one CPU).
        #[arg(long, default_value_t = 100.0)]
        percent: f64,
        /// Memory left to the quadrant above its use, MiB (memory-pressure).
        #[arg(long, default_value_t = chaos::DEFAULT_HEADROOM_MIB)]
        headroom_mib: u32,
        /// Processes left to the quadrant above its count (pids-pressure).
        #[arg(long, default_value_t = chaos::DEFAULT_HEADROOM_PIDS)]
        headroom_pids: u32,
        /// Added delay, ms (delay).
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// Uniform jitter around the delay, ms (delay).
        #[arg(long, default_value_t = 0)]
        jitter_ms: u32,
        /// Also from --to to --from (a partition).
        #[arg(long)]
        both_ways: bool,
        /// How long the fault lasts, seconds.
        #[arg(long = "for", value_name = "SECONDS")]
        seconds: u64,
        /// Let the fault touch production quadrants (px, pg; `any` includes them).
        #[arg(long)]
        allow_production: bool,
        /// freeze, kill: only this workload of the quadrant (its cgroup).
        #[arg(long)]
        workload: Option<String>,
        /// kill-agent: leave the restart to a service manager (systemd's `Restart=`).
        #[arg(long)]
        no_restart_agent: bool,
    },
    /// The faults in the dataplane: time left, traffic matched and dropped or refused.
    Status {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove every fault now and the fq qdiscs delays needed.
    Recover {
        /// Everything (the only mode).
        #[arg(long, required = true)]
        all: bool,
    },
    /// Run an experiment (YAML or JSON, schema `quadrant schema chaos-experiment`): an echo in
    /// every quadrant, fixed-rate probes of each, baseline, fault and recovery windows, the
    /// faults armed for the fault window only, safeguards; then the report and its verdict.
    /// Exits 1 unless the verdict is `passed`.
    Run {
        /// The experiment file.
        file: std::path::PathBuf,
        /// Validate and show what would run; nothing is injected.
        #[arg(long)]
        dry_run: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The UDP echo an experiment runs inside each quadrant.
    #[command(hide = true)]
    Echo,
    /// The guardian of a freeze: thaws the quadrant at the expiry.
    #[command(hide = true)]
    Thaw {
        /// The frozen quadrant.
        #[arg(long)]
        quadrant: String,
        /// The frozen workload of it, if only one was.
        #[arg(long)]
        workload: Option<String>,
        /// Its expiry, monotonic ns.
        #[arg(long)]
        at: u64,
    },
    /// The guardian of a resource pressure: keeps its stressors running, ends it at the
    /// expiry.
    #[command(hide = true)]
    PressureGuard {
        /// The pressure's lease.
        #[arg(long)]
        lease: std::path::PathBuf,
    },
    /// A stressor inside a quadrant.
    #[command(hide = true)]
    Stress {
        /// What it presses on.
        #[arg(value_enum)]
        resource: chaos::pressure::Resource,
        /// `cgroup.procs` files it joins first.
        #[arg(long)]
        join: Vec<std::path::PathBuf>,
        /// Memory it holds at most, MiB.
        #[arg(long, default_value_t = 0)]
        mib: u64,
        /// The memory use of the group holding the limit (memory).
        #[arg(long)]
        usage: Option<std::path::PathBuf>,
        /// Its limit (memory).
        #[arg(long)]
        limit: Option<std::path::PathBuf>,
    },
    /// An experiment's steady-state probe over one lane transport (inside a quadrant).
    #[command(hide = true)]
    LaneProbe {
        /// A new lane for each request.
        #[arg(long)]
        fresh: bool,
        /// The quadrant (its own `chaos-echo` lane service).
        quadrant: String,
        /// shm, uds or tcp.
        transport: String,
        /// Requests per second.
        rate: u32,
        /// Per request, ms.
        timeout_ms: u64,
    },
    /// A lane hog inside a quadrant (`lane_exhaustion`).
    #[command(hide = true)]
    LaneHog {
        /// Its quadrant.
        quadrant: String,
        /// How long it holds the lanes.
        seconds: u64,
        /// Dies with the controller.
        #[arg(long)]
        tied: bool,
        /// Outlives the controller until the expiry.
        #[arg(long)]
        detached: bool,
    },
    /// An experiment's effect probe of a quadrant's Workload API (inside the quadrant).
    #[command(hide = true)]
    IdentityProbe {
        /// Fetches per second.
        rate: u32,
        /// Per fetch, ms.
        timeout_ms: u64,
    },
    /// An experiment's effect probe inside a quadrant.
    #[command(hide = true)]
    Probe {
        /// The echo probed.
        addr: std::net::SocketAddr,
        /// Requests per second.
        rate: u32,
        /// Per request, ms.
        timeout_ms: u64,
    },
}

/// Runs one `quadrant chaos` command.
pub fn run(
    config: &Config,
    config_path: Option<&std::path::Path>,
    command: ChaosCommand,
) -> anyhow::Result<()> {
    match command {
        ChaosCommand::Inject {
            action,
            from,
            to,
            percent,
            headroom_mib,
            headroom_pids,
            delay_ms,
            jitter_ms,
            both_ways,
            seconds,
            allow_production,
            workload,
            no_restart_agent,
        } => {
            let spec = FaultSpec {
                action,
                from,
                to,
                percent,
                delay_ms,
                jitter_ms,
                both_ways,
                seconds,
                headroom_mib,
                headroom_pids,
                restart_agent: !no_restart_agent,
                workload,
            };
            inject(config, config_path, &spec, allow_production)?;
        }
        ChaosCommand::Status { output } => {
            let faults = chaos::status(config)?;
            match output {
                Output::Text => print!("{}", chaos::render(&faults)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&faults)?),
            }
        }
        ChaosCommand::Recover { all: _ } => println!("{}", chaos::recover(config)?),
        ChaosCommand::Echo => chaos::run::echo()?,
        ChaosCommand::Thaw {
            quadrant,
            workload,
            at,
        } => {
            let quadrant = dataplane_common::Quadrant::from_name(&quadrant)
                .ok_or_else(|| anyhow::anyhow!("unknown quadrant {quadrant:?}"))?;
            let t = chaos::freeze::Target { quadrant, workload };
            chaos::freeze::thaw_at(config, &t, at)?;
        }
        ChaosCommand::PressureGuard { lease } => {
            chaos::pressure::guard(config, config_path, &lease)?;
        }
        ChaosCommand::Stress {
            resource,
            join,
            mib,
            usage,
            limit,
        } => chaos::pressure::stress(resource, &join, mib, usage.as_deref().zip(limit.as_deref()))?,
        ChaosCommand::LaneProbe {
            fresh,
            quadrant,
            transport,
            rate,
            timeout_ms,
        } => chaos::lane_probe::probe_lines(
            (&quadrant, &transport, fresh),
            rate,
            std::time::Duration::from_millis(timeout_ms),
        )?,
        ChaosCommand::LaneHog {
            quadrant,
            seconds,
            tied,
            detached: _,
        } => {
            let q = dataplane_common::Quadrant::from_name(&quadrant)
                .ok_or_else(|| anyhow::anyhow!("unknown quadrant {quadrant:?}"))?;
            chaos::lanes::hog(q, seconds, tied)?;
        }
        ChaosCommand::IdentityProbe { rate, timeout_ms } => {
            chaos::outage::probe_lines(rate, std::time::Duration::from_millis(timeout_ms))?;
        }
        ChaosCommand::Probe {
            addr,
            rate,
            timeout_ms,
        } => chaos::run::probe_lines(addr, rate, std::time::Duration::from_millis(timeout_ms))?,
        ChaosCommand::Run {
            file,
            dry_run,
            output,
        } => run_experiment(config, config_path, &file, dry_run, output)?,
    }
    Ok(())
}

/// `quadrant chaos inject`: arms one fault and says what it did.
fn inject(
    config: &Config,
    config_path: Option<&std::path::Path>,
    spec: &FaultSpec,
    allow_production: bool,
) -> anyhow::Result<()> {
    let (seconds, to) = (spec.seconds, &spec.to);
    chaos::require_enabled(config)?;
    if spec.action == Action::KillAgent {
        spec.entries(allow_production, 0)?;
        let k = chaos::agent::kill_agent(config, config_path, spec.restart_agent)?;
        match k.back_after_ms {
            Some(ms) => println!(
                "killed the agent (pid {}); the next one took over and answered after {ms:.0} ms",
                k.pid
            ),
            None => println!("killed the agent (pid {})", k.pid),
        }
        return Ok(());
    }
    let entries = chaos::inject(config, config_path, spec, allow_production)?;
    match spec.action {
        Action::Freeze | Action::Kill => {
            let what = spec
                .workload
                .as_ref()
                .map_or_else(|| to.clone(), |w| format!("{to}/{w}"));
            if spec.action == Action::Freeze {
                println!("froze {what} for {seconds} s");
            } else {
                println!("killed every process of {what}");
            }
        }
        Action::IdentityOutage => {
            println!("the Workload API of {to} is unavailable for {seconds} s");
        }
        Action::LaneExhaustion => {
            println!("every lane {to} may open is taken for {seconds} s");
        }
        Action::PolicyOutage => {
            println!("the policy engine is unavailable to {to} for {seconds} s");
        }
        Action::CpuPressure | Action::MemoryPressure | Action::PidsPressure => {
            println!("{} on {to} for {seconds} s", spec.action.name());
        }
        _ => println!(
            "armed {} fault entr{} for {seconds} s",
            entries.len(),
            if entries.len() == 1 { "y" } else { "ies" }
        ),
    }
    Ok(())
}

/// `quadrant chaos run FILE`: exits 1 unless the verdict is `passed`.
fn run_experiment(
    config: &Config,
    config_path: Option<&std::path::Path>,
    file: &std::path::Path,
    dry_run: bool,
    output: Output,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let exp = chaos::Experiment::parse(&text)?;
    if dry_run {
        println!(
            "{}: valid; targets {}; windows {} s baseline, {} s fault, {} s recovery; faults:",
            exp.title,
            if exp.targets.is_empty() {
                "none (every quadrant keeps its steady state)".to_owned()
            } else {
                exp.targets.join(", ")
            },
            exp.windows.baseline_secs,
            exp.windows.fault_secs,
            exp.windows.recovery_secs
        );
        for f in exp.faults() {
            let what = match f.action {
                Action::Delay => format!("{} ms ± {} ms", f.delay_ms, f.jitter_ms),
                Action::Drop | Action::Refuse | Action::Reset => format!("{} %", f.percent),
                Action::Freeze | Action::Kill => f.workload.as_ref().map_or_else(
                    || "every process".to_owned(),
                    |w| format!("every process of workload {w}"),
                ),
                Action::CpuPressure => format!("{} % of one CPU", f.percent),
                Action::MemoryPressure => format!("{} MiB above its use", f.headroom_mib),
                Action::PidsPressure => format!("{} processes above its count", f.headroom_pids),
                Action::IdentityOutage => "its Workload API unavailable".to_owned(),
                Action::LaneExhaustion => "every lane it may open taken".to_owned(),
                Action::PolicyOutage => "its lane decisions fail closed".to_owned(),
                Action::KillAgent => {
                    if f.restart_agent {
                        "SIGKILL, the controller starts the next agent".to_owned()
                    } else {
                        "SIGKILL, a service manager starts the next agent".to_owned()
                    }
                }
            };
            println!(
                "  {} {} -> {}{}: {what} for {} s",
                f.action.name(),
                f.from,
                f.to,
                if f.both_ways { " and back" } else { "" },
                f.seconds
            );
        }
        for (i, r) in exp.rollbacks.iter().enumerate() {
            println!(
                "  then rollbacks[{i}]: {}",
                serde_json::to_string(r).unwrap_or_default()
            );
        }
        return Ok(());
    }
    let report = chaos::run::run(config, config_path, &exp)?;
    match output {
        Output::Text => print!("{}", chaos::run::render(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    if report.verdict != "passed" {
        std::process::exit(1);
    }

    Ok(())
}
