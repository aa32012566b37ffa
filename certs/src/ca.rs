//! The fleet certificate authority and the certificates it issues.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use keyward_common::identity::{CertificateFacts, Identity, serial_hex};
use keyward_common::ids::{Sha256Digest, TrustDomain};
use keyward_common::tls::DenyList;
use rand_core::{OsRng, RngCore as _};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer as _;
use zeroize::Zeroizing;

use crate::files::{self, FileError};

/// File name of the CA certificate in a data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a data directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen could not build or sign the certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CSR is not PEM, does not parse, or its self-signature fails.
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(String),
    /// The CSR's key is not ECDSA P-256.
    #[error("certificate signing request must use an ECDSA P-256 key")]
    CsrKeyType,
    /// A stored or presented certificate does not parse.
    #[error("certificate is invalid: {0}")]
    BadCertificate(String),
    /// The CA key file does not belong to the CA certificate file.
    #[error("CA key does not match the CA certificate")]
    KeyMismatch,
    /// The certificate presented for renewal was not issued by this CA.
    #[error("certificate was not issued by this fleet CA")]
    ForeignCertificate,
    /// The certificate presented for renewal has expired.
    #[error("certificate expired at {0} (unix seconds); enroll again with a new join token")]
    Expired(i64),
    /// The certificate presented for renewal is on the deny list.
    #[error("certificate serial {0} is denied; the identity was evicted or revoked")]
    Denied(String),
    /// A subject alternative name is not usable.
    #[error("subject alternative name {0:?} is not a valid DNS name or IP address")]
    BadSan(String),
    /// Reading or writing a key or certificate file failed.
    #[error(transparent)]
    File(#[from] FileError),
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from five minutes ago (tolerating clock skew) for `duration` from now.
    pub fn for_duration(duration: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::minutes(5),
            not_after: now + duration,
        }
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM encoding.
    pub pem: String,
    /// DER encoding.
    pub der: CertificateDer<'static>,
    /// Serial, lower-case hex (see [`serial_hex`]).
    pub serial: String,
    /// `notAfter`, unix seconds.
    pub not_after: i64,
}

/// A certificate with the private key the CA generated for it (server certificate, bootstrap
/// operator identity). The key is zeroized on drop and hidden from `Debug`.
pub struct IssuedKey {
    /// The certificate.
    pub cert: IssuedCert,
    /// PKCS#8 PEM private key.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("cert", &self.cert)
            .field("key_pem", &"...")
            .finish()
    }
}

/// The fleet CA: one per trust domain.
pub struct FleetCa {
    domain: TrustDomain,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// PKCS#8 PEM of the CA key, kept only to save it.
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa")
            .field("domain", &self.domain)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A random 128-bit serial whose first byte is in `0x01..=0x7f`, so its DER encoding needs no
/// padding byte and its hex form is exactly 32 digits.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn new_key() -> Result<KeyPair, CertError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn issued(cert: rcgen::Certificate, serial: &SerialNumber, validity: Validity) -> IssuedCert {
    IssuedCert {
        pem: cert.pem(),
        der: cert.der().clone(),
        serial: serial_hex(&serial.to_bytes()),
        not_after: validity.not_after.unix_timestamp(),
    }
}

impl FleetCa {
    /// Creates a new CA for `domain`.
    pub fn create(domain: TrustDomain, validity: Validity) -> Result<Self, CertError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("keyward fleet CA {domain}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "keyward");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Self {
            domain,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            key_pem,
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        files::write_secret(&dir.join(CA_KEY_FILE), self.key_pem.as_bytes())?;
        files::write_public(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes())?;
        Ok(())
    }

