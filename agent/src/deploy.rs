//! Deploying a workload: `quadrant submit` and the break-glass `quadrant rollback`.
//!
//! Signature → schema → generation → artifact digests → SVID and admission → generation
//! recorded → workload started. Nothing is started or recorded unless every step passes. The
//! checks (Ed25519, JSON Schema, re-hashing the artifacts, Rego) run on a blocking thread, never
//! on the runtime threads that answer the control socket and the Workload API; no lock is held
//! while the workload starts.

use std::{path::PathBuf, sync::Arc, time::Duration};

use dataplane_common::Quadrant;
use tracing::warn;

use crate::{
    artifacts::{ArtifactError, ArtifactStore},
    config::Config,
    daemon::agent::{Agent, locked},
    events::Event,
    generations::{GenerationError, Generations},
    identity::attest,
    lanes::broker::{DeclaredLane, PlanBreaker},
    plans::{self, PlanError},
    signing::{Envelope, SignatureError, TrustStore},
    workloads::{self, WorkloadError},
};

/// Why a plan was not deployed; nothing was started or recorded.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The trust store cannot be read.
    #[error("trust store: {0}")]
    TrustStore(#[source] SignatureError),
    /// No instance of the quadrant can take the workload (why for each, as the scheduler says).
    #[error("{key}: not placed: {summary}")]
    Unplaced {
        /// `<quadrant>/<workload>`.
        key: String,
        /// `0/4 px instances available: …`.
        summary: String,
    },
    /// The envelope, its signature or the plan is refused.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The generation store cannot be used (fail-closed).
    #[error("generation store unusable (fail-closed): {0}")]
    GenerationStore(String),
    /// The generation does not move forward (or cannot be recorded).
    #[error(transparent)]
    Generation(#[from] GenerationError),
    /// The break-glass authorization does not apply.
    #[error("break-glass: {0}")]
    BreakGlass(String),
    /// An artifact is missing or its content does not match its digest.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The plan names no artifact.
    #[error("the plan names no artifact")]
    NoArtifact,
    /// The plan's `slo` section cannot be kept beside the SLOs already kept.
    #[error("the plan's slo section: {0}")]
    Slo(String),
    /// The plan's `breaker` section is not valid with the configuration's thresholds, or
    /// another workload's plan sets thresholds for the same service.
    #[error("the plan's breaker section: {0}")]
    Breaker(String),
    /// Admission cannot decide (fail-closed).
    #[error("admission unavailable (fail-closed): {0}")]
    AdmissionUnavailable(String),
    /// Admission refused the workload.
    #[error("admission rejected {key}: {why}")]
    Rejected {
        /// `<quadrant>/<workload>`.
        key: String,
        /// The violations or the SVID problem.
        why: String,
    },
    /// The break-glass rollback could not be recorded in the audit log (fail-closed).
    #[error("break-glass: cannot record the rollback (fail-closed): {0}")]
    AuditRecord(String),
    /// Admitted and recorded, but the shadow generation did not start.
    #[error("{key} admitted but its shadow generation did not start: {source}")]
    Shadow {
        /// `<quadrant>/<workload>`.
        key: String,
        /// Cause.
        source: crate::shadow::ShadowError,
    },
    /// Admitted and recorded, but the process did not start.
    #[error("{key} admitted but not started: {source}")]
    NotStarted {
        /// `<quadrant>/<workload>`.
        key: String,
        /// Cause.
        source: WorkloadError,
    },
    /// The supervisor lost track of the workload it just started.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
}

/// What a deployment started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The workload's status right after start.
    pub status: workloads::Status,
    /// Key that signed the plan.
    pub signer: String,
    /// The workload's SPIFFE ID.
    pub spiffe_id: String,
    /// Audit record of the admission.
    pub audit_seq: Option<u64>,
    /// Why it started as a shadow beside the live generation (`quadrant shadow`), if it did.
    pub shadow: Option<String>,
}

/// A break-glass authorization that applies to the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BreakGlass {
    rollback: plans::Rollback,
    authorized_by: String,
    /// The generation accepted before.
    from: Option<u64>,
}

