//! The one path that makes a policy bundle live, used by start-up and by every reload
//! (`quadrant policy reload`, SIGHUP, a change in a watched `policy_dir`).
//!
//! The bundle is read once; everything is derived from that one read — the revision guard, the
//! kernel's entries, admission's prepared templates, the broker's lane rules — before anything
//! changes, so a `policy_dir` edited half-way can never leave the kernel, admission and the
//! broker on different bundles, and a bundle that fails at any step changes nothing. Then the
//! kernel flips to it, admission and the broker follow, the revision is recorded and an event
//! says what happened. Activations run one at a time, off the runtime threads.

use std::sync::{Arc, Mutex, PoisonError};

use dataplane_common::Quadrant;
use tracing::{info, warn};

use super::{MANIFEST_FILE, PolicyBundle, PolicyError, compile};
use crate::{
    admission::{Admission, Prepared},
    config::Config,
    events::{Event, EventBus},
    generations::{GenerationError, Generations},
    lanes::broker::Broker,
    loader::{Dataplane, LoaderError},
    sys,
};

/// Generation-store keys of the live policy bundle's revision and (the first 64 bits of) its
/// digest.
pub(crate) const BUNDLE_REVISION_KEY: &str = "policy-bundle/revision";
const BUNDLE_DIGEST_KEY: &str = "policy-bundle/digest";

/// Why a bundle was not made live; the live policy (or deny-all) stays.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// Without the identity service the quadrants stay in deny-all.
    #[error(
        "{0}; the quadrants stay in deny-all until the agent restarts with a working identity service"
    )]
    IdentityUnavailable(String),
    /// The bundle does not load, evaluate or compile.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The bundle's revision goes backwards (or repeats with other files).
    #[error("{0}")]
    Revision(String),
    /// The kernel refused the compiled policy.
    #[error("the kernel's policy maps: {0}")]
    Kernel(#[from] LoaderError),
}

/// What an activation made live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    /// The status line (`enforced: …`).
    pub state: String,
    /// The live policy slot now.
    pub slot: u32,
    /// The bundle's digest.
    pub digest: String,
}

/// The points between the steps of an activation (where a test may change the world).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The bundle was read.
    Read,
    /// Everything was derived from it; nothing changed yet.
    Derived,
    /// The kernel runs it.
    Kernel,
}

/// The policy as the agent runs it, and the path to change it.
#[derive(Debug)]
pub struct PolicyService {
    config: Config,
    identity: Result<(), String>,
    generations: Arc<Mutex<Result<Generations, GenerationError>>>,
    admission: Arc<Admission>,
    broker: Arc<Broker>,
    events: Arc<EventBus>,
    /// The status line (held only to read or replace it: status answers during an activation).
    live: Mutex<String>,
    /// Held while an activation runs, so activations take turns.
    turn: Mutex<()>,
}

impl PolicyService {
    /// The service for `config`; `identity` says whether the identity service runs (without it
    /// every activation is refused and the quadrants stay deny-all).
    #[must_use]
    pub fn new(
        config: &Config,
        identity: Result<(), String>,
        generations: Arc<Mutex<Result<Generations, GenerationError>>>,
        admission: Arc<Admission>,
        broker: Arc<Broker>,
        events: Arc<EventBus>,
    ) -> Self {
        Self {
            config: config.clone(),
            identity,
            generations,
            admission,
            broker,
            events,
            live: Mutex::new("deny-all: no policy made live yet".into()),
            turn: Mutex::new(()),
        }
    }

