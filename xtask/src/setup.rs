//! `cargo xtask setup`: brings a fresh machine to what the eBPF build, the tests and the
//! benchmarks need.
//!
//! The host toolchain is the workspace's `rust-version` (`toolchain::host_channel`): setup
//! installs it with clippy and rustfmt, and every cargo command xtask runs uses it.
//!
//! The eBPF toolchain comes from one place, `dataplane-ebpf/rust-toolchain.toml` (read through
//! `toolchain`, as `agent/build.rs` reads it): setup installs exactly that dated nightly with
//! its components (never touching the user's `nightly`), asks it for its LLVM major, installs
//! that LLVM from Debian and bpf-linker built against it, and stops before any build if the
//! bpf-linker on `PATH` still speaks another LLVM. Each requirement is checked first with cheap
//! probes, so a machine that has everything is done in well under a second.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use toolchain::{BPF_LINKER_VERSION, Pin};

/// Debian packages the tests and benchmarks use besides LLVM: bpftool (pinned-map checks),
/// iperf3 and nftables (datapath benchmark), iproute2 (namespaces, veths), the CNI reference
/// plugins (`/usr/lib/cni`: `ptp` and `host-local` before `quadrant-cni` in the chaining tests),
/// and what builds and runs the agent's container image: debootstrap (its Debian base), podman
/// (the import, and the DaemonSet's containers in the image test) and runc (podman's runtime
/// there: crun refuses a host with both cgroup hierarchies mounted).
const TOOL_PACKAGES: &[&str] = &[
    "bpftool",
    "iperf3",
    "nftables",
    "iproute2",
    "containernetworking-plugins",
    "debootstrap",
    "podman",
    "runc",
];

/// Where the Debian `prometheus` package is unpacked (not installed: installing it would start
/// a Prometheus server on the machine): `usr/bin/prometheus` scrapes a test agent and
/// `usr/bin/promtool` checks the metrics and the shipped rules.
pub const PROMETHEUS_TOOLS: &str = "target/tools/prometheus";

/// The Python virtual environment of the test clients written in other languages, below the
/// workspace's `target/`.
pub const PYTHON_ENV: &str = "target/pyenv";
/// What it holds: gRPC C-core (grpcio) with the protobuf compiler plugin for stubs from the
/// published workload.proto, py-spiffe, the SPIFFE project's Python client library, and
/// kubernetes-validate, which checks the rendered manifests against the Kubernetes schemas.
const PYTHON_REQUIREMENTS: &[&str] = &[
    "grpcio==1.85.3",
    "grpcio-tools==1.85.1",
    "spiffe==0.3.2",
    "kubernetes-validate==1.37.0",
];
/// The Workload API definition the Python stubs are generated from.
const WORKLOAD_PROTO: &str = "agent/proto/workload.proto";
/// Records what the environment was made from; a different record remakes it.
const PYTHON_STAMP: &str = "quadrant-requirements.txt";

pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let root = crate::workspace_root();
    let pin = Pin::read(&root)?;
    let mut installed = Vec::new();

    let host = toolchain::host_channel(&root)?;
    ensure_toolchain(
        &host,
        &["clippy".to_owned(), "rustfmt".to_owned()],
        None,
        "the host toolchain (the workspace's rust-version)",
        &mut installed,
    )?;
    ensure_toolchain(
        &pin.channel,
        &pin.components,
        pin.profile.as_deref(),
        &format!("the eBPF toolchain pinned in {}", toolchain::PIN_FILE),
        &mut installed,
    )?;
    let llvm = toolchain::rustc_llvm_major(&pin.channel)?;
    ensure_debian_packages(llvm, &mut installed)?;
    ensure_bpf_linker(&host, llvm, &mut installed)?;
    ensure_nextest(&host, &mut installed)?;
    ensure_prometheus_tools(&root, &mut installed)?;
    // What the build will use: the bpf-linker first on PATH, whoever installed it.
    toolchain::check_llvm(&pin)?;

    if python_env_stale(&root)? {
        println!(
            "setup: creating the Python test environment {PYTHON_ENV} ({})",
            PYTHON_REQUIREMENTS.join(" ")
        );
        make_python_env(&root)?;
        installed.push(format!("Python test environment ({PYTHON_ENV})"));
    }

    let took = start.elapsed();
    if installed.is_empty() {
        println!(
            "setup: everything present: host toolchain {host}, eBPF toolchain {} (LLVM {llvm}), \
             bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm}), cargo-nextest, test tools ({:.2} s)",
            pin.channel,
            took.as_secs_f64()
        );
    } else {
        println!(
            "setup: installed {} ({:.1} s)",
            installed.join(", "),
            took.as_secs_f64()
        );
    }
    Ok(())
}

