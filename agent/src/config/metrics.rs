//! The `metrics` section: where the agent serves Prometheus metrics and its health endpoints.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `GET /metrics` (Prometheus text 0.0.4, or OpenMetrics 1.0 when the scraper asks for it),
/// `GET /healthz` and `GET /readyz`, over plain HTTP/1.1.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The address to listen on (port 0: one the kernel picks, shown by `quadrant status`).
    /// None: no metrics endpoint. The endpoint has no authentication: keep it on loopback or an
    /// address only the scraper reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}
