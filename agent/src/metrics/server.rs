//! The HTTP endpoint of `metrics.listen`: `GET /metrics`, `GET /healthz` (the agent serves),
//! `GET /readyz` (and runs a policy: 503 with the reason while the quadrants are deny-all).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

use super::{Format, collect::Sources};
use crate::daemon::agent::Agent;

/// A request that has not sent its headers within this long is dropped (a slow client holds
/// no task for ever).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr`.
///
/// # Errors
/// The address is taken, or not this host's.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `listener` until `stop`.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let agent = Arc::clone(&agent);
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let agent = Arc::clone(&agent);
                            async move { Ok::<_, Infallible>(handle(&agent, &req).await) }
                        });
                        let conn = http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = conn.await {
                            debug!(%peer, error = %e, "metrics connection ended");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "metrics accept failed"),
            },
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle<B>(agent: &Arc<Agent>, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed: only GET and HEAD\n", req.method()),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let format = Format::from_accept(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            metrics(agent, format).await
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let state = agent.policy.state();
            if state.starts_with("enforced") {
                text(StatusCode::OK, format!("{state}\n"))
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{state}\n"))
            }
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no {other} here: /metrics, /healthz and /readyz\n"),
        ),
    }
}

async fn metrics(agent: &Arc<Agent>, format: Format) -> Response<Full<Bytes>> {
    let a = Arc::clone(agent);
    let encoded = tokio::task::spawn_blocking(move || {
        let sources = Sources::read(&a);
        for (source, why) in &sources.unreadable {
            warn!(source, error = %why, "metrics: a source could not be read");
        }
        super::encode(
            super::collect::families(&sources),
            &a.admission.metrics,
            format,
        )
    })
    .await;
    match encoded {
        Ok(Ok(body)) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the metrics task failed: {e}\n"),
        ),
    }
}
