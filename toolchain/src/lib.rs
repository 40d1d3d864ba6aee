//! The project's pinned toolchains.
//!
//! The host toolchain is the workspace's `rust-version` (1.95 → `1.95.0`): `cargo xtask` builds,
//! lints and tests with it whatever `stable` a machine has, so a newer stable's new lints or
//! formatting never fail a fresh machine's run, and the minimum version stays the one tested.
//! (Not a rust-toolchain.toml at the root: rustup no longer installs a toolchain named there by
//! itself, so the first `cargo` of a fresh machine would stop.)
//!
//! The eBPF toolchain pin and its LLVM check are shared by `cargo xtask setup` and
//! `agent/build.rs`.
//!
//! The eBPF object is built with one dated nightly, named in [`PIN_FILE`] (a rustup toolchain
//! file, so editors opened in `dataplane-ebpf/` use it too). rustc hands bpf-linker LLVM bitcode,
//! which an LLVM of an older major cannot read (`ERROR llvm: Invalid record`): the nightly's LLVM
//! major and the one bpf-linker is built against must be the same. Both are asked, never assumed:
//! `rustc -vV` prints the compiler's, and bpf-linker passes `--llvm-args=--version` to its LLVM,
//! which prints its own.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The pin, relative to the workspace root.
pub const PIN_FILE: &str = "dataplane-ebpf/rust-toolchain.toml";
/// The bpf-linker release the build uses (installed by `cargo xtask setup`).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Components the pinned toolchain needs: `rust-src` for build-std, clippy and rustfmt for the
/// checks `cargo xtask test` runs on the eBPF crate.
pub const REQUIRED_COMPONENTS: &[&str] = &["rust-src", "clippy", "rustfmt"];

/// The host toolchain: the workspace's `rust-version` as a full version (`1.95` → `1.95.0`,
/// the name rustup installs it under).
pub fn host_channel(workspace_root: &Path) -> Result<String, Error> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        workspace: Workspace,
    }
    #[derive(serde::Deserialize)]
    struct Workspace {
        package: Package,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Package {
        rust_version: String,
    }
    let path = workspace_root.join("Cargo.toml");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let manifest: Manifest = toml::from_str(&text).map_err(|e| Error::Pin {
        path: path.clone(),
        message: format!("workspace.package.rust-version: {e}"),
    })?;
    full_version(&manifest.workspace.package.rust_version).ok_or_else(|| Error::Pin {
        path,
        message: format!(
            "workspace.package.rust-version {:?} is not MAJOR.MINOR[.PATCH]",
            manifest.workspace.package.rust_version
        ),
    })
}

/// `1.95` → `1.95.0`; `1.95.1` stays.
fn full_version(v: &str) -> Option<String> {
    let parts: Vec<&str> = v.split('.').collect();
    if !(2..=3).contains(&parts.len())
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    Some(if parts.len() == 2 {
        format!("{v}.0")
    } else {
        v.to_owned()
    })
}

/// Errors of reading the pins and of the LLVM check; each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pin file could not be read.
    #[error("cannot read the eBPF toolchain pin {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The pin file is not what a pin must be.
    #[error("{path}: {message}")]
    Pin {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tool could not be run or failed.
    #[error("`{command}` failed: {detail}; run `cargo xtask setup` to install the eBPF toolchain")]
    Command {
        /// The command line.
        command: String,
        /// What happened.
        detail: String,
    },
    /// A tool ran but printed no LLVM version.
    #[error("`{command}` printed no LLVM version (it printed {output:?})")]
    NoLlvmVersion {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// The nightly and bpf-linker disagree on the LLVM major.
    #[error(
        "the eBPF toolchain {channel} (pinned in {PIN_FILE}) emits LLVM {rustc_llvm} bitcode, but \
         bpf-linker is built against LLVM {linker_llvm}, which cannot read it (`Invalid record`). \
         Run `cargo xtask setup` to install bpf-linker {BPF_LINKER_VERSION} for LLVM {rustc_llvm} \
         (or remove the other bpf-linker from PATH), or move the pin to a nightly whose LLVM is \
         {linker_llvm}"
    )]
    Mismatch {
        /// The pinned channel.
        channel: String,
        /// Its LLVM major.
        rustc_llvm: u32,
        /// bpf-linker's LLVM major.
        linker_llvm: u32,
    },
}

