//! The keyward key server and its operator CLI.
//!
//! The server (`keyward-server`) is reachable only over mutual TLS, except for enrollment. It
//! keeps users, groups, nodes and containers in one store (SQLite or PostgreSQL), generates
//! per-container keys, signs each container's desired state as a manifest, answers agents'
//! long-polls with those manifests and a signed node snapshot, and tracks revocations until every
//! holder confirmed. The CLI (`keyward`) is a thin client of the operator API.
//!
//! # Modules
//!
//! - [`daemon`]: `serve`: listeners, signals, shutdown.
//! - [`http`]: TLS accept loop, identity extraction, routes.
//! - [`service`]: every operation, one transaction each.
//! - [`store`]: the database behind one interface, migrations.
//! - [`watch`]: waking long-polls.
//! - [`audit`]: the hash-chained audit log.
//! - [`kek`]: encryption of secrets at rest.
//! - [`sshkeys`]: OpenSSH key generation and parsing.
//! - [`datadir`]: what `init` creates and `serve` loads.
//! - [`config`]: settings from file, environment and flags.
//! - [`metrics`]: Prometheus text metrics.
//! - [`api`]: operator API bodies, shared with the CLI.
//! - [`cli`]: the `keyward` command.

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod http;
pub mod kek;
pub mod metrics;
pub mod service;
pub mod sshkeys;
pub mod store;
pub mod watch;