/// A plan that passed every check, ready to run.
#[derive(Debug)]
struct Admitted {
    /// Why it starts as a shadow beside the live generation, if it does.
    shadow: Option<String>,
    /// The breaker thresholds its plan gives its lane service.
    breaker: Option<PlanBreaker>,
    slos: Vec<crate::slo::SloSpec>,
    key: String,
    quadrant: Quadrant,
    workload: String,
    spec: workloads::Spec,
    lanes: Vec<DeclaredLane>,
    signer: String,
    spiffe_id: String,
    audit_seq: Option<u64>,
}

/// Deploys the plan in `envelope` (a break-glass rollback with `rollback`; as a shadow of the
/// live generation with `shadow`, or when a cost SLO of the workload's service is near its
/// limit), and emits the event of its outcome.
pub async fn submit(
    agent: &Arc<Agent>,
    envelope: Envelope,
    rollback: Option<Envelope>,
    shadow: bool,
) -> Result<Submitted, DeployError> {
    let result = run(agent, envelope, rollback, shadow).await;
    match &result {
        Ok(s) => agent.events.emit(|seq, at_ms| Event::WorkloadStarted {
            seq,
            at_ms,
            name: s.status.name.clone(),
            generation: s.status.generation,
            spiffe_id: s.spiffe_id.clone(),
        }),
        Err(e) => agent.events.emit(|seq, at_ms| Event::SubmitRefused {
            seq,
            at_ms,
            message: e.to_string(),
        }),
    }
    result
}

async fn run(
    agent: &Arc<Agent>,
    envelope: Envelope,
    rollback: Option<Envelope>,
    shadow: bool,
) -> Result<Submitted, DeployError> {
    let a = Arc::clone(agent);
    let admitted =
        tokio::task::spawn_blocking(move || admit(&a, &envelope, rollback.as_ref(), shadow))
            .await
            .map_err(|e| {
                DeployError::AdmissionUnavailable(format!("the admission task failed: {e}"))
            })??;
    if let Some(reason) = admitted.shadow.clone() {
        let key = admitted.key.clone();
        let status = agent
            .shadows
            .start(
                agent,
                admitted.quadrant,
                &admitted.workload,
                reason.clone(),
                crate::shadow::Promotion {
                    spec: admitted.spec,
                    lanes: admitted.lanes,
                    slos: admitted.slos,
                    breaker: admitted.breaker,
                },
            )
            .await
            .map_err(|source| DeployError::Shadow { key, source })?;
        return Ok(Submitted {
            status,
            signer: admitted.signer,
            spiffe_id: admitted.spiffe_id,
            audit_seq: admitted.audit_seq,
            shadow: Some(reason),
        });
    }
    agent
        .broker
        .set_declared(admitted.quadrant, &admitted.workload, Some(admitted.lanes));
    agent
        .supervisor
        .start(admitted.spec)
        .await
        .map_err(|source| DeployError::NotStarted {
            key: admitted.key.clone(),
            source,
        })?;
    // Checked in `admit`; submits take turns per workload, so it still fits.
    agent
        .set_workload_slos(&admitted.key, admitted.slos)
        .map_err(slo_error)?;
    // Checked in `admit` as the SLOs are.
    agent
        .broker
        .set_plan_breaker(&admitted.key, admitted.breaker)
        .map_err(DeployError::Breaker)?;
    // Give the process a moment to be placed, so the answer carries its pid.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Submitted {
        status: agent.supervisor.get(&admitted.key)?,
        signer: admitted.signer,
        spiffe_id: admitted.spiffe_id,
        audit_seq: admitted.audit_seq,
        shadow: None,
    })
}

/// A plan's SLOs that do not fit, named by the field at fault.
fn slo_error(e: crate::config::ConfigError) -> DeployError {
    match e {
        crate::config::ConfigError::Invalid { field, reason } => {
            DeployError::Slo(format!("{field}: {reason}"))
        }
        other => DeployError::Slo(other.to_string()),
    }
}