/// The pinned toolchain: the `[toolchain]` table of [`PIN_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Pin {
    /// A dated nightly, `nightly-YYYY-MM-DD`.
    pub channel: String,
    /// Components installed with it.
    #[serde(default)]
    pub components: Vec<String>,
    /// rustup profile.
    #[serde(default)]
    pub profile: Option<String>,
}

#[derive(serde::Deserialize)]
struct PinFile {
    toolchain: Pin,
}

impl Pin {
    /// Reads [`PIN_FILE`] below `workspace_root`.
    pub fn read(workspace_root: &Path) -> Result<Self, Error> {
        let path = workspace_root.join(PIN_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    /// Parses a pin file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let err = |message: String| Error::Pin {
            path: path.to_owned(),
            message,
        };
        let file: PinFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let pin = file.toolchain;
        if !is_dated_nightly(&pin.channel) {
            return Err(err(format!(
                "channel {:?} is not a dated nightly (nightly-YYYY-MM-DD): an undated channel \
                 moves to whatever LLVM the newest nightly has, which bpf-linker may not read",
                pin.channel
            )));
        }
        if let Some(missing) = REQUIRED_COMPONENTS
            .iter()
            .find(|c| !pin.components.iter().any(|have| have == *c))
        {
            return Err(err(format!(
                "components must include {missing} (needed: {})",
                REQUIRED_COMPONENTS.join(", ")
            )));
        }
        Ok(pin)
    }
}

fn is_dated_nightly(channel: &str) -> bool {
    let Some(date) = channel.strip_prefix("nightly-") else {
        return false;
    };
    let parts: Vec<&str> = date.split('-').collect();
    matches!(parts.as_slice(), [y, m, d]
        if y.len() == 4 && m.len() == 2 && d.len() == 2
            && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())))
}

/// The LLVM major in `rustc -vV` output (`LLVM version: 22.1.4`).
#[must_use]
pub fn llvm_major_of_rustc(verbose_version: &str) -> Option<u32> {
    verbose_version
        .lines()
        .find_map(|l| l.trim().strip_prefix("LLVM version:"))
        .and_then(major)
}

/// The LLVM major in what LLVM prints for `--version` (`Debian LLVM version 22.1.8`, `LLVM
/// version 22.1.4`).
#[must_use]
pub fn llvm_major_of_llvm(version_output: &str) -> Option<u32> {
    version_output
        .lines()
        .find_map(|l| l.split_once("LLVM version ").map(|(_, v)| v))
        .and_then(major)
}

/// The version in `bpf-linker --version` output (`bpf-linker 0.13.0`).
#[must_use]
pub fn bpf_linker_version(version_output: &str) -> Option<&str> {
    version_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("bpf-linker "))
        .map(str::trim)
}

fn major(version: &str) -> Option<u32> {
    version.trim().split('.').next()?.parse().ok()
}

fn run(cmd: &mut Command) -> Result<String, Error> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `rustup run <channel> <program>`, without the variables an outer cargo sets that would pin
/// its own compiler.
#[must_use]
pub fn rustup_run(channel: &str, program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", channel, program]);
    for var in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO"] {
        cmd.env_remove(var);
    }
    cmd
}

/// The LLVM major of the pinned toolchain's rustc.
pub fn rustc_llvm_major(channel: &str) -> Result<u32, Error> {
    let mut cmd = rustup_run(channel, "rustc");
    cmd.arg("-vV");
    let out = run(&mut cmd)?;
    llvm_major_of_rustc(&out).ok_or_else(|| Error::NoLlvmVersion {
        command: format!("rustup run {channel} rustc -vV"),
        output: out,
    })
}

/// The version of the bpf-linker on `PATH`, `None` if there is none.
#[must_use]
pub fn installed_bpf_linker() -> Option<String> {
    let out = run(Command::new("bpf-linker").arg("--version")).ok()?;
    bpf_linker_version(&out).map(ToOwned::to_owned)
}

/// The LLVM major the bpf-linker on `PATH` is built against, asked of its LLVM.
pub fn bpf_linker_llvm_major() -> Result<u32, Error> {
    // LLVM's option parser prints its version for `--version` and exits before anything is
    // linked; the input and output are placeholders the linker requires.
    let out = run(Command::new("bpf-linker").args([
        "--llvm-args=--version",
        "--output",
        "/dev/null",
        "/dev/null",
    ]))?;
    llvm_major_of_llvm(&out).ok_or_else(|| Error::NoLlvmVersion {
        command: "bpf-linker --llvm-args=--version".into(),
        output: out,
    })
}

