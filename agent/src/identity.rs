//! The node's TLS identity: enrollment with a join token, loading, and renewal.
//!
//! The private key is generated here and never leaves the host. At enrollment the CA is not yet
//! known, so the server is accepted only if its chain contains a CA whose SHA-256 fingerprint is
//! the one the operator printed next to the token.

use std::time::Duration;

use keyward_certs::files;
use keyward_certs::generate_csr;
use keyward_common::api::{CertificateResponse, EnrollRequest, RenewRequest};
use keyward_common::client::ApiClient;
use keyward_common::dsse::TrustRoot;
use keyward_common::ids::{NodeId, Sha256Digest, TrustDomain};
use keyward_common::secret::SecretString;
use keyward_common::tls::{CertifiedKey, client_config, pinned_ca_client_config};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::FromDer as _;
use zeroize::Zeroizing;

use crate::state::{AgentInfo, StateDir, StateError};

/// Deadline of enrollment and renewal requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why enrollment, loading or renewal failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A request to the server failed.
    #[error(transparent)]
    Client(#[from] keyward_common::client::ClientError),
    /// Certificate generation failed.
    #[error(transparent)]
    Cert(#[from] keyward_certs::CertError),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] keyward_common::tls::TlsError),
    /// An input or a server answer is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

/// A loaded identity: what the agent needs to talk to the server.
pub struct NodeIdentity {
    /// Node id.
    pub node: NodeId,
    /// Trust domain.
    pub domain: TrustDomain,
    /// API URL.
    pub server_url: String,
    /// Fleet CA.
    pub ca: CertificateDer<'static>,
    /// Manifest trust root.
    pub trust_root: TrustRoot,
    /// `notBefore` and `notAfter` of the certificate, unix seconds.
    pub validity: (i64, i64),
    cert: CertificateDer<'static>,
    key_pem: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .field("server_url", &self.server_url)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads the identity from the state directory.
    pub fn load(state: &StateDir) -> Result<Self, IdentityError> {
        let info = state.info()?;
        let invalid =
            |what: &str| IdentityError::Invalid(format!("{}: {what}", state.root().display()));
        let ca = CertificateDer::from_pem_slice(
            &files::read_public(&state.path("ca.pem")).map_err(StateError::from)?,
        )
        .map_err(|_| invalid("ca.pem holds no certificate"))?;
        let trust_root = TrustRoot::from_json(
            &files::read_public(&state.path("trust-root.json")).map_err(StateError::from)?,
        )
        .map_err(|e| invalid(&format!("trust-root.json: {e}")))?;
        let pem = files::read_secret(&state.path("identity.pem")).map_err(StateError::from)?;
        let cert = CertificateDer::from_pem_slice(&pem)
            .map_err(|_| invalid("identity.pem holds no certificate"))?;
        let validity =
            validity(&cert).ok_or_else(|| invalid("identity.pem certificate does not parse"))?;
        Ok(Self {
            node: NodeId::new(info.node).map_err(|e| invalid(&e.to_string()))?,
            domain: TrustDomain::new(info.trust_domain).map_err(|e| invalid(&e.to_string()))?,
            server_url: info.server_url,
            ca,
            trust_root,
            validity,
            cert,
            key_pem: pem,
        })
    }

    /// A client for the API, presenting this identity.
    pub fn client(&self, timeout: Duration) -> Result<ApiClient, IdentityError> {
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|_| IdentityError::Invalid("identity.pem holds no private key".into()))?;
        let config = client_config(
            &self.ca,
            Some(CertifiedKey {
                chain: vec![self.cert.clone()],
                key,
            }),
        )?;
        Ok(ApiClient::new(&self.server_url, config, timeout)?)
    }

    /// Unix time at which the certificate should be renewed: two thirds into its life.
    pub fn renew_at(&self) -> i64 {
        let (not_before, not_after) = self.validity;
        not_before + (not_after - not_before) * 2 / 3
    }
}

fn validity(cert: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    Some((
        parsed.validity().not_before.timestamp(),
        parsed.validity().not_after.timestamp(),
    ))
}

/// Writes the certificate and its key into one file, so they are always replaced together.
fn write_identity(
    state: &StateDir,
    certificate_pem: &str,
    key_pem: &str,
) -> Result<(), IdentityError> {
    let combined = Zeroizing::new(format!("{certificate_pem}{key_pem}"));
    files::write_secret(&state.path("identity.pem"), combined.as_bytes())
        .map_err(StateError::from)?;
    Ok(())
}

/// The enrollment URL when none is given: the API URL's port plus one.
pub fn default_enroll_url(server_url: &str) -> Result<String, IdentityError> {
    let (host, port) = keyward_common::client::parse_https_url(server_url)?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(format!("https://{host}:{}", port.saturating_add(1)))
}

/// Enrolls this node: generates a key, sends a CSR with the join token, and stores the
/// certificate, the pinned CA and the trust root in the state directory.
pub async fn enroll(
    state: &StateDir,
    server_url: &str,
    enroll_url: &str,
    node: &NodeId,
    ca_fingerprint: &str,
    token: SecretString,
) -> Result<AgentInfo, IdentityError> {
    let fingerprint =
        Sha256Digest::parse_hex(&ca_fingerprint.trim().to_lowercase().replace(':', ""))
            .map_err(|_| IdentityError::Invalid("--ca-fingerprint must be 64 hex digits".into()))?;
    keyward_common::client::parse_https_url(server_url)?;
    if let Ok(existing) = state.info()
        && existing.node != node.as_str()
    {
        return Err(IdentityError::Invalid(format!(
            "{} is enrolled as node {}; use another state directory for node {node}",
            state.root().display(),
            existing.node
        )));
    }

    let csr = generate_csr(&format!("node/{node}"))?;
    let client = ApiClient::new(
        enroll_url,
        pinned_ca_client_config(fingerprint)?,
        REQUEST_TIMEOUT,
    )?;
    let request = EnrollRequest {
        token,
        node: node.clone(),
        csr_pem: csr.csr_pem.clone(),
    };
    let response: CertificateResponse = client.post_json("/v1/enroll", &request).await?;

    // The CA the server sent must be the pinned one.
    let ca = CertificateDer::from_pem_slice(response.ca_pem.as_bytes())
        .map_err(|_| IdentityError::Invalid("server sent no CA certificate".into()))?;
    if Sha256Digest::of(&ca) != fingerprint {
        return Err(IdentityError::Invalid(
            "server sent a CA that does not match --ca-fingerprint".into(),
        ));
    }
    let trust_root = TrustRoot::from_json(response.trust_root.get().as_bytes())
        .map_err(|e| IdentityError::Invalid(format!("server sent an invalid trust root: {e}")))?;
    TrustDomain::new(response.trust_domain.clone())
        .map_err(|e| IdentityError::Invalid(format!("server sent an invalid trust domain: {e}")))?;

    state.create()?;
    files::write_public(&state.path("ca.pem"), response.ca_pem.as_bytes())
        .map_err(StateError::from)?;
    files::write_public(&state.path("trust-root.json"), &trust_root.to_json())
        .map_err(StateError::from)?;
    write_identity(state, &response.certificate_pem, &csr.key_pem)?;
    let info = AgentInfo {
        node: node.to_string(),
        trust_domain: response.trust_domain,
        server_url: server_url.to_string(),
    };
    state.write_info(&info)?;
    Ok(info)
}

/// Renews the node certificate with a new key, over mTLS with the current one.
pub async fn renew(
    state: &StateDir,
    current: &NodeIdentity,
    client: &ApiClient,
) -> Result<NodeIdentity, IdentityError> {
    let csr = generate_csr(&format!("node/{}", current.node))?;
    let response: CertificateResponse = client
        .post_json(
            "/v1/node/renew",
            &RenewRequest {
                csr_pem: csr.csr_pem.clone(),
            },
        )
        .await?;
    let cert = CertificateDer::from_pem_slice(response.certificate_pem.as_bytes())
        .map_err(|_| IdentityError::Invalid("server sent no certificate".into()))?;
    validity(&cert)
        .ok_or_else(|| IdentityError::Invalid("server sent an unreadable certificate".into()))?;
    // The trust root travels with every certificate, so a signing key rotated with an overlap
    // reaches agents at their next renewal.
    let trust_root = TrustRoot::from_json(response.trust_root.get().as_bytes())
        .map_err(|e| IdentityError::Invalid(format!("server sent an invalid trust root: {e}")))?;
    files::write_public(&state.path("trust-root.json"), &trust_root.to_json())
        .map_err(StateError::from)?;
    write_identity(state, &response.certificate_pem, &csr.key_pem)?;
    NodeIdentity::load(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_enrollment_url_is_the_next_port() {
        assert_eq!(
            default_enroll_url("https://keys.example:7443").unwrap(),
            "https://keys.example:7444"
        );
        assert_eq!(
            default_enroll_url("https://[::1]:7443").unwrap(),
            "https://[::1]:7444"
        );
    }
}
