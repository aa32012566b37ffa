//! rustls configurations for the fleet: TLS 1.3 only, the `ring` provider, trust in the fleet
//! CA alone.
//!
//! - [`server_config`] with [`ClientAuth::Required`] is the main API listener: every client
//!   presents a certificate chained to the fleet CA whose serial is not on the [`DenyList`].
//! - [`server_config`] with [`ClientAuth::Optional`] is the enrollment listener: a client without
//!   a certificate may connect (it has none yet); a certificate, if sent, is still checked.
//! - [`client_config`] trusts only the fleet CA, with or without a client certificate.
//! - [`pinned_ca_client_config`] is for enrollment, before the agent has the CA: it accepts a
//!   server whose chain contains a CA certificate with the pinned SHA-256 fingerprint and verifies
//!   the server certificate against that CA.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::{CertificateFacts, Identity, IdentityError};
use crate::ids::{Sha256Digest, TrustDomain};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA certificate cannot be used as a trust anchor.
    #[error("fleet CA certificate is not usable as a trust anchor: {0}")]
    BadCa(String),
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration refused: {0}")]
    Config(#[source] rustls::Error),
}

/// The `ring` crypto provider all keyward TLS configurations use.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificate serials (lower-case hex) that the server refuses even though they chain to the CA:
/// certificates of evicted nodes and revoked operators.
#[derive(Debug, Default)]
pub struct DenyList {
    serials: RwLock<HashSet<String>>,
}

impl DenyList {
    /// An empty deny list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds serials to the list.
    pub fn extend(&self, serials: impl IntoIterator<Item = String>) {
        // A poisoned lock only means another thread panicked while inserting; the set itself
        // is still a valid set, so keep using it.
        let mut set = self.serials.write().unwrap_or_else(|e| e.into_inner());
        set.extend(serials);
    }

    /// Whether `serial` is denied.
    pub fn contains(&self, serial: &str) -> bool {
        self.serials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(serial)
    }

    /// Number of denied serials.
    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the server insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The main API listener: no certificate, no connection.
    Required,
    /// The enrollment listener: connections without a certificate are allowed.
    Optional,
}

/// A certificate chain and its private key.
pub struct CertifiedKey {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("chain_len", &self.chain.len())
            .field("key", &"...")
            .finish()
    }
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// A server configuration for a listener of the fleet. See the module docs.
pub fn server_config(
    ca: &CertificateDer<'static>,
    server: CertifiedKey,
    client_auth: ClientAuth,
    denied: Arc<DenyList>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone());
    let builder = match client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let inner = builder
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let verifier = Arc::new(DenyingClientVerifier { inner, denied });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain, server.key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumed TLS 1.3 sessions skip client certificate verification, so a serial denied after
    // the first handshake could keep reconnecting on a ticket. No tickets, no session cache.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// A client configuration trusting only the fleet CA, presenting `identity` if given.
pub fn client_config(
    ca: &CertificateDer<'static>,
    identity: Option<CertifiedKey>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(TlsError::Config)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration for enrollment: the server must present, in its chain, a CA
/// certificate whose SHA-256 fingerprint is `ca_fingerprint`, and its leaf must verify against
/// that CA for the name connected to.
pub fn pinned_ca_client_config(ca_fingerprint: Sha256Digest) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_fingerprint,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The identity of a connected client, read from its verified leaf certificate.
pub fn peer_identity(
    peer_certificates: Option<&[CertificateDer<'_>]>,
    domain: &TrustDomain,
) -> Option<Result<(Identity, CertificateFacts), IdentityError>> {
    let leaf = peer_certificates?.first()?;
    Some(
        Identity::from_certificate(leaf, domain)
            .and_then(|id| CertificateFacts::read(leaf).map(|facts| (id, facts))),
    )
}

/// Delegates chain verification to webpki, then refuses denied serials.
#[derive(Debug)]
struct DenyingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    denied: Arc<DenyList>,
}

impl ClientCertVerifier for DenyingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let facts = CertificateFacts::read(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.denied.contains(&facts.serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Trusts a server whose presented chain includes the pinned CA. See
/// [`pinned_ca_client_config`].
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: Sha256Digest,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| Sha256Digest::of(cert) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        let ca = CertificateDer::from(ca.to_vec());
        let roots = roots(&ca)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
