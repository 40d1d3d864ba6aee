//! Host plumbing the quadrants need: iproute2 invocations, mounts, sysctls and namespace entry.
//!
//! Links, addresses and namespaces are made with iproute2's `ip`, which every Linux host has and
//! whose errors are the ones operators know; the agent checks each exit status and reports the
//! command with its stderr.

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns},
    sys::statfs::{CGROUP2_SUPER_MAGIC, statfs},
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where `ip netns add` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors of host operations.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A command could not be started.
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Cause.
        source: io::Error,
    },
    /// A command exited with an error.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A mount failed.
    #[error("cannot mount {fstype} at {path}: {source}")]
    Mount {
        /// File-system type.
        fstype: &'static str,
        /// Mount point.
        path: PathBuf,
        /// Cause.
        source: nix::Error,
    },
    /// setns failed.
    #[error("cannot enter network namespace {ns}: {source}")]
    Setns {
        /// Namespace name.
        ns: String,
        /// Cause.
        source: nix::Error,
    },
}

/// Wraps an io error with the path.
pub fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SysError + 'a {
    move |source| SysError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (a temporary file beside it, renamed over it), root-only
/// (0600) from the temporary file's creation on.
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| io::Write::write_all(&mut f, bytes))
        .and_then(|()| fs::rename(&tmp, path))
}

/// Runs `ip ARGS…` and returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, SysError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| SysError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SysError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a named network namespace exists.
#[must_use]
pub fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_RUN_DIR).join(name).exists()
}

/// Whether an interface exists in the agent's network namespace.
#[must_use]
pub fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// The ifindex of an interface in the agent's network namespace.
pub fn ifindex(name: &str) -> Result<u32, SysError> {
    nix::net::if_::if_nametoindex(name).map_err(|e| SysError::Io {
        what: "no interface",
        path: name.into(),
        source: e.into(),
    })
}

fn fs_type_is(path: &Path, magic: i64) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type().0 == magic)
}

/// Whether `path` is the root of a cgroup2 mount (its parent is not cgroup2, or it is
/// cgroup2 itself and the directory is a mount point).
fn is_mount_point(path: &Path) -> bool {
    let (Ok(me), Some(parent)) = (fs::metadata(path), path.parent()) else {
        return false;
    };
    fs::metadata(parent).is_ok_and(|p| p.dev() != me.dev())
}

/// Mounts bpffs at `path` unless one is there. Returns whether it mounted.
pub fn ensure_bpffs(path: &Path) -> Result<bool, SysError> {
    if fs_type_is(path, BPF_FS_MAGIC) {
        return Ok(false);
    }
    fs::create_dir_all(path).map_err(io_err("cannot create", path))?;
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SysError::Mount {
        fstype: "bpf",
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Mounts a cgroup2 hierarchy at `path` unless one is mounted there. Returns whether it mounted.
pub fn ensure_cgroup2(path: &Path) -> Result<bool, SysError> {
    if fs_type_is(path, CGROUP2_SUPER_MAGIC.0) && is_mount_point(path) {
        return Ok(false);
    }
    fs::create_dir_all(path).map_err(io_err("cannot create", path))?;
    mount(
        Some("cgroup2"),
        path,
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SysError::Mount {
        fstype: "cgroup2",
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

/// Unmounts `path` (lazily, so a stale shell inside it does not block teardown).
pub fn unmount(path: &Path) -> Result<(), SysError> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|source| SysError::Mount {
        fstype: "umount",
        path: path.to_owned(),
        source,
    })
}

/// Writes a sysctl under /proc/sys of the calling thread's network namespace.
pub fn write_sysctl(key: &str, value: &str) -> Result<(), SysError> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    fs::write(&path, value).map_err(io_err("cannot write sysctl", &path))
}

/// Runs `f` on a new thread that has entered network namespace `ns`, and returns its result.
/// The agent's own threads stay in the host namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, SysError> + Send + 'static,
) -> Result<T, SysError> {
    let path = Path::new(NETNS_RUN_DIR).join(ns);
    let file = fs::File::open(&path).map_err(io_err("cannot open network namespace", &path))?;
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        // setns on this thread only; the thread ends with the closure.
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| SysError::Setns { ns, source })?;
        f()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(SysError::Io {
            what: "thread panicked in",
            path,
            source: io::Error::other("panic"),
        })
    })
}

/// The cgroup id of a cgroup2 directory (its inode number, as `bpf_get_current_cgroup_id`
/// reports it).
pub fn cgroup_id(dir: &Path) -> Result<u64, SysError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(io_err("cannot stat cgroup", dir))
}

/// `CAP_NET_RAW`.
const CAP_NET_RAW: u32 = 13;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Removes `CAP_NET_RAW` from this process for good (bounding, ambient, effective, permitted and
/// inheritable sets), so neither it nor anything it executes can open raw IP or packet sockets.
/// Only system calls: safe between fork and exec.
pub fn drop_net_raw() -> io::Result<()> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let bit = 1u32 << CAP_NET_RAW;
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAPBSET_DROP,
            libc::c_ulong::from(CAP_NET_RAW),
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; lowering an ambient capability that is not raised is not an error.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_LOWER).unwrap_or_default(),
            libc::c_ulong::from(CAP_NET_RAW),
            0,
            0,
        );
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) fills the two data words for version 3 headers.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    data[0].effective &= !bit;
    data[0].permitted &= !bit;
    data[0].inheritable &= !bit;
    // SAFETY: capset(2) with the header and data just read, one capability less.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling process into the cgroup at `cgroup`, then into network namespace `ns`,
/// drops `CAP_NET_RAW` if `drop_raw`, then replaces it with `argv`, with `extra_env` added to its
/// environment. Returns only on failure.
#[must_use]
pub fn enter_and_exec(
    cgroup: &Path,
    ns: &str,
    argv: &[String],
    extra_env: &[(&str, &str)],
    drop_raw: bool,
) -> SysError {
    let procs = cgroup.join("cgroup.procs");
    if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
        return SysError::Io {
            what: "cannot join cgroup",
            path: procs,
            source: e,
        };
    }
    let path = Path::new(NETNS_RUN_DIR).join(ns);
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return SysError::Io {
                what: "cannot open network namespace",
                path,
                source: e,
            };
        }
    };
    if let Err(source) = setns(file.as_fd(), CloneFlags::CLONE_NEWNET) {
        return SysError::Setns {
            ns: ns.to_owned(),
            source,
        };
    }
    if drop_raw && let Err(e) = drop_net_raw() {
        return SysError::Io {
            what: "cannot drop CAP_NET_RAW for",
            path: argv.join(" ").into(),
            source: e,
        };
    }
    let c_argv: Result<Vec<CString>, _> = argv.iter().map(|a| CString::new(a.as_bytes())).collect();
    let c_argv = match c_argv {
        Ok(a) if !a.is_empty() => a,
        _ => {
            return SysError::Io {
                what: "invalid command",
                path: argv.join(" ").into(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            };
        }
    };
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !extra_env.iter().any(|(e, _)| k == e))
        .map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            kv
        })
        .chain(
            extra_env
                .iter()
                .map(|(k, v)| format!("{k}={v}").into_bytes()),
        )
        .filter_map(|kv| CString::new(kv).ok())
        .collect();
    let err = nix::unistd::execvpe(&c_argv[0], &c_argv, &env).unwrap_err();
    SysError::Io {
        what: "cannot execute",
        path: argv[0].clone().into(),
        source: err.into(),
    }
}
