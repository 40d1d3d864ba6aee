//! `cargo xtask deploy image`: the agent's container image, the one the DaemonSet runs
//! (`quadrant:<version>`). A Debian base made by `debootstrap --variant=minbase` with
//! `iproute2` (the agent runs `ip` and `tc`; `nsenter` and `cp` come with the base) and the
//! agent's binaries in `/usr/local/bin`, imported as one layer by podman or docker — nothing is
//! pulled from a registry. The base is the build host's Debian release, so the binaries find
//! the C library they were linked against; it is made once and kept as a tarball in the work
//! directory (`target/image/`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The binaries the image holds, from the build's directory.
pub const BINARIES: [&str; 2] = ["quadrant", "quadrant-cni"];

/// Where the binaries go in the image (the DaemonSet's commands name them there).
pub const BIN_DIR_IN_IMAGE: &str = "usr/local/bin";

/// Debian's packages added to the minimal base.
const EXTRA_PACKAGES: &str = "iproute2";

/// What was left out of the base: documentation, manuals, translations, the package cache.
const TRIMMED: [&str; 5] = [
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "var/cache/apt/archives",
    "var/lib/apt/lists",
];

/// How to build the image.
#[derive(Debug, Clone)]
pub struct Options {
    /// The image's name and tag.
    pub tag: String,
    /// Where `quadrant` and `quadrant-cni` are.
    pub bin_dir: PathBuf,
    /// `podman` or `docker`; the first found if none.
    pub engine: Option<String>,
    /// The Debian release of the base; the build host's if none.
    pub suite: Option<String>,
    /// The Debian mirror debootstrap reads.
    pub mirror: String,
    /// Where the base is kept and the image's tarball made.
    pub work_dir: PathBuf,
    /// Also write the image as an archive here (`podman save`/`docker save`), for
    /// `ctr -n k8s.io images import` on nodes without a registry.
    pub save: Option<PathBuf>,
}

/// The image built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The engine that holds it.
    pub engine: String,
    /// Its tag.
    pub tag: String,
    /// Its id.
    pub id: String,
    /// The Debian release of its base.
    pub suite: String,
}

/// Builds the image.
///
/// # Errors
///
/// A binary, `debootstrap`, `tar` or the engine is missing, or one of them fails; the error
/// names which, and how to get it.
pub fn build(o: &Options) -> anyhow::Result<Built> {
    for name in BINARIES {
        let path = o.bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not found: build the agent first (cargo build --release -p agent --bins)",
                path.display()
            );
        }
    }
    let engine = match &o.engine {
        Some(e) => e.clone(),
        None => find_engine()?,
    };
    let suite = match &o.suite {
        Some(s) => s.clone(),
        None => host_suite()?,
    };
    fs::create_dir_all(&o.work_dir)
        .with_context(|| format!("cannot create {}", o.work_dir.display()))?;
    let base = base_tarball(&o.work_dir, &suite, &o.mirror)?;
    // Named after the tag and this process: builds of other tags may run at the same time.
    let scratch = format!("{}-{}", file_name_of(&o.tag), std::process::id());
    let tarball = o.work_dir.join(format!("{scratch}.tar"));
    let stage = o.work_dir.join(&scratch);
    let imported = import(&engine, &o.tag, (&base, &tarball), (&o.bin_dir, &stage));
    // The scratch files go whether the import worked or not (the tarball is the base's size).
    let _ = fs::remove_file(&tarball);
    let _ = fs::remove_dir_all(&stage);
    imported?;
    let id = output(
        Command::new(&engine).args(["image", "inspect", "--format", "{{.Id}}", &o.tag]),
        &format!("{engine} image inspect"),
    )?;
    if let Some(to) = &o.save {
        let mut save = Command::new(&engine);
        save.arg("save");
        if engine_is_podman(&engine) {
            save.args(["--format", "oci-archive"]);
        }
        run(
            save.arg("--output").arg(to).arg(&o.tag),
            &format!("{engine} save"),
        )?;
    }
    Ok(Built {
        engine,
        tag: o.tag.clone(),
        id: id.trim().to_owned(),
        suite,
    })
}

