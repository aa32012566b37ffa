//! Who is calling: the identity from the verified client certificate, checked on every request.
//!
//! The TLS layer has already verified the chain and the deny list at the handshake. The
//! extractors here add what a handshake cannot know: the kind of identity an endpoint needs,
//! a serial denied after the connection was opened, and whether the node is still active.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use keyward_common::identity::{CertificateFacts, Identity};
use keyward_common::ids::{NodeId, OperatorName};
use rustls_pki_types::CertificateDer;

use crate::service::{ErrorKind, Service, ServiceError};

/// The verified client of a connection, set once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The identity, if the client presented a certificate.
    pub identity: Option<Arc<Result<PeerCert, String>>>,
}

/// A client certificate that chained to the fleet CA.
#[derive(Debug, Clone)]
pub struct PeerCert {
    /// Identity from its URI SAN.
    pub identity: Identity,
    /// Serial and expiry.
    pub facts: CertificateFacts,
    /// The certificate itself, for renewal.
    pub der: CertificateDer<'static>,
}

fn peer_cert(parts: &Parts, service: &Service) -> Result<PeerCert, ServiceError> {
    let peer = parts
        .extensions
        .get::<Peer>()
        .ok_or_else(|| ServiceError::internal(&"connection has no peer information"))?;
    let cert = match peer.identity.as_deref() {
        None => {
            return Err(ServiceError::new(
                ErrorKind::Unauthorized,
                "certificate_required",
                "a client certificate of the fleet CA is required",
            ));
        }
        Some(Err(reason)) => {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "bad_identity",
                reason.clone(),
            ));
        }
        Some(Ok(cert)) => cert,
    };
    if service.deny.contains(&cert.facts.serial) {
        return Err(ServiceError::new(
            ErrorKind::Forbidden,
            "certificate_denied",
            format!("certificate {} was revoked", cert.facts.serial),
        ));
    }
    if cert.facts.not_after <= keyward_common::time::now_unix() as i64 {
        return Err(ServiceError::new(
            ErrorKind::Forbidden,
            "certificate_expired",
            "client certificate expired",
        ));
    }
    Ok(cert.clone())
}

/// A request from an active node.
#[derive(Debug, Clone)]
pub struct NodeCaller {
    /// The node.
    pub id: NodeId,
    /// Its certificate.
    pub cert: CertificateDer<'static>,
}

impl FromRequestParts<Arc<Service>> for NodeCaller {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        let cert = peer_cert(parts, service)?;
        let Identity::Node(id) = cert.identity else {
            return Err(ServiceError::forbidden(
                "node endpoints need a node certificate",
            ));
        };
        match service.node_state(id.as_str()).await?.as_deref() {
            Some("active") => Ok(Self { id, cert: cert.der }),
            Some("evicted") => Err(ServiceError::new(
                ErrorKind::Forbidden,
                "node_evicted",
                format!("node {id} was evicted"),
            )),
            _ => Err(ServiceError::forbidden(format!(
                "node {id} is not enrolled"
            ))),
        }
    }
}

/// A request from an operator.
#[derive(Debug, Clone)]
pub struct OperatorCaller {
    /// The operator.
    pub name: OperatorName,
}

impl OperatorCaller {
    /// How the operator appears in the audit log.
    pub fn actor(&self) -> String {
        format!("operator/{}", self.name)
    }
}

impl FromRequestParts<Arc<Service>> for OperatorCaller {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        service: &Arc<Service>,
    ) -> Result<Self, Self::Rejection> {
        match peer_cert(parts, service)?.identity {
            Identity::Operator(name) => Ok(Self { name }),
            Identity::Node(_) => Err(ServiceError::forbidden(
                "operator endpoints need an operator certificate",
            )),
        }
    }
}