/// Both LLVM majors, or why they cannot be used together; returns the common major.
pub fn check_llvm(pin: &Pin) -> Result<u32, Error> {
    let rustc_llvm = rustc_llvm_major(&pin.channel)?;
    let linker_llvm = bpf_linker_llvm_major()?;
    agree(&pin.channel, rustc_llvm, linker_llvm)
}

/// The decision of [`check_llvm`]: the majors must be equal.
pub fn agree(channel: &str, rustc_llvm: u32, linker_llvm: u32) -> Result<u32, Error> {
    if rustc_llvm == linker_llvm {
        Ok(rustc_llvm)
    } else {
        Err(Error::Mismatch {
            channel: channel.to_owned(),
            rustc_llvm,
            linker_llvm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "[toolchain]\nchannel = \"nightly-2026-05-19\"\n\
                       components = [\"rust-src\", \"clippy\", \"rustfmt\"]\nprofile = \"minimal\"\n";

    #[test]
    fn the_project_pin_is_a_dated_nightly_with_every_component() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let pin = Pin::read(&root).unwrap();
        assert!(is_dated_nightly(&pin.channel), "{}", pin.channel);
        for c in REQUIRED_COMPONENTS {
            assert!(pin.components.iter().any(|have| have == c), "{c}");
        }
    }

    #[test]
    fn the_host_toolchain_is_the_rust_version() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let channel = host_channel(&root).unwrap();
        assert_eq!(Some(channel), full_version(env!("CARGO_PKG_RUST_VERSION")));
        assert_eq!(full_version("1.95").as_deref(), Some("1.95.0"));
        assert_eq!(full_version("1.95.2").as_deref(), Some("1.95.2"));
        for bad in ["1", "1.x", "stable", "1.95.0.1", ""] {
            assert_eq!(full_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_pin_parses() {
        let pin = Pin::parse(PIN, Path::new("p")).unwrap();
        assert_eq!(pin.channel, "nightly-2026-05-19");
        assert_eq!(pin.profile.as_deref(), Some("minimal"));
    }

    #[test]
    fn an_undated_or_incomplete_pin_is_refused() {
        for (text, needle) in [
            (
                PIN.replace("nightly-2026-05-19", "nightly"),
                "not a dated nightly",
            ),
            (
                PIN.replace("nightly-2026-05-19", "stable"),
                "not a dated nightly",
            ),
            (
                PIN.replace("nightly-2026-05-19", "nightly-2026-5-19"),
                "not a dated nightly",
            ),
            (
                PIN.replace("nightly-2026-05-19", "nightly-2026-05-1x"),
                "not a dated nightly",
            ),
            (
                PIN.replace(", \"clippy\"", ""),
                "components must include clippy",
            ),
            (PIN.replace("[toolchain]", "[tools]"), "toolchain"),
        ] {
            let e = Pin::parse(&text, Path::new("p")).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn rustc_verbose_version_gives_the_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\ncommit-date: 2026-05-19\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major_of_rustc(vv), Some(22));
        assert_eq!(
            llvm_major_of_rustc("release: 1.101.0-nightly\nLLVM version: 23.1.4\n"),
            Some(23)
        );
        assert_eq!(llvm_major_of_rustc("release: 1.97.0\n"), None);
    }

    #[test]
    fn llvm_version_output_gives_the_major() {
        assert_eq!(
            llvm_major_of_llvm("Debian LLVM version 22.1.8\n  Optimized build.\n"),
            Some(22)
        );
        assert_eq!(
            llvm_major_of_llvm("LLVM (http://llvm.org/):\n  LLVM version 23.1.4\n"),
            Some(23)
        );
        assert_eq!(llvm_major_of_llvm("error: no input\n"), None);
    }

    #[test]
    fn bpf_linker_version_is_read() {
        assert_eq!(bpf_linker_version("bpf-linker 0.13.0\n"), Some("0.13.0"));
        assert_eq!(bpf_linker_version("something else\n"), None);
    }

    #[test]
    fn a_mismatch_names_both_llvm_versions_and_the_way_out() {
        assert_eq!(agree("nightly-2026-05-19", 22, 22).unwrap(), 22);
        let e = agree("nightly-2026-10-29", 23, 22).unwrap_err().to_string();
        for needle in [
            "nightly-2026-10-29",
            "LLVM 23",
            "LLVM 22",
            "cargo xtask setup",
            PIN_FILE,
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
