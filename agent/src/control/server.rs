//! The agent's side of the control socket: reads one request (at most
//! [`MAX_REQUEST_BYTES`], UTF-8, JSON of the schema), checks that the peer is root, dispatches it
//! to the services of the running [`Agent`] and writes the answer. Work that blocks — the
//! kernel's counters, Rego, map writes — runs on blocking threads, never on the runtime threads
//! that also answer the Workload API. This is the only place a [`Response`] is built.

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::mpsc,
};

use super::protocol::{MAX_REQUEST_BYTES, Request, Response, parse_request};
use crate::{daemon::agent::Agent, deploy};

/// A `down` request handed to the main loop, which answers it on the connection when done.
pub type DownRequest = (UnixStream, bool);

/// What a control connection sent.
enum RequestLine {
    /// Nothing: a liveness probe connects and closes without a request.
    Empty,
    /// One request line.
    Line(String),
    /// Something that is no request line, and why.
    Refused(String),
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`]. A longer one is not read to its
/// end: the agent answers at once that it is too large (the client's write then fails, and it
/// reads the answer).
async fn read_request(stream: &mut UnixStream) -> io::Result<RequestLine> {
    let limit = MAX_REQUEST_BYTES;
    let mut bytes = Vec::new();
    BufReader::new(stream.take(limit as u64 + 1))
        .read_until(b'\n', &mut bytes)
        .await?;
    if bytes.is_empty() {
        return Ok(RequestLine::Empty);
    }
    if bytes.len() > limit {
        return Ok(RequestLine::Refused(format!(
            "invalid request: too large: more than {limit} bytes (1 MiB) without a newline; the \
             control socket takes one JSON request of at most {limit} bytes per line"
        )));
    }
    Ok(match String::from_utf8(bytes) {
        Ok(line) => RequestLine::Line(line),
        Err(e) => RequestLine::Refused(format!(
            "invalid request: not UTF-8 (byte {} is not valid UTF-8)",
            e.utf8_error().valid_up_to()
        )),
    })
}

/// Writes one answer line.
pub async fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the callback of map_or_else, which hands over the error it owns"
)]
fn error(message: impl ToString) -> Response {
    Response::Error {
        message: message.to_string(),
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    agent: &Arc<Agent>,
    f: impl FnOnce(&Agent) -> T + Send + 'static,
) -> Result<T, Response> {
    let agent = Arc::clone(agent);
    tokio::task::spawn_blocking(move || f(&agent))
        .await
        .map_err(|e| error(format!("the agent's task failed: {e}")))
}

/// Serves one connection.
pub async fn serve_connection(
    mut stream: UnixStream,
    agent: Arc<Agent>,
    down: mpsc::Sender<DownRequest>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let line = match read_request(&mut stream).await? {
        RequestLine::Empty => return Ok(()),
        RequestLine::Line(line) => Ok(line),
        RequestLine::Refused(message) => Err(message),
    };
    if cred.uid() != 0 {
        let message = format!(
            "uid {} may not use the control socket (root only)",
            cred.uid()
        );
        return write_response(&mut stream, &error(message)).await;
    }
    let request = match line.and_then(|l| parse_request(&l).map_err(|e| e.to_string())) {
        Ok(r) => r,
        Err(message) => return write_response(&mut stream, &error(message)).await,
    };
    let response = match request {
        Request::Events { quadrant } => return stream_events(stream, &agent, quadrant).await,
        Request::Observe {
            filter,
            last,
            follow,
        } => return stream_flows(stream, &agent, &filter, last, follow).await,
        Request::Down { keep_dataplane } => {
            // The main loop tears down (or keeps the dataplane) and answers on this connection.
            return match down.send((stream, keep_dataplane)).await {
                Ok(()) => Ok(()),
                Err(mpsc::error::SendError((mut stream, _))) => {
                    write_response(&mut stream, &error("the agent is already shutting down")).await
                }
            };
        }
        other => dispatch(other, &agent).await,
    };
    write_response(&mut stream, &response).await
}

/// `IdentityOutage`, `PolicyOutage`: starts (or with 0 ends) an outage for a quadrant.
fn outage(outages: &crate::chaos::outage::Outages, quadrant: String, millis: u64) -> Response {
    match dataplane_common::Quadrant::from_name(&quadrant) {
        None => error(format!("unknown quadrant {quadrant:?}: dx, dg, px or pg")),
        Some(_) if millis > crate::chaos::outage::MAX_OUTAGE_MS => error(format!(
            "millis: {millis} is above {} (an hour)",
            crate::chaos::outage::MAX_OUTAGE_MS
        )),
        Some(q) => {
            let refused = outages.set(q, millis);
            Response::IdentityOutage {
                quadrant,
                left_ms: outages.left_ms(q).unwrap_or(0),
                refused,
            }
        }
    }
}

async fn dispatch(request: Request, agent: &Arc<Agent>) -> Response {
    let answer = match request {
        Request::Status => blocking(agent, Agent::status)
            .await
            .map(|r| r.map_or_else(error, |s| Response::Status(Box::new(s)))),
        Request::PolicyReload => blocking(agent, Agent::reload_policy).await.map(|r| {
            r.map_or_else(
                |e| {
                    error(format!(
                        "policy not reloaded, the previous one stays live: {e}"
                    ))
                },
                |a| Response::PolicyReloaded {
                    policy: a.state,
                    slot: a.slot,
                },
            )
        }),
        Request::Submit { envelope, shadow } => Ok(submitted(
            deploy::submit(agent, envelope, None, shadow).await,
        )),
        Request::Rollback {
            authorization,
            envelope,
        } => Ok(submitted(
            deploy::submit(agent, envelope, Some(authorization), false).await,
        )),
        Request::Shadows => {
            blocking(agent, |a| Response::Shadows(Box::new(a.shadows.report(a)))).await
        }
        Request::ShadowDecide { workload, decision } => Ok(agent
            .shadows
            .decide(agent, &workload, decision)
            .await
            .map_or_else(error, |report| Response::ShadowDecided {
                decision,
                report: Box::new(report),
            })),
        Request::Lanes => blocking(agent, |a| Response::Lanes(Box::new(a.lanes_report()))).await,
        Request::Slo => blocking(agent, |a| Response::Slo(Box::new(a.slo_report()))).await,
        Request::Breakers => {
            blocking(agent, |a| {
                a.breakers_report().map_or_else(
                    |e| error(e.to_string()),
                    |r| Response::Breakers(Box::new(r)),
                )
            })
            .await
        }
        Request::Scale { .. }
        | Request::Instances
        | Request::Drain { .. }
        | Request::Place { .. } => instances(request, agent).await,
        Request::Trace { mode } => {
            blocking(agent, move |a| {
                a.set_trace(mode)
                    .map_or_else(error, |mode| Response::Trace { mode })
            })
            .await
        }
        Request::PodAdd { .. }
        | Request::PodDel { .. }
        | Request::PodCheck { .. }
        | Request::PodGc { .. }
        | Request::Pods => pods(request, agent).await,
        Request::IdentityOutage { quadrant, millis } => {
            Ok(outage(&agent.outages, quadrant, millis))
        }
        Request::PolicyOutage { quadrant, millis } => {
            Ok(outage(&agent.broker.policy_outages, quadrant, millis))
        }
        Request::Outages => Ok(Response::Outages {
            faults: [agent.outages.live(), agent.broker.policy_outages.live()].concat(),
        }),
        Request::Workloads => Ok(Response::Workloads {
            workloads: agent.supervisor.list(),
        }),
        Request::Stop { name } => Ok(stop(agent, &name).await),
        Request::Admit { review, svid_pem } => {
            blocking(agent, move |a| {
                Response::Admission(a.admit(&review, &svid_pem))
            })
            .await
        }
        Request::Events { .. } | Request::Observe { .. } | Request::Down { .. } => {
            Err(error("handled by the connection"))
        }
    };
    answer.unwrap_or_else(|e| e)
}

/// `stop`: a workload that stops takes its shadow generation with it (recorded as rejected),
/// and its SLOs and breaker thresholds.
async fn stop(agent: &Arc<Agent>, name: &str) -> Response {
    if agent.shadows.generation_of(name).is_some()
        && let Err(e) = agent
            .shadows
            .decide(agent, name, crate::shadow::Decision::Rejected)
            .await
    {
        tracing::warn!(error = %e, workload = %name, "its shadow generation did not stop");
    }
    let stopped = agent.supervisor.stop(name).await;
    if stopped.is_ok() {
        // Removing can only make the set valid.
        let _ = agent.set_workload_slos(name, Vec::new());
        let _ = agent.broker.set_plan_breaker(name, None);
    }
    stopped.map_or_else(error, Response::Stopped)
}

fn submitted(result: Result<deploy::Submitted, deploy::DeployError>) -> Response {
    match result {
        Ok(s) => Response::Submitted {
            status: s.status,
            signer: s.signer,
            spiffe_id: s.spiffe_id,
            audit_seq: s.audit_seq,
            shadow: s.shadow,
        },
        Err(e) => error(e),
    }
}

/// The CNI requests (`quadrant-cni`) and `pods`.
async fn pods(request: Request, agent: &Arc<Agent>) -> Result<Response, Response> {
    blocking(agent, move |a| {
        let (pods, dp, config) = (&a.pods, &a.dataplane, &a.config);
        let answer = match request {
            Request::PodAdd { pod } => pods
                .add(config, dp, pod)
                .map_or_else(error, |p| Response::Pod(Box::new(p))),
            Request::PodDel {
                container_id,
                ifname,
            } => pods
                .del(dp, &container_id, &ifname)
                .map_or_else(error, |removed| Response::PodDeleted { removed }),
            Request::PodCheck {
                container_id,
                ifname,
            } => pods
                .check(&container_id, &ifname)
                .map_or_else(error, |p| Response::Pod(Box::new(p))),
            Request::PodGc { valid } => pods
                .gc(dp, &valid)
                .map_or_else(error, |removed| Response::PodsCollected { removed }),
            _ => Response::Pods { pods: pods.list() },
        };
        a.flows.set_pods(&pods.list());
        answer
    })
    .await
}

/// Writes each event (of `quadrant`, if given) as a JSON line until the subscriber goes away
/// or the agent stops.
async fn stream_events(
    mut stream: UnixStream,
    agent: &Agent,
    quadrant: Option<String>,
) -> io::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    let q = match quadrant
        .as_deref()
        .map(dataplane_common::Quadrant::from_name)
    {
        Some(None) => {
            let name = quadrant.unwrap_or_default();
            return write_response(
                &mut stream,
                &error(format!("unknown quadrant {name:?}: dx, dg, px or pg")),
            )
            .await;
        }
        Some(q) => q,
        None => None,
    };
    let mut rx = agent.events.subscribe();
    loop {
        let line = match rx.recv().await {
            Ok(line) => line,
            Err(RecvError::Lagged(missed)) => agent.events.lagged(missed),
            Err(RecvError::Closed) => return Ok(()),
        };
        if q.is_some_and(|q| !crate::events::concerns(&line, q)) {
            continue;
        }
        stream.write_all(line.as_bytes()).await?;
        stream.write_all(b"\n").await?;
    }
}

/// Writes the last `last` kept flows `filter` passes, then with `follow` every later one, as
/// JSON lines; a follower that fell behind is told how many it missed.
async fn stream_flows(
    mut stream: UnixStream,
    agent: &Agent,
    filter: &crate::flows::FlowFilter,
    last: u32,
    follow: bool,
) -> io::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    if let Err(e) = filter.validate() {
        return write_response(&mut stream, &error(e)).await;
    }
    let (kept, mut rx) = agent.flows.snapshot(filter, last as usize);
    let write = |l: &crate::flows::FlowLine| {
        let mut line = serde_json::to_vec(l).unwrap_or_default();
        line.push(b'\n');
        line
    };
    for l in &kept {
        stream.write_all(&write(l)).await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match rx.recv().await {
            Ok(l) if filter.matches(&l.flow) => stream.write_all(&write(&l)).await?,
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                let note = serde_json::json!({"lost_events": missed});
                stream.write_all(format!("{note}\n").as_bytes()).await?;
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

/// The requests about quadrant instances: `scale`, `instances`, `drain`, `place`.
async fn instances(request: Request, agent: &Arc<Agent>) -> Result<Response, Response> {
    let unknown = |name: &str| {
        error(format!(
            "unknown quadrant {name:?}; expected dx, dg, px or pg"
        ))
    };
    match request {
        Request::Scale {
            quadrant,
            instances,
        } => {
            let Some(q) = dataplane_common::Quadrant::from_name(&quadrant) else {
                return Ok(unknown(&quadrant));
            };
            blocking(agent, move |a| {
                a.scale(q, instances).map_or_else(
                    |e| error(e.to_string()),
                    |instances| Response::Scaled {
                        quadrant,
                        instances,
                    },
                )
            })
            .await
        }
        Request::Drain {
            quadrant,
            index,
            resume,
        } => {
            let Some(q) = dataplane_common::Quadrant::from_name(&quadrant) else {
                return Ok(unknown(&quadrant));
            };
            blocking(agent, move |a| {
                a.drain(q, index, !resume)
                    .map_or_else(error, |()| Response::Drained {
                        quadrant,
                        index,
                        draining: !resume,
                    })
            })
            .await
        }
        Request::Place { plan } => {
            let plan = match crate::plans::from_value(&plan) {
                Ok(p) => p,
                Err(e) => return Ok(error(e.to_string())),
            };
            blocking(agent, move |a| {
                let q = dataplane_common::Quadrant::from(plan.quadrant);
                let key = format!("{}/{}", q.name(), plan.workload);
                Response::Placement(Box::new(a.place(q, &key, &deploy::request_of(&plan))))
            })
            .await
        }
        _ => {
            blocking(agent, |a| {
                Response::Instances(Box::new(a.instances_report()))
            })
            .await
        }
    }
}
