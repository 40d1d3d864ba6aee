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
        /// drop (packets into the destination quadrant), delay (them), refuse (connects).
        #[arg(value_enum)]
        action: Action,
        /// Source: dx, dg, px, pg, host, world or any (for refuse: the calling quadrant).
        #[arg(long)]
        from: String,
        /// Destination: a quadrant or any (for refuse: any identity).
        #[arg(long)]
        to: String,
        /// Share of the matched traffic dropped or refused, percent.
        #[arg(long, default_value_t = 100.0)]
        percent: f64,
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
}

/// Runs one `quadrant chaos` command.
pub fn run(config: &Config, command: ChaosCommand) -> anyhow::Result<()> {
    match command {
        ChaosCommand::Inject {
            action,
            from,
            to,
            percent,
            delay_ms,
            jitter_ms,
            both_ways,
            seconds,
            allow_production,
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
            };
            let entries = chaos::inject(config, &spec, allow_production)?;
            println!(
                "armed {} fault entr{} for {seconds} s",
                entries.len(),
                if entries.len() == 1 { "y" } else { "ies" }
            );
        }
        ChaosCommand::Status { output } => {
            let faults = chaos::status(config)?;
            match output {
                Output::Text => print!("{}", chaos::render(&faults)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&faults)?),
            }
        }
        ChaosCommand::Recover { all: _ } => println!("{}", chaos::recover(config)?),
    }
    Ok(())
}