    /// Loads the CA from `dir`, checking that the key belongs to the certificate.
    pub fn load(dir: &Path, domain: TrustDomain) -> Result<Self, CertError> {
        let key_bytes = files::read_secret(&dir.join(CA_KEY_FILE))?;
        let key_pem = Zeroizing::new(
            String::from_utf8(key_bytes.to_vec())
                .map_err(|_| CertError::BadCertificate("CA key is not PEM text".into()))?,
        );
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_pem = String::from_utf8(files::read_public(&dir.join(CA_CERT_FILE))?)
            .map_err(|_| CertError::BadCertificate("CA certificate is not PEM text".into()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        let (_, parsed) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        if parsed.public_key().subject_public_key.as_ref() != key.public_key_raw() {
            return Err(CertError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            domain,
            cert_pem,
            cert_der,
            issuer,
            key_pem,
        })
    }

    /// The trust domain.
    pub fn domain(&self) -> &TrustDomain {
        &self.domain
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate's DER: what agents pin when they enroll.
    pub fn fingerprint(&self) -> Sha256Digest {
        Sha256Digest::of(&self.cert_der)
    }

    fn leaf_params(&self, validity: Validity, serial: &SerialNumber) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial.clone());
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params
    }

    fn identity_params(
        &self,
        identity: &Identity,
        validity: Validity,
        serial: &SerialNumber,
    ) -> Result<CertificateParams, CertError> {
        let mut params = self.leaf_params(validity, serial);
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_string());
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(
            identity.uri(&self.domain),
        )?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params)
    }

    /// Issues the server certificate, with a new key, for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        sans: &[String],
        validity: Validity,
    ) -> Result<IssuedKey, CertError> {
        let serial = random_serial();
        let mut params = self.leaf_params(validity, &serial);
        params
            .distinguished_name
            .push(DnType::CommonName, "keyward server");
        for san in sans {
            let entry = match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(san) => SanType::DnsName(Ia5String::try_from(san.as_str())?),
                Err(_) => return Err(CertError::BadSan(san.clone())),
            };
            params.subject_alt_names.push(entry);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedKey {
            cert: issued(cert, &serial, validity),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Issues a certificate for `identity` with a key generated here. Used for the first
    /// operator identity at `init` and in tests; nodes send CSRs instead.
    pub fn issue_identity(
        &self,
        identity: &Identity,
        validity: Validity,
    ) -> Result<IssuedKey, CertError> {
        let serial = random_serial();
        let params = self.identity_params(identity, validity, &serial)?;
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedKey {
            cert: issued(cert, &serial, validity),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Signs a CSR into a certificate for `identity`.
    ///
    /// Only the CSR's public key is used (after its self-signature is checked); names,
    /// extensions and validity requested in it are ignored and replaced.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Validity,
    ) -> Result<IssuedCert, CertError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CertError::BadCsr(e.to_string()))?;
        let csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| CertError::BadCsr(e.to_string()))?;
        // rcgen derives the key algorithm from the signature algorithm; make sure the key in the
        // request really is the P-256 key it re-encodes.
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CertError::CsrKeyType);
        }
        let (_, request) = X509CertificationRequest::from_der(&der)
            .map_err(|e| CertError::BadCsr(e.to_string()))?;
        if request.certification_request_info.subject_pki.raw
            != csr.public_key.subject_public_key_info().as_slice()
        {
            return Err(CertError::CsrKeyType);
        }

        let serial = random_serial();
        let params = self.identity_params(identity, validity, &serial)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(issued(cert, &serial, validity))
    }

    /// Renews a certificate: `current` must be a certificate this CA issued, unexpired and not
    /// denied; the new one carries the same identity, a new serial and the new key of the CSR.
    pub fn renew(
        &self,
        current: &CertificateDer<'_>,
        csr_pem: &str,
        denied: &DenyList,
        validity: Validity,
    ) -> Result<(Identity, IssuedCert), CertError> {
        let (_, cert) = X509Certificate::from_der(current)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        let (_, ca) = X509Certificate::from_der(&self.cert_der)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| CertError::ForeignCertificate)?;
        let facts = CertificateFacts::read(current)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        if facts.not_after <= OffsetDateTime::now_utc().unix_timestamp() {
            return Err(CertError::Expired(facts.not_after));
        }
        if denied.contains(&facts.serial) {
            return Err(CertError::Denied(facts.serial));
        }
        let identity = Identity::from_certificate(current, &self.domain)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        let issued = self.sign_csr(csr_pem, &identity, validity)?;
        Ok((identity, issued))
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A key pair and CSR made on the requesting side (the agent). The private key never leaves the
/// process that called this; it is zeroized on drop and hidden from `Debug`.
pub struct CsrWithKey {
    /// PEM of the certificate signing request.
    pub csr_pem: String,
    /// PKCS#8 PEM private key.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for CsrWithKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrWithKey")
            .field("csr_pem", &self.csr_pem)
            .field("key_pem", &"...")
            .finish()
    }
}

