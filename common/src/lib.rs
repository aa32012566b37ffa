//! Shared foundation of keyward: what the key server signs and what the node agent checks.
//!
//! keyward distributes per-container SSH keys and secret files to Docker hosts. The server
//! signs, for each container, a [`manifest::Manifest`] (its desired state at one generation) and,
//! on every watch answer, a [`manifest::NodeSnapshot`] (the list of current manifests of one
//! node). Both travel as DSSE envelopes ([`dsse`]). The agent applies nothing until
//! [`verify::Verifier`] has produced a [`verify::VerifiedManifest`], which no other code can
//! construct.
//!
//! # Modules
//!
//! - [`ids`]: validated identifiers (node, container, user, image id, digest).
//! - [`manifest`]: the manifest and snapshot documents.
//! - [`dsse`]: envelope encoding, PAE, ed25519 signing keys and the trust root.
//! - [`verify`]: checks 1 to 6 of the design, pure functions of their inputs.
//! - [`paths`]: where injected files may go and with which modes.
//! - [`limits`]: size limits enforced before parsing.
//! - [`identity`]: SPIFFE-style identities in certificate URI SANs.
//! - [`tls`]: rustls configurations (TLS 1.3, fleet CA only, deny list, CA pinning).
//! - [`api`]: JSON bodies of the node API.
//! - `client` (feature `client`): a small HTTPS client for the API.
//! - [`secret`]: zeroizing containers for secret bytes.
//! - [`time`]: the clock, in unix seconds.

#![warn(missing_docs)]

pub mod api;
#[cfg(feature = "client")]
pub mod client;
pub mod dsse;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod manifest;
pub mod paths;
pub mod secret;
pub mod time;
pub mod tls;
pub mod verify;