/// Every check, then the generation recorded (blocking). A `shadow` submit is refused before
/// anything is recorded when the workload has no live generation or a shadow already runs.
fn admit(
    agent: &Agent,
    envelope: &Envelope,
    rollback: Option<&Envelope>,
    shadow: bool,
) -> Result<Admitted, DeployError> {
    let config = &agent.config;
    let trust = TrustStore::load(&config.trust_store).map_err(DeployError::TrustStore)?;
    let (plan, signer) = plans::verify(envelope, &trust)?;
    let q = Quadrant::from(plan.quadrant);
    let key = format!("{}/{}", q.name(), plan.workload);
    shadow_fits(agent, &key, shadow && rollback.is_none())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Forward only, unless a live break-glass authorization names exactly this generation.
    let break_glass = {
        let generations = locked(&agent.generations);
        let store = generations
            .as_ref()
            .map_err(|e| DeployError::GenerationStore(e.to_string()))?;
        check_generation(store, &trust, &plan, &key, rollback, now)?
    };
    let executable = verified_executable(&ArtifactStore::new(&config.artifacts_root), &plan)?;
    let identity = agent
        .identity
        .as_ref()
        .map_err(|e| DeployError::AdmissionUnavailable(e.clone()))?;
    let spiffe_id = identity.id_of(&attest::Caller {
        quadrant: q,
        workload: plan.workload.clone(),
        shadow: false,
        instance: 0,
    });
    let svid = identity
        .authority()
        .mint_x509(&spiffe_id, identity.ttl())
        .map_err(|e| DeployError::AdmissionUnavailable(e.to_string()))?;
    // The plan's SLOs must fit beside the others before anything is decided or recorded.
    let slos = plan
        .slo
        .as_ref()
        .map(|s| crate::slo::plan_slos(q, &plan.workload, s))
        .unwrap_or_default();
    agent.slo.check_owned(&key, &slos).map_err(slo_error)?;
    let breaker = plan_breaker(agent, &plan, q, &key)?;
    // A rollback replaces the live generation; anything else may start as its shadow (asked
    // for, or a cost SLO of its service near its limit), which admission sees.
    let shadow_reason = rollback
        .is_none()
        .then(|| crate::shadow::Shadows::reason(agent, &key, q, &plan.workload, shadow))
        .flatten();
    let decision = agent.admission.admit(
        Ok(identity.authority()),
        &review_of(&plan, q, &signer, shadow_reason.is_some()),
        &svid.chain,
    );
    if !decision.allowed {
        return Err(DeployError::Rejected {
            key,
            why: decision.why(),
        });
    }
    let at = placed(agent, q, &key, &plan)?;
    if let Some(bg) = &break_glass {
        let rb = &bg.rollback;
        let event = serde_json::json!({
            "workload": key, "from_generation": bg.from, "to_generation": rb.target_generation,
            "reason": rb.reason, "authorized_by": bg.authorized_by, "plan_signer": signer,
            "expires_at": rb.expires_at,
        });
        agent
            .admission
            .record("break-glass", event)
            .map_err(DeployError::AuditRecord)?;
        warn!(workload = %key, to = rb.target_generation, reason = %rb.reason, by = %bg.authorized_by, "break-glass rollback");
    }
    {
        let mut generations = locked(&agent.generations);
        let store = generations
            .as_mut()
            .map_err(|e| DeployError::GenerationStore(e.to_string()))?;
        if break_glass.is_some() {
            store.force(&key, plan.generation)?;
        } else {
            // Checked again under the same lock: a concurrent submit of the same generation
            // loses here.
            store.accept(&key, plan.generation)?;
        }
    }
    let mut spec = spec_of(config, &plan, at, key.clone(), executable);
    spec.drop_net_raw = locked(&agent.dataplane).raw_sockets_denied(q);
    Ok(Admitted {
        shadow: shadow_reason,
        breaker,
        slos,
        key,
        quadrant: q,
        workload: plan.workload.clone(),
        lanes: declared_lanes(&plan),
        spec,
        signer,
        spiffe_id,
        audit_seq: decision.audit_seq,
    })
}

