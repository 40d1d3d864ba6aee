//! A service of the agent unavailable to one quadrant for a while — the chaos fault
//! `identity_outage`: the quadrant's Workload API answers `UNAVAILABLE` to every call and ends
//! the streams it had open, as a SPIFFE agent that went away would; SVIDs already fetched stay
//! valid until they expire, and the other quadrants are served as before. The agent keeps the
//! outage with its expiry (the controller asks for it over the control socket), so it ends on
//! time by itself, and with the agent.

use std::sync::atomic::{AtomicU64, Ordering};

use dataplane_common::Quadrant;
use tokio::sync::watch;

use crate::breakers::monotonic_ns;

/// The longest outage.
pub const MAX_OUTAGE_MS: u64 = 3_600_000;

/// The outages of one of the agent's services the agent keeps: per quadrant, when its outage
/// ends.
#[derive(Debug)]
pub struct Outages {
    until: watch::Sender<[u64; 4]>,
    refused: [AtomicU64; 4],
    /// What is unavailable ("the Workload API", "the policy engine") and the fault's name.
    what: (&'static str, &'static str),
}

impl Default for Outages {
    /// The Workload API's.
    fn default() -> Self {
        Self::of("the Workload API", "identity_outage")
    }
}

impl Outages {
    /// Outages of `what`, caused by the fault `fault`.
    #[must_use]
    pub fn of(what: &'static str, fault: &'static str) -> Self {
        Self {
            until: watch::Sender::new([0; 4]),
            refused: Default::default(),
            what: (what, fault),
        }
    }

    /// The policy engine's: lane decisions that involve the quadrant fail closed.
    #[must_use]
    pub fn policy() -> Self {
        Self::of("the policy engine", "policy_outage")
    }

    /// The message of a refusal of `q`'s, or `None` outside an outage (counted).
    #[must_use]
    pub fn refusal(&self, q: Quadrant) -> Option<String> {
        let left = self.left_ms(q)?;
        self.refused[q as usize].fetch_add(1, Ordering::Relaxed);
        Some(format!(
            "{} of {} is unavailable for {left} ms more (chaos {})",
            self.what.0,
            q.name(),
            self.what.1
        ))
    }

    /// Starts an outage of `q`'s Workload API for `millis` (0 ends it now). Returns the calls
    /// refused during the outage it replaced or ended.
    pub fn set(&self, q: Quadrant, millis: u64) -> u64 {
        let i = q as usize;
        let until = if millis == 0 {
            0
        } else {
            monotonic_ns() + millis.min(MAX_OUTAGE_MS) * 1_000_000
        };
        let refused = self.refused[i].swap(0, Ordering::Relaxed);
        self.until.send_modify(|u| u[i] = until);
        refused
    }

    /// Milliseconds left of `q`'s outage, if one is live.
    #[must_use]
    pub fn left_ms(&self, q: Quadrant) -> Option<u64> {
        let until = self.until.borrow()[q as usize];
        let now = monotonic_ns();
        (now < until).then(|| (until - now).div_ceil(1_000_000))
    }

    /// Calls refused so far in `q`'s current (or last) outage.
    #[must_use]
    pub fn refused(&self, q: Quadrant) -> u64 {
        self.refused[q as usize].load(Ordering::Relaxed)
    }

    /// The answer to a call of `q` during its outage (counted), or `None` outside one.
    #[must_use]
    pub fn refuse(&self, q: Quadrant) -> Option<tonic::Status> {
        self.refusal(q).map(tonic::Status::unavailable)
    }

    /// The live outages, as `quadrant chaos status` shows them: the calls refused so far as
    /// what they matched and refused.
    #[must_use]
    pub fn live(&self) -> Vec<super::FaultStatus> {
        let action = if self.what.1 == "policy_outage" {
            super::Action::PolicyOutage
        } else {
            super::Action::IdentityOutage
        };
        let until = *self.until.borrow();
        Quadrant::ALL
            .into_iter()
            .filter_map(|q| {
                let left_ms = self.left_ms(q)?;
                let refused = self.refused(q);
                Some(super::FaultStatus {
                    action,
                    from: "any".into(),
                    to: q.name().into(),
                    percent: 100.0,
                    delay_ms: 0.0,
                    jitter_ms: 0.0,
                    left_ms,
                    expires_ns: until[q as usize],
                    matched: refused,
                    dropped: refused,
                })
            })
            .collect()
    }

