//! A running quadrant agent for one test: its own instance name, interface prefix, address pool,
//! state directory and cgroup2 mount, so tests run in parallel. Dropping it runs `quadrant down`
//! and stops every process the test started.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::bounded::{COMMAND_TIMEOUT, output_within, wait_within};
use dataplane_common::Quadrant;
use quadrant::{
    config::{Config, PolicyRule, QuadrantConfig},
    control::StatusReport,
};

/// Where test instances keep their state and cgroup2 mounts.
pub const TEST_STATE_DIR: &str = "/run/quadrant-test";
const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a binary built next to `qprobe` (same target directory and profile).
#[must_use]
pub fn sibling_binary(qprobe: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var("QUADRANT_BIN") {
        return p.into();
    }
    let path = Path::new(qprobe).with_file_name(name);
    assert!(
        path.exists(),
        "{} not found: build the agent first (`cargo build -p agent`; `cargo xtask test` does it)",
        path.display()
    );
    path
}

/// A fresh copy of the repository's policies/ under the test state directory, for tests that
/// edit the policy of a running agent.
///
/// # Panics
/// If the copy fails.
#[must_use]
pub fn copy_of_policies(instance: &str) -> PathBuf {
    let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{instance}-policies"));
    let _ = std::fs::remove_dir_all(&dir);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let status = Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(&dir)
        .status()
        .expect("cp");
    assert!(status.success(), "cannot copy {}", src.display());
    dir
}

/// How many test instances can run at once: `qt0` … `qt63`, prefixes 10.241.0.0/24 …
/// 10.241.255.0/24.
pub const SLOTS: u8 = 64;

/// Takes a slot no test of this process or of another one holds: an exclusive lock on
/// `<TEST_STATE_DIR>/slots/<n>`, kept until the process exits (the kernel drops it then, also
/// after a crash).
///
/// # Panics
/// If every slot is taken.
#[must_use]
pub fn take_slot() -> u8 {
    use nix::fcntl::{Flock, FlockArg};
    static HELD: Mutex<Vec<Flock<std::fs::File>>> = Mutex::new(Vec::new());
    let dir = PathBuf::from(TEST_STATE_DIR).join("slots");
    std::fs::create_dir_all(&dir).expect("slot directory");
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for n in 0..SLOTS {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(n.to_string()))
            .expect("slot file");
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            held.push(lock);
            return n;
        }
    }
    panic!("all {SLOTS} test slots are taken");
}

/// The configuration of a test instance in a slot of its own ([`take_slot`]): instance `qt<n>`,
/// prefixes 10.241.(4n+i).0/24, everything under [`TEST_STATE_DIR`].
#[must_use]
pub fn test_config(policy: Option<Vec<PolicyRule>>) -> Config {
    config_in_slot(take_slot(), policy)
}

fn config_in_slot(n: u8, policy: Option<Vec<PolicyRule>>) -> Config {
    let mut c = Config::embedded();
    c.instance = format!("qt{n}");
    c.interface_prefix = format!("qt{n}");
    c.state_dir = TEST_STATE_DIR.into();
    c.cgroup2 = PathBuf::from(TEST_STATE_DIR).join(format!("qt{n}-cgroup2"));
    for (i, q) in Quadrant::ALL.iter().enumerate() {
        let third = u16::from(n) * 4 + u16::try_from(i).unwrap_or(0);
        let prefix = format!("10.241.{third}.0/24").parse().expect("prefix");
        c.quadrants
            .insert(q.name().to_owned(), QuadrantConfig::new(prefix));
    }
    if let Some(p) = policy {
        c.policy = p;
    }
    // Tests that need the acceleration turn it on; the others keep to the stack, where tc
    // decides every packet, whatever this machine measures.
    c.lanes.tcp_acceleration = quadrant::config::TcpAcceleration::Off;
    c.identity.ca_dir = PathBuf::from(TEST_STATE_DIR).join(format!("qt{n}-ca"));
    c.audit_log = PathBuf::from(TEST_STATE_DIR).join(format!("qt{n}-audit.log"));
    // Metrics on a port of the kernel's choosing (`StatusReport::metrics`): tests run side by
    // side, and beside an agent of the embedded defaults.
    c.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    c.validate().expect("test config is valid");
    // A slot starts without the records of the test that held it before (which may have
    // tampered with them on purpose) and without its plan generations.
    let _ = std::fs::remove_file(&c.audit_log);
    let _ = std::fs::remove_file(quadrant::audit::head_path(&c.audit_log));
    let _ = std::fs::remove_file(quadrant::daemon::state::generations_path(&c));
    let _ = std::fs::remove_file(quadrant::pods::record_path(&c));
    let _ = std::fs::remove_dir_all(quadrant::pods::pending_dir(&c.socket_path()));
    c
}