/// The plan's `breaker` section over the configuration's thresholds, for its service.
fn plan_breaker(
    agent: &Agent,
    plan: &plans::Plan,
    q: Quadrant,
    key: &str,
) -> Result<Option<PlanBreaker>, DeployError> {
    let Some(b) = &plan.breaker else {
        return Ok(None);
    };
    let service = b.service.clone().unwrap_or_else(|| plan.workload.clone());
    let cfg = agent
        .config
        .breakers
        .with_plan(b)
        .map_err(|e| DeployError::Breaker(e.to_string()))?;
    let target = (q, service);
    if let Some(other) = agent.broker.plan_breaker_owner(key, &target) {
        return Err(DeployError::Breaker(format!(
            "{}/{} has breaker thresholds from the plan of {other} already",
            q.name(),
            target.1
        )));
    }
    Ok(Some((target, cfg)))
}

/// No new generation of `key` while its shadow runs; a shadow (`shadow`) only beside a live
/// generation.
fn shadow_fits(agent: &Agent, key: &str, shadow: bool) -> Result<(), DeployError> {
    let refuse = |source| DeployError::Shadow {
        key: key.to_owned(),
        source,
    };
    if let Some(generation) = agent.shadows.generation_of(key) {
        return Err(refuse(crate::shadow::ShadowError::Busy {
            key: key.to_owned(),
            generation,
        }));
    }
    let live = agent
        .supervisor
        .get(key)
        .is_ok_and(|s| s.state != "stopped");
    if shadow && !live {
        return Err(refuse(crate::shadow::ShadowError::NoLive(key.to_owned())));
    }
    Ok(())
}

/// Every artifact re-hashed against its digest; the first is what runs.
fn verified_executable(store: &ArtifactStore, plan: &plans::Plan) -> Result<PathBuf, DeployError> {
    let mut executable = None;
    for reference in &plan.artifacts {
        let path = store.open_verified(reference)?;
        executable.get_or_insert(path);
    }
    executable.ok_or(DeployError::NoArtifact)
}

/// The admission review of a plan (`shadow`: it starts as a shadow generation).
fn review_of(plan: &plans::Plan, q: Quadrant, signer: &str, shadow: bool) -> serde_json::Value {
    serde_json::json!({"review": {"object": {
        "quadrant": q.name(),
        "workload": plan.workload,
        "labels": plan.labels,
        "artifacts": plan.artifacts,
        "resources": {
            "cpu": plan.resources.cpu_millis,
            "memory": plan.resources.memory_bytes,
            "pids": plan.resources.pids,
        },
        "generation": plan.generation,
        "signer": signer,
        "priority": plan.priority,
        "shadow": shadow,
    }}})
}

/// How the supervisor runs a plan's workload.
/// The instance of `q` the workload `key` of `plan` runs in (`scale::place`), or why none fits.
fn placed(
    agent: &Agent,
    q: Quadrant,
    key: &str,
    plan: &plans::Plan,
) -> Result<crate::config::InstanceRef, DeployError> {
    let placement = agent.place(q, key, &request_of(plan));
    placement
        .chosen
        .map(|index| crate::config::InstanceRef::new(q, index))
        .ok_or_else(|| DeployError::Unplaced {
            key: key.to_owned(),
            summary: placement.summary,
        })
}

/// What placement weighs for `plan`: its resource limits and its `constraints`.
#[must_use]
pub fn request_of(plan: &plans::Plan) -> crate::scale::place::Request {
    crate::scale::place::Request {
        cpu_millis: plan.resources.cpu_millis,
        memory_bytes: plan.resources.memory_bytes,
        constraints: plan.constraints.clone(),
    }
}

fn spec_of(
    config: &Config,
    plan: &plans::Plan,
    at: crate::config::InstanceRef,
    key: String,
    executable: PathBuf,
) -> workloads::Spec {
    let q = at.quadrant;
    workloads::Spec {
        key,
        instance: config.instance.clone(),
        quadrant: q.name().to_owned(),
        workload: plan.workload.clone(),
        generation: plan.generation,
        executable,
        args: plan.args.clone(),
        env: plan.env.clone(),
        resources: plan.resources.clone(),
        restart: plan.restart,
        cgroup: config.instance_cgroup_dir(at).join(&plan.workload),
        netns: config.instance_netns(at),
        endpoint: format!("unix://{}", config.workload_socket(q).display()),
        lane_socket: config.lane_socket(),
        log: config
            .state_dir
            .join(format!("{}-logs", config.instance))
            .join(format!("{}-{}.log", q.name(), plan.workload)),
        // Set from the live dataplane when the workload starts.
        drop_net_raw: false,
    }
}

