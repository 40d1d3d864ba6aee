//! `cargo xtask setup`: brings a fresh machine to what the eBPF build and the tests need.
//!
//! Each requirement is checked first (cheap commands only), so a machine that has everything is
//! done in well under a second; what is missing is installed with progress shown.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// Debian packages: LLVM 22 for bpf-linker, libclang for bindgen (iceoryx2, the shared-memory
/// baseline of the lane benchmark), and the tools tests and benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libclang-22-dev",
    "bpftool",
    "iperf3",
    "nftables",
    "iproute2",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const NIGHTLY: &str = "nightly";

pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let mut installed = Vec::new();

    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if !missing.is_empty() {
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
    }

    if !nightly_has_rust_src() {
        println!("setup: adding rust-src to the {NIGHTLY} toolchain (eBPF build uses build-std)");
        crate::status(
            Command::new("rustup").args([
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
            "rustup toolchain install",
        )?;
        installed.push("rust-src for nightly".into());
    }

    if !bpf_linker_ok() {
        println!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)"
        );
        crate::status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            "cargo install bpf-linker",
        )?;
        installed.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }

    let took = start.elapsed();
    if installed.is_empty() {
        println!("setup: everything present ({:.2} s)", took.as_secs_f64());
    } else {
        println!(
            "setup: installed {} ({:.1} s)",
            installed.join(", "),
            took.as_secs_f64()
        );
    }
    Ok(())
}

fn ensure_root(what: &str) -> anyhow::Result<()> {
    let out = Command::new("id").arg("-u").output().context("id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("setup needs root to {what}; run it with sudo");
    }
    Ok(())
}

fn deb_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn nightly_has_rust_src() -> bool {
    // rustup keeps each component's files under the toolchain directory; checking the path avoids
    // starting rustup (which may try to sync a toolchain) on every run.
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return false };
    if !out.status.success() {
        return false;
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}
