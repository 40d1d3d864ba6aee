//! Lane control messages: what workloads ask the broker and what it answers, one JSON document
//! per `SOCK_SEQPACKET` message, with descriptors attached by `SCM_RIGHTS` where a lane is handed
//! over. The broker validates requests against the published schema
//! (`manifests/schemas/lane-request.schema.json`; its own messages:
//! `lane-message.schema.json`) before it reads them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Transports a lane can use.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Shared-memory rings (same host).
    Shm,
    /// A framed Unix stream socket pair (same host).
    Uds,
    /// TCP with TLS 1.3 and mutual X.509-SVID authentication.
    Tcp,
}

impl Transport {
    /// Lower-case name (as in policies).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Shm => "shm",
            Self::Uds => "uds",
            Self::Tcp => "tcp",
        }
    }

    /// Every transport, in the order `auto` prefers them.
    pub const ALL: [Self; 3] = [Self::Shm, Self::Uds, Self::Tcp];
}

impl From<Transport> for TransportChoice {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Shm => Self::Shm,
            Transport::Uds => Self::Uds,
            Transport::Tcp => Self::Tcp,
        }
    }
}

/// A transport asked for: one of them, or the broker's choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// The fastest the policy allows: shared memory, then a Unix socket, then TCP.
    #[default]
    Auto,
    /// Shared memory only.
    Shm,
    /// Unix socket only.
    Uds,
    /// TCP + mTLS only.
    Tcp,
}

impl TransportChoice {
    /// The transports acceptable for this choice, in order of preference.
    #[must_use]
    pub fn candidates(self) -> &'static [Transport] {
        match self {
            Self::Auto => &Transport::ALL,
            Self::Shm => &[Transport::Shm],
            Self::Uds => &[Transport::Uds],
            Self::Tcp => &[Transport::Tcp],
        }
    }
}

/// A workload's request to the lane broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LaneRequest {
    /// Open a lane to a service.
    Open {
        /// The service's quadrant.
        #[schemars(regex(pattern = r"^(dx|dg|px|pg)$"))]
        quadrant: String,
        /// The service name.
        #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9][a-z0-9._-]*$"))]
        service: String,
        /// Transport wanted.
        #[serde(default)]
        transport: TransportChoice,
        /// A lane to the service's shadow generation, for the requests the client library
        /// mirrors (a grant with `mirror` says when there is one).
        #[serde(default, skip_serializing_if = "is_false")]
        mirror: bool,
        /// Every message on the lane carries a request envelope (id and attempt, 16 bytes;
        /// see `lane::RequestId`): the retrying caller's lanes, whose requests survive the loss
        /// of a service instance.
        #[serde(default, skip_serializing_if = "is_false")]
        request_ids: bool,
        /// Pass over this instance of the service's quadrant if another offers the service
        /// (the instance a retrying caller's last lane went to: it went away or hung).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Instances 0–15 are the opener's node's; `16·(p + 1) + k` is instance k of its
        /// agent's p-th peer node.
        avoid_instance: Option<u8>,
        /// Lanes opened with the same key go to the same instance of a service several
        /// instances offer (rendezvous hashing over the instances taking lanes: removing one
        /// moves only the keys that were on it), e.g. a user or session id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 256))]
        affinity_key: Option<String>,
    },
    /// Offer a service in the caller's quadrant; lanes to it arrive as `incoming` messages on
    /// this connection for as long as it stays open.
    Listen {
        /// The service name.
        #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9][a-z0-9._-]*$"))]
        service: String,
        /// A TCP port the service accepts mTLS lanes on, in its quadrant's namespace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 65535))]
        tcp_port: Option<u16>,
        /// The listener answers the broker's `ping`s while it waits for lanes; one that misses
        /// three in a row (300 ms) is taken for hung and passed over for new lanes.
        #[serde(default, skip_serializing_if = "is_false")]
        pings: bool,
    },
    /// Close a lane (either end may).
    Close {
        /// Lane id.
        lane: u64,
    },
    /// A listener's answer to the broker's `ping`.
    Pong {
        /// The ping's number.
        seq: u64,
    },
}

/// SVID material for a TCP lane's TLS handshake (base64 DER).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SvidMaterial {
    /// Certificate chain, leaf first.
    pub chain: Vec<String>,
    /// PKCS#8 private key.
    pub key: String,
    /// Trust bundle (root certificates).
    pub bundle: Vec<String>,
    /// The trust domain.
    pub trust_domain: String,
}

/// How to reach a TCP lane's server, and what to prove.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpGrant {
    /// `ip:port` of the server (client side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// One-time token the client presents after the handshake (hex).
    pub token: String,
    /// This side's SVID.
    pub svid: SvidMaterial,
    /// The lane's id at the service's broker, which the client presents with the token, when
    /// it differs from `lane` (a lane to an instance on another node; client side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lane: Option<u64>,
}