/// Generates a P-256 key and a CSR for it. The CSR names the identity for readability only; the
/// CA decides the certificate's identity.
pub fn generate_csr(common_name: &str) -> Result<CsrWithKey, CertError> {
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    Ok(CsrWithKey {
        csr_pem: csr.pem()?,
        key_pem: Zeroizing::new(key.serialize_pem()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_common::ids::{NodeId, OperatorName};

    fn domain() -> TrustDomain {
        TrustDomain::new("fleet.test").unwrap()
    }

    fn day() -> Validity {
        Validity::for_duration(Duration::from_secs(86_400))
    }

    fn node(id: &str) -> Identity {
        Identity::Node(NodeId::new(id).unwrap())
    }

    #[test]
    fn a_signed_csr_carries_the_identity_and_a_random_128_bit_serial() {
        let ca = FleetCa::create(domain(), day()).unwrap();
        let csr = generate_csr("whatever-the-node-says").unwrap();
        let a = ca.sign_csr(&csr.csr_pem, &node("n1"), day()).unwrap();
        let b = ca.sign_csr(&csr.csr_pem, &node("n1"), day()).unwrap();
        assert_eq!(
            Identity::from_certificate(&a.der, &domain()).unwrap(),
            node("n1")
        );
        assert_eq!(a.serial.len(), 32);
        assert_ne!(a.serial, b.serial);
        assert_eq!(CertificateFacts::read(&a.der).unwrap().serial, a.serial);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let ca = FleetCa::create(domain(), day()).unwrap();
        let csr = generate_csr("n1").unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.csr_pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let last = der.len() - 5;
        der[last] ^= 0xff;
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64_lines(&der)
        );
        assert!(matches!(
            ca.sign_csr(&pem, &node("n1"), day()),
            Err(CertError::BadCsr(_))
        ));
        assert!(matches!(
            ca.sign_csr("garbage", &node("n1"), day()),
            Err(CertError::BadCsr(_))
        ));
    }

    fn base64_lines(der: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn the_ca_saves_and_loads_back_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FleetCa::create(domain(), day()).unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = FleetCa::load(dir.path(), domain()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        // A certificate issued by the loaded CA verifies against the original certificate.
        let op = Identity::Operator(OperatorName::new("admin").unwrap());
        let issued = loaded.issue_identity(&op, day()).unwrap();
        let csr = generate_csr("x").unwrap();
        let renewed = ca
            .renew(&issued.cert.der, &csr.csr_pem, &DenyList::new(), day())
            .unwrap();
        assert_eq!(renewed.0, op);
    }

    #[test]
    fn loading_a_key_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        FleetCa::create(domain(), day())
            .unwrap()
            .save(dir.path())
            .unwrap();
        let other = tempfile::tempdir().unwrap();
        FleetCa::create(domain(), day())
            .unwrap()
            .save(other.path())
            .unwrap();
        std::fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            FleetCa::load(dir.path(), domain()),
            Err(CertError::KeyMismatch)
        ));
    }

    #[test]
    fn renewal_refuses_foreign_expired_and_denied_certificates() {
        let ca = FleetCa::create(domain(), day()).unwrap();
        let other = FleetCa::create(domain(), day()).unwrap();
        let csr = generate_csr("n1").unwrap();
        let deny = DenyList::new();

        let foreign = other.issue_identity(&node("n1"), day()).unwrap();
        assert!(matches!(
            ca.renew(&foreign.cert.der, &csr.csr_pem, &deny, day()),
            Err(CertError::ForeignCertificate)
        ));

        let past = Validity {
            not_before: OffsetDateTime::now_utc() - time::Duration::days(2),
            not_after: OffsetDateTime::now_utc() - time::Duration::days(1),
        };
        let expired = ca.issue_identity(&node("n1"), past).unwrap();
        assert!(matches!(
            ca.renew(&expired.cert.der, &csr.csr_pem, &deny, day()),
            Err(CertError::Expired(_))
        ));

        let current = ca.issue_identity(&node("n1"), day()).unwrap();
        deny.extend([current.cert.serial.clone()]);
        let err = ca
            .renew(&current.cert.der, &csr.csr_pem, &deny, day())
            .unwrap_err();
        assert!(
            matches!(&err, CertError::Denied(s) if *s == current.cert.serial),
            "{err}"
        );
    }

    #[test]
    fn server_certificates_refuse_bad_names() {
        let ca = FleetCa::create(domain(), day()).unwrap();
        assert!(
            ca.issue_server(&["localhost".into(), "127.0.0.1".into()], day())
                .is_ok()
        );
        assert!(matches!(
            ca.issue_server(&["bad name".into()], day()),
            Err(CertError::BadSan(name)) if name == "bad name"
        ));
    }

    #[test]
    fn debug_output_never_contains_private_keys() {
        let ca = FleetCa::create(domain(), day()).unwrap();
        let issued = ca.issue_server(&["localhost".into()], day()).unwrap();
        let csr = generate_csr("n1").unwrap();
        for shown in [format!("{issued:?}"), format!("{csr:?}"), format!("{ca:?}")] {
            assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        }
    }
}