/// Installs toolchain `channel` with `components` unless rustup has them already.
fn ensure_toolchain(
    channel: &str,
    components: &[String],
    profile: Option<&str>,
    what: &str,
    installed: &mut Vec<String>,
) -> anyhow::Result<()> {
    if toolchain_complete(channel, components) {
        return Ok(());
    }
    println!(
        "setup: installing {what}: {channel} ({})",
        components.join(", ")
    );
    crate::status(
        Command::new("rustup")
            .args(["toolchain", "install", channel, "--profile"])
            .arg(profile.unwrap_or("minimal"))
            .arg("--component")
            .arg(components.join(",")),
        "rustup toolchain install",
    )?;
    installed.push(channel.to_owned());
    Ok(())
}

/// LLVM `llvm` for bpf-linker, libclang, and the tools the tests and benchmarks use.
fn ensure_debian_packages(llvm: u32, installed: &mut Vec<String>) -> anyhow::Result<()> {
    let mut packages = vec![
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        // libclang for bindgen (iceoryx2, the shared-memory baseline of the lane benchmark).
        format!("libclang-{llvm}-dev"),
    ];
    packages.extend(TOOL_PACKAGES.iter().map(|p| (*p).to_owned()));
    if !python_has_venv() {
        packages.push("python3-venv".into());
    }
    let missing = missing_debian_packages(&packages);
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    ensure_root("install Debian packages")?;
    crate::status(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    crate::status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )?;
    installed.push(format!("Debian packages ({})", missing.join(" ")));
    Ok(())
}

/// cargo-nextest, which runs the tests (`.config/nextest.toml`: a hung test is ended, not
/// waited for), unless cargo finds it already.
fn ensure_nextest(host: &str, installed: &mut Vec<String>) -> anyhow::Result<()> {
    let present = toolchain::rustup_run(host, "cargo")
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    println!("setup: installing cargo-nextest (takes a few minutes)");
    crate::status(
        toolchain::rustup_run(host, "cargo")
            .args(["install", "cargo-nextest", "--locked"])
            .current_dir(std::env::temp_dir()),
        "cargo install cargo-nextest",
    )?;
    installed.push("cargo-nextest".to_owned());
    Ok(())
}

/// bpf-linker of the project's version built against LLVM `llvm`, unless the one on PATH is.
fn ensure_bpf_linker(host: &str, llvm: u32, installed: &mut Vec<String>) -> anyhow::Result<()> {
    if toolchain::installed_bpf_linker().as_deref() == Some(BPF_LINKER_VERSION)
        && toolchain::bpf_linker_llvm_major().ok() == Some(llvm)
    {
        return Ok(());
    }
    println!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (takes a few minutes)"
    );
    crate::status(
        toolchain::rustup_run(host, "cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}"))
            .current_dir(std::env::temp_dir()),
        "cargo install bpf-linker",
    )?;
    installed.push(format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm})"));
    Ok(())
}

/// Unpacks Debian's `prometheus` package into [`PROMETHEUS_TOOLS`] unless its `promtool` runs.
fn ensure_prometheus_tools(root: &Path, installed: &mut Vec<String>) -> anyhow::Result<()> {
    let dir = root.join(PROMETHEUS_TOOLS);
    let promtool = dir.join("usr/bin/promtool");
    let runs = Command::new(&promtool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return Ok(());
    }
    println!("setup: unpacking Debian's prometheus package into {PROMETHEUS_TOOLS}");
    let download = dir.with_extension("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    let fetch = || {
        Command::new("apt-get")
            .args(["download", "-q", "prometheus"])
            .current_dir(&download)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !fetch() {
        // A fresh machine's package lists may not know it yet.
        ensure_root("update the package lists")?;
        crate::status(
            Command::new("apt-get").args(["update", "-q"]),
            "apt-get update",
        )?;
        if !fetch() {
            bail!("apt-get download prometheus failed (see above)");
        }
    }
    let deb = std::fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let _ = std::fs::remove_dir_all(&dir);
    crate::status(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir),
        "dpkg-deb -x",
    )?;
    let _ = std::fs::remove_dir_all(&download);
    installed.push(format!("promtool and prometheus ({PROMETHEUS_TOOLS})"));
    Ok(())
}

