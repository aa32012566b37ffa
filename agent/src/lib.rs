//! The keyward node agent.
//!
//! One agent runs on every Docker host. It enrolls once with a join token (generating its key
//! locally and pinning the fleet CA by fingerprint), then long-polls the key server for signed
//! manifests, verifies each against the trust root, its node id, its persisted high-water mark
//! and the latest signed snapshot, and reconciles the Docker engine: it rebuilds each
//! container's image from a base image already on the host with the keys injected, runs it, and
//! on destroy wipes the container, its image and build cache and reports the wipe.
//!
//! # Modules
//!
//! - [`agent`]: the main loop: watch, verify, persist, reconcile, report, renew, expiry policy.
//! - [`reconcile`]: making the engine match the verified desired state, idempotently.
//! - [`docker`]: the Docker Engine API calls, scoped by labels to this node.
//! - [`identity`]: enrollment, the node certificate and its renewal.
//! - [`state`]: the state directory: identity files and high-water marks.
//! - [`config`]: command-line settings.
//! - [`failpoint`]: crash points for crash-safety tests.

pub mod agent;
pub mod config;
pub mod docker;
pub mod failpoint;
pub mod identity;
pub mod reconcile;
pub mod state;