/// A running agent.
#[derive(Debug)]
pub struct Instance {
    /// Its configuration.
    pub config: Config,
    /// The config file passed to the agent.
    pub config_path: PathBuf,
    /// The `quadrant` binary.
    pub bin: PathBuf,
    /// The `qprobe` binary.
    pub qprobe: String,
    agent: Option<Child>,
    agent_stdout: Arc<Mutex<String>>,
    agent_stderr: Arc<Mutex<String>>,
    background: Vec<Child>,
    /// The network namespace the agent runs in (standing in for another host); none: the
    /// test's own.
    netns: Option<String>,
}

impl Instance {
    /// Writes `config`, starts `quadrant up` and waits until the control socket answers.
    ///
    /// # Panics
    /// If the agent exits or does not answer within the timeout.
    #[must_use]
    pub fn up(config: Config, qprobe: &str) -> Self {
        Self::up_in(config, qprobe, None)
    }

    /// [`Self::up`] with the agent in network namespace `netns` (`/run/netns/<netns>`), entered
    /// with `nsenter --net`, which leaves `/sys` and the other mounts as they are.
    ///
    /// # Panics
    /// If the agent exits or does not answer within the timeout.
    #[must_use]
    pub fn up_in(config: Config, qprobe: &str, netns: Option<&str>) -> Self {
        let mut inst = Self::written(config, qprobe, netns);
        // Leftovers of an earlier aborted run of the same instance.
        let _ = inst.quadrant(&["down"]);
        inst.start_agent();
        inst
    }

    /// The instance with its configuration file written, no agent started.
    fn written(config: Config, qprobe: &str, netns: Option<&str>) -> Self {
        let bin = sibling_binary(qprobe, "quadrant");
        std::fs::create_dir_all(TEST_STATE_DIR).expect("state dir");
        let config_path = PathBuf::from(TEST_STATE_DIR).join(format!("{}.yaml", config.instance));
        std::fs::write(&config_path, serde_yaml::to_string(&config).expect("yaml"))
            .expect("write config");
        Self {
            config,
            config_path,
            bin,
            qprobe: qprobe.to_owned(),
            agent: None,
            agent_stdout: Arc::default(),
            agent_stderr: Arc::default(),
            background: Vec::new(),
            netns: netns.map(str::to_owned),
        }
    }

    /// An agent something else runs (a container), seen through `config` (this host's view of
    /// its paths): writes the configuration file and waits until `check` holds — it returns
    /// what went wrong otherwise (the agent's log, say) — and the control socket answers.
    /// Dropping it runs `quadrant down`, which ends that agent.
    ///
    /// # Panics
    /// If the socket does not answer within the timeout.
    #[must_use]
    pub fn attach(config: Config, qprobe: &str, check: impl Fn() -> Result<(), String>) -> Self {
        let inst = Self::written(config, qprobe, None);
        let start = Instant::now();
        while !inst.quadrant(&["status"]).status.success() {
            if let Err(why) = check() {
                panic!("the agent is not running: {why}");
            }
            assert!(
                start.elapsed() < UP_TIMEOUT,
                "agent did not answer within {UP_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
        inst
    }

    /// Starts `quadrant up` on this instance's configuration (without cleaning up first, so it
    /// takes over a kept dataplane) and waits until the control socket answers.
    ///
    /// # Panics
    /// If the agent exits or does not answer within the timeout.
    pub fn start_agent(&mut self) {
        let inst = self;
        let mut command = match &inst.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(&inst.bin);
                c
            }
            None => Command::new(&inst.bin),
        };
        let mut child = command
            .arg("--config")
            .arg(&inst.config_path)
            .arg("up")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn quadrant up");
        // Drain stderr (the agent's log) so a full pipe never blocks the agent; kept for failures.
        let log = Arc::clone(&inst.agent_stderr);
        let stderr = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        let out = Arc::clone(&inst.agent_stdout);
        let stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                thread::sleep(Duration::from_millis(100));
                panic!("quadrant up exited with {status}: {}", inst.agent_log());
            }
            if inst.quadrant(&["status"]).status.success() {
                break;
            }
            assert!(
                start.elapsed() < UP_TIMEOUT,
                "agent did not answer within {UP_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        inst.agent = Some(child);
    }

    /// `quadrant down --keep-dataplane`, then waits for the agent to exit; returns the command's
    /// output. Background processes keep running.
    ///
    /// # Panics
    /// If the agent does not exit.
    pub fn stop_keeping_dataplane(&mut self) -> Output {
        let out = self.quadrant(&["down", "--keep-dataplane"]);
        if let Some(mut agent) = self.agent.take() {
            let status = Self::wait_for_agent_exit(&mut agent);
            assert!(status.success(), "agent exited with {status}");
        }
        out
    }

