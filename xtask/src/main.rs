//! `cargo xtask …`: the project's developer tasks.
//!
//! | task | what it does |
//! |---|---|
//! | `setup` | installs what a fresh machine lacks for the eBPF build and the tests (idempotent) |
//! | `run` | setup, build, `quadrant up` with the embedded defaults |
//! | `test` | setup, fmt check, clippy, every test tier (unit, `BPF_PROG_TEST_RUN` fixtures, namespaces) |
//! | `verifier` | loads every program and prints the kernel's verified instruction counts |
//! | `bench datapath`, `bench policy`, `bench lanes`, `bench slo`, `bench scale [capacity]`, `bench chaos` | the benchmarks (benches/) |
//! | `deploy render --out DIR`, `deploy image`, `deploy node [--root DIR]` | Kubernetes manifests (deploy/), the agent's container image, or the agent installed on this host |
//! | `fuzz [SECONDS]` | cargo-fuzz on the plan parser, the envelope decoder and the lane frame decoders (fuzz/) |
//!
//! Deliberately free of the agent crate: `setup` must run before the eBPF toolchain exists.

mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "quadrant developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what this machine lacks: the pinned eBPF toolchain, its LLVM, bpf-linker, test tools.
    Setup,
    /// Set up, build, and run `quadrant up` with the embedded defaults (foreground).
    Run {
        /// Arguments passed to `quadrant up` (for example `--config FILE`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then run formatting and lint checks and every test tier.
    Test {
        /// Extra arguments for `cargo nextest run` (a test name filter, `--no-capture`, …).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Load every eBPF program and print its verified instruction count.
    Verifier,
    /// Fuzz the plan parser, the envelope decoder and the lane frame decoders with cargo-fuzz
    /// (installed if missing).
    Fuzz {
        /// Seconds per target.
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
    /// Deploy: `render --out DIR` writes the Kubernetes manifests (Namespace, RBAC, ConfigMap,
    /// DaemonSet, metrics Service, kustomization); `node [--root DIR]` builds the release
    /// binaries and installs them, the systemd unit and a configuration on this host.
    Deploy {
        /// `render` or `node`, and their arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a benchmark: `datapath`, `policy`, `lanes`, `slo`, `scale` or `chaos`; arguments
    /// after the name go to the benchmark (`scale capacity`: the capacity search alone).
    Bench {
        /// Which benchmark.
        name: String,
        /// The benchmark's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Run { args } => {
            setup::run()?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "agent",
                "--bin",
                "quadrant",
            ])?;
            let mut cmd = Command::new(workspace_root().join("target/release/quadrant"));
            cmd.args(&args).arg("up");
            status(&mut cmd, "quadrant up")
        }
        Task::Test { args } => test(&args),
        Task::Fuzz { seconds } => {
            setup::run()?;
            let have = Command::new("cargo")
                .args(["fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                step("installing cargo-fuzz");
                cargo(&["install", "cargo-fuzz", "--locked"])?;
            }
            for target in ["plan_parser", "envelope_decoder", "lane_frames"] {
                step(&format!("fuzzing {target} for {seconds} s"));
                let pin = toolchain::Pin::read(&workspace_root())?;
                let mut cmd = toolchain::rustup_run(&pin.channel, "cargo");
                cmd.args([
                    "fuzz",
                    "run",
                    target,
                    "--",
                    &format!("-max_total_time={seconds}"),
                ])
                .current_dir(workspace_root().join("fuzz"));
                status(&mut cmd, &format!("cargo fuzz run {target}"))?;
            }
            Ok(())
        }
        Task::Verifier => {
            setup::run()?;
            cargo(&[
                "run",
                "--quiet",
                "--package",
                "agent",
                "--bin",
                "quadrant",
                "--",
                "verifier",
            ])
        }
        Task::Bench { name, args } => {
            setup::run()?;
            bench(&name, &args)
        }
        Task::Deploy { args } => deploy(&args),
    }
}

/// `cargo xtask deploy …`: `node` and `image` build the agent's release binaries first and take
/// them from `target/release`; all run `quadrant-deploy` (deploy/).
fn deploy(args: &[String]) -> anyhow::Result<()> {
    let mut args = args.to_vec();
    if matches!(args.first().map(String::as_str), Some("node" | "image")) {
        setup::run()?;
        cargo(&["build", "--release", "--package", "agent", "--bins"])?;
        if args[0] == "image" && !args.iter().any(|a| a.starts_with("--work-dir")) {
            args.push("--work-dir".into());
            args.push(workspace_root().join("target/image").display().to_string());
        }
        args.push("--bin-dir".into());
        args.push(
            workspace_root()
                .join("target/release")
                .display()
                .to_string(),
        );
    }
    let mut run = vec![
        "run",
        "--quiet",
        "--package",
        "deploy",
        "--bin",
        "quadrant-deploy",
        "--",
    ];
    run.extend(args.iter().map(String::as_str));
    cargo(&run)
}

/// `cargo xtask bench NAME [ARGS…]`: builds what the benchmark runs (the agent's binaries, and
/// the test helpers for `datapath`), then runs it (release) with ARGS.
fn bench(name: &str, args: &[String]) -> anyhow::Result<()> {
    let with_test_helpers = match name {
        "datapath" => true,
        "policy" | "lanes" | "slo" | "scale" | "chaos" => false,
        other => {
            bail!(
                "unknown benchmark {other:?}; available: datapath, policy, lanes, slo, scale, chaos"
            )
        }
    };
    let mut build = vec![
        "build",
        "--release",
        "--package",
        "agent",
        "--package",
        "quadrant-lanes",
    ];
    if with_test_helpers {
        build.extend(["--package", "tests"]);
    }
    build.push("--bins");
    cargo(&build)?;
    let mut run = vec![
        "run",
        "--release",
        "--quiet",
        "--package",
        "benches",
        "--bin",
        name,
        "--",
    ];
    run.extend(args.iter().map(String::as_str));
    cargo(&run)
}

/// `cargo xtask test`: setup, formatting, lints, the verifier report and every test tier.
fn test(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    warn_when_disk_is_short();
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--", "--check"])?;
    step("cargo clippy -D warnings");
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    step("cargo clippy -D warnings (dataplane-ebpf, bpfel target)");
    ebpf_cargo(&[
        "clippy",
        "--package",
        "dataplane-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ])?;
    step("cargo build (agent and test helpers)");
    cargo(&[
        "build",
        "--package",
        "agent",
        "--package",
        "quadrant-lanes",
        "--package",
        "tests",
        "--bins",
    ])?;
    step("verifier report");
    status(
        Command::new(workspace_root().join("target/debug/quadrant")).arg("verifier"),
        "quadrant verifier",
    )?;
    step("cargo nextest run (unit, BPF_PROG_TEST_RUN fixtures, network namespaces)");
    cargo_test(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Free space a full test build needs: the debug build with line tables (every test binary and
/// the eBPF objects) took 3.3 GiB here; the clippy target directories and a margin make 5.
const TEST_BUILD_BYTES: u64 = 5 << 30;

/// A full disk shows up as a linker killed by SIGBUS in the middle of the build; say it up front.
fn warn_when_disk_is_short() {
    let root = workspace_root();
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(&root)
        .output();
    let Some(avail) = out.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
    }) else {
        return;
    };
    if avail < TEST_BUILD_BYTES {
        println!(
            "warning: {} has {} MiB free; a full test build needs about {} MiB (a full disk makes \
             the linker die with a bus error)",
            root.display(),
            avail >> 20,
            TEST_BUILD_BYTES >> 20
        );
    }
}

fn step(what: &str) {
    println!("==> {what}");
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(ToOwned::to_owned)
        .unwrap_or_default()
}

/// cargo of the host toolchain (the workspace's rust-version, installed by setup).
fn host_cargo() -> anyhow::Result<Command> {
    let host = toolchain::host_channel(&workspace_root())?;
    let mut cmd = toolchain::rustup_run(&host, "cargo");
    cmd.current_dir(workspace_root());
    Ok(cmd)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = host_cargo()?;
    cmd.args(args);
    status(&mut cmd, &format!("cargo {}", args.join(" ")))
}

/// Runs `cargo nextest run ARGS`, echoing its output, and closes with one summary line over all
/// test binaries: `N passed, M failed` (timed-out tests count as failed).
fn cargo_test(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut cmd = host_cargo()?;
    cmd.args(["nextest", "run"])
        .args(args)
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("cannot start cargo nextest")?;
    let mut counts = None;
    for line in BufReader::new(child.stderr.take().context("cargo nextest stderr")?).lines() {
        let line = line?;
        eprintln!("{line}");
        counts = summary_counts(&line).or(counts);
    }
    let st = child.wait()?;
    let (passed, failed) = counts.unwrap_or_default();
    println!("{passed} passed, {failed} failed");
    if !st.success() {
        bail!("cargo nextest run failed ({st})");
    }
    Ok(())
}

/// (passed, failed or timed out) from nextest's closing line, e.g. `Summary [  69.3s] 211 tests
/// run: 209 passed, 1 failed, 1 timed out, 0 skipped`.
fn summary_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim_start().strip_prefix("Summary")?;
    let (_, counts) = rest.split_once("run:")?;
    let (mut passed, mut failed) = (0, 0);
    for part in counts.split(',') {
        let part = part.trim();
        let Some((n, what)) = part.split_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        if what.starts_with("passed") {
            passed += n;
        } else if what.starts_with("failed") || what.starts_with("timed out") {
            failed += n;
        }
    }
    Some((passed, failed))
}

/// Runs cargo of the pinned eBPF toolchain (the eBPF crate needs build-std).
fn ebpf_cargo(args: &[&str]) -> anyhow::Result<()> {
    let pin = toolchain::Pin::read(&workspace_root())?;
    let mut cmd = toolchain::rustup_run(&pin.channel, "cargo");
    cmd.args(args).current_dir(workspace_root());
    status(
        &mut cmd,
        &format!("cargo +{} {}", pin.channel, args.join(" ")),
    )
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::summary_counts;

    #[test]
    fn nextest_summaries_count_timeouts_as_failures() {
        assert_eq!(
            summary_counts("     Summary [  69.333s] 211 tests run: 211 passed, 0 skipped"),
            Some((211, 0))
        );
        assert_eq!(
            summary_counts(
                "     Summary [ 300.1s] 211 tests run: 208 passed, 2 failed, 1 timed out, 0 skipped"
            ),
            Some((208, 3))
        );
        assert_eq!(summary_counts("        PASS [   0.2s] tests::x y"), None);
    }
}