/// A lane handed to one of its ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LaneGrant {
    /// Lane id.
    pub lane: u64,
    /// Transport.
    pub transport: Transport,
    /// The service.
    pub service: String,
    /// The service's quadrant.
    pub quadrant: String,
    /// This end's SPIFFE ID.
    pub local_id: String,
    /// The other end's SPIFFE ID.
    pub peer_id: String,
    /// Largest message.
    pub max_message: u32,
    /// Ring size per direction (shared memory only; 0 otherwise).
    pub ring_bytes: u32,
    /// Messages in flight per direction.
    pub max_in_flight: u32,
    /// TCP details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpGrant>,
    /// The service has a shadow generation: the client library copies this share of its
    /// requests to it over a lane of its own and drops the shadow's replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorGrant>,
    /// Every message carries a request envelope (the opener asked for `request_ids`); the
    /// library adds and strips it, and the service answers each request under its id.
    #[serde(default, skip_serializing_if = "is_false")]
    pub request_ids: bool,
    /// The instance of the service's quadrant whose listener serves the lane.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub instance: u8,
}

/// Requests to mirror to a service's shadow generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MirrorGrant {
    /// The share of requests copied, in parts per million (100000 = 10 %).
    #[schemars(range(min = 1, max = 1_000_000))]
    pub fraction_ppm: u32,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
const fn is_false(b: &bool) -> bool {
    !*b
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
const fn is_zero(n: &u8) -> bool {
    *n == 0
}

impl LaneGrant {
    /// Descriptors attached to the message carrying this grant, in order.
    #[must_use]
    pub fn fd_count(&self) -> usize {
        match self.transport {
            // memory, own eventfd, peer eventfd, peer socket
            Transport::Shm => 4,
            // memory, socket
            Transport::Uds => 2,
            // memory
            Transport::Tcp => 1,
        }
    }
}

/// What the broker sends a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LaneMessage {
    /// Answer to `open`.
    Opened {
        /// The lane.
        grant: LaneGrant,
    },
    /// Answer to `listen`.
    Listening {
        /// The service.
        service: String,
        /// The listener's SPIFFE ID.
        spiffe_id: String,
    },
    /// A lane to a service this connection listens for.
    Incoming {
        /// The lane.
        grant: LaneGrant,
    },
    /// Is the listener alive? Answered with `pong` (listeners that offered with `pings`).
    Ping {
        /// The ping's number.
        seq: u64,
    },
    /// A refused request.
    Error {
        /// What is wrong.
        message: String,
        /// Why, from the registry (absent from brokers before it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<Refusal>,
        /// The limit exceeded, when that is the reason (`max_lanes`, `max_shm_bytes`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
        /// When asking again may succeed, ms from now (`breaker_open`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// Why the broker refused a request: the one registry of lane refusals, named alike in the
/// broker's answers, `quadrant lanes` and the agent's events.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The caller could not be attested (its process is in no quadrant of this agent).
    Attestation,
    /// The request is malformed (not JSON, not of the schema, an unknown quadrant).
    Invalid,
    /// The caller's plan does not declare this lane (or requires another transport).
    Plan,
    /// The policy's lane rules allow no lane (or no transport) for it, or they are unavailable.
    Policy,
    /// No such service is offered.
    NoService,
    /// The lane could not be built (memory, descriptors, randomness).
    Io,
    /// The opener's quadrant has `max_lanes` open lanes.
    MaxLanes,
    /// The lane's memory would take the opener's quadrant over `max_shm_bytes`.
    MaxShmBytes,
    /// The service did not take the lane in time (its queue stayed full).
    Busy,
    /// The service is offered already (a second `listen` for it).
    Taken,
    /// The opener quadrant's circuit breaker for the service's address is open (or half-open
    /// with its probe in flight): `retry_after_ms` says when to ask again.
    BreakerOpen,
}

impl Refusal {
    /// Every reason.
    pub const ALL: [Self; 11] = [
        Self::Attestation,
        Self::Invalid,
        Self::Plan,
        Self::Policy,
        Self::NoService,
        Self::Io,
        Self::MaxLanes,
        Self::MaxShmBytes,
        Self::Busy,
        Self::Taken,
        Self::BreakerOpen,
    ];

    /// The stable name (as serialised).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Attestation => "attestation",
            Self::Invalid => "invalid",
            Self::Plan => "plan",
            Self::Policy => "policy",
            Self::NoService => "no_service",
            Self::Io => "io",
            Self::MaxLanes => "max_lanes",
            Self::MaxShmBytes => "max_shm_bytes",
            Self::Busy => "busy",
            Self::Taken => "taken",
            Self::BreakerOpen => "breaker_open",
        }
    }
}

/// The published schema of lane requests.
#[must_use]
pub fn request_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(LaneRequest)).unwrap_or_default()
}

/// The published schema of broker messages.
#[must_use]
pub fn message_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(LaneMessage)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_are_what_serde_writes() {
        for r in Refusal::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
    }
}