    /// The status line: `enforced: …`, or `deny-all: <why>`.
    #[must_use]
    pub fn state(&self) -> String {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Start-up: makes the configured bundle live, or — if it cannot be — records why the
    /// quadrants stay deny-all (the dataplane starts empty) and makes admission and the broker
    /// refuse with that reason.
    pub fn start(&self, dataplane: &Mutex<Dataplane>) -> Result<Activated, ActivateError> {
        let result = self.activate_with(dataplane, |_| {});
        if let Err(e) = &result {
            let why = format!("policy evaluation failed: {e}");
            self.admission.set_prepared(Err(why.clone()));
            self.broker.set_rules(Err(why.clone()), "", None);
            *self.live.lock().unwrap_or_else(PoisonError::into_inner) = format!("deny-all: {e}");
        }
        result
    }

    /// Reload: the same path; on failure the live policy stays.
    pub fn activate(&self, dataplane: &Mutex<Dataplane>) -> Result<Activated, ActivateError> {
        self.activate_with(dataplane, |_| {})
    }

    /// [`Self::activate`], calling `between` at each [`Step`].
    pub fn activate_with(
        &self,
        dataplane: &Mutex<Dataplane>,
        mut between: impl FnMut(Step),
    ) -> Result<Activated, ActivateError> {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = self.run(dataplane, &mut between);
        self.admission.metrics.policy_activation(result.is_ok());
        match &result {
            Ok(a) => {
                self.live
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone_from(&a.state);
                info!(slot = a.slot, digest = %a.digest, "{}", a.state);
                self.events.emit(|seq, at_ms| Event::PolicyReloaded {
                    seq,
                    at_ms,
                    policy: a.state.clone(),
                    slot: a.slot,
                });
            }
            Err(e) => {
                warn!(error = %e, "policy not made live");
                self.events.emit(|seq, at_ms| Event::PolicyReloadFailed {
                    seq,
                    at_ms,
                    message: format!("policy not reloaded, the previous one stays live: {e}"),
                });
            }
        }
        result
    }

    fn run(
        &self,
        dataplane: &Mutex<Dataplane>,
        between: &mut impl FnMut(Step),
    ) -> Result<Activated, ActivateError> {
        self.identity
            .clone()
            .map_err(ActivateError::IdentityUnavailable)?;
        let bundle = PolicyBundle::for_config(&self.config)?;
        between(Step::Read);
        let digest = bundle.digest();
        let revision = {
            let generations = self
                .generations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            check_revision(&generations, &bundle).map_err(ActivateError::Revision)?
        };
        let flows = bundle.compile_all(&self.config)?;
        let mut kernel = compile::for_kernel(flows, |q, w| workload_cgroup(&self.config, q, w))?;
        kernel.bundle_digest = Some(digest.clone());
        let prepared = Prepared::new(&bundle)?;
        let lane_rules = bundle.lane_rules()?;
        between(Step::Derived);
        let slot = dataplane
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply_policy(&kernel)?;
        between(Step::Kernel);
        if let Err(e) = record_revision(
            &mut self
                .generations
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            revision,
        ) {
            warn!(error = %e, "cannot record the policy bundle revision");
        }
        self.admission.set_prepared(Ok(prepared));
        self.broker
            .set_rules(Ok(lane_rules), bundle.origin(), Some(&digest));
        Ok(Activated {
            state: kernel.summary(bundle.origin()),
            slot,
            digest,
        })
    }
}

/// The cgroup id of workload `workload` of quadrant `q`, creating its cgroup (as `quadrant exec
/// --workload` and the supervisor do; neither removes it) so that its id is fixed before the
/// workload starts.
fn workload_cgroup(config: &Config, q: Quadrant, workload: &str) -> Result<u64, PolicyError> {
    let dir = config.cgroup_dir(q).join(workload);
    let fail = |reason: String| PolicyError::Cgroup {
        path: dir.clone(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    sys::cgroup_id(&dir).map_err(|e| fail(e.to_string()))
}

/// Forward-only policy bundles: a `policy_dir` bundle's revision must not be older than the one
/// last made live on this host, and the same revision must be the same bundle. Returns what to
/// record once the bundle is live. The embedded bundle is versioned with the binary.
pub fn check_revision(
    generations: &Result<Generations, GenerationError>,
    bundle: &PolicyBundle,
) -> Result<Option<(u64, u64)>, String> {
    if bundle.is_embedded() {
        return Ok(None);
    }
    let revision = bundle.revision().map_err(|e| e.to_string())?;
    let store = generations
        .as_ref()
        .map_err(|e| format!("cannot check the bundle revision (fail-closed): {e}"))?;
    let digest = u64::from_str_radix(&bundle.digest()[..16], 16).unwrap_or_default();
    match (revision, store.current(BUNDLE_REVISION_KEY)) {
        (None, None) => Ok(None),
        (None, Some(live)) => Err(format!(
            "the policy bundle has no revision ({MANIFEST_FILE}), but revision {live} was live on this host; bundles only move forward"
        )),
        (Some(r), Some(live)) if r < live => Err(format!(
            "policy bundle revision {r} is older than revision {live}, live on this host before; bundles only move forward"
        )),
        (Some(r), Some(live)) if r == live && store.current(BUNDLE_DIGEST_KEY) != Some(digest) => {
            Err(format!(
                "policy bundle revision {r} is not the revision {r} made live before (its files differ): a changed bundle needs a new revision in {MANIFEST_FILE}"
            ))
        }
        (Some(r), _) => Ok(Some((r, digest))),
    }
}

/// Records a bundle revision [`check_revision`] accepted, once the bundle is live.
fn record_revision(
    generations: &mut Result<Generations, GenerationError>,
    revision: Option<(u64, u64)>,
) -> Result<(), GenerationError> {
    let (Some((r, digest)), Ok(store)) = (revision, generations.as_mut()) else {
        return Ok(());
    };
    store
        .force(BUNDLE_REVISION_KEY, r)
        .and_then(|()| store.force(BUNDLE_DIGEST_KEY, digest))
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf};

    use super::*;

    fn bundle_dir(name: &str, revision: Option<u64>, extra: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("quadrant-revision-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("a.rego"),
            format!("package quadrant.runtime.extra\n{extra}\n"),
        )
        .unwrap();
        if let Some(r) = revision {
            fs::write(
                dir.join(MANIFEST_FILE),
                format!("{{\"bundle\": {{\"revision\": {r}}}}}"),
            )
            .unwrap();
        }
        dir
    }

    fn store(name: &str) -> Result<Generations, GenerationError> {
        let path = std::env::temp_dir().join(format!(
            "quadrant-revision-{name}-{}.json",
            std::process::id()
        ));
        let _ = fs::remove_file(&path);
        Generations::open(&path)
    }

    #[test]
    fn bundle_revisions_only_move_forward() {
        let mut generations = store("forward");
        let embedded = PolicyBundle::embedded();
        assert_eq!(check_revision(&generations, &embedded), Ok(None));

        let unversioned = PolicyBundle::from_dir(&bundle_dir("none", None, "")).unwrap();
        assert_eq!(check_revision(&generations, &unversioned), Ok(None));

        let r2 = PolicyBundle::from_dir(&bundle_dir("r2", Some(2), "")).unwrap();
        let accepted = check_revision(&generations, &r2).unwrap();
        assert_eq!(accepted.map(|(r, _)| r), Some(2));
        record_revision(&mut generations, accepted).unwrap();
        // The same bundle again is fine.
        assert!(check_revision(&generations, &r2).is_ok());

        let r1 = PolicyBundle::from_dir(&bundle_dir("r1", Some(1), "")).unwrap();
        let e = check_revision(&generations, &r1).unwrap_err();
        assert!(e.contains("revision 1 is older than revision 2"), "{e}");
        let r2_changed = PolicyBundle::from_dir(&bundle_dir("r2x", Some(2), "x := 1")).unwrap();
        let e = check_revision(&generations, &r2_changed).unwrap_err();
        assert!(e.contains("its files differ"), "{e}");
        let e = check_revision(&generations, &unversioned).unwrap_err();
        assert!(e.contains("has no revision"), "{e}");
        let r3 = PolicyBundle::from_dir(&bundle_dir("r3", Some(3), "")).unwrap();
        assert_eq!(
            check_revision(&generations, &r3).unwrap().map(|(r, _)| r),
            Some(3)
        );
        // No generation store: fail-closed for a versioned bundle.
        let gone = Err(GenerationError::Io {
            path: "/gone".into(),
            reason: "disk gone".into(),
        });
        let e = check_revision(&gone, &r3).unwrap_err();
        assert!(e.contains("fail-closed"), "{e}");
    }
}
