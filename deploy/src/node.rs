//! `cargo xtask deploy node`: installs the agent on this host (or under `--root`): the
//! binaries (`/usr/local/bin/quadrant`, `/opt/cni/bin/quadrant-cni`), the systemd unit and a
//! configuration that chains `quadrant-cni` into the node's CNI configuration at start. An
//! existing configuration is kept.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// What was written (or kept).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Files left as they were (the configuration, if there was one).
    pub kept: Vec<PathBuf>,
}

fn put(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("a path without a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot install {}", path.display()))
}

/// Installs from `bin_dir` (holding `quadrant` and `quadrant-cni`) under `root`.
pub fn install(root: &Path, bin_dir: &Path) -> anyhow::Result<Installed> {
    let mut out = Installed::default();
    for (name, to) in [
        ("quadrant", "usr/local/bin/quadrant"),
        ("quadrant-cni", "opt/cni/bin/quadrant-cni"),
    ] {
        let from = bin_dir.join(name);
        let bytes = fs::read(&from).with_context(|| {
            format!(
                "cannot read {} (build it first: cargo build --release)",
                from.display()
            )
        })?;
        let to = root.join(to);
        put(&to, &bytes, 0o755)?;
        out.written.push(to);
    }
    let unit = root.join("etc/systemd/system/quadrant.service");
    put(&unit, crate::SYSTEMD_UNIT.as_bytes(), 0o644)?;
    out.written.push(unit);
    let config = root.join("etc/quadrant/config.yaml");
    if config.exists() {
        out.kept.push(config);
    } else {
        put(&config, crate::node_config(false)?.as_bytes(), 0o600)?;
        out.written.push(config);
    }
    Ok(out)
}
