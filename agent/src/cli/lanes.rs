//! `quadrant lanes`, `quadrant slo`, `quadrant breakers` and `quadrant events`.

use quadrant::{config::Config, control::Client};

use super::Output;

/// `quadrant lanes`.
pub fn lanes(config: &Config, output: Output) -> anyhow::Result<()> {
    let report = Client::new(config.socket_path()).lanes()?;
    match output {
        Output::Text => print!("{}", quadrant::lanes::broker::render(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// `quadrant slo`.
pub fn slo(config: &Config, output: Output) -> anyhow::Result<()> {
    let report = Client::new(config.socket_path()).slo()?;
    match output {
        Output::Text => print!("{}", quadrant::slo::render(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// `quadrant breakers`.
pub fn breakers(config: &Config, output: Output) -> anyhow::Result<()> {
    let report = Client::new(config.socket_path()).breakers()?;
    match output {
        Output::Text => print!("{}", quadrant::breakers::render(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// `quadrant scale Q N`.
pub fn scale(config: &Config, quadrant: &str, instances: u8) -> anyhow::Result<()> {
    let n = Client::new(config.socket_path()).scale(quadrant, instances)?;
    println!("{quadrant}: {n} instance(s)");
    Ok(())
}

/// `quadrant instances`.
pub fn instances(config: &Config, output: Output) -> anyhow::Result<()> {
    let report = Client::new(config.socket_path()).instances()?;
    match output {
        Output::Text => print!("{}", quadrant::scale::render(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// `quadrant place [--explain] PLAN`: exits 1 when no instance fits.
pub fn place(
    config: &Config,
    plan: &std::path::Path,
    explain: bool,
    output: Output,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(plan)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", plan.display()))?;
    let parsed = quadrant::plans::parse(&text)?;
    let placement = Client::new(config.socket_path()).place(serde_json::to_value(&parsed)?)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&placement)?),
        Output::Text => {
            println!("{}", placement.summary);
            if explain {
                for v in &placement.instances {
                    let name = if v.index == 0 {
                        placement.quadrant.clone()
                    } else {
                        format!("{}-{}", placement.quadrant, v.index)
                    };
                    match (&v.filtered, v.score) {
                        (Some(why), _) => println!("  {name:<8} filtered: {why}"),
                        (None, Some(score)) => println!(
                            "  {name:<8} fits, score {score}{}",
                            if placement.chosen == Some(v.index) {
                                " (chosen)"
                            } else {
                                ""
                            }
                        ),
                        (None, None) => println!("  {name:<8} fits"),
                    }
                }
            }
        }
    }
    if placement.chosen.is_none() {
        std::process::exit(1);
    }
    Ok(())
}

/// `quadrant drain Q K [--resume]`.
pub fn drain(config: &Config, quadrant: &str, index: u8, resume: bool) -> anyhow::Result<()> {
    let draining = Client::new(config.socket_path()).drain(quadrant, index, resume)?;
    println!(
        "{quadrant} instance {index}: {}",
        if draining {
            "draining (no new connections through service VIPs)"
        } else {
            "receiving new connections"
        }
    );
    Ok(())
}
