//! What the benchmarks in src/bin share: a real agent brought up from a configuration and down
//! again when dropped, and the binaries built beside them.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::ProgramInfo;
use dataplane_common::Quadrant;
use hdrhistogram::Histogram;
use quadrant::config::{Config, QuadrantConfig, TcpAcceleration};

/// The embedded configuration moved out of the way of a running `quadrant up`: instance
/// `instance`, veths `<prefix>-…`, everything it keeps under `state_dir`, quadrant prefixes
/// `10.<net>.<0..3>.0/24`, TCP acceleration off (measured on its own where it matters). Not yet
/// validated: the caller adds what its run needs, then validates.
///
/// # Errors
/// If a prefix does not parse (with a `u8` for `net` they all do).
pub fn isolated_config(
    instance: &str,
    prefix: &str,
    state_dir: &str,
    net: u8,
) -> anyhow::Result<Config> {
    let mut c = Config::embedded();
    c.instance = instance.into();
    c.interface_prefix = prefix.into();
    c.state_dir = state_dir.into();
    c.cgroup2 = Path::new(state_dir).join("cgroup2");
    c.audit_log = Path::new(state_dir).join("audit.log");
    c.identity.ca_dir = Path::new(state_dir).join("ca");
    c.lanes.tcp_acceleration = TcpAcceleration::Off;
    // Out of the way of the agent of the embedded defaults (and of one another).
    c.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    for (i, q) in Quadrant::ALL.iter().enumerate() {
        c.quadrants.insert(
            q.name().into(),
            QuadrantConfig::new(format!("10.{net}.{i}.0/24").parse()?),
        );
    }
    Ok(c)
}

/// A latency histogram from 1 ns to 60 s, three significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

/// Microseconds, for printing.
#[must_use]
pub fn us(ns: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "latencies far below 2^52 ns")]
    let ns = ns as f64;
    ns / 1000.0
}

/// Nanoseconds of a duration (saturating).
#[must_use]
pub fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A pinned program's (run time, run count) so far (the kernel counts them while
/// `BPF_ENABLE_STATS` is on).
pub fn stats(config: &Config, program: &str) -> anyhow::Result<(Duration, u64)> {
    let pin = config.bpffs_dir().join("progs").join(program);
    let info = ProgramInfo::from_pin(&pin).with_context(|| format!("{}", pin.display()))?;
    Ok((info.run_time(), info.run_count()))
}

/// Nanoseconds per run, nanoseconds per connection and runs per connection of a program
/// between two readings.
#[must_use]
pub fn per_run(
    before: (Duration, u64),
    after: (Duration, u64),
    connections: u32,
) -> (f64, f64, f64) {
    let time = after.0.saturating_sub(before.0).as_secs_f64() * 1e9;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let runs = after.1.saturating_sub(before.1).max(1) as f64;
    let connections = f64::from(connections.max(1));
    (time / runs, time / connections, runs / connections)
}

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
    /// the agent (its log in `<dir>/<name>.log`) and waits (up to 30 s) until it answers
    /// `status`.
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
        // The agent's log goes beside its configuration, for a run that fails.
        let log = std::fs::File::create(Path::new(dir).join(format!("{name}.log")))?;
        agent.process = Some(
            agent
                .quadrant()
                .arg("up")
                .stdout(Stdio::null())
                .stderr(log)
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

    /// Runs this benchmark's own binary with `args` in quadrant `q` as workload `bench` (the
    /// measuring workload) and reads the JSON it prints.
    pub fn measure<T: for<'de> serde::Deserialize<'de>>(
        &self,
        q: &str,
        args: &[&str],
    ) -> anyhow::Result<T> {
        let me = std::env::current_exe()?.display().to_string();
        let mut command = vec![me.as_str()];
        command.extend(args);
        let out = self
            .exec(q, "bench", &command)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("the measuring workload failed: {args:?}");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Starts this benchmark's own binary with `args` in instance `index` of quadrant `q` as
    /// `workload`, waits for it to print `listening`, and keeps it until the agent goes down.
    pub fn serve_on(
        &mut self,
        q: &str,
        index: u8,
        workload: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        let me = std::env::current_exe()?.display().to_string();
        let mut child = self
            .quadrant()
            .args(["exec", q, "--instance", &index.to_string()])
            .args(["--workload", workload, "--", &me])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "listening" {
            bail!("{args:?} in {q} instance {index} did not start");
        }
        self.servers.push(child);
        Ok(())
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
