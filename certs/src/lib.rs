//! The keyward fleet certificate authority.
//!
//! One CA per trust domain signs every certificate of the fleet: the key server's (DNS and IP
//! SANs), each node agent's (`spiffe://<domain>/node/<id>`) and each operator's
//! (`spiffe://<domain>/operator/<name>`). Serials are random 128-bit numbers. Nodes send
//! certificate signing requests, so their private keys never leave their host.
//!
//! # Key type
//!
//! Every key is ECDSA P-256 with SHA-256. It is the one type that rcgen can generate with the
//! `ring` backend, that rustls can use for both TLS 1.3 handshakes and certificate
//! verification, and that webpki accepts in chains; it is also what `curl` and `openssl s_client`
//! understand when an operator debugs a connection by hand. Ed25519 would work for rustls and
//! webpki too, but fewer external tools accept Ed25519 certificates.
//!
//! # Modules
//!
//! - [`ca`]: create and load the CA, issue server and identity certificates, sign CSRs, renew.
//! - [`files`]: atomic, permission-checked key and certificate files.
//!
//! Revoked serials are kept in the key server's store and enforced through
//! [`keyward_common::tls::DenyList`]; [`ca::FleetCa::renew`] consults the same list.

#![warn(missing_docs)]

pub mod ca;
pub mod files;

pub use ca::{CertError, CsrWithKey, FleetCa, IssuedCert, IssuedKey, Validity, generate_csr};