    /// Adds a global deny of `from` -> `to` to the policies in `policies` (the agent's
    /// `policy_dir`) and reloads them.
    ///
    /// # Panics
    /// If the files cannot be written or the reload fails.
    pub fn deny_and_reload(&self, policies: &Path, from: &str, to: &str) {
        let global = policies.join("runtime/global.rego");
        let rego = std::fs::read_to_string(&global).expect("read global.rego");
        let deny = format!(
            "\ndeny contains {{\"from\": \"{from}\", \"to\": \"{to}\", \"reason\": \"revoked\"}}\n"
        );
        std::fs::write(&global, format!("{rego}{deny}")).expect("write global.rego");
        let reload = self.quadrant(&["policy", "reload"]);
        assert!(reload.status.success(), "{reload:?}");
    }

    /// The agent's process id.
    ///
    /// # Panics
    /// If the agent is not running.
    #[must_use]
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("the agent runs").id()
    }

    /// What the agent logged so far (stderr).
    #[must_use]
    pub fn agent_log(&self) -> String {
        self.agent_stderr.lock().expect("lock").clone()
    }

    /// What `quadrant up` printed so far.
    #[must_use]
    pub fn agent_stdout(&self) -> String {
        self.agent_stdout.lock().expect("lock").clone()
    }

    /// Runs `quadrant --config <file> ARGS…`.
    #[must_use]
    pub fn quadrant(&self, args: &[&str]) -> Output {
        self.bounded(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config_path)
                .args(args)
                .stdin(Stdio::null()),
        )
    }

    /// Runs `command` for at most [`COMMAND_TIMEOUT`]; a hang fails the test with the stacks
    /// of the command and of the agent.
    #[must_use]
    pub fn bounded(&self, command: &mut Command) -> Output {
        self.bounded_for(command, COMMAND_TIMEOUT)
    }

    /// [`Self::bounded`] with a limit of its own.
    #[must_use]
    pub fn bounded_for(&self, command: &mut Command, limit: Duration) -> Output {
        let agent: Vec<u32> = self.agent.iter().map(Child::id).collect();
        output_within(command, limit, &agent)
    }

    /// Waits for the agent to exit after a `down`, for at most [`COMMAND_TIMEOUT`].
    fn wait_for_agent_exit(agent: &mut Child) -> std::process::ExitStatus {
        wait_within(agent, COMMAND_TIMEOUT, "the agent after `down`", &[])
    }

    /// `quadrant status --output json`.
    ///
    /// # Panics
    /// If the agent does not answer.
    #[must_use]
    pub fn status(&self) -> StatusReport {
        let out = self.quadrant(&["status", "--output", "json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// The counter of (hook, quadrant, reason) from the status report, 0 if absent.
    #[must_use]
    pub fn counter(&self, hook: &str, quadrant: Quadrant, reason: &str) -> u64 {
        self.status()
            .counters
            .iter()
            .filter(|c| c.hook == hook && c.quadrant == quadrant.name() && c.reason == reason)
            .map(|c| c.count)
            .sum()
    }

    /// Runs `qprobe ARGS…` inside quadrant `q` and returns (success, first stdout line).
    #[must_use]
    pub fn probe(&self, q: Quadrant, args: &[&str]) -> (bool, String) {
        self.probe_as(q, None, args)
    }

    /// Runs `qprobe ARGS…` inside quadrant `q` as `workload` and returns (success, first stdout
    /// line).
    #[must_use]
    pub fn probe_as(&self, q: Quadrant, workload: Option<&str>, args: &[&str]) -> (bool, String) {
        let mut exec = vec!["exec", q.name()];
        if let Some(w) = workload {
            exec.extend(["--workload", w]);
        }
        exec.extend(["--", &self.qprobe]);
        let out = self.bounded(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config_path)
                .args(exec)
                .args(args)
                .stdin(Stdio::null()),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().next().unwrap_or_default().to_owned();
        assert!(
            line.starts_with("ok") || line.starts_with("err"),
            "qprobe {args:?} in {}: no outcome line; stderr: {}",
            q.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), line)
    }

    /// Starts `qprobe ARGS…` in quadrant `q` in the background and waits for it to print
    /// `listening`. Later lines are returned through the receiver.
    ///
    /// # Panics
    /// If the server exits before it listens.
    pub fn serve(&mut self, q: Quadrant, args: &[&str]) -> std::sync::mpsc::Receiver<String> {
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config_path)
            .args(["exec", q.name(), "--", &self.qprobe])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn server");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(
            first,
            "listening",
            "server {args:?} in {} did not start",
            q.name()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.background.push(child);
        rx
    }

    /// Starts `ARGV…` inside quadrant `q` (as `workload`) in the background and waits for a
    /// stdout line starting with `ready`; that line and later ones come through the receiver.
    /// The process is killed when the instance goes down.
    ///
    /// # Panics
    /// If the process ends before printing `ready`.
    pub fn background_in(
        &mut self,
        q: Quadrant,
        workload: Option<&str>,
        argv: &[&str],
        ready: &str,
    ) -> (u32, std::sync::mpsc::Receiver<String>) {
        self.background_on(q, 0, workload, argv, ready)
    }

    /// [`Self::background_in`] in instance `index` of quadrant `q`.
    ///
    /// # Panics
    /// If the process ends before printing `ready`.
    pub fn background_on(
        &mut self,
        q: Quadrant,
        index: u8,
        workload: Option<&str>,
        argv: &[&str],
        ready: &str,
    ) -> (u32, std::sync::mpsc::Receiver<String>) {
        let index = index.to_string();
        let mut exec = vec!["exec", q.name(), "--instance", &index];
        if let Some(w) = workload {
            exec.extend(["--workload", w]);
        }
        exec.push("--");
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config_path)
            .args(exec)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn background process");
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (tx, rx) = std::sync::mpsc::channel();
        loop {
            let line = lines.next().and_then(Result::ok);
            let Some(line) = line else {
                panic!("{argv:?} in {} ended before printing {ready:?}", q.name());
            };
            let found = line.starts_with(ready);
            let _ = tx.send(line);
            if found {
                break;
            }
        }
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.background.push(child);
        (pid, rx)
    }

    /// Starts `qprobe ARGS…` in instance `index` of quadrant `q` in the background and waits for
    /// it to print `listening`; returns its pid (killed when the instance goes down).
    ///
    /// # Panics
    /// If the server exits before it listens.
    pub fn serve_on_instance(&mut self, q: Quadrant, index: u8, args: &[&str]) -> u32 {
        let probe = self.qprobe.clone();
        let mut command = vec![probe.as_str()];
        command.extend(args);
        // Its later lines are not read: a `qprobe` server prints none after `listening`.
        self.background_on(q, index, None, &command, "listening").0
    }

    /// Runs `ARGV…` inside quadrant `q` as `workload` and waits for it.
    #[must_use]
    pub fn run_in(&self, q: Quadrant, workload: Option<&str>, argv: &[&str]) -> Output {
        let mut exec = vec!["exec", q.name()];
        if let Some(w) = workload {
            exec.extend(["--workload", w]);
        }
        exec.push("--");
        self.bounded(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&self.config_path)
                .args(exec)
                .args(argv)
                .stdin(Stdio::null()),
        )
    }

    /// The address of quadrant `q` inside its namespace.
    #[must_use]
    pub fn addr(&self, q: Quadrant) -> String {
        self.config.addrs(q).workload.to_string()
    }

    /// Runs `quadrant down` and waits for the agent to exit; returns the `down` output.
    ///
    /// # Panics
    /// If the agent does not exit.
    pub fn down(&mut self) -> Output {
        for mut c in self.background.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let out = self.quadrant(&["down"]);
        if let Some(mut agent) = self.agent.take() {
            let status = Self::wait_for_agent_exit(&mut agent);
            assert!(status.success(), "agent exited with {status}");
        }
        out
    }

    /// Kills the agent with SIGKILL, as a crash would, leaving its pins and namespaces.
    pub fn crash(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        for mut c in self.background.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.quadrant(&["down"]);
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// An upstream root CA (PEM files in `dir`) that agents' CAs chain to (`identity.upstream`).
///
/// # Panics
/// When it cannot be made or written.
#[must_use]
pub fn upstream_ca(dir: &Path) -> quadrant::config::UpstreamConfig {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256,
    };
    std::fs::create_dir_all(dir).expect("upstream dir");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name
        .push(DnType::CommonName, "quadrant test upstream");
    let cert = p.self_signed(&key).expect("self-signed");
    let (cert_path, key_path) = (dir.join("root.pem"), dir.join("root.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    quadrant::config::UpstreamConfig {
        cert: cert_path,
        key: key_path,
    }
}

/// `qprobe tcp-spread`'s (or `udp-spread`'s) `ok peer=VIP:PORT a=N b=M` (or `from=`) → (peer,
/// address → count).
#[must_use]
pub fn spread(line: &str) -> (String, std::collections::BTreeMap<String, u32>) {
    let mut parts = line.split_whitespace().skip(1);
    let peer = parts
        .next()
        .and_then(|p| p.strip_prefix("peer=").or_else(|| p.strip_prefix("from=")))
        .unwrap_or_default()
        .to_owned();
    let counts = parts
        .filter_map(|p| p.split_once('='))
        .map(|(a, n)| (a.to_owned(), n.parse().unwrap_or(0)))
        .collect();
    (peer, counts)
}
