//! Chaining into the node's primary network configuration, as Cilium's chaining mode does:
//! `quadrant cni install` appends a `quadrant-cni` entry to the `plugins` of the conflist the
//! runtime uses — the first network configuration file of the directory by name, as libcni
//! picks it — and `quadrant cni uninstall` removes exactly the entries of that type. Each
//! change is written to a temporary file in the same directory (a name libcni does not read)
//! and renamed over the file, so a runtime never reads half a configuration.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{ANNOTATIONS_CAPABILITY, CGROUP_CAPABILITY, PLUGIN_TYPE};

/// The configuration file the runtime uses: the first `.conflist`, `.conf` or `.json` file by
/// name.
pub fn primary(conf_dir: &Path) -> Result<PathBuf, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot list {}: {e}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| {
        format!(
            "no network configuration in {} to chain into: install the primary plugin's first",
            conf_dir.display()
        )
    })
}

/// Our entry: the quadrant of pods without the annotation (if any) and the agent's socket;
/// the capabilities that make runtimes pass pod annotations and the pod's cgroup.
#[must_use]
pub fn entry(quadrant: Option<&str>, socket: &Path) -> Value {
    let mut e = json!({
        "type": PLUGIN_TYPE,
        "socket": socket.display().to_string(),
        "capabilities": { ANNOTATIONS_CAPABILITY: true, CGROUP_CAPABILITY: true },
    });
    if let (Some(q), Some(o)) = (quadrant, e.as_object_mut()) {
        o.insert("quadrant".into(), Value::String(q.to_owned()));
    }
    e
}

/// `list` (a conflist) with `entry` last among its plugins, replacing an earlier entry of ours;
/// false if it held exactly that already.
pub fn with_entry(list: &mut Value, entry: Value) -> Result<bool, String> {
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("not a conflist: no \"plugins\" list (chaining needs a .conflist)")?;
    if plugins.first().is_none_or(|p| p["type"] == PLUGIN_TYPE) {
        return Err("the conflist has no primary plugin before quadrant-cni".into());
    }
    if plugins.last() == Some(&entry)
        && plugins.iter().filter(|p| p["type"] == PLUGIN_TYPE).count() == 1
    {
        return Ok(false);
    }
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.push(entry);
    Ok(true)
}

/// `list` without our entries; false if it had none.
pub fn without_entry(list: &mut Value) -> bool {
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.len() != before
}

fn read(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

/// Writes `value` over `path` atomically, keeping its permissions.
fn write(path: &Path, value: &Value) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(".quadrant-cni.tmp");
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())? + "\n";
    let mode = std::fs::metadata(path).map(|m| m.permissions());
    std::fs::write(&tmp, text)
        .and_then(|()| mode.map_or(Ok(()), |m| std::fs::set_permissions(&tmp, m)))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
}

/// Chains `quadrant-cni` into the primary configuration of `conf_dir`; returns the file and
/// whether it changed.
pub fn install(
    conf_dir: &Path,
    quadrant: Option<&str>,
    socket: &Path,
) -> Result<(PathBuf, bool), String> {
    if let Some(q) = quadrant
        && dataplane_common::Quadrant::from_name(q).is_none()
    {
        return Err(format!("unknown quadrant {q:?}: dx, dg, px or pg"));
    }
    let path = primary(conf_dir)?;
    let mut list = read(&path)?;
    let changed = with_entry(&mut list, entry(quadrant, socket))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if changed {
        write(&path, &list)?;
    }
    Ok((path, changed))
}

/// Removes the `quadrant-cni` entries from every configuration file of `conf_dir`; returns the
/// files it changed.
pub fn uninstall(conf_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut changed = Vec::new();
    let entries = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot list {}: {e}", conf_dir.display()))?;
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "conflist") {
            continue;
        }
        let mut list = read(&path)?;
        if without_entry(&mut list) {
            write(&path, &list)?;
            changed.push(path);
        }
    }
    Ok(changed)
}
