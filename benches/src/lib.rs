//! What the benchmarks in src/bin share: a real agent brought up from a configuration and down
//! again when dropped, and the binaries built beside them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;
use quadrant::config::Config;

/// The binary `name` built beside the running benchmark.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let b = std::env::current_exe()?.with_file_name(name);
    if !b.exists() {
        bail!(
            "{} not found: `cargo build --release -p agent --bins` first",
            b.display()
        );
    }
    Ok(b)
}

/// A running agent (`quadrant up` with the benchmark's configuration), brought down with the
/// servers it was given when dropped.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    config: PathBuf,
    process: Option<Child>,
    /// Processes stopped before the agent goes down.
    pub servers: Vec<Child>,
}

impl Agent {
    /// Writes `config` to `<dir>/<name>.yaml`, brings down what an earlier run left, starts
    /// the agent and waits (up to 30 s) until it answers `status`.
    pub fn start(config: &Config, dir: &str, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = Path::new(dir).join(format!("{name}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(config)?)?;
        let mut agent = Self {
            bin: sibling("quadrant")?,
            config: path,
            process: None,
            servers: Vec::new(),
        };
        let _ = agent.quadrant().arg("down").stdout(Stdio::null()).status();
        agent.process = Some(
            agent
                .quadrant()
                .arg("up")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent
            .quadrant()
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success()
        {
            if Instant::now() > deadline {
                bail!("the agent did not come up");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    /// `quadrant --config <the benchmark's configuration>`.
    #[must_use]
    pub fn quadrant(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config").arg(&self.config);
        c
    }

    /// `quadrant exec Q --workload W -- ARGV…`.
    #[must_use]
    pub fn exec(&self, q: &str, workload: &str, argv: &[&str]) -> Command {
        let mut c = self.quadrant();
        c.args(["exec", q, "--workload", workload, "--"]).args(argv);
        c
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for mut s in self.servers.drain(..) {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.quadrant().arg("down").stdout(Stdio::null()).status();
        if let Some(mut a) = self.process.take() {
            let _ = a.wait();
        }
    }
}
