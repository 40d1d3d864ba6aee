//! Creating and removing a quadrant's host resources: network namespace, veth pair, addresses,
//! routes and cgroup.
//!
//! Removal is idempotent and touches only names derived from the configuration, so it is safe to
//! run twice, after a crash, or on a host where nothing was created.

use std::{fs, io, path::Path, thread, time::Duration};

use dataplane_common::Quadrant;

use crate::{
    config::Config,
    sys::{self, SysError, io_err},
};

/// Name of the veth end inside each quadrant's namespace.
pub const NS_IFACE: &str = "eth0";

/// How long teardown waits for killed processes to leave a cgroup.
const CGROUP_DRAIN_ATTEMPTS: u32 = 100;
const CGROUP_DRAIN_STEP: Duration = Duration::from_millis(10);

/// What exists of one quadrant once it is created.
#[derive(Clone, Debug)]
pub struct QuadrantHandle {
    /// Which quadrant.
    pub quadrant: Quadrant,
    /// ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// Cgroup id of the quadrant's cgroup.
    pub cgroup_id: u64,
}

/// Creates quadrant `q`: namespace, veth, addresses, default route, forwarding on the host side,
/// and its cgroup (below `cgroup_parent`, which must exist).
pub fn create(config: &Config, q: Quadrant) -> Result<QuadrantHandle, SysError> {
    let ns = config.netns(q);
    let host = config.host_iface(q);
    let addrs = config.addrs(q);
    let len = addrs.prefix.prefix_len().to_string();
    let gw = format!("{}/{len}", addrs.gateway);
    let wl = format!("{}/{len}", addrs.workload);

    sys::ip(&["netns", "add", &ns])?;
    sys::ip(&[
        "link", "add", &host, "type", "veth", "peer", "name", NS_IFACE, "netns", &ns,
    ])?;
    sys::ip(&["addr", "add", &gw, "dev", &host])?;
    // The namespace side speaks IPv4 only; IPv6 would only produce router solicitations the
    // dataplane drops.
    sys::write_sysctl(&format!("net.ipv6.conf.{host}.disable_ipv6"), "1")?;
    // Forwarding only on this interface: packets arriving from the quadrant may be routed, the
    // host's other interfaces keep their setting.
    sys::write_sysctl(&format!("net.ipv4.conf.{host}.forwarding"), "1")?;
    sys::ip(&["link", "set", &host, "up"])?;
    let gateway = addrs.gateway.to_string();
    sys::in_netns(&ns, move || {
        sys::write_sysctl(&format!("net.ipv6.conf.{NS_IFACE}.disable_ipv6"), "1")?;
        Ok(())
    })?;
    sys::ip(&["-n", &ns, "addr", "add", &wl, "dev", NS_IFACE])?;
    sys::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    sys::ip(&["-n", &ns, "link", "set", NS_IFACE, "up"])?;
    sys::ip(&["-n", &ns, "route", "add", "default", "via", &gateway])?;

    let cg = config.cgroup_dir(q);
    fs::create_dir_all(&cg).map_err(io_err("cannot create cgroup", &cg))?;
    Ok(QuadrantHandle {
        quadrant: q,
        host_ifindex: sys::ifindex(&host)?,
        cgroup_id: sys::cgroup_id(&cg)?,
    })
}

/// Finds quadrant `q` as an earlier agent created it (a takeover after `quadrant down
/// --keep-dataplane`): namespace, host-side veth and cgroup must all exist; nothing is changed.
pub fn adopt(config: &Config, q: Quadrant) -> Result<QuadrantHandle, SysError> {
    let ns = config.netns(q);
    let host = config.host_iface(q);
    let cg = config.cgroup_dir(q);
    let missing = |what: String| SysError::Io {
        what: "cannot take over quadrant: missing",
        path: what.into(),
        source: io::Error::from(io::ErrorKind::NotFound),
    };
    if !sys::netns_exists(&ns) {
        return Err(missing(format!("network namespace {ns}")));
    }
    if !sys::link_exists(&host) {
        return Err(missing(format!("interface {host}")));
    }
    if !cg.is_dir() {
        return Err(missing(format!("cgroup {}", cg.display())));
    }
    Ok(QuadrantHandle {
        quadrant: q,
        host_ifindex: sys::ifindex(&host)?,
        cgroup_id: sys::cgroup_id(&cg)?,
    })
}

/// Removes quadrant `q`'s namespace, veth and cgroup (killing what runs in the cgroup). Missing
/// pieces are skipped.
pub fn remove(config: &Config, q: Quadrant) -> Result<(), SysError> {
    let host = config.host_iface(q);
    if sys::link_exists(&host) {
        sys::ip(&["link", "del", &host])?;
    }
    let ns = config.netns(q);
    if sys::netns_exists(&ns) {
        sys::ip(&["netns", "del", &ns])?;
    }
    remove_cgroup(&config.cgroup_dir(q))
}

/// Kills every process in the cgroup at `dir` and below (workload cgroups), waits for them to
/// leave, and removes the cgroups bottom-up.
pub fn remove_cgroup(dir: &Path) -> Result<(), SysError> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill covers the whole subtree.
    let kill = dir.join("cgroup.kill");
    fs::write(&kill, "1").map_err(io_err("cannot kill processes of cgroup", dir))?;
    remove_tree(dir)
}

fn remove_tree(dir: &Path) -> Result<(), SysError> {
    let entries = fs::read_dir(dir).map_err(io_err("cannot list cgroup", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("cannot list cgroup", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    let procs = dir.join("cgroup.procs");
    for _ in 0..CGROUP_DRAIN_ATTEMPTS {
        let left = fs::read_to_string(&procs).map_err(io_err("cannot read", &procs))?;
        if left.trim().is_empty() {
            break;
        }
        thread::sleep(CGROUP_DRAIN_STEP);
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SysError::Io {
            what: "cannot remove cgroup",
            path: dir.to_owned(),
            source: e,
        }),
    }
}