/// The generation rule: a newer generation, or an older one under a live break-glass
/// authorization for exactly this plan, at time `now` (seconds). Returns the authorization when
/// it applies.
fn check_generation(
    generations: &Generations,
    trust: &TrustStore,
    plan: &plans::Plan,
    key: &str,
    rollback: Option<&Envelope>,
    now: u64,
) -> Result<Option<BreakGlass>, DeployError> {
    match rollback {
        None => {
            generations.check(key, plan.generation)?;
            Ok(None)
        }
        Some(auth) => {
            let (rb, authorized_by) = plans::verify_rollback(auth, trust, now)
                .map_err(|e| DeployError::BreakGlass(e.to_string()))?;
            if rb.quadrant != plan.quadrant
                || rb.workload != plan.workload
                || rb.target_generation != plan.generation
            {
                return Err(DeployError::BreakGlass(format!(
                    "the authorization is for {}/{} generation {}, the plan is {key} generation {}",
                    Quadrant::from(rb.quadrant).name(),
                    rb.workload,
                    rb.target_generation,
                    plan.generation
                )));
            }
            let current = generations.current(key);
            if current.is_none_or(|c| plan.generation >= c) {
                return Err(DeployError::BreakGlass(format!(
                    "generation {} is not older than the accepted {current:?}; submit it normally",
                    plan.generation
                )));
            }
            Ok(Some(BreakGlass {
                rollback: rb,
                authorized_by,
                from: current,
            }))
        }
    }
}

