//! Waiting with a limit. A test that waits for a process without one turns a hang of the agent
//! or of a lane into a CI run that never ends; these waits fail the test instead, with the
//! stacks of every thread of the processes involved (read with gdb, when it is installed) so the
//! failure says where it hung.

use std::{
    fmt::Write as _,
    io::Read as _,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// How long one command of a test may run before the test fails. The longest a test runs on
/// purpose is a lane call of a few seconds; a debug-build agent answers within one.
pub const COMMAND_TIMEOUT: Duration = Duration::from_mins(1);

/// How long gdb may take to print one process's stacks.
const GDB_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `command` (stdout and stderr captured) and waits at most `limit` for it.
///
/// # Panics
/// If it cannot start, or runs longer than `limit`: then the panic carries the stacks of it,
/// its descendants and the processes in `also`, and it is killed.
#[must_use]
pub fn output_within(command: &mut Command, limit: Duration, also: &[u32]) -> Output {
    let what = format!("{command:?}");
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_output_within(child, limit, &what, also)
}

/// Waits at most `limit` for `child` and collects what it wrote to its piped stdout and stderr.
///
/// # Panics
/// As [`output_within`].
#[must_use]
pub fn wait_output_within(mut child: Child, limit: Duration, what: &str, also: &[u32]) -> Output {
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let status = wait_within(&mut child, limit, what, also);
    // A descendant that outlives the child may hold the pipes open: take what arrived by then.
    let collect = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok())
            .unwrap_or_default()
    };
    Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    }
}

/// Waits at most `limit` for `child` to exit.
///
/// # Panics
/// If it does not: with the stacks of it, its descendants and `also`; it and its descendants
/// are killed.
pub fn wait_within(child: &mut Child, limit: Duration, what: &str, also: &[u32]) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return status;
        }
        if Instant::now() >= deadline {
            let below = descendants(child.id());
            let mut pids = vec![child.id()];
            pids.extend(&below);
            pids.extend(also.iter().filter(|p| **p != child.id()));
            let report = stacks(&pids);
            let _ = child.kill();
            for pid in below {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}\n{report}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn drain(mut pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Every process below `pid`, parents before children.
#[must_use]
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The command line and the stacks of every thread of each process in `pids` (gdb, when it is
/// installed; the kernel's view of each thread otherwise).
#[must_use]
pub fn stacks(pids: &[u32]) -> String {
    let mut report = String::new();
    for &pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_or_else(
            |_| "(gone)".into(),
            |c| String::from_utf8_lossy(&c).replace('\0', " "),
        );
        let _ = writeln!(report, "--- process {pid}: {cmdline}");
        report.push_str(&gdb_stacks(pid).unwrap_or_else(|| kernel_stacks(pid)));
    }
    report
}

fn gdb_stacks(pid: u32) -> Option<String> {
    let child = Command::new("gdb")
        .args(["-batch", "-nx", "-p", &pid.to_string()])
        .args(["-ex", "thread apply all bt 30"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut child = child;
    let mut out = child.stdout.take()?;
    let rx = {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        rx
    };
    let deadline = Instant::now() + GDB_TIMEOUT;
    while child.try_wait().ok()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let text = rx.recv_timeout(Duration::from_secs(2)).ok()?;
    // Keep the thread headers and frames, not gdb's chatter about symbols.
    let mut frames = String::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("Thread ") || l.starts_with('#'))
    {
        let _ = writeln!(frames, "{l}");
    }
    (!frames.is_empty()).then_some(frames)
}

/// Each thread's name, state and kernel wait channel from /proc, when gdb cannot attach.
fn kernel_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.filter_map(Result::ok) {
        let path = task.path();
        let read = |f: &str| {
            std::fs::read_to_string(path.join(f))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let _ = writeln!(
            out,
            "thread {}: {} wchan={} {}",
            task.file_name().to_string_lossy(),
            read("comm"),
            read("wchan"),
            read("stack").replace('\n', " | ")
        );
    }
    out
}

/// [`output_within`] with [`COMMAND_TIMEOUT`], as a method of `Command`.
pub trait Bounded {
    /// Runs the command, capturing stdout and stderr, for at most [`COMMAND_TIMEOUT`].
    fn output_bounded(&mut self) -> Output;
}

impl Bounded for Command {
    fn output_bounded(&mut self) -> Output {
        output_within(self, COMMAND_TIMEOUT, &[])
    }
}
