//! Workload attestation: the caller of a Workload API socket is identified by the kernel
//! (`SO_PEERCRED` → pid → its cgroup v2 path), never by anything it sends.
//!
//! A process in `<cgroup2>/<instance>/<quadrant>` is workload `default` of that quadrant; one in
//! `<cgroup2>/<instance>/<quadrant>/<name>` (or below) is workload `<name>`, and one in
//! `<name>@shadow` is the shadow generation of workload `<name>` (same identity; `@` is in no
//! workload name).

use std::fs;

use dataplane_common::Quadrant;

/// Workload name of processes placed directly in a quadrant's cgroup.
pub const DEFAULT_WORKLOAD: &str = "default";

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's quadrant.
    pub quadrant: Quadrant,
    /// The caller's workload name.
    pub workload: String,
    /// Whether it runs in the workload's shadow generation (`<name>@shadow`).
    pub shadow: bool,
    /// Which instance of the quadrant it runs in (0: the quadrant's first); every instance has
    /// the quadrant's identity.
    pub instance: u8,
}

/// What a shadow generation's cgroup adds to its workload's name.
pub const SHADOW_SUFFIX: &str = "@shadow";

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    /// The socket did not report the peer's credentials.
    #[error("the caller's process could not be identified (no peer credentials)")]
    NoPeer,
    /// The caller's cgroup could not be read (it exited, or /proc is hidden).
    #[error("cannot read the cgroup of pid {0}")]
    NoCgroup(i32),
    /// The caller runs outside every quadrant of this instance.
    #[error("pid {pid} runs in cgroup {path}, which is not inside a quadrant of this agent")]
    NotInQuadrant {
        /// Caller pid.
        pid: i32,
        /// Its cgroup path.
        path: String,
    },
}

pub use quadrant_lanes::svid::valid_workload_name;

/// Maps a cgroup v2 path (as in `/proc/<pid>/cgroup`, `0::<path>`) to a caller of `instance`.
#[must_use]
pub fn caller_of_cgroup(path: &str, instance: &str) -> Option<Caller> {
    let mut parts = path.trim_start_matches('/').split('/');
    if parts.next()? != instance {
        return None;
    }
    let (quadrant, instance) = quadrant_of_instance(parts.next()?)?;
    let (workload, shadow) = match parts.next() {
        None | Some("") => (DEFAULT_WORKLOAD.to_owned(), false),
        Some(w) if valid_workload_name(w) => (w.to_owned(), false),
        Some(w) => match w.strip_suffix(SHADOW_SUFFIX) {
            Some(name) if valid_workload_name(name) => (name.to_owned(), true),
            _ => return None,
        },
    };
    Some(Caller {
        quadrant,
        workload,
        shadow,
        instance,
    })
}

/// The quadrant and instance of an instance's cgroup name: `px` (its first instance) or
/// `px-<k>` for `k` in 1..16 (`quadrant scale`); every instance has the quadrant's identity.
fn quadrant_of_instance(name: &str) -> Option<(Quadrant, u8)> {
    let (q, k) = match name.split_once('-') {
        Some((q, k)) => (q, Some(k)),
        None => (name, None),
    };
    let quadrant = Quadrant::from_name(q)?;
    match k {
        None => Some((quadrant, 0)),
        Some(k) => {
            // Canonical numbers only ("px-01" is no instance's cgroup).
            let n: u8 = k.parse().ok()?;
            ((1..crate::config::MAX_INSTANCES).contains(&n) && n.to_string() == k)
                .then_some((quadrant, n))
        }
    }
}

/// Attests the process `pid` as a caller of `instance`.
pub fn attest(pid: Option<i32>, instance: &str) -> Result<Caller, AttestError> {
    let pid = pid.ok_or(AttestError::NoPeer)?;
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|_| AttestError::NoCgroup(pid))?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(AttestError::NoCgroup(pid))?;
    caller_of_cgroup(path, instance).ok_or_else(|| AttestError::NotInQuadrant {
        pid,
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_map_to_callers() {
        let c = |q, w: &str| {
            Some(Caller {
                quadrant: q,
                workload: w.to_owned(),
                shadow: false,
                instance: 0,
            })
        };
        assert_eq!(
            caller_of_cgroup("/quadrant/px", "quadrant"),
            c(Quadrant::Px, "default")
        );
        assert_eq!(
            caller_of_cgroup("/quadrant/px/api", "quadrant"),
            c(Quadrant::Px, "api")
        );
        assert_eq!(
            caller_of_cgroup("/quadrant/dx/web/worker", "quadrant"),
            c(Quadrant::Dx, "web")
        );
        assert_eq!(
            caller_of_cgroup("/quadrant/px/api@shadow", "quadrant"),
            Some(Caller {
                quadrant: Quadrant::Px,
                workload: "api".into(),
                shadow: true,
                instance: 0,
            })
        );
        assert_eq!(
            caller_of_cgroup("/quadrant/px-3/api", "quadrant"),
            Some(Caller {
                instance: 3,
                ..c(Quadrant::Px, "api").unwrap()
            }),
            "every instance has the quadrant's identity"
        );
        assert_eq!(
            caller_of_cgroup("/quadrant/dg-15", "quadrant").map(|c| (c.quadrant, c.instance)),
            Some((Quadrant::Dg, 15))
        );
        for not_an_instance in ["px-0", "px-16", "px-01", "px-", "px-a", "qa-1"] {
            assert_eq!(
                caller_of_cgroup(&format!("/quadrant/{not_an_instance}/api"), "quadrant"),
                None,
                "{not_an_instance}"
            );
        }
        assert_eq!(caller_of_cgroup("/quadrant/px/@shadow", "quadrant"), None);
        assert_eq!(caller_of_cgroup("/quadrant/px/api@other", "quadrant"), None);
        assert_eq!(caller_of_cgroup("/quadrant", "quadrant"), None);
        assert_eq!(caller_of_cgroup("/other/px/api", "quadrant"), None);
        assert_eq!(caller_of_cgroup("/quadrant/qa/api", "quadrant"), None);
        assert_eq!(caller_of_cgroup("/quadrant/px/API", "quadrant"), None);
        assert_eq!(
            caller_of_cgroup("/user.slice/session-1.scope", "quadrant"),
            None
        );
    }

    #[test]
    fn workload_names() {
        assert!(valid_workload_name("api-v2.1_x"));
        assert!(!valid_workload_name(""));
        assert!(!valid_workload_name(".."));
        assert!(!valid_workload_name("a/b"));
        assert!(!valid_workload_name(&"a".repeat(65)));
    }

    #[test]
    fn this_process_is_not_in_a_quadrant() {
        let pid = i32::try_from(std::process::id()).unwrap();
        assert!(matches!(
            attest(Some(pid), "no-such-instance"),
            Err(AttestError::NotInQuadrant { .. })
        ));
        assert_eq!(attest(None, "x"), Err(AttestError::NoPeer));
    }
}