/// The lanes a plan declares, as the broker enforces them. Every TCP lane is mutually
/// authenticated, so `tcp` and `tcp_mtls` both mean a TCP + mTLS lane.
fn declared_lanes(plan: &plans::Plan) -> Vec<DeclaredLane> {
    use crate::lanes::Transport;
    plan.lanes
        .iter()
        .filter_map(|l| {
            let (q, service) = l.peer.split_once('/')?;
            Some(DeclaredLane {
                quadrant: Quadrant::from_name(q)?,
                service: service.to_owned(),
                transport: l.transport.map(|t| match t {
                    plans::Transport::Shm => Transport::Shm,
                    plans::Transport::Uds => Transport::Uds,
                    plans::Transport::Tcp | plans::Transport::TcpMtls => Transport::Tcp,
                }),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{Role, SigningKey};

    fn plan(generation: u64) -> plans::Plan {
        plans::parse(
            &serde_json::json!({
                "api_version": "quadrant/v1", "quadrant": "px", "workload": "api",
                "generation": generation, "artifacts": [format!("api@sha256:{}", "ab".repeat(32))],
                "args": ["--listen"], "env": {"A": "1"},
                "resources": {"cpu_millis": 250, "memory_bytes": 67_108_864, "pids": 32},
                "labels": {"app": "api", "owner": "payments"}, "restart": "on_failure",
                "lanes": [{"peer": "pg/edge", "transport": "tcp_mtls"}, {"peer": "dg/cache"}],
            })
            .to_string(),
        )
        .unwrap()
    }

    fn store(name: &str) -> Generations {
        let path = std::env::temp_dir().join(format!(
            "quadrant-deploy-{name}-{}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Generations::open(&path).unwrap()
    }

    #[test]
    fn the_review_carries_what_admission_judges() {
        let r = review_of(&plan(3), Quadrant::Px, "prod", true);
        let o = &r["review"]["object"];
        assert_eq!(o["shadow"], true);
        assert_eq!(o["quadrant"], "px");
        assert_eq!(o["workload"], "api");
        assert_eq!(o["labels"]["owner"], "payments");
        assert_eq!(
            o["resources"],
            serde_json::json!({"cpu": 250, "memory": 67_108_864, "pids": 32})
        );
        assert_eq!(
            (o["generation"].as_u64(), o["signer"].as_str()),
            (Some(3), Some("prod"))
        );
    }

    #[test]
    fn a_plan_runs_in_its_quadrant_and_workload_cgroup() {
        let config = Config::embedded();
        let s = spec_of(
            &config,
            &plan(1),
            crate::config::InstanceRef::new(Quadrant::Px, 0),
            "px/api".into(),
            "/opt/mcp/x".into(),
        );
        assert_eq!(s.cgroup, config.cgroup_dir(Quadrant::Px).join("api"));
        assert_eq!(s.netns, config.netns(Quadrant::Px));
        let placed = spec_of(
            &config,
            &plan(1),
            crate::config::InstanceRef::new(Quadrant::Px, 2),
            "px/api".into(),
            "/opt/mcp/x".into(),
        );
        assert_eq!(
            placed.cgroup,
            config.cgroup_parent().join("px-2").join("api")
        );
        assert_eq!(placed.netns, "quadrant-px-2");
        assert_eq!(
            s.endpoint,
            format!("unix://{}", config.workload_socket(Quadrant::Px).display())
        );
        assert_eq!(s.args, ["--listen"]);
        assert!(!s.drop_net_raw, "set from the live dataplane, not here");
    }

    #[test]
    fn declared_lanes_name_quadrant_service_and_transport() {
        use crate::lanes::Transport;
        let lanes = declared_lanes(&plan(1));
        assert_eq!(lanes.len(), 2);
        assert_eq!(
            (
                lanes[0].quadrant,
                lanes[0].service.as_str(),
                lanes[0].transport
            ),
            (Quadrant::Pg, "edge", Some(Transport::Tcp))
        );
        assert_eq!(
            (
                lanes[1].quadrant,
                lanes[1].service.as_str(),
                lanes[1].transport
            ),
            (Quadrant::Dg, "cache", None)
        );
    }

    #[test]
    fn generations_move_forward_unless_break_glass_names_the_plan() {
        let trust_dir =
            std::env::temp_dir().join(format!("quadrant-deploy-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&trust_dir);
        std::fs::create_dir_all(&trust_dir).unwrap();
        let (glass, _) = SigningKey::generate("glass").unwrap();
        std::fs::write(
            trust_dir.join("glass.json"),
            serde_json::to_string(&glass.trusted(vec![Role::BreakGlass], &[Quadrant::Px])).unwrap(),
        )
        .unwrap();
        let trust = TrustStore::load(&trust_dir).unwrap();
        let mut generations = store("gens");
        generations.accept("px/api", 3).unwrap();
        let now = 1_000;
        assert_eq!(
            check_generation(&generations, &trust, &plan(4), "px/api", None, now).unwrap(),
            None
        );
        let e = check_generation(&generations, &trust, &plan(3), "px/api", None, now).unwrap_err();
        assert!(matches!(e, DeployError::Generation(_)), "{e}");

        let authorize = |generation, expires_at| {
            plans::sign_rollback(
                &plans::Rollback {
                    quadrant: plans::QuadrantName::Px,
                    workload: "api".into(),
                    target_generation: generation,
                    reason: "bad release".into(),
                    expires_at,
                },
                &glass,
            )
        };
        let bg = check_generation(
            &generations,
            &trust,
            &plan(2),
            "px/api",
            Some(&authorize(2, now + 60)),
            now,
        )
        .unwrap()
        .expect("applies");
        assert_eq!((bg.from, bg.authorized_by.as_str()), (Some(3), "glass"));
        for (what, auth, p) in [
            ("another generation", authorize(1, now + 60), plan(2)),
            ("not older", authorize(4, now + 60), plan(4)),
            ("expired", authorize(2, now - 1), plan(2)),
        ] {
            let e =
                check_generation(&generations, &trust, &p, "px/api", Some(&auth), now).unwrap_err();
            assert!(matches!(e, DeployError::BreakGlass(_)), "{what}: {e}");
        }
        let _ = std::fs::remove_dir_all(&trust_dir);
    }
}
