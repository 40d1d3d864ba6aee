//! The `quadrant` command: parses the command line and hands over to [`quadrant::app`].

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use dataplane_common::Quadrant;
use quadrant::{api, app, config::Config};
use tracing_subscriber::EnvFilter;

/// quadrant: four isolated quadrants (DX, DG, PX, PG) on one Linux host, enforced by eBPF.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (YAML); the embedded default when absent.
    #[arg(long, short, global = true, env = "QUADRANT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// The helper the agent starts to measure `sk_msg` against the TCP stack
    /// (`lanes.tcp_acceleration: auto`); not for direct use.
    #[command(hide = true)]
    AccelProbe,
    /// Print a published JSON Schema: plan, rollback, request or response (the control API),
    /// lane-request or lane-message (the lane broker's protocol), or event (`quadrant events`).
    Schema {
        /// Which schema.
        #[arg(value_parser = ["plan", "rollback", "request", "response", "lane-request", "lane-message", "event"])]
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
        command: ArtifactCommand,
    },
    /// Submit a signed plan to the running agent: signature → schema → generation → artifacts
    /// → admission → run.
    Submit {
        /// The DSSE envelope (`quadrant plan sign` output).
        envelope: PathBuf,
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
    /// Trace the dataplane's verdicts into the agent's log (target `quadrant::trace`): every
    /// verdict (`all`), the drops and refusals (`drops`), or nothing (`off`, the default).
    Trace {
        /// What to trace.
        #[arg(value_enum)]
        mode: quadrant::trace::TraceMode,
    },
    /// Follow the agent's events (policy reloads, submits, lanes) as JSON lines.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
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
        command: PlanCommand,
    },
    /// Signing keys and the trust store (`trust_store`, default /etc/quadrant/trust).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Work with the Rego policy bundle (the embedded one, or `policy_dir`), offline.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Load every eBPF program into this kernel and print its verified instruction count.
    Verifier,
    /// The agent's own eBPF object: its digest and versions, and signing it.
    Dataplane {
        #[command(subcommand)]
        command: DataplaneCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DataplaneCommand {
    /// Print the embedded object's digest, program set and map layout versions.
    Info,
    /// Sign the embedded object (digest and versions) with KEY (a `dataplane` key for every
    /// quadrant); write the envelope to OUT, for `dataplane_signature`.
    Sign {
        /// PKCS#8 key file.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signature.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ArtifactCommand {
    /// Store FILE as package NAME; prints its reference `<name>@sha256:<digest>`.
    Add {
        /// The file.
        file: PathBuf,
        /// Package name (a-z, 0-9, '.', '_', '-').
        #[arg(long)]
        name: String,
    },
    /// List the stored references.
    List,
    /// Re-hash every artifact and report mismatches; fails if there are any.
    Verify,
    /// Sign a stored artifact with a key (detached DSSE envelope beside it).
    Sign {
        /// `<pkg>@sha256:<digest>`.
        reference: String,
        /// Ed25519 PKCS#8 key file (its stem is the key id).
        #[arg(long)]
        key: PathBuf,
    },
    /// Check an artifact's content and that a trusted key signed it for QUADRANT.
    CheckSigned {
        /// `<pkg>@sha256:<digest>`.
        reference: String,
        /// dx, dg, px or pg.
        #[arg(long)]
        quadrant: String,
    },
}

#[derive(Debug, Subcommand)]
enum PlanCommand {
    /// Print the plan JSON Schema (published as manifests/schemas/plan.schema.json).
    Schema,
    /// Validate a plan (JSON or YAML) against the schema.
    Validate {
        /// The plan.
        file: PathBuf,
    },
    /// Sign a plan with a key: prints the DSSE envelope (JSON).
    Sign {
        /// The plan.
        file: PathBuf,
        /// Ed25519 PKCS#8 key file (its stem is the key id).
        #[arg(long)]
        key: PathBuf,
    },
    /// Sign a break-glass rollback authorization with a break-glass key: prints the envelope.
    AuthorizeRollback {
        /// dx, dg, px or pg.
        #[arg(long)]
        quadrant: String,
        /// Workload name.
        #[arg(long)]
        workload: String,
        /// Generation to return to.
        #[arg(long)]
        generation: u64,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// How long the authorization stays valid, seconds.
        #[arg(long, default_value_t = 3600)]
        valid_for_secs: u64,
        /// Ed25519 PKCS#8 break-glass key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a signed plan (envelope) against the trust store, offline.
    Verify {
        /// The envelope.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate an Ed25519 key: `<out>/<id>.pk8` (private, 0600) and `<out>/<id>.json` (the
    /// trust document to install with `quadrant keys trust`).
    Generate {
        /// Key id.
        #[arg(long)]
        id: String,
        /// What it may sign: plan, artifact, break-glass (repeatable).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// For which quadrants (repeatable).
        #[arg(long = "quadrant", required = true)]
        quadrants: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Install a trust document into the trust store.
    Trust {
        /// `<id>.json`.
        file: PathBuf,
    },
    /// List the trusted keys.
    List,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the audit log (the configured one, or FILE).
    Verify {
        /// Log file instead of the configured `audit_log`.
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run every `test_*` rule of the bundle, as `opa test` does.
    Test,
    /// Report quadrant or local allows that a global deny overrides (with both sources), and
    /// rules placed in a layer that does not own them. Fails if there are any.
    Check,
    /// Evaluate a decision for an input document and print it with the rules that produced it:
    /// a flow `{"from","to","protocol","port"}`, or an admission review `{"review": {...}}`.
    Eval {
        /// JSON or YAML input file.
        #[arg(long, short)]
        input: PathBuf,
        /// Query instead of the decision chosen by the input's shape.
        #[arg(long, short)]
        query: Option<String>,
    },
    /// Print the flows the kernel enforces.
    Flows,
    /// Sign the `policy_dir` bundle with a policy key (writes `<policy_dir>/bundle.dsse.json`).
    Sign {
        /// Ed25519 PKCS#8 key with the `policy` role for every quadrant.
        #[arg(long)]
        key: PathBuf,
    },
    /// Ask the running agent to re-evaluate the bundle and make it live at once (SIGHUP does
    /// the same); the current policy stays if the new one does not evaluate.
    Reload,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("QUADRANT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::AccelProbe) {
        return Ok(quadrant::lanes::accel_probe::run_helper()?);
    }
    let config = app::load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Up => up(config),
        Command::Down {
            keep_dataplane: true,
        } => {
            let (pins, layout, handed) = app::down_keep_dataplane(&config)?;
            println!(
                "agent stopped; the quadrants and the dataplane (map layout {layout}, pins in {}) keep enforcing and {} workloads keep running ({}) until the next `quadrant up` takes them over",
                pins.display(),
                handed.len(),
                handed.join(", ")
            );
            Ok(())
        }
        Command::Down {
            keep_dataplane: false,
        } => {
            let removed = app::down(&config)?;
            if removed.is_empty() {
                println!("nothing to remove for instance {}", config.instance);
            }
            for r in removed {
                println!("removed {r}");
            }
            Ok(())
        }
        Command::Status { output } => {
            let report = app::status(&config)?;
            match output {
                Output::Text => print!("{}", api::render_status(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
        Command::Exec {
            quadrant,
            workload,
            command,
        } => {
            let Some(q) = Quadrant::from_name(&quadrant) else {
                bail!("unknown quadrant {quadrant:?}; expected dx, dg, px or pg");
            };
            Err(app::exec(&config, q, workload.as_deref(), &command))
                .with_context(|| format!("cannot run {:?} in {}", command.join(" "), q.name()))
        }
        Command::Verifier => verifier(),
        Command::Policy { command } => policy(&config, command),
        Command::Dataplane { command } => dataplane(command),
        Command::Admit { review, svid } => {
            let text = std::fs::read_to_string(&review)
                .with_context(|| format!("cannot read {}", review.display()))?;
            let review_doc: serde_json::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is neither JSON nor YAML", review.display()))?;
            let pem = std::fs::read_to_string(&svid)
                .with_context(|| format!("cannot read {}", svid.display()))?;
            let decision = app::admit(&config, review_doc, pem)?;
            println!("{}", serde_json::to_string_pretty(&decision)?);
            if !decision.allowed {
                let why = decision.why();
                bail!("rejected: {why}");
            }
            Ok(())
        }
        Command::Artifact { command } => artifact(&config, command),
        Command::Keys { command } => keys(&config, command),
        Command::Plan { command } => plan(&config, command),
        c @ (Command::Rollback { .. }
        | Command::Submit { .. }
        | Command::Workloads { .. }
        | Command::Logs { .. }
        | Command::Stop { .. }) => workloads_cli(&config, c),
        Command::Audit {
            command: AuditCommand::Verify { log },
        } => {
            let path = log.unwrap_or_else(|| config.audit_log.clone());
            let n = quadrant::audit::verify(&path)?;
            println!("audit log {}: {n} records, chain intact", path.display());
            Ok(())
        }
        Command::Schema { name } => print_schema(&name),
        Command::Lanes { output } => lanes(&config, output),
        Command::Trace { mode } => {
            let mode = app::trace(&config, mode)?;
            println!(
                "verdict trace: {} (the agent logs it under the target quadrant::trace)",
                serde_json::to_value(mode)?.as_str().unwrap_or_default()
            );
            Ok(())
        }
        Command::Events { count } => events(&config, count),
        Command::DefaultConfig => {
            print!("{}", quadrant::config::DEFAULT_CONFIG_YAML);
            Ok(())
        }
        Command::AccelProbe => unreachable!("handled before the configuration is read"),
    }
}

/// The workloads as a table.
fn print_workloads(list: Vec<quadrant::workloads::Status>) {
    println!(
        "{:<24} {:>4} {:>8} {:<9} {:<12} {:>8} LIMITS",
        "NAME", "GEN", "PID", "STATE", "LAST EXIT", "RESTARTS"
    );
    for w in list {
        println!(
            "{:<24} {:>4} {:>8} {:<9} {:<12} {:>8} {}",
            w.name,
            w.generation,
            w.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            w.state,
            w.last_exit.unwrap_or_else(|| "-".into()),
            w.restarts,
            w.limits
        );
    }
}

/// `submit`, `workloads`, `logs`, `stop`: the running agent's workloads.
fn workloads_cli(config: &Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Rollback {
            authorization,
            plan,
        } => {
            let read = |f: &PathBuf| -> anyhow::Result<quadrant::signing::Envelope> {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                Ok(serde_json::from_str(&text)
                    .map_err(|e| quadrant::signing::SignatureError::Malformed(e.to_string()))?)
            };
            let request = api::Request::Rollback {
                authorization: read(&authorization)?,
                envelope: read(&plan)?,
            };
            match app::call(config, &request)? {
                api::Response::Submitted {
                    status, spiffe_id, ..
                } => {
                    println!(
                        "rolled back {} to generation {} as {spiffe_id} (break-glass, recorded in the audit log)",
                        status.name, status.generation
                    );
                    Ok(())
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Submit { envelope } => {
            let text = std::fs::read_to_string(&envelope)
                .with_context(|| format!("cannot read {}", envelope.display()))?;
            let envelope: quadrant::signing::Envelope = serde_json::from_str(&text)
                .map_err(|e| quadrant::signing::SignatureError::Malformed(e.to_string()))?;
            match app::call(config, &api::Request::Submit { envelope })? {
                api::Response::Submitted {
                    status,
                    signer,
                    spiffe_id,
                    audit_seq,
                } => {
                    println!(
                        "started {} generation {} as {spiffe_id} (pid {}, signed by {signer}, audit record {})",
                        status.name,
                        status.generation,
                        status.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                        audit_seq.map_or_else(|| "-".into(), |s| s.to_string())
                    );
                    Ok(())
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Workloads { output } => {
            let api::Response::Workloads { workloads: list } =
                app::call(config, &api::Request::Workloads)?
            else {
                bail!("unexpected answer to workloads");
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Text => print_workloads(list),
            }
            Ok(())
        }
        Command::Logs { name } => {
            let api::Response::Workloads { workloads: list } =
                app::call(config, &api::Request::Workloads)?
            else {
                bail!("unexpected answer to workloads");
            };
            let w = list
                .into_iter()
                .find(|w| w.name == name)
                .with_context(|| format!("no workload {name}; see `quadrant workloads`"))?;
            print!(
                "{}",
                std::fs::read_to_string(&w.log)
                    .with_context(|| format!("cannot read {}", w.log.display()))?
            );
            Ok(())
        }
        Command::Stop { name } => {
            let api::Response::Stopped(s) = app::call(config, &api::Request::Stop { name })? else {
                bail!("unexpected answer to stop");
            };
            println!(
                "stopped {} ({})",
                s.name,
                s.last_exit.unwrap_or_else(|| "not running".into())
            );
            Ok(())
        }
        _ => unreachable!("only workload commands are passed here"),
    }
}

fn plan(config: &Config, command: PlanCommand) -> anyhow::Result<()> {
    use quadrant::{plans, signing};
    let read = |f: &PathBuf| {
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
    };
    match command {
        PlanCommand::Schema => {
            println!("{}", serde_json::to_string_pretty(&plans::schema())?);
            Ok(())
        }
        PlanCommand::Validate { file } => {
            let p = plans::parse(&read(&file)?)?;
            println!(
                "valid: {}/{} generation {}",
                Quadrant::from(p.quadrant).name(),
                p.workload,
                p.generation
            );
            Ok(())
        }
        PlanCommand::Sign { file, key } => {
            let p = plans::parse(&read(&file)?)?;
            let key = signing::SigningKey::load(&key)?;
            println!("{}", serde_json::to_string_pretty(&plans::sign(&p, &key))?);
            Ok(())
        }
        PlanCommand::AuthorizeRollback {
            quadrant,
            workload,
            generation,
            reason,
            valid_for_secs,
            key,
        } => {
            let q: plans::QuadrantName =
                serde_json::from_value(serde_json::Value::String(quadrant.clone()))
                    .with_context(|| format!("unknown quadrant {quadrant:?}"))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let rollback = plans::Rollback {
                quadrant: q,
                workload,
                target_generation: generation,
                reason,
                expires_at: now + valid_for_secs,
            };
            let key = signing::SigningKey::load(&key)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&plans::sign_rollback(&rollback, &key))?
            );
            Ok(())
        }
        PlanCommand::Verify { file } => {
            let envelope: signing::Envelope = serde_json::from_str(&read(&file)?)
                .map_err(|e| signing::SignatureError::Malformed(e.to_string()))?;
            let trust = signing::TrustStore::load(&config.trust_store)?;
            let (p, key) = plans::verify(&envelope, &trust)?;
            println!(
                "verified: {}/{} generation {} signed by {key}",
                Quadrant::from(p.quadrant).name(),
                p.workload,
                p.generation
            );
            Ok(())
        }
    }
}

fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    use quadrant::signing::{Role, SigningKey, TrustStore, TrustedKey};
    match command {
        KeysCommand::Generate {
            id,
            roles,
            quadrants,
            out,
        } => {
            if !quadrant::artifacts::valid_name(&id) {
                bail!("invalid key id {id:?}: use a-z, 0-9, '.', '_', '-'");
            }
            let roles: Vec<Role> = roles
                .iter()
                .map(|r| {
                    serde_json::from_value(serde_json::Value::String(r.clone())).with_context(
                        || format!("unknown role {r:?}; expected plan, artifact, break-glass, policy or dataplane"),
                    )
                })
                .collect::<anyhow::Result<_>>()?;
            let qs: Vec<Quadrant> = quadrants
                .iter()
                .map(|q| Quadrant::from_name(q).with_context(|| format!("unknown quadrant {q:?}")))
                .collect::<anyhow::Result<_>>()?;
            let (key, pkcs8) = SigningKey::generate(&id)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let private = out.join(format!("{id}.pk8"));
            {
                use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&private)
                    .with_context(|| {
                        format!(
                            "cannot create {} (it must not exist yet)",
                            private.display()
                        )
                    })?;
                f.write_all(&pkcs8)?;
            }
            let public = out.join(format!("{id}.json"));
            std::fs::write(
                &public,
                serde_json::to_string_pretty(&key.trusted(roles, &qs))?,
            )?;
            println!(
                "private key {} (keep it secret)
trust document {}",
                private.display(),
                public.display()
            );
            Ok(())
        }
        KeysCommand::Trust { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let doc: TrustedKey = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a trust document", file.display()))?;
            if doc
                .quadrants
                .iter()
                .any(|q| Quadrant::from_name(q).is_none())
                || doc.roles.is_empty()
            {
                bail!(
                    "{}: quadrants must be dx, dg, px or pg and roles must not be empty",
                    file.display()
                );
            }
            std::fs::create_dir_all(&config.trust_store)?;
            let dest = config.trust_store.join(format!("{}.json", doc.id));
            std::fs::write(&dest, serde_json::to_string_pretty(&doc)?)?;
            TrustStore::load(&config.trust_store)?;
            println!("trusted key {} ({})", doc.id, dest.display());
            Ok(())
        }
        KeysCommand::List => {
            for k in TrustStore::load(&config.trust_store)?.keys() {
                let roles: Vec<String> = k
                    .roles
                    .iter()
                    .filter_map(|r| {
                        serde_json::to_value(r)
                            .ok()?
                            .as_str()
                            .map(ToOwned::to_owned)
                    })
                    .collect();
                println!(
                    "{}	roles {}	quadrants {}",
                    k.id,
                    roles.join(","),
                    k.quadrants.join(",")
                );
            }
            Ok(())
        }
    }
}

fn artifact(config: &Config, command: ArtifactCommand) -> anyhow::Result<()> {
    use quadrant::artifacts::{Added, ArtifactStore, Finding};
    let store = ArtifactStore::new(&config.artifacts_root);
    match command {
        ArtifactCommand::Add { file, name } => {
            match store.add(&file, &name)? {
                Added::Stored(r) => println!("{r}"),
                Added::AlreadyPresent(r) => println!("{r} (already present)"),
            }
            Ok(())
        }
        ArtifactCommand::List => {
            for r in store.list()? {
                println!("{r}");
            }
            Ok(())
        }
        ArtifactCommand::Sign { reference, key } => {
            let key = quadrant::signing::SigningKey::load(&key)?;
            let path = store.sign(&reference.parse()?, &key)?;
            println!(
                "signed {reference} with key {}: {}",
                key.id(),
                path.display()
            );
            Ok(())
        }
        ArtifactCommand::CheckSigned {
            reference,
            quadrant,
        } => {
            let q = Quadrant::from_name(&quadrant)
                .with_context(|| format!("unknown quadrant {quadrant:?}"))?;
            let trust = quadrant::signing::TrustStore::load(&config.trust_store)?;
            let key = store.check_signed(&reference.parse()?, q, &trust)?;
            println!(
                "{reference}: content intact, signed for {} by key {key}",
                q.name()
            );
            Ok(())
        }
        ArtifactCommand::Verify => {
            let (ok, findings) = store.verify_all()?;
            for f in &findings {
                match f {
                    Finding::Mismatch { path, actual } => {
                        println!("MISMATCH {} (content is sha256:{actual})", path.display());
                    }
                    Finding::Unexpected(path) => {
                        println!("UNEXPECTED {} (not an artifact reference)", path.display());
                    }
                }
            }
            println!(
                "{ok} artifacts intact, {} problems in {}",
                findings.len(),
                store.root().display()
            );
            if !findings.is_empty() {
                bail!(
                    "the artifact store {} has {} problems",
                    store.root().display(),
                    findings.len()
                );
            }
            Ok(())
        }
    }
}

fn policy(config: &Config, command: PolicyCommand) -> anyhow::Result<()> {
    let bundle = || quadrant::policy::PolicyBundle::for_config(config);
    match command {
        PolicyCommand::Test => {
            let bundle = bundle()?;
            let results = bundle.run_tests()?;
            let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
            for r in &results {
                match &r.error {
                    None => println!("PASS {}", r.name),
                    Some(e) => println!("FAIL {} ({e})", r.name),
                }
            }
            println!(
                "{} passed, {} failed ({})",
                results.len() - failed.len(),
                failed.len(),
                bundle.origin()
            );
            if !failed.is_empty() {
                bail!("{} policy test(s) failed", failed.len());
            }
            Ok(())
        }
        PolicyCommand::Check => {
            let report = bundle()?.check(&config.policy)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.conflicts.is_empty() || !report.misplaced.is_empty() {
                bail!(
                    "{} conflict(s) (a global deny overrides an allow) and {} misplaced rule(s)",
                    report.conflicts.len(),
                    report.misplaced.len()
                );
            }
            Ok(())
        }
        PolicyCommand::Eval { input, query } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("cannot read {}", input.display()))?;
            let value: serde_json::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is neither JSON nor YAML", input.display()))?;
            let (q, decision) = bundle()?.eval(&config.policy, &value, query.as_deref())?;
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "query": q, "result": decision })
                )?
            );
            Ok(())
        }
        PolicyCommand::Sign { key } => {
            let dir = config.policy_dir.as_ref().context("policy sign needs policy_dir in the configuration (the embedded bundle is part of the binary)")?;
            let bundle = quadrant::policy::PolicyBundle::from_dir(dir)?;
            let key = quadrant::signing::SigningKey::load(&key)?;
            let path = dir.join(quadrant::policy::SIGNATURE_FILE);
            std::fs::write(&path, serde_json::to_string_pretty(&bundle.sign(&key))?)?;
            println!(
                "signed bundle sha256:{} with key {}: {}",
                bundle.digest(),
                key.id(),
                path.display()
            );
            Ok(())
        }
        PolicyCommand::Reload => {
            let (state, slot) = app::policy_reload(config)?;
            println!("policy {state} (live slot {slot})");
            Ok(())
        }
        PolicyCommand::Flows => {
            for f in bundle()?.flows(&config.policy)? {
                println!("{}", serde_json::to_string(&f)?);
            }
            Ok(())
        }
    }
}

/// `quadrant verifier`.
fn verifier() -> anyhow::Result<()> {
    app::require_root("verifier")?;
    let dp = quadrant::loader::Dataplane::load(None)?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let hooks = quadrant::loader::programs::ALL
        .iter()
        .map(|(_, hook)| hook.name())
        .chain(
            quadrant::loader::programs::LANE_ACCEL
                .iter()
                .map(|(_, kind)| *kind),
        );
    println!(
        "all {} programs loaded on kernel {}",
        quadrant::loader::programs::ALL.len() + quadrant::loader::programs::LANE_ACCEL.len(),
        kernel.trim()
    );
    println!(
        "{:<22} {:<12} {:>22}",
        "PROGRAM", "HOOK", "VERIFIED INSTRUCTIONS"
    );
    for ((name, count), hook) in dp.verified_instructions()?.into_iter().zip(hooks) {
        let count = count.map_or_else(|| "n/a".to_owned(), |c| c.to_string());
        println!("{name:<22} {hook:<12} {count:>22}");
    }
    Ok(())
}

/// `quadrant dataplane`.
fn dataplane(command: DataplaneCommand) -> anyhow::Result<()> {
    let statement = quadrant::loader::object_statement();
    match command {
        DataplaneCommand::Info => println!("{statement}"),
        DataplaneCommand::Sign { key, out } => {
            let key = quadrant::signing::SigningKey::load(&key)?;
            let envelope = key.sign(
                quadrant::signing::DATAPLANE_PAYLOAD_TYPE,
                statement.as_bytes(),
            );
            std::fs::write(&out, serde_json::to_string_pretty(&envelope)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "signed {statement} with key {}: {}",
                key.id(),
                out.display()
            );
        }
    }
    Ok(())
}

/// `quadrant events`.
fn events(config: &Config, count: Option<usize>) -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let socket = config.socket_path();
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)
        .with_context(|| format!("no agent answers on {}", socket.display()))?;
    let mut request = serde_json::to_vec(&api::Request::Events)?;
    request.push(b'\n');
    stream.write_all(&request)?;
    let mut out = std::io::stdout().lock();
    if count == Some(0) {
        return Ok(());
    }
    for (i, line) in std::io::BufReader::new(stream).lines().enumerate() {
        writeln!(out, "{}", line?)?;
        out.flush()?;
        if count.is_some_and(|c| i + 1 >= c) {
            break;
        }
    }
    Ok(())
}

/// `quadrant lanes`.
fn lanes(config: &Config, output: Output) -> anyhow::Result<()> {
    let report = app::lanes(config)?;
    match output {
        Output::Text => print!("{}", quadrant::lanes::broker::render(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// `quadrant schema NAME`.
fn print_schema(name: &str) -> anyhow::Result<()> {
    let (_, _, schema) = api::published_schemas()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .with_context(|| format!("unknown schema {name:?}"))?;
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}

fn up(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(app::up(config, |status| {
        print!("{}", api::render_status(status));
        println!(
            "\nquadrant up: {} quadrants ready; control socket {}. Ctrl-C or `quadrant down` stops and removes them.",
            status.quadrants.len(),
            status.socket.display()
        );
    }))? {
        app::Stopped::Removed => println!("quadrant down: everything removed"),
        app::Stopped::DataplaneKept => {
            println!("quadrant down: the agent stopped; the dataplane keeps enforcing");
        }
    }
    Ok(())
}
