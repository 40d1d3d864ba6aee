//! An experiment's rollbacks, as Chaos Toolkit runs them: actions taken in order once the faults
//! have ended — after the fault window, or after a safeguard aborted it — to put back what the
//! experiment's own method cannot: a command on the host, a command inside a quadrant, or every
//! chaos fault on the node removed. Each is reported with its outcome; a rollback that fails
//! fails the run.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_common::Quadrant;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ChaosError;
use crate::config::Config;

/// The most output a rollback's report keeps, bytes.
const OUTPUT_LIMIT: usize = 1024;

/// What a rollback does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RollbackAction {
    /// `argv` run on the host by the controller.
    Command,
    /// `argv` run inside `quadrant` (`quadrant exec`, as a workload would run).
    Exec,
    /// `quadrant chaos recover --all`: every fault on the node removed, not only this run's.
    RecoverAll,
}

/// One rollback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// What it does.
    pub action: RollbackAction,
    /// The program and its arguments (`command`, `exec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub argv: Vec<String>,
    /// The quadrant an `exec` runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quadrant: Option<String>,
    /// Killed and failed after this long.
    #[serde(default = "default_timeout_secs")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_secs: u64,
}

const fn default_timeout_secs() -> u64 {
    30
}

/// What a rollback did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RollbackReport {
    /// The rollback, in words: `command /bin/true`, `exec in dx: …`, `recover_all`.
    pub rollback: String,
    /// Whether it succeeded (exit status 0 within its time).
    pub ok: bool,
    /// What it printed (the first KiB of standard output and error), or why it failed.
    pub detail: String,
    /// How long it took, ms.
    pub millis: f64,
}

impl Rollback {
    /// Checks the fields its action needs; `i` is its index, for the message.
    ///
    /// # Errors
    /// The field missing or out of place, named.
    pub fn validate(&self, i: usize) -> Result<(), ChaosError> {
        let err = |m: &str| Err(ChaosError::Experiment(format!("rollbacks[{i}]: {m}")));
        match self.action {
            RollbackAction::Command | RollbackAction::Exec if self.argv.is_empty() => {
                err("argv: a command needs its program")
            }
            RollbackAction::Exec
                if self
                    .quadrant
                    .as_deref()
                    .and_then(Quadrant::from_name)
                    .is_none() =>
            {
                err("quadrant: exec runs inside dx, dg, px or pg")
            }
            RollbackAction::Command if self.quadrant.is_some() => {
                err("quadrant: a command runs on the host; use exec to run inside a quadrant")
            }
            RollbackAction::RecoverAll if !self.argv.is_empty() || self.quadrant.is_some() => {
                err("recover_all takes neither argv nor quadrant")
            }
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        match self.action {
            RollbackAction::Command => format!("command {}", self.argv.join(" ")),
            RollbackAction::Exec => format!(
                "exec in {}: {}",
                self.quadrant.as_deref().unwrap_or("?"),
                self.argv.join(" ")
            ),
            RollbackAction::RecoverAll => "recover_all".into(),
        }
    }

    /// Takes the rollback (`config_path`: the file `quadrant exec` is given).
    #[must_use]
    pub fn run(&self, config: &Config, config_path: Option<&std::path::Path>) -> RollbackReport {
        let start = Instant::now();
        let outcome =
            match self.action {
                RollbackAction::RecoverAll => super::recover(config).map_err(|e| e.to_string()),
                RollbackAction::Command => match self.argv.split_first() {
                    Some((program, args)) => {
                        let mut c = Command::new(program);
                        c.args(args);
                        run_for(c, Duration::from_secs(self.timeout_secs))
                    }
                    None => Err("argv: a command needs its program".into()),
                },
                RollbackAction::Exec => std::env::current_exe()
                    .map_err(|e| e.to_string())
                    .and_then(|me| {
                        let mut c = Command::new(me);
                        if let Some(p) = config_path {
                            c.arg("--config").arg(p);
                        }
                        c.args(["exec", self.quadrant.as_deref().unwrap_or_default(), "--"])
                            .args(&self.argv);
                        run_for(c, Duration::from_secs(self.timeout_secs))
                    }),
            };
        let (ok, detail) = match outcome {
            Ok(out) => (true, out),
            Err(e) => (false, e),
        };
        RollbackReport {
            rollback: self.describe(),
            ok,
            detail,
            millis: start.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// Runs `c` for at most `limit`: its output if it exited 0, else why not.
fn run_for(mut c: Command, limit: Duration) -> Result<String, String> {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    // Read both pipes beside the wait, so a talkative command never blocks on a full pipe.
    let readers = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    ]
    .map(|pipe| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut p) = pipe {
                let mut buf = [0u8; 4096];
                while let Ok(n) = p.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
            kept
        })
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("still running after {} s: killed", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e.to_string()),
        }
    };
    let output: Vec<u8> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap_or_default())
        .take(OUTPUT_LIMIT)
        .collect();
    let output = String::from_utf8_lossy(&output).trim().to_owned();
    match status? {
        s if s.success() => Ok(output),
        s => Err(format!("{s}: {output}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollback(action: RollbackAction, argv: &[&str], quadrant: Option<&str>) -> Rollback {
        Rollback {
            action,
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            quadrant: quadrant.map(str::to_owned),
            timeout_secs: 1,
        }
    }

    #[test]
    fn each_action_needs_its_fields_and_no_others() {
        use RollbackAction::*;
        let err = |r: Rollback| r.validate(2).unwrap_err().to_string();
        assert!(err(rollback(Command, &[], None)).contains("rollbacks[2]: argv"));
        assert!(err(rollback(Exec, &["true"], None)).contains("rollbacks[2]: quadrant"));
        assert!(err(rollback(Exec, &["true"], Some("zz"))).contains("dx, dg, px or pg"));
        assert!(err(rollback(Command, &["true"], Some("dx"))).contains("use exec"));
        assert!(err(rollback(RecoverAll, &["x"], None)).contains("neither"));
        assert!(rollback(Exec, &["true"], Some("dx")).validate(0).is_ok());
        assert!(rollback(RecoverAll, &[], None).validate(0).is_ok());
    }

    #[test]
    fn a_command_reports_its_output_failure_or_timeout() {
        let run = |argv: &[&str]| {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            run_for(c, Duration::from_millis(500))
        };
        assert_eq!(
            run(&["/bin/sh", "-c", "echo put back"]),
            Ok("put back".into())
        );
        let failed = run(&["/bin/sh", "-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert!(
            failed.contains("exit status: 3") && failed.contains("nope"),
            "{failed}"
        );
        let slow = run(&["/bin/sleep", "5"]).unwrap_err();
        assert!(slow.contains("killed"), "{slow}");
        let long = run(&["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]).unwrap();
        assert_eq!(long.len(), OUTPUT_LIMIT, "kept to a KiB, the pipe drained");
        assert!(
            run(&["/nonexistent/program"])
                .unwrap_err()
                .contains("cannot start it")
        );
    }
}