    /// Resolves once an outage of `q` is live (at once if one is).
    pub async fn begun(&self, q: Quadrant) {
        let mut rx = self.until.subscribe();
        loop {
            if monotonic_ns() < rx.borrow_and_update()[q as usize] {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// One X.509-SVID fetch from the Workload API at `socket`: the first message of the stream.
async fn fetch_svid(socket: std::path::PathBuf) -> Result<(), String> {
    use crate::identity::workload_api::{
        SECURITY_HEADER,
        pb::{X509svidRequest, spiffe_workload_api_client::SpiffeWorkloadApiClient},
    };
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    match stream.message().await {
        Ok(Some(r)) if !r.svids.is_empty() => Ok(()),
        Ok(_) => Err("no SVID".into()),
        Err(s) => Err(s.message().to_owned()),
    }
}

/// `quadrant chaos identity-probe RATE TIMEOUT_MS` (inside a quadrant, as an experiment's
/// effect probe of an `identity_outage`): fetches an X.509-SVID from the quadrant's Workload API
/// (`SPIFFE_ENDPOINT_SOCKET`) `rate` times a second, each on a new connection, and prints
/// `SENT_NS RTT_NS` for one answered within the timeout, `SENT_NS -` otherwise, until killed.
///
/// # Errors
/// No endpoint in the environment, or stdout gone.
pub fn probe_lines(rate: u32, timeout: std::time::Duration) -> std::io::Result<()> {
    use std::io::Write as _;
    let endpoint = std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|_| {
        std::io::Error::other("SPIFFE_ENDPOINT_SOCKET is not set (run it with `quadrant exec`)")
    })?;
    let socket = std::path::PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(&endpoint));
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let period = std::time::Duration::from_secs(1) / rate.max(1);
    let start = std::time::Instant::now();
    let mut out = std::io::stdout().lock();
    for n in 0u32.. {
        std::thread::sleep(
            (start + period * n).saturating_duration_since(std::time::Instant::now()),
        );
        let sent = monotonic_ns();
        let ok = rt
            .block_on(async { tokio::time::timeout(timeout, fetch_svid(socket.clone())).await })
            .is_ok_and(|r| r.is_ok());
        if ok {
            writeln!(out, "{sent} {}", monotonic_ns() - sent)?;
        } else {
            writeln!(out, "{sent} -")?;
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_outage_refuses_its_quadrant_only_until_it_ends() {
        let o = std::sync::Arc::new(Outages::default());
        assert!(o.refuse(Quadrant::Px).is_none());
        let waiting = tokio::spawn({
            let o = std::sync::Arc::clone(&o);
            async move { o.begun(Quadrant::Px).await }
        });
        assert_eq!(o.set(Quadrant::Px, 60_000), 0);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("streams learn of it")
            .expect("task");
        let status = o.refuse(Quadrant::Px).expect("refused");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("Workload API of px"),
            "{status:?}"
        );
        assert!(o.refuse(Quadrant::Pg).is_none(), "another quadrant served");
        assert!(o.left_ms(Quadrant::Px).is_some_and(|l| l > 59_000));
        assert_eq!(o.set(Quadrant::Px, 0), 1, "one refused, then ended");
        assert!(o.refuse(Quadrant::Px).is_none());
        o.set(Quadrant::Dx, 1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(o.refuse(Quadrant::Dx).is_none(), "ended by itself");
        assert!(o.live().is_empty(), "none live");
        let p = Outages::policy();
        p.set(Quadrant::Dg, 60_000);
        let live = p.live();
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(
            (live[0].action, live[0].to.as_str()),
            (crate::chaos::Action::PolicyOutage, "dg")
        );
        assert!(live[0].left_ms > 59_000 && live[0].expires_ns > monotonic_ns());
        let m = p.refusal(Quadrant::Dg).expect("refused");
        assert!(
            m.starts_with("the policy engine of dg is unavailable")
                && m.ends_with("(chaos policy_outage)"),
            "{m}"
        );
        assert_eq!(p.live()[0].matched, 1, "the refusal counted");
    }
}
