//! The errors of the lifecycle commands (`up`, `down`, `exec`, `status`).

use std::path::PathBuf;

use crate::{loader::LoaderError, sys::SysError};

/// Errors of the lifecycle commands.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The eBPF object's signature or versions are refused; nothing was loaded.
    #[error("dataplane refused: {0}")]
    Dataplane(String),
    /// Another agent of the same instance answers on the control socket.
    #[error(
        "an agent for instance {instance} is already running (control socket {socket}); stop it with `quadrant down`"
    )]
    AlreadyRunning {
        /// Instance name.
        instance: String,
        /// Socket path.
        socket: PathBuf,
    },
    /// Not root.
    #[error("quadrant {command} needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run it with sudo")]
    NotRoot {
        /// The subcommand.
        command: &'static str,
    },
    /// No state file: nothing was brought up with this configuration.
    #[error("instance {instance} is not up (no state file {path}); start it with `quadrant up`")]
    NotUp {
        /// Instance name.
        instance: String,
        /// State file path.
        path: PathBuf,
    },
    /// Host plumbing failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// eBPF loading or attaching failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Control socket failure.
    #[error(transparent)]
    Client(#[from] crate::control::ClientError),
    /// The state file could not be written or read.
    #[error("state file {path}: {reason}")]
    State {
        /// Path.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// A request to an instance that cannot be met.
    #[error("{0}")]
    Refused(String),
    /// The dataplane an earlier agent kept running could not be taken over; nothing of it was
    /// changed.
    #[error(
        "{cause}\n(the dataplane kept by the previous agent was not changed and keeps enforcing; `quadrant down` removes it)"
    )]
    KeptDataplaneStays {
        /// Why.
        cause: Box<DaemonError>,
    },
    /// Bring-up failed and was rolled back.
    #[error("{cause}\n(rolled back: everything created so far was removed)")]
    RolledBack {
        /// The original error.
        cause: Box<DaemonError>,
    },
    /// Bring-up failed and the rollback failed too.
    #[error("{cause}\nrollback also failed: {rollback}; run `quadrant down` to finish cleaning up")]
    RollbackFailed {
        /// The original error.
        cause: Box<DaemonError>,
        /// The rollback error.
        rollback: Box<DaemonError>,
    },
}
