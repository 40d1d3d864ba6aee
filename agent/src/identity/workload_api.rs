//! The SPIFFE Workload API (gRPC over a Unix socket, one per quadrant), generated from
//! `agent/proto/workload.proto`.
//!
//! Every call must carry the `workload.spiffe.io: true` header (else `InvalidArgument`). The
//! caller is attested from the socket's peer credentials; a caller outside this socket's quadrant
//! gets `PermissionDenied`, so a process only ever receives identities of its own quadrant and
//! workload.

use std::{collections::HashMap, path::Path, pin::Pin, sync::Arc};

use dataplane_common::Quadrant;
use tokio::{net::UnixListener, sync::watch};
use tokio_stream::{Stream, StreamExt as _, wrappers::WatchStream};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use super::{IdentityService, attest};
use crate::chaos::outage::Outages;

/// Generated protobuf types, server and client.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    clippy::undocumented_unsafe_blocks,
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    reason = "generated code"
)]
pub mod pb {
    tonic::include_proto!("_");
}

use pb::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
    spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer},
};

/// The security header every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API of one quadrant.
#[derive(Clone, Debug)]
pub struct WorkloadApi {
    quadrant: Quadrant,
    service: Arc<IdentityService>,
    outages: Arc<Outages>,
}

impl WorkloadApi {
    /// The API for `quadrant`, unavailable during the outages `outages` holds for it.
    #[must_use]
    pub fn new(quadrant: Quadrant, service: Arc<IdentityService>, outages: Arc<Outages>) -> Self {
        Self {
            quadrant,
            service,
            outages,
        }
    }

    /// Checks the header and attests the caller; returns its SPIFFE ID. During an outage of
    /// this quadrant's API every call is `Unavailable`.
    fn authorize<T>(&self, request: &Request<T>) -> Result<String, Status> {
        if let Some(refused) = self.outages.refuse(self.quadrant) {
            return Err(refused);
        }
        match request.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
            Some(Ok("true")) => {}
            _ => {
                return Err(Status::invalid_argument(
                    "security header missing from request",
                ));
            }
        }
        let pid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid());
        let caller = attest::attest(pid, self.service.instance())
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if caller.quadrant != self.quadrant {
            return Err(Status::permission_denied(format!(
                "this is the Workload API of quadrant {}; the caller runs in quadrant {}",
                self.quadrant.name(),
                caller.quadrant.name()
            )));
        }
        Ok(self.service.id_of(&caller))
    }

    fn bundle_der(&self) -> Vec<u8> {
        self.service.authority().roots().concat()
    }

    /// `stream`, ended with `Unavailable` when an outage of this quadrant's API begins (the
    /// client reconnects, and is refused until it ends). A task forwards it until then, or
    /// until the client goes away.
    fn until_outage<T: Send + 'static>(
        &self,
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> BoxStream<T> {
        let (outages, q) = (Arc::clone(&self.outages), self.quadrant);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(item) => {
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = outages.begun(q) => {
                        let refused = outages.refuse(q).unwrap_or_else(|| {
                            Status::unavailable("the Workload API was unavailable")
                        });
                        let _ = tx.send(Err(refused)).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let id = self.authorize(&request)?;
        let rx = self.service.x509_for(&id).map_err(internal)?;
        let bundle = self.bundle_der();
        let stream = WatchStream::new(rx).map(move |svid| {
            Ok(X509svidResponse {
                svids: vec![X509svid {
                    spiffe_id: svid.spiffe_id.clone(),
                    x509_svid: svid.chain.concat(),
                    x509_svid_key: svid.key_pkcs8.clone(),
                    bundle: bundle.clone(),
                    hint: String::new(),
                }],
                crl: vec![],
                federated_bundles: HashMap::new(),
            })
        });
        Ok(Response::new(self.until_outage(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.authorize(&request)?;
        let response = X509BundlesResponse {
            crl: vec![],
            bundles: HashMap::from([(
                self.service.authority().trust_domain_id(),
                self.bundle_der(),
            )]),
        };
        // The bundle does not change while the agent runs: one message, then the stream stays open.
        let stream = tokio_stream::once(Ok(response)).chain(tokio_stream::pending());
        Ok(Response::new(self.until_outage(stream)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let id = self.authorize(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !req.spiffe_id.is_empty() && req.spiffe_id != id {
            return Err(Status::permission_denied(format!(
                "the caller is {id}, not {}",
                req.spiffe_id
            )));
        }
        let token = self
            .service
            .authority()
            .mint_jwt(&id, &req.audience, self.service.ttl())
            .map_err(internal)?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: id,
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.authorize(&request)?;
        let response = JwtBundlesResponse {
            bundles: HashMap::from([(
                self.service.authority().trust_domain_id(),
                self.service.authority().jwks(),
            )]),
        };
        let stream = tokio_stream::once(Ok(response)).chain(tokio_stream::pending());
        Ok(Response::new(self.until_outage(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let (spiffe_id, claims) = self
            .service
            .authority()
            .validate_jwt(&req.svid, &req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(to_struct(claims)),
        }))
    }
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Serves the Workload API of `quadrant` on `socket` (mode 0666: access is decided by
/// attestation, not by file permissions) until `shutdown` fires.
pub async fn serve(
    socket: &Path,
    quadrant: Quadrant,
    service: Arc<IdentityService>,
    outages: Arc<Outages>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    // gRPC C-core and grpc-java clients name the socket path as `:authority`, which h2 refuses:
    // each connection passes through the repair first.
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|conn| conn.map(super::authority::AuthorityRepair::new));
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(WorkloadApi::new(
            quadrant, service, outages,
        )))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await
        .map_err(std::io::Error::other)
}