fn ensure_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("setup needs root to {what}; run it with sudo");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The packages of `wanted` that dpkg does not list as installed (one dpkg-query for all).
fn missing_debian_packages(wanted: &[String]) -> Vec<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(wanted)
        .stderr(Stdio::null())
        .output();
    let listed = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    wanted
        .iter()
        .filter(|p| !listed.lines().any(|l| l == format!("{p} installed")))
        .cloned()
        .collect()
}

/// Whether toolchain `channel` and its components are installed, read from rustup's own
/// directory (cheaper than starting rustup, and without its side effects).
fn toolchain_complete(channel: &str, components: &[String]) -> bool {
    let home = std::env::var_os("RUSTUP_HOME").map_or_else(
        || {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".rustup")
        },
        PathBuf::from,
    );
    let Ok(entries) = std::fs::read_dir(home.join("toolchains")) else {
        return false;
    };
    let prefix = format!("{channel}-");
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with(&prefix)
            && components_present(&e.path(), components)
    })
}

fn components_present(toolchain: &Path, components: &[String]) -> bool {
    toolchain.join("bin/rustc").exists()
        && components.iter().all(|c| match c.as_str() {
            "rust-src" => toolchain
                .join("lib/rustlib/src/rust/library/core/Cargo.toml")
                .exists(),
            "clippy" => toolchain.join("bin/cargo-clippy").exists(),
            "rustfmt" => toolchain.join("bin/rustfmt").exists(),
            other => toolchain
                .join("lib/rustlib")
                .join(format!("manifest-{other}-preview"))
                .exists(),
        })
}

fn python_has_venv() -> bool {
    Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The record of what the Python environment is made from: the requirements and the proto.
fn python_stamp(root: &Path) -> anyhow::Result<String> {
    let proto = std::fs::read_to_string(root.join(WORKLOAD_PROTO))
        .with_context(|| format!("read {WORKLOAD_PROTO}"))?;
    Ok(format!("{}\n{proto}", PYTHON_REQUIREMENTS.join("\n")))
}

fn python_env_stale(root: &Path) -> anyhow::Result<bool> {
    let stamp = std::fs::read_to_string(root.join(PYTHON_ENV).join(PYTHON_STAMP));
    Ok(stamp.ok() != Some(python_stamp(root)?))
}

/// Creates the virtual environment, installs the requirements and generates the Workload API
/// stubs into `<env>/stubs`; the stamp is written last, so an interrupted run is redone.
fn make_python_env(root: &Path) -> anyhow::Result<()> {
    let env = root.join(PYTHON_ENV);
    let _ = std::fs::remove_dir_all(&env);
    crate::status(
        Command::new("python3").arg("-m").arg("venv").arg(&env),
        "python3 -m venv",
    )?;
    let python = env.join("bin/python");
    crate::status(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PYTHON_REQUIREMENTS),
        "pip install",
    )?;
    let stubs = env.join("stubs");
    std::fs::create_dir_all(&stubs).context("create the stubs directory")?;
    let proto = root.join(WORKLOAD_PROTO);
    let proto_dir = proto.parent().context("proto directory")?;
    crate::status(
        Command::new(&python)
            .args(["-m", "grpc_tools.protoc"])
            .arg(format!("--proto_path={}", proto_dir.display()))
            .arg(format!("--python_out={}", stubs.display()))
            .arg(format!("--grpc_python_out={}", stubs.display()))
            .arg(&proto),
        "grpc_tools.protoc",
    )?;
    std::fs::write(env.join(PYTHON_STAMP), python_stamp(root)?).context("write the stamp")?;
    Ok(())
}
