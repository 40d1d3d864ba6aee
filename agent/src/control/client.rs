//! The typed client of the control socket: one method per request, each returning exactly what
//! the request asks for (or the agent's refusal as [`ClientError::Agent`]).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::protocol::{MAX_REQUEST_BYTES, Request, Response, StatusReport};
use crate::{
    admission::Decision, lanes::broker::LanesReport, signing::Envelope, trace::TraceMode, workloads,
};

/// How long the CLI waits for the agent to answer (teardown included).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the CLI side of the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no agent answers on {path} ({source}); start one with `quadrant up`")]
    NotRunning {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The exchange failed half-way.
    #[error("control socket {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The request is longer than the agent reads.
    #[error(
        "the request is {bytes} bytes; the agent takes requests of at most {MAX_REQUEST_BYTES} bytes \
         (1 MiB): make the plan smaller (fewer or shorter arguments and environment entries)"
    )]
    TooLarge {
        /// Its length, newline included.
        bytes: usize,
    },
    /// The agent refused the request.
    #[error("agent: {0}")]
    Agent(String),
    /// The agent answered with something other than what the request asks for.
    #[error("control socket {path}: unexpected answer to {request}: {answer}")]
    Unexpected {
        /// Socket path.
        path: PathBuf,
        /// The request kind.
        request: &'static str,
        /// What came back, abridged.
        answer: String,
    },
    /// The answer was not valid.
    #[error("control socket {path}: invalid response: {source}")]
    Decode {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
}

/// Sends one request and waits for the answer.
pub fn call(path: &Path, request: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::NotRunning {
        path: path.to_owned(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ClientError::TooLarge { bytes: line.len() });
    }
    // An agent that refuses the request answers and closes before reading all of it: the write
    // then fails (EPIPE), and its answer says why.
    let written = (&stream).write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    match (written, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(io(e)),
        (Ok(()), Ok(_)) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without an answer",
            )));
        }
    }
    serde_json::from_str(&answer).map_err(|source| ClientError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// Whether an agent answers on `path`.
#[must_use]
pub fn agent_running(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// What `down --keep-dataplane` left running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The pins the next agent takes over.
    pub pin_dir: PathBuf,
    /// Their map layout.
    pub map_layout: u32,
    /// The workloads left running.
    pub handed_over_workloads: Vec<String>,
}

/// What a submit or a rollback started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    /// The workload's status right after start.
    pub status: workloads::Status,
    /// Key that signed the plan.
    pub signer: String,
    /// The workload's SPIFFE ID.
    pub spiffe_id: String,
    /// Audit record of the admission.
    pub audit_seq: Option<u64>,
    /// Why it started as a shadow beside the live generation, if it did.
    pub shadow: Option<String>,
}