/// Copies the base to `tarball`, adds the binaries of `bin_dir` (staged in `stage`) and imports
/// it as `tag`.
fn import(
    engine: &str,
    tag: &str,
    (base, tarball): (&Path, &Path),
    (bin_dir, stage): (&Path, &Path),
) -> anyhow::Result<()> {
    fs::copy(base, tarball).with_context(|| format!("cannot copy {}", base.display()))?;
    append_binaries(tarball, bin_dir, stage)?;
    let version = env!("CARGO_PKG_VERSION");
    run(
        Command::new(engine)
            .arg("import")
            .args([
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENTRYPOINT [\"/usr/local/bin/quadrant\"]",
                "--change",
                "CMD [\"up\"]",
                "--change",
                &format!("LABEL org.opencontainers.image.version={version}"),
                "--change",
                "LABEL org.opencontainers.image.title=quadrant",
            ])
            .arg(tarball)
            .arg(tag),
        &format!("{engine} import"),
    )
}

/// `tag` with every character but letters, digits, `.` and `-` made `_`.
fn file_name_of(tag: &str) -> String {
    tag.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn engine_is_podman(engine: &str) -> bool {
    Path::new(engine).file_name().is_some_and(|n| n == "podman")
}

/// podman, else docker, from `PATH`.
fn find_engine() -> anyhow::Result<String> {
    for engine in ["podman", "docker"] {
        if which(engine).is_some() {
            return Ok(engine.to_owned());
        }
    }
    bail!(
        "neither podman nor docker was found: install one (Debian: apt-get install podman), or \
         name one with --engine"
    )
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// The build host's Debian release (`VERSION_CODENAME` of `/etc/os-release`).
fn host_suite() -> anyhow::Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("cannot read /etc/os-release")?;
    suite_of(&text).context(
        "this host's /etc/os-release names no Debian release (VERSION_CODENAME): name one \
         with --suite (the binaries need a C library as new as the one they were built with)",
    )
}

fn suite_of(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|line| {
        line.strip_prefix("VERSION_CODENAME=")
            .map(|v| v.trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
    })
}

/// The minimal Debian base as a tarball, made by debootstrap the first time.
fn base_tarball(work: &Path, suite: &str, mirror: &str) -> anyhow::Result<PathBuf> {
    let tarball = work.join(format!("base-{suite}-minbase-{EXTRA_PACKAGES}.tar"));
    if tarball.is_file() {
        return Ok(tarball);
    }
    if which("debootstrap").is_none() && !Path::new("/usr/sbin/debootstrap").is_file() {
        bail!(
            "debootstrap not found: `cargo xtask setup` installs it (Debian package debootstrap)"
        );
    }
    let root = work.join(format!("base-{suite}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    eprintln!(
        "image: making the {suite} base with debootstrap (once; kept in {})",
        work.display()
    );
    run(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={EXTRA_PACKAGES}"),
                suite,
            ])
            .arg(&root)
            .arg(mirror)
            .stdout(Stdio::null()),
        "debootstrap",
    )
    .inspect_err(|_| {
        let _ = fs::remove_dir_all(&root);
    })?;
    for dir in TRIMMED {
        let path = root.join(dir);
        if path.is_dir() {
            fs::remove_dir_all(&path).with_context(|| format!("cannot trim {}", path.display()))?;
            fs::create_dir_all(&path)?;
        }
    }
    let partial = work.join(format!(".{suite}.{}.partial", std::process::id()));
    run(
        Command::new("tar")
            .args(["--numeric-owner", "--create", "--file"])
            .arg(&partial)
            .arg("--directory")
            .arg(&root)
            .arg("."),
        "tar (the base)",
    )
    .inspect_err(|_| {
        let _ = fs::remove_file(&partial);
        let _ = fs::remove_dir_all(&root);
    })?;
    fs::rename(&partial, &tarball)?;
    fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    Ok(tarball)
}

/// Adds the binaries to the tarball under [`BIN_DIR_IN_IMAGE`], owned by root, mode 0755,
/// staged in `stage`.
fn append_binaries(tarball: &Path, bin_dir: &Path, stage: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(stage);
    let into = stage.join(BIN_DIR_IN_IMAGE);
    fs::create_dir_all(&into)?;
    let mut tar = Command::new("tar");
    tar.args([
        "--append",
        "--owner=0",
        "--group=0",
        "--mode=0755",
        "--file",
    ])
    .arg(tarball)
    .arg("--directory")
    .arg(stage);
    for name in BINARIES {
        fs::copy(bin_dir.join(name), into.join(name))
            .with_context(|| format!("cannot copy {name}"))?;
        tar.arg(format!("./{BIN_DIR_IN_IMAGE}/{name}"));
    }
    run(&mut tar, "tar (the binaries)")?;
    fs::remove_dir_all(stage)?;
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_is_the_hosts_debian_release() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\n";
        assert_eq!(suite_of(text).as_deref(), Some("bookworm"));
        assert_eq!(
            suite_of("VERSION_CODENAME=\"trixie\"").as_deref(),
            Some("trixie")
        );
        assert_eq!(suite_of("ID=alpine\nVERSION_CODENAME=\n"), None);
        assert_eq!(suite_of("ID=fedora\n"), None);
    }

    #[test]
    fn scratch_files_are_named_after_the_tag() {
        assert_eq!(
            file_name_of("localhost/quadrant-test:qt3"),
            "localhost_quadrant-test_qt3"
        );
        assert_eq!(file_name_of("quadrant:0.1.0"), "quadrant_0.1.0");
    }
}
