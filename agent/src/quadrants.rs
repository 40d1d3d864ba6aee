//! Creating and removing a quadrant's host resources: network namespace, veth pair, addresses,
//! routes and cgroup.
//!
//! Removal is idempotent and touches only names derived from the configuration, so it is safe to
//! run twice, after a crash, or on a host where nothing was created.

use std::{fs, io, path::Path, thread, time::Duration};

use dataplane_common::Quadrant;

use crate::{
    config::{Config, InstanceRef},
    sys::{self, SysError, io_err},
};

/// Name of the veth end inside each quadrant's namespace.
pub const NS_IFACE: &str = "eth0";

/// How long teardown waits for killed processes to leave a cgroup.
const CGROUP_DRAIN_ATTEMPTS: u32 = 100;
const CGROUP_DRAIN_STEP: Duration = Duration::from_millis(10);

/// What exists of one quadrant instance once it is created.
#[derive(Clone, Debug)]
pub struct QuadrantHandle {
    /// Which quadrant.
    pub quadrant: Quadrant,
    /// Which of its instances (0: the quadrant's first).
    pub index: u8,
    /// ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// Cgroup id of the instance's cgroup.
    pub cgroup_id: u64,
}

impl QuadrantHandle {
    /// The instance this handle is of.
    #[must_use]
    pub const fn instance(&self) -> InstanceRef {
        InstanceRef::new(self.quadrant, self.index)
    }
}

/// Creates quadrant `q` (its instance 0): namespace, veth, addresses, default route, forwarding
/// on the host side, and its cgroup (below `cgroup_parent`, which must exist).
pub fn create(config: &Config, q: Quadrant) -> Result<QuadrantHandle, SysError> {
    create_instance(config, InstanceRef::new(q, 0))
}

/// Creates instance `i`. Instance 0 shares the quadrant's prefix with its veth (the host side
/// holds the gateway address); every further instance gets its own veth whose host side holds
/// no address: the host routes the instance's address (a /32) to it, and the instance reaches
/// the gateway on its link (the host answers ARP for its own addresses on every interface).
pub fn create_instance(config: &Config, i: InstanceRef) -> Result<QuadrantHandle, SysError> {
    let ns = config.instance_netns(i);
    let host = config.instance_iface(i);
    let addrs = config.addrs(i.quadrant);
    let addr = config.instance_addr(i);
    let gateway = addrs.gateway.to_string();

    sys::ip(&["netns", "add", &ns])?;
    sys::ip(&[
        "link", "add", &host, "type", "veth", "peer", "name", NS_IFACE, "netns", &ns,
    ])?;
    if i.index == 0 {
        let len = addrs.prefix.prefix_len();
        sys::ip(&["addr", "add", &format!("{gateway}/{len}"), "dev", &host])?;
    }
    // The namespace side speaks IPv4 only; IPv6 would only produce router solicitations the
    // dataplane drops.
    sys::write_sysctl(&format!("net.ipv6.conf.{host}.disable_ipv6"), "1")?;
    // Forwarding only on this interface: packets arriving from the quadrant may be routed, the
    // host's other interfaces keep their setting.
    sys::write_sysctl(&format!("net.ipv4.conf.{host}.forwarding"), "1")?;
    // Answers of outside connections to a VIP leave an instance with the VIP as their source
    // (tc gives it back), which the host routes to the first instance's veth, and the host
    // side of a further instance's veth has no address: any reverse-path filtering drops them.
    // The stricter of this and `conf.all.rp_filter` applies (`up` warns when that is on).
    sys::write_sysctl(&format!("net.ipv4.conf.{host}.rp_filter"), "0")?;
    sys::ip(&["link", "set", &host, "up"])?;
    if i.index != 0 {
        sys::ip(&[
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &host,
            "src",
            &gateway,
        ])?;
    }
    sys::in_netns(&ns, move || {
        sys::write_sysctl(&format!("net.ipv6.conf.{NS_IFACE}.disable_ipv6"), "1")?;
        Ok(())
    })?;
    let own = if i.index == 0 {
        format!("{addr}/{}", addrs.prefix.prefix_len())
    } else {
        format!("{addr}/32")
    };
    sys::ip(&["-n", &ns, "addr", "add", &own, "dev", NS_IFACE])?;
    sys::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    sys::ip(&["-n", &ns, "link", "set", NS_IFACE, "up"])?;
    if i.index != 0 {
        sys::ip(&[
            "-n", &ns, "route", "add", &gateway, "dev", NS_IFACE, "scope", "link",
        ])?;
    }
    sys::ip(&["-n", &ns, "route", "add", "default", "via", &gateway])?;

    let cg = config.instance_cgroup_dir(i);
    fs::create_dir_all(&cg).map_err(io_err("cannot create cgroup", &cg))?;
    Ok(QuadrantHandle {
        quadrant: i.quadrant,
        index: i.index,
        host_ifindex: sys::ifindex(&host)?,
        cgroup_id: sys::cgroup_id(&cg)?,
    })
}

/// Finds quadrant `q` as an earlier agent created it (a takeover after `quadrant down
/// --keep-dataplane`): namespace, host-side veth and cgroup must all exist; nothing is changed.
pub fn adopt(config: &Config, q: Quadrant) -> Result<QuadrantHandle, SysError> {
    adopt_instance(config, InstanceRef::new(q, 0))
}

/// [`adopt`] for any instance.
pub fn adopt_instance(config: &Config, i: InstanceRef) -> Result<QuadrantHandle, SysError> {
    let ns = config.instance_netns(i);
    let host = config.instance_iface(i);
    let cg = config.instance_cgroup_dir(i);
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
        quadrant: i.quadrant,
        index: i.index,
        host_ifindex: sys::ifindex(&host)?,
        cgroup_id: sys::cgroup_id(&cg)?,
    })
}

/// Whether anything of instance `i` exists.
#[must_use]
pub fn instance_exists(config: &Config, i: InstanceRef) -> bool {
    sys::netns_exists(&config.instance_netns(i))
        || sys::link_exists(&config.instance_iface(i))
        || config.instance_cgroup_dir(i).exists()
}

/// Removes instance `i`'s namespace, veth and cgroup (killing what runs in it). Missing pieces
/// are skipped.
pub fn remove_instance(config: &Config, i: InstanceRef) -> Result<(), SysError> {
    let host = config.instance_iface(i);
    if sys::link_exists(&host) {
        sys::ip(&["link", "del", &host])?;
    }
    let ns = config.instance_netns(i);
    if sys::netns_exists(&ns) {
        sys::ip(&["netns", "del", &ns])?;
    }
    remove_cgroup(&config.instance_cgroup_dir(i))
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
