//! `cargo xtask …`: the project's developer tasks.
//!
//! | task | what it does |
//! |---|---|
//! | `setup` | installs what a fresh machine lacks for the eBPF build and the tests (idempotent) |
//! | `run` | setup, build, `quadrant up` with the embedded defaults |
//! | `test` | setup, fmt check, clippy, every test tier (unit, `BPF_PROG_TEST_RUN` fixtures, namespaces) |
//! | `verifier` | loads every program and prints the kernel's verified instruction counts |
//! | `bench datapath`, `bench policy`, `bench lanes`, `bench slo` | the benchmarks (benches/) |
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
        /// Extra arguments for `cargo test` (a test name filter, `--nocapture`, …).
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
    /// Run a benchmark: `datapath`, `policy`, `lanes` or `slo`.
    Bench {
        /// Which benchmark.
        name: String,
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
        Task::Bench { name } => {
            setup::run()?;
            bench(&name)
        }
    }
}

/// `cargo xtask bench NAME`: builds what the benchmark runs (the agent's binaries, and the test
/// helpers for `datapath`), then runs it (release).
fn bench(name: &str) -> anyhow::Result<()> {
    let with_test_helpers = match name {
        "datapath" => true,
        "policy" | "lanes" | "slo" => false,
        other => bail!("unknown benchmark {other:?}; available: datapath, policy, lanes, slo"),
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
    cargo(&[
        "run",
        "--release",
        "--quiet",
        "--package",
        "benches",
        "--bin",
        name,
    ])
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
    step("cargo test (unit, BPF_PROG_TEST_RUN fixtures, network namespaces)");
    let mut test = vec!["test"];
    if !args.is_empty() {
        test.push("--");
        test.extend(args.iter().map(String::as_str));
    }
    cargo_test(&test)
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

/// Runs `cargo test`, echoing its output, and closes with one summary line over all test
/// binaries: `N passed, M failed`.
fn cargo_test(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut cmd = host_cargo()?;
    cmd.args(args).stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let st = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !st.success() {
        bail!("cargo test failed ({st})");
    }
    Ok(())
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
