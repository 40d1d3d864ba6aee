//! TLS 1.3 with mutual X.509-SVID authentication for TCP lanes (rustls, ring provider).
//!
//! SVIDs carry a SPIFFE ID in a URI SAN and no DNS name, so both verifiers check the chain with
//! the SPIFFE rules of [`crate::svid`] against the trust bundle the broker handed
//! out; the client additionally requires the server's exact SPIFFE ID. Which client may use the
//! lane is decided after the handshake, from the verified client SPIFFE ID and the lane's
//! one-time token (see `client::LaneListener`).

use std::{sync::Arc, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::control::SvidMaterial;
use crate::svid::{verify_node_svid, verify_svid};

/// Decoded SVID material.
#[derive(Debug)]
pub struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    bundle: Vec<Vec<u8>>,
    trust_domain: String,
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(s)
        .map_err(|e| format!("{what} is not base64: {e}"))
}

impl Svid {
    /// Decodes what the broker sent.
    pub fn from_material(m: &SvidMaterial) -> Result<Self, String> {
        Ok(Self {
            chain: m
                .chain
                .iter()
                .map(|c| b64("certificate", c).map(CertificateDer::from))
                .collect::<Result<_, _>>()?,
            key: b64("key", &m.key)?,
            bundle: m
                .bundle
                .iter()
                .map(|c| b64("bundle certificate", c))
                .collect::<Result<_, _>>()?,
            trust_domain: m.trust_domain.clone(),
        })
    }

    /// Encodes for the broker's messages.
    #[must_use]
    pub fn material(
        chain: &[Vec<u8>],
        key: &[u8],
        bundle: &[Vec<u8>],
        trust_domain: &str,
    ) -> SvidMaterial {
        SvidMaterial {
            chain: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            key: STANDARD.encode(key),
            bundle: bundle.iter().map(|c| STANDARD.encode(c)).collect(),
            trust_domain: trust_domain.to_owned(),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

/// ring, with AES-128-GCM first (the suite every TLS 1.3 implementation has, and the first
/// choice of Go and of `BoringSSL` with AES instructions): lanes carry bulk data, and it costs
/// ten AES rounds per block where AES-256 costs fourteen. Both ends are ours: the order decides.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// Whose SVIDs a configuration accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Workloads: the lanes.
    Workload,
    /// Node agents: the links between nodes.
    Node,
}

/// Verifies a presented chain as an SVID of the bundle's trust domain; returns its SPIFFE ID.
fn check_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &[Vec<u8>],
    (trust_domain, kind): (&str, Kind),
) -> Result<String, Error> {
    let mut chain = vec![end_entity.to_vec()];
    chain.extend(intermediates.iter().map(|c| c.to_vec()));
    match kind {
        Kind::Workload => {
            verify_svid(&chain, bundle, trust_domain, None, SystemTime::now()).map(|v| v.spiffe_id)
        }
        Kind::Node => verify_node_svid(&chain, bundle, trust_domain, SystemTime::now()),
    }
    .map_err(|e| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            SvidRefused(e.to_string()),
        ))))
    })
}

#[derive(Debug)]
struct SvidRefused(String);

impl std::fmt::Display for SvidRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer SVID refused: {}", self.0)
    }
}

impl std::error::Error for SvidRefused {}

/// The SPIFFE ID of a verified peer's leaf certificate.
#[must_use]
pub fn spiffe_id_of(leaf: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

#[derive(Debug)]
struct ServerVerifier {
    bundle: Vec<Vec<u8>>,
    trust_domain: String,
    kind: Kind,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = check_chain(
            end_entity,
            intermediates,
            &self.bundle,
            (&self.trust_domain, self.kind),
        )?;
        if id != self.expected {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(SvidRefused(format!(
                    "server presented {id}, the lane's service is {}",
                    self.expected
                )))),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct ClientVerifier {
    bundle: Vec<Vec<u8>>,
    trust_domain: String,
    kind: Kind,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check_chain(
            end_entity,
            intermediates,
            &self.bundle,
            (&self.trust_domain, self.kind),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client configuration: present `svid`, accept only a server proving `server_id`.
pub fn client_config(svid: &Svid, server_id: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config_for(svid, server_id, Kind::Workload)
}

/// Client configuration of a link between nodes: present the node SVID `svid`, accept only the
/// node agent `server_id`.
pub fn node_client_config(
    svid: &Svid,
    server_id: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config_for(svid, server_id, Kind::Node)
}

/// Server configuration of a link between nodes: present the node SVID `svid`, require a node
/// agent's SVID of the same trust domain (which node is checked after the handshake).
pub fn node_server_config(svid: &Svid) -> Result<Arc<rustls::ServerConfig>, String> {
    server_config_for(svid, Kind::Node)
}

fn client_config_for(
    svid: &Svid,
    server_id: &str,
    kind: Kind,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let verifier = ServerVerifier {
        bundle: svid.bundle.clone(),
        trust_domain: svid.trust_domain.clone(),
        kind,
        expected: server_id.to_owned(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key())
        .map_err(|e| format!("client SVID unusable: {e}"))?;
    // A lane's records after the handshake are protected by `crate::record` with the keys rustls
    // hands over.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Server configuration: present `svid`, require a client SVID of the same trust domain.
pub fn server_config(svid: &Svid) -> Result<Arc<rustls::ServerConfig>, String> {
    server_config_for(svid, Kind::Workload)
}

fn server_config_for(svid: &Svid, kind: Kind) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let verifier = ClientVerifier {
        bundle: svid.bundle.clone(),
        trust_domain: svid.trust_domain.clone(),
        kind,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain.clone(), svid.key())
        .map_err(|e| format!("server SVID unusable: {e}"))?;
    // Keys handed over to `crate::record` after the handshake; lanes never resume a session,
    // so no tickets follow the handshake.
    config.enable_secret_extraction = true;
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The name clients put in SNI (SVIDs are matched by SPIFFE ID, not by this).
#[must_use]
pub fn sni() -> ServerName<'static> {
    ServerName::try_from("lane.quadrant.invalid").unwrap_or_else(|_| unreachable!())
}
