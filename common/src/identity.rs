//! Fleet identities carried as URI SANs in X.509 certificates.
//!
//! Agents are `spiffe://<domain>/node/<node-id>`, operators `spiffe://<domain>/operator/<name>`.
//! A certificate must carry exactly one URI SAN; zero or several are refused rather than
//! guessed between.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

use crate::ids::{IdError, NodeId, OperatorName, TrustDomain};

/// Why a certificate does not carry a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate is not valid DER X.509.
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// The certificate has no URI SAN.
    #[error("certificate carries no URI identity")]
    NoIdentity,
    /// The certificate has more than one URI SAN.
    #[error("certificate carries {0} URI identities; exactly one is accepted")]
    SeveralIdentities(usize),
    /// The URI is not a `spiffe://` URI of the expected trust domain.
    #[error("identity {uri:?} is not in trust domain {expected}")]
    ForeignDomain {
        /// The URI found (cut to 120 characters).
        uri: String,
        /// This fleet's trust domain.
        expected: TrustDomain,
    },
    /// The URI path is neither `/node/<id>` nor `/operator/<name>`.
    #[error("identity {0:?} is neither /node/<id> nor /operator/<name>")]
    BadPath(String),
    /// The id in the URI breaks the id grammar.
    #[error("identity has an invalid id: {0}")]
    BadId(IdError),
}

/// Who is on the other end of an mTLS connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A node agent.
    Node(NodeId),
    /// An operator (a person or automation using the CLI).
    Operator(OperatorName),
}

impl Identity {
    /// The SPIFFE URI of this identity in `domain`.
    pub fn uri(&self, domain: &TrustDomain) -> String {
        match self {
            Identity::Node(id) => format!("spiffe://{domain}/node/{id}"),
            Identity::Operator(name) => format!("spiffe://{domain}/operator/{name}"),
        }
    }

    /// Parses a SPIFFE URI of `domain`.
    pub fn parse_uri(uri: &str, domain: &TrustDomain) -> Result<Self, IdentityError> {
        let foreign = || IdentityError::ForeignDomain {
            uri: uri.chars().take(120).collect(),
            expected: domain.clone(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(foreign)?;
        let (found_domain, path) = rest.split_once('/').ok_or_else(foreign)?;
        if found_domain != domain.as_str() {
            return Err(foreign());
        }
        let bad_path = || IdentityError::BadPath(uri.chars().take(120).collect());
        let (kind, id) = path.split_once('/').ok_or_else(bad_path)?;
        match kind {
            "node" => NodeId::new(id)
                .map(Identity::Node)
                .map_err(IdentityError::BadId),
            "operator" => OperatorName::new(id)
                .map(Identity::Operator)
                .map_err(IdentityError::BadId),
            _ => Err(bad_path()),
        }
    }

    /// Reads the identity from a DER certificate.
    pub fn from_certificate(der: &[u8], domain: &TrustDomain) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris = uri_sans(&cert)?;
        match uris.as_slice() {
            [] => Err(IdentityError::NoIdentity),
            [uri] => Self::parse_uri(uri, domain),
            several => Err(IdentityError::SeveralIdentities(several.len())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node/{id}"),
            Identity::Operator(name) => write!(f, "operator/{name}"),
        }
    }
}

/// All URI SANs of a certificate.
fn uri_sans<'a>(cert: &'a X509Certificate<'a>) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Facts about a certificate that the server records: serial and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// The serial number as lower-case hex of its big-endian bytes.
    pub serial: String,
    /// `notAfter` as unix seconds.
    pub not_after: i64,
}

impl CertificateFacts {
    /// Reads serial and expiry from a DER certificate.
    pub fn read(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Ok(Self {
            serial: serial_hex(cert.raw_serial()),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// Lower-case hex of a serial's big-endian bytes without leading zero bytes, the form used in
/// the deny list and shown to operators.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> TrustDomain {
        TrustDomain::new("fleet.test").unwrap()
    }

    #[test]
    fn parses_node_and_operator_uris() {
        assert_eq!(
            Identity::parse_uri("spiffe://fleet.test/node/n1", &domain()),
            Ok(Identity::Node(NodeId::new("n1").unwrap()))
        );
        assert_eq!(
            Identity::parse_uri("spiffe://fleet.test/operator/alice", &domain()),
            Ok(Identity::Operator(OperatorName::new("alice").unwrap()))
        );
    }

    #[test]
    fn refuses_other_domains_kinds_and_bad_ids() {
        assert!(matches!(
            Identity::parse_uri("spiffe://other.test/node/n1", &domain()),
            Err(IdentityError::ForeignDomain { .. })
        ));
        assert!(matches!(
            Identity::parse_uri("https://fleet.test/node/n1", &domain()),
            Err(IdentityError::ForeignDomain { .. })
        ));
        assert_eq!(
            Identity::parse_uri("spiffe://fleet.test/admin/n1", &domain()),
            Err(IdentityError::BadPath(
                "spiffe://fleet.test/admin/n1".into()
            ))
        );
        assert!(matches!(
            Identity::parse_uri("spiffe://fleet.test/node/N1", &domain()),
            Err(IdentityError::BadId(_))
        ));
        assert!(matches!(
            Identity::parse_uri("spiffe://fleet.test/node/a/b", &domain()),
            Err(IdentityError::BadId(_))
        ));
    }

    #[test]
    fn serial_hex_drops_leading_zero_bytes() {
        assert_eq!(serial_hex(&[0, 0, 0x1f, 0x02]), "1f02");
        assert_eq!(serial_hex(&[0]), "00");
    }
}
