//! MCP-Core identity: the trust domain's CA ([`ca`]), caller attestation ([`attest`]) and the
//! SPIFFE Workload API served on one Unix socket per quadrant ([`workload_api`]).
//!
//! SPIFFE IDs are quadrant-scoped: `spiffe://<trust-domain>/quadrant/<q>/workload/<name>`.
//! X.509-SVIDs are issued on first request and re-issued at half their lifetime; every open
//! `FetchX509SVID` stream receives the new SVID.

pub mod attest;
pub mod authority;
pub mod ca;
pub mod verify;
pub mod workload_api;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use dataplane_common::Quadrant;
use tokio::sync::watch;
use tracing::{info, warn};

use self::{
    attest::Caller,
    ca::{Authority, CaError, X509Svid},
};

/// The SPIFFE ID of a quadrant workload.
#[must_use]
pub fn spiffe_id(trust_domain: &str, quadrant: Quadrant, workload: &str) -> String {
    format!(
        "spiffe://{trust_domain}/quadrant/{}/workload/{workload}",
        quadrant.name()
    )
}

/// Issues and rotates the SVIDs of one agent instance.
#[derive(Debug)]
pub struct IdentityService {
    authority: Authority,
    instance: String,
    ttl: Duration,
    x509: Mutex<HashMap<String, watch::Sender<Arc<X509Svid>>>>,
}

impl IdentityService {
    /// Wraps an authority for `instance` with SVID lifetime `ttl`.
    #[must_use]
    pub fn new(authority: Authority, instance: &str, ttl: Duration) -> Self {
        Self {
            authority,
            instance: instance.to_owned(),
            ttl,
            x509: Mutex::default(),
        }
    }

    /// The authority.
    #[must_use]
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The instance whose quadrants callers must be in.
    #[must_use]
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// SVID lifetime.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The SPIFFE ID of `caller`.
    #[must_use]
    pub fn id_of(&self, caller: &Caller) -> String {
        spiffe_id(
            self.authority.trust_domain(),
            caller.quadrant,
            &caller.workload,
        )
    }

    /// A receiver that always holds the current X.509-SVID of `id`, issuing it on first use.
    pub fn x509_for(&self, id: &str) -> Result<watch::Receiver<Arc<X509Svid>>, CaError> {
        let mut map = self
            .x509
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = map.get(id) {
            return Ok(tx.subscribe());
        }
        let svid = self.authority.mint_x509(id, self.ttl)?;
        let (tx, rx) = watch::channel(Arc::new(svid));
        map.insert(id.to_owned(), tx);
        Ok(rx)
    }

    /// Re-issues every SVID past half its lifetime; returns how many were rotated.
    pub fn rotate_due(&self) -> usize {
        let map = self
            .x509
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = SystemTime::now();
        let mut rotated = 0;
        for (id, tx) in map.iter() {
            let left = tx
                .borrow()
                .not_after
                .duration_since(now)
                .unwrap_or_default();
            if left > self.ttl / 2 {
                continue;
            }
            match self.authority.mint_x509(id, self.ttl) {
                Ok(svid) => {
                    tx.send_replace(Arc::new(svid));
                    rotated += 1;
                }
                Err(e) => {
                    warn!(spiffe_id = %id, error = %e, "SVID rotation failed; the current SVID stays until it expires");
                }
            }
        }
        rotated
    }

    /// Checks for due rotations every tenth of the lifetime, until `shutdown` fires.
    pub async fn run_rotation(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let step = (self.ttl / 10).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                () = tokio::time::sleep(step) => {
                    let n = self.rotate_due();
                    if n > 0 {
                        info!(rotated = n, "X.509-SVIDs rotated");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
