//! `quadrant observe` and `quadrant events`: the agent's flow events and events, as they come.

use std::io::Write as _;

use quadrant::{
    config::Config,
    control::Client,
    flows::{FlowFilter, FlowLine},
};

use super::Output;

/// `quadrant observe`.
pub fn observe(
    config: &Config,
    filter: FlowFilter,
    last: u32,
    follow: bool,
    output: Output,
) -> anyhow::Result<()> {
    filter.validate().map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    let mut failed = None;
    Client::new(config.socket_path()).observe(filter, last, follow, |line| {
        let text = match output {
            Output::Json => line.to_owned(),
            Output::Text => render(line),
        };
        if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
            failed = Some(e);
            return false;
        }
        true
    })?;
    failed.map_or(Ok(()), |e| Err(e.into()))
}

/// One flow line as text: its time, its one-line summary and what kind of event it is.
fn render(line: &str) -> String {
    match serde_json::from_str::<FlowLine>(line) {
        Ok(l) => format!("{}  {}  [{}]", l.time, l.flow.summary, l.flow.event.name()),
        // A note such as {"lost_events": N}.
        Err(_) => line.to_owned(),
    }
}

/// `quadrant events`.
pub fn events(
    config: &Config,
    count: Option<usize>,
    quadrant: Option<String>,
) -> anyhow::Result<()> {
    if count == Some(0) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let mut seen = 0;
    let mut failed = None;
    Client::new(config.socket_path()).events(quadrant, |line| {
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            failed = Some(e);
            return false;
        }
        seen += 1;
        count.is_none_or(|c| seen < c)
    })?;
    failed.map_or(Ok(()), |e| Err(e.into()))
}
