//! The key server's operations. Each public method is one transaction on the store: it checks
//! its input, changes state, appends to the audit log, and after commit wakes the watchers of
//! the nodes it touched.
//!
//! - [`nodes`]: join tokens, enrollment, renewal, eviction.
//! - [`users`]: users, their keys, groups and memberships.
//! - [`containers`]: create, rotate, destroy.
//! - [`issue`]: deriving a container's files and signing a new generation.
//! - [`node_api`]: what agents call: watch, fetch, report.
//! - [`rollouts`]: releasing many generations in batches.
//! - [`keys`]: key listing, revocation and its progress.
//! - [`audit_log`]: reading the audit log.

pub mod audit_log;
pub mod containers;
pub mod issue;
pub mod keys;
pub mod node_api;
pub mod nodes;
pub mod rollouts;
pub mod users;

use std::sync::Arc;

use keyward_certs::FleetCa;
use keyward_common::dsse::{ManifestSigningKey, TrustRoot};
use keyward_common::tls::DenyList;
use rand_core::{OsRng, RngCore as _};
use tokio::sync::Notify;

use crate::config::Settings;
use crate::kek::Kek;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::watch::WatchHub;

/// What kind of failure, which decides the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// 400: the request is malformed or invalid.
    BadRequest,
    /// 401: no usable credential.
    Unauthorized,
    /// 403: the caller may not do this.
    Forbidden,
    /// 404: the object does not exist.
    NotFound,
    /// 409: the request conflicts with current state.
    Conflict,
    /// 413: the body is too large.
    TooLarge,
    /// 503: the server cannot serve right now.
    Unavailable,
    /// 500: a bug or a failing dependency; details are logged, not returned.
    Internal,
}

/// An error returned to API callers: a kind, a stable code and a message that says what to do.
/// Messages never contain secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    /// The kind.
    pub kind: ErrorKind,
    /// A stable code for scripts, such as `not_found`.
    pub code: &'static str,
    /// The message.
    pub message: String,
}

impl ServiceError {
    /// Makes an error.
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, "bad_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, "not_found", message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, "conflict", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, "forbidden", message)
    }

    /// 500 `internal`, logging the cause.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            ErrorKind::Internal,
            "internal",
            "internal server error; see the server log",
        )
    }
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        Self::internal(&err)
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(err: sqlx::Error) -> Self {
        Self::internal(&err)
    }
}

/// Result of a service operation.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// Maps a unique-constraint violation from an insert to 409 `conflict` with the message
/// `taken` builds; every other database error stays internal.
pub(crate) fn conflict_if_taken<T>(
    result: Result<T, sqlx::Error>,
    taken: impl FnOnce() -> String,
) -> ServiceResult<T> {
    match result {
        Err(e) if crate::store::is_unique_violation(&e) => Err(ServiceError::conflict(taken())),
        other => Ok(other?),
    }
}

/// Everything the operations need: the store, the keys, the settings.
pub struct Service {
    /// The store.
    pub store: Store,
    /// The fleet CA.
    pub ca: FleetCa,
    /// The manifest signing key.
    pub signing: ManifestSigningKey,
    /// The trust root handed to agents, as JSON.
    pub trust_root: TrustRoot,
    /// The key-encryption key.
    pub kek: Kek,
    /// Denied certificate serials, shared with the TLS listeners.
    pub deny: Arc<DenyList>,
    /// Watcher wake-ups.
    pub hub: WatchHub,
    /// Wakes the rollout driver.
    pub rollout_wake: Notify,
    /// Resolved settings.
    pub settings: Settings,
    /// Metrics, shared with the listeners.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("backend", &self.store.backend())
            .field("signing_key", &self.signing.key_id())
            .finish_non_exhaustive()
    }
}

/// A new random id: `prefix` and 16 hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    OsRng.fill_bytes(&mut bytes);
    format!("{prefix}-{}", hex::encode(bytes))
}

/// The current time in unix seconds.
pub fn now() -> u64 {
    keyward_common::time::now_unix()
}

impl Service {
    /// Loads the denied serials from the store into the in-memory deny list.
    pub async fn refresh_deny_list(&self) -> ServiceResult<usize> {
        let serials: Vec<String> =
            sqlx::query_scalar("SELECT serial FROM certificates WHERE denied_at IS NOT NULL")
                .fetch_all(self.store.pool())
                .await?;
        self.deny.extend(serials);
        Ok(self.deny.len())
    }

    /// Wakes watchers of `nodes` after a commit at `revision`.
    pub(crate) fn announce(&self, nodes: &[String], revision: u64) {
        self.hub.notify(nodes, revision);
    }
}
