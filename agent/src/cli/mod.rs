//! The `quadrant` command line: a thin client of the library. One file per command group;
//! the control socket is reached through [`quadrant::control::Client`], the tables come from
//! [`render`].

mod artifacts;
mod chaos;
mod cni;
mod lanes;
mod lifecycle;
mod observe;
mod plans;
mod policy;
pub mod render;
mod workloads;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use quadrant::{daemon::offline, trace::TraceMode};

/// quadrant: four isolated quadrants (DX, DG, PX, PG) on one Linux host, enforced by eBPF.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Configuration file (YAML); the embedded default when absent.
    #[arg(long, short, global = true, env = "QUADRANT_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the four quadrants, load and attach the dataplane, and run in the foreground until
    /// Ctrl-C or `quadrant down`.
    Up,
    /// Remove everything `up` created (asks the running agent, or cleans up after a crash).
    Down {
        /// Stop only the agent: the quadrants and the eBPF dataplane keep enforcing, tracked
        /// flows included, the workloads keep running, and the next `quadrant up` (a newer
        /// agent, say) takes them over without a gap.
        #[arg(long)]
        keep_dataplane: bool,
    },
    /// Show quadrants, attached programs and verdict counters.
    Status {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Run a command inside a quadrant (its network namespace and cgroup), with
    /// `SPIFFE_ENDPOINT_SOCKET` pointing at the quadrant's Workload API.
    Exec {
        /// dx, dg, px or pg.
        quadrant: String,
        /// Workload name (its own cgroup below the quadrant's, and its SPIFFE ID); the
        /// quadrant's `default` workload when absent.
        #[arg(long, short)]
        workload: Option<String>,
        /// Which instance of the quadrant (`quadrant instances`); 0, the quadrant's first, when
        /// absent.
        #[arg(long, short, default_value_t = 0)]
        instance: u8,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run N instances of a quadrant (1..=16), adding or removing the highest ones. Each is its
    /// own namespace, veth, cgroup and address with the quadrant's identity.
    Scale {
        /// dx, dg, px or pg.
        quadrant: String,
        /// How many instances.
        instances: u8,
    },
    /// List every quadrant instance: address, capacity, readiness per service with a VIP, open
    /// connections through a VIP.
    Instances {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Where a workload of PLAN (JSON or YAML, unsigned) would be placed among its quadrant's
    /// instances, and why each instance fits or not; nothing is started.
    Place {
        /// The plan file.
        plan: PathBuf,
        /// Show every instance's verdict (filtered out and why, or its score).
        #[arg(long)]
        explain: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop sending new connections through service VIPs to instance K of a quadrant (those it
    /// has go on); `--resume` undoes it.
    Drain {
        /// dx, dg, px or pg.
        quadrant: String,
        /// The instance (1.., as `quadrant instances` lists them).
        index: u8,
        /// Send it new connections again.
        #[arg(long)]
        resume: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// The helper the agent starts to measure `sk_msg` against the TCP stack
    /// (`lanes.tcp_acceleration: auto`); not for direct use.
    #[command(hide = true)]
    AccelProbe,
    /// Print a published JSON Schema: plan, rollback, request or response (the control API),
    /// lane-request or lane-message (the lane broker's protocol), event (`quadrant events`),
    /// flow (`quadrant observe`), chaos-experiment or chaos-report (`quadrant chaos run`).
    Schema {
        /// Which schema.
        #[arg(value_parser = ["plan", "rollback", "request", "response", "lane-request", "lane-message", "event", "flow", "chaos-experiment", "chaos-report"])]
        name: String,
    },
    /// Ask the running agent to admit a workload: SVID check, constraints, audit record.
    /// Exits 1 when the workload is rejected.
    Admit {
        /// The review (JSON or YAML): `{"review": {"object": {quadrant, workload, labels,
        /// artifacts, resources}}}`.
        #[arg(long)]
        review: PathBuf,
        /// The workload's X.509-SVID, PEM certificates, leaf first.
        #[arg(long)]
        svid: PathBuf,
    },
    /// The content-addressed artifact store (`artifacts_root`, default /opt/mcp).
    Artifact {
        #[command(subcommand)]
        command: artifacts::ArtifactCommand,
    },
    /// Submit a signed plan to the running agent: signature → schema → generation → artifacts
    /// → admission → run.
    Submit {
        /// The DSSE envelope (`quadrant plan sign` output).
        envelope: PathBuf,
        /// Start the new generation as a shadow beside the live one: it gets a share of the
        /// lane requests mirrored (`shadows.fraction`) and `quadrant shadow` compares the two.
        #[arg(long)]
        shadow: bool,
    },
    /// Shadow generations: each compared with its live generation over the same mirrored
    /// traffic (failures, p99 latency, CPU per 1,000 requests, memory) with a verdict;
    /// `promote` makes the shadow's generation the live one, `reject` stops it.
    Shadow {
        #[command(subcommand)]
        command: Option<workloads::ShadowCommand>,
        /// Output format (of the list).
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Break-glass: return a workload to an older generation with a break-glass authorization
    /// (`quadrant plan authorize-rollback`) and that generation's signed plan.
    Rollback {
        /// The authorization envelope.
        #[arg(long)]
        authorization: PathBuf,
        /// The older signed plan.
        #[arg(long)]
        plan: PathBuf,
    },
    /// List the open RTT lanes (transport, peers, bytes, round-trip time), the services offered
    /// and each quadrant's lane usage against its limits.
    Lanes {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Report every SLO: its SLI over the window, the error budget left, the burn rates of the
    /// multiwindow rules and the alerts firing.
    Slo {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the circuit breakers the kernel keeps per (caller quadrant, destination): state,
    /// consecutive failures, ejection and time left, refusals, counted connections.
    Breakers {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Trace the dataplane's verdicts into the agent's log (target `quadrant::trace`): every
    /// verdict (`all`), the drops and refusals (`drops`), or nothing (`off`, the default).
    Trace {
        /// What to trace.
        #[arg(value_enum)]
        mode: TraceMode,
    },
    /// Follow the agent's events (policy reloads, submits, lanes) as JSON lines.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Only the events that concern this quadrant (those naming no quadrant concern all).
        #[arg(long)]
        quadrant: Option<String>,
    },
    /// Flow events: drops, flows opened and closed (and every verdict while `quadrant trace
    /// all` is on), the newest the agent kept, then with `--follow` as they come. JSON lines
    /// use Hubble's flow field names (`quadrant schema flow`).
    Observe {
        /// Go on with new flows as they come.
        #[arg(long, short)]
        follow: bool,
        /// How many of the kept flows to show first.
        #[arg(long, default_value_t = 20)]
        last: u32,
        /// Only flows the quadrant decided, or that come from or go to it.
        #[arg(long)]
        quadrant: Option<String>,
        /// Only forwarded or dropped flows.
        #[arg(long, value_enum)]
        verdict: Option<quadrant::flows::FlowVerdict>,
        /// Only this verdict reason (`deny_policy`, `allow_policy`, … as `quadrant status`
        /// counts them).
        #[arg(long)]
        reason: Option<String>,
        /// Only packets entering (ingress) or leaving (egress) the deciding quadrant.
        #[arg(long, value_enum)]
        direction: Option<quadrant::flows::Direction>,
        /// Only this kind of event.
        #[arg(long, value_enum)]
        event: Option<quadrant::flows::EventKind>,
        /// Only flows from or to this pod (`<namespace>/<name>`, or a name in any namespace).
        #[arg(long)]
        pod: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// List the workloads the agent runs.
    Workloads {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print a workload's output (`<quadrant>/<workload>`).
    Logs {
        /// Name.
        name: String,
    },
    /// Stop a workload (`<quadrant>/<workload>`).
    Stop {
        /// Name.
        name: String,
    },
    /// Execution plans: schema, validation, signing, offline verification.
    Plan {
        #[command(subcommand)]
        command: plans::PlanCommand,
    },
    /// Signing keys and the trust store (`trust_store`, default /etc/quadrant/trust).
    Keys {
        #[command(subcommand)]
        command: plans::KeysCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: policy::AuditCommand,
    },
    /// Work with the Rego policy bundle (the embedded one, or `policy_dir`), offline.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Load every eBPF program into this kernel and print its verified instruction count.
    Verifier,
    /// The agent's own eBPF object: its digest and versions, and signing it.
    Dataplane {
        #[command(subcommand)]
        command: lifecycle::DataplaneCommand,
    },
    /// Faults injected into the dataplane's own programs (drop, delay, refuse), each ending by
    /// itself at its expiry; this process is the controller, not the agent.
    Chaos {
        #[command(subcommand)]
        command: chaos::ChaosCommand,
    },
    /// Kubernetes nodes: chain `quadrant-cni` into the node's CNI configuration, or take it
    /// out again.
    Cni {
        #[command(subcommand)]
        command: cni::CniCommand,
    },
    /// The pods `quadrant-cni` attached: their quadrant, veth, addresses and programs.
    Pods {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// Text for people, or JSON for programs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    /// A table.
    Text,
    /// JSON.
    Json,
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::AccelProbe) {
        return Ok(quadrant::lanes::accel_probe::run_helper()?);
    }
    let config = offline::load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Up => lifecycle::up(config),
        Command::Down { keep_dataplane } => lifecycle::down(&config, keep_dataplane),
        Command::Status { output } => lifecycle::status(&config, output),
        Command::Exec {
            quadrant,
            workload,
            instance,
            command,
        } => lifecycle::exec(&config, &quadrant, instance, workload.as_deref(), &command),
        Command::Scale {
            quadrant,
            instances,
        } => lanes::scale(&config, &quadrant, instances),
        Command::Instances { output } => lanes::instances(&config, output),
        Command::Chaos { command } => chaos::run(&config, cli.config.as_deref(), command),
        Command::Cni { command } => cni::run(&config, command),
        Command::Pods { output } => cni::pods(&config, output),
        Command::Place {
            plan,
            explain,
            output,
        } => lanes::place(&config, &plan, explain, output),
        Command::Drain {
            quadrant,
            index,
            resume,
        } => lanes::drain(&config, &quadrant, index, resume),
        Command::Verifier => lifecycle::verifier(&config),
        Command::Dataplane { command } => lifecycle::dataplane(command),
        Command::Trace { mode } => lifecycle::trace(&config, mode),
        Command::Schema { name } => lifecycle::print_schema(&name),
        Command::DefaultConfig => {
            print!("{}", quadrant::config::DEFAULT_CONFIG_YAML);
            Ok(())
        }
        Command::Policy { command } => policy::policy(&config, command),
        Command::Admit { review, svid } => policy::admit(&config, &review, &svid),
        Command::Audit { command } => policy::audit(&config, command),
        Command::Artifact { command } => artifacts::artifact(&config, command),
        Command::Keys { command } => plans::keys(&config, command),
        Command::Plan { command } => plans::plan(&config, command),
        Command::Submit { envelope, shadow } => workloads::submit(&config, &envelope, shadow),
        Command::Shadow { command, output } => workloads::shadow(&config, command, output),
        Command::Rollback {
            authorization,
            plan,
        } => workloads::rollback(&config, &authorization, &plan),
        Command::Workloads { output } => workloads::list(&config, output),
        Command::Logs { name } => workloads::logs(&config, &name),
        Command::Stop { name } => workloads::stop(&config, &name),
        Command::Lanes { output } => lanes::lanes(&config, output),
        Command::Breakers { output } => lanes::breakers(&config, output),
        Command::Slo { output } => lanes::slo(&config, output),
        Command::Events { count, quadrant } => observe::events(&config, count, quadrant),
        Command::Observe {
            follow,
            last,
            quadrant,
            verdict,
            reason,
            direction,
            event,
            pod,
            output,
        } => observe::observe(
            &config,
            quadrant::flows::FlowFilter {
                quadrant,
                verdict,
                reason,
                direction,
                event,
                pod,
            },
            last,
            follow,
            output,
        ),
        Command::AccelProbe => unreachable!("handled before the configuration is read"),
    }
}