/// A client of one agent's control socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the agent listening on `socket`.
    #[must_use]
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// Whether an agent answers.
    #[must_use]
    pub fn agent_running(&self) -> bool {
        agent_running(&self.socket)
    }

    /// Sends `request`; the agent's refusal becomes [`ClientError::Agent`], and `pick` takes
    /// what the request asks for out of the answer (`None`: another answer).
    fn expect<T>(
        &self,
        request: &Request,
        kind: &'static str,
        pick: impl FnOnce(Response) -> Result<T, Box<Response>>,
    ) -> Result<T, ClientError> {
        match call(&self.socket, request)? {
            Response::Error { message } => Err(ClientError::Agent(message)),
            other => pick(other).map_err(|answer| ClientError::Unexpected {
                path: self.socket.clone(),
                request: kind,
                answer: format!("{answer:?}").chars().take(200).collect(),
            }),
        }
    }

    /// `status`.
    pub fn status(&self) -> Result<StatusReport, ClientError> {
        self.expect(&Request::Status, "status", |r| match r {
            Response::Status(s) => Ok(*s),
            other => Err(Box::new(other)),
        })
    }

    /// `down`: everything removed; returns what.
    pub fn down(&self) -> Result<Vec<String>, ClientError> {
        let request = Request::Down {
            keep_dataplane: false,
        };
        self.expect(&request, "down", |r| match r {
            Response::Down { removed } => Ok(removed),
            other => Err(Box::new(other)),
        })
    }

    /// `down` with `keep_dataplane`.
    pub fn down_keep_dataplane(&self) -> Result<Kept, ClientError> {
        let request = Request::Down {
            keep_dataplane: true,
        };
        self.expect(&request, "down", |r| match r {
            Response::DataplaneKept {
                pin_dir,
                map_layout,
                handed_over_workloads,
            } => Ok(Kept {
                pin_dir,
                map_layout,
                handed_over_workloads,
            }),
            other => Err(Box::new(other)),
        })
    }

    /// `policy_reload`: the new policy line and the live slot.
    pub fn policy_reload(&self) -> Result<(String, u32), ClientError> {
        self.expect(&Request::PolicyReload, "policy_reload", |r| match r {
            Response::PolicyReloaded { policy, slot } => Ok((policy, slot)),
            other => Err(Box::new(other)),
        })
    }

    /// `admit`.
    pub fn admit(
        &self,
        review: serde_json::Value,
        svid_pem: String,
    ) -> Result<Decision, ClientError> {
        self.expect(&Request::Admit { review, svid_pem }, "admit", |r| match r {
            Response::Admission(d) => Ok(d),
            other => Err(Box::new(other)),
        })
    }

    /// `pod_add` (CNI ADD).
    pub fn pod_add(
        &self,
        pod: crate::pods::PodSpec,
    ) -> Result<crate::pods::PodStatus, ClientError> {
        self.expect(&Request::PodAdd { pod }, "pod_add", |r| match r {
            Response::Pod(p) => Ok(*p),
            other => Err(Box::new(other)),
        })
    }

    /// `pod_del` (CNI DEL): whether it was attached.
    pub fn pod_del(&self, container_id: &str, ifname: &str) -> Result<bool, ClientError> {
        let request = Request::PodDel {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        };
        self.expect(&request, "pod_del", |r| match r {
            Response::PodDeleted { removed } => Ok(removed),
            other => Err(Box::new(other)),
        })
    }

    /// `pod_check` (CNI CHECK).
    pub fn pod_check(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<crate::pods::PodStatus, ClientError> {
        let request = Request::PodCheck {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        };
        self.expect(&request, "pod_check", |r| match r {
            Response::Pod(p) => Ok(*p),
            other => Err(Box::new(other)),
        })
    }

    /// `pod_gc` (CNI GC): the pods detached.
    pub fn pod_gc(&self, valid: Vec<crate::pods::Attachment>) -> Result<Vec<String>, ClientError> {
        self.expect(&Request::PodGc { valid }, "pod_gc", |r| match r {
            Response::PodsCollected { removed } => Ok(removed),
            other => Err(Box::new(other)),
        })
    }

    /// `pods`.
    pub fn pods(&self) -> Result<Vec<crate::pods::PodStatus>, ClientError> {
        self.expect(&Request::Pods, "pods", |r| match r {
            Response::Pods { pods } => Ok(pods),
            other => Err(Box::new(other)),
        })
    }

    /// `submit`; with `shadow`, the new generation starts as a shadow of the live one.
    pub fn submit(&self, envelope: Envelope, shadow: bool) -> Result<Started, ClientError> {
        self.expect(&Request::Submit { envelope, shadow }, "submit", started)
    }

    /// `shadows`.
    pub fn shadows(&self) -> Result<crate::shadow::ShadowsReport, ClientError> {
        self.expect(&Request::Shadows, "shadows", |r| match r {
            Response::Shadows(report) => Ok(*report),
            other => Err(Box::new(other)),
        })
    }

    /// `shadow_decide`: promotes or rejects the shadow of `workload`.
    pub fn shadow_decide(
        &self,
        workload: String,
        decision: crate::shadow::Decision,
    ) -> Result<crate::shadow::ShadowReport, ClientError> {
        self.expect(
            &Request::ShadowDecide { workload, decision },
            "shadow_decide",
            |r| match r {
                Response::ShadowDecided { report, .. } => Ok(*report),
                other => Err(Box::new(other)),
            },
        )
    }

    /// `rollback`.
    pub fn rollback(
        &self,
        authorization: Envelope,
        envelope: Envelope,
    ) -> Result<Started, ClientError> {
        let request = Request::Rollback {
            authorization,
            envelope,
        };
        self.expect(&request, "rollback", started)
    }

    /// `workloads`.
    pub fn workloads(&self) -> Result<Vec<workloads::Status>, ClientError> {
        self.expect(&Request::Workloads, "workloads", |r| match r {
            Response::Workloads { workloads } => Ok(workloads),
            other => Err(Box::new(other)),
        })
    }

    /// `stop`.
    pub fn stop(&self, name: &str) -> Result<workloads::Status, ClientError> {
        let request = Request::Stop {
            name: name.to_owned(),
        };
        self.expect(&request, "stop", |r| match r {
            Response::Stopped(s) => Ok(s),
            other => Err(Box::new(other)),
        })
    }

    /// `lanes`.
    pub fn lanes(&self) -> Result<LanesReport, ClientError> {
        self.expect(&Request::Lanes, "lanes", |r| match r {
            Response::Lanes(l) => Ok(*l),
            other => Err(Box::new(other)),
        })
    }

    /// `slo`.
    pub fn slo(&self) -> Result<crate::slo::SloReport, ClientError> {
        self.expect(&Request::Slo, "slo", |r| match r {
            Response::Slo(s) => Ok(*s),
            other => Err(Box::new(other)),
        })
    }

    /// A Workload API outage of `quadrant` for `millis` (0: end it); returns (ms left, calls
    /// refused during the outage it replaced or ended).
    pub fn identity_outage(&self, quadrant: &str, millis: u64) -> Result<(u64, u64), ClientError> {
        let request = Request::IdentityOutage {
            quadrant: quadrant.to_owned(),
            millis,
        };
        self.expect(&request, "identity outage", |r| match r {
            Response::IdentityOutage {
                left_ms, refused, ..
            } => Ok((left_ms, refused)),
            other => Err(Box::new(other)),
        })
    }

    /// A policy engine outage of `quadrant` for `millis` (0: end it); returns (ms left, lane
    /// decisions refused during the outage it replaced or ended).
    pub fn policy_outage(&self, quadrant: &str, millis: u64) -> Result<(u64, u64), ClientError> {
        let request = Request::PolicyOutage {
            quadrant: quadrant.to_owned(),
            millis,
        };
        self.expect(&request, "policy outage", |r| match r {
            Response::IdentityOutage {
                left_ms, refused, ..
            } => Ok((left_ms, refused)),
            other => Err(Box::new(other)),
        })
    }

    /// The live identity and policy outages.
    pub fn outages(&self) -> Result<Vec<crate::chaos::FaultStatus>, ClientError> {
        self.expect(&Request::Outages, "outages", |r| match r {
            Response::Outages { faults } => Ok(faults),
            other => Err(Box::new(other)),
        })
    }

    /// `breakers`.
    pub fn breakers(&self) -> Result<crate::breakers::BreakersReport, ClientError> {
        self.expect(&Request::Breakers, "breakers", |r| match r {
            Response::Breakers(b) => Ok(*b),
            other => Err(Box::new(other)),
        })
    }

    /// `scale`: the instances `quadrant` runs now.
    pub fn scale(&self, quadrant: &str, instances: u8) -> Result<u8, ClientError> {
        let request = Request::Scale {
            quadrant: quadrant.to_owned(),
            instances,
        };
        self.expect(&request, "scale", |r| match r {
            Response::Scaled { instances, .. } => Ok(instances),
            other => Err(Box::new(other)),
        })
    }

    /// `instances`.
    pub fn instances(&self) -> Result<crate::scale::InstancesReport, ClientError> {
        self.expect(&Request::Instances, "instances", |r| match r {
            Response::Instances(i) => Ok(*i),
            other => Err(Box::new(other)),
        })
    }

    /// `place --explain`: where a workload of `plan` would go and why.
    pub fn place(
        &self,
        plan: serde_json::Value,
    ) -> Result<crate::scale::place::Placement, ClientError> {
        self.expect(&Request::Place { plan }, "place", |r| match r {
            Response::Placement(p) => Ok(*p),
            other => Err(Box::new(other)),
        })
    }

    /// `drain`: whether the instance is draining now.
    pub fn drain(&self, quadrant: &str, index: u8, resume: bool) -> Result<bool, ClientError> {
        let request = Request::Drain {
            quadrant: quadrant.to_owned(),
            index,
            resume,
        };
        self.expect(&request, "drain", |r| match r {
            Response::Drained { draining, .. } => Ok(draining),
            other => Err(Box::new(other)),
        })
    }

    /// `trace`: the mode now set.
    pub fn trace(&self, mode: TraceMode) -> Result<TraceMode, ClientError> {
        self.expect(&Request::Trace { mode }, "trace", |r| match r {
            Response::Trace { mode } => Ok(mode),
            other => Err(Box::new(other)),
        })
    }

    /// `events`: calls `each` with every event line until it returns `false` or the agent
    /// stops.
    pub fn events(
        &self,
        quadrant: Option<String>,
        each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        self.stream(&Request::Events { quadrant }, each)
    }

    /// `observe`: calls `each` with every flow line until it returns false or the agent ends
    /// the stream (at once without `follow`, after the kept flows).
    pub fn observe(
        &self,
        filter: crate::flows::FlowFilter,
        last: u32,
        follow: bool,
        each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        self.stream(
            &Request::Observe {
                filter,
                last,
                follow,
            },
            each,
        )
    }

    /// Sends `request` and calls `each` with every line of the answer until it returns false.
    fn stream(
        &self,
        request: &Request,
        mut each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let io = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::NotRunning {
                path: self.socket.clone(),
                source,
            })?;
        let mut request = serde_json::to_vec(request).unwrap_or_default();
        request.push(b'\n');
        stream.write_all(&request).map_err(io)?;
        for line in BufReader::new(stream).lines() {
            if !each(&line.map_err(io)?) {
                break;
            }
        }
        Ok(())
    }
}

fn started(r: Response) -> Result<Started, Box<Response>> {
    match r {
        Response::Submitted {
            status,
            signer,
            spiffe_id,
            audit_seq,
            shadow,
        } => Ok(Started {
            status,
            signer,
            spiffe_id,
            audit_seq,
            shadow,
        }),
        other => Err(Box::new(other)),
    }
}
