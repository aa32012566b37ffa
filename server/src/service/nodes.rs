//! Nodes: join tokens, enrollment, certificate renewal, eviction.
//!
//! A join token is 32 random bytes shown once; the store keeps only its SHA-256. Enrollment
//! consumes it with one conditional `UPDATE`, so two concurrent attempts with the same token
//! cannot both succeed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyward_certs::{IssuedCert, Validity};
use keyward_common::api::{CertificateResponse, EnrollRequest, LocalImage, RenewRequest};
use keyward_common::identity::Identity;
use keyward_common::ids::{NodeId, OperatorName, Sha256Digest};
use keyward_common::secret::SecretString;
use rand_core::{OsRng, RngCore as _};
use rustls_pki_types::CertificateDer;
use serde_json::value::RawValue;
use sqlx::Row as _;

use super::{ErrorKind, Service, ServiceError, ServiceResult, now};
use crate::api::{CreateTokenRequest, NodeView, TokenResponse};
use crate::audit::{self, NewEntry};
use crate::datadir::InitReport;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, Tx, to_i64, to_u64};

/// Prefix of join tokens, so a leaked one is recognizable in a secret scanner.
const TOKEN_PREFIX: &str = "kwjt_";

fn token_hash(token: &str) -> String {
    Sha256Digest::of(token.as_bytes()).to_hex()
}

fn invalid_token() -> ServiceError {
    ServiceError::new(
        ErrorKind::Unauthorized,
        "invalid_token",
        "join token is invalid, expired, already used, or for another node; ask an operator for a \
         new one",
    )
}

impl Service {
    /// Creates a single-use join token for `node`, registering the node as pending.
    pub async fn create_token(
        &self,
        actor: &str,
        req: CreateTokenRequest,
    ) -> ServiceResult<TokenResponse> {
        let node =
            NodeId::new(req.node.clone()).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let max = self.settings.join_token_ttl.as_secs();
        let ttl = req.ttl_seconds.unwrap_or(max);
        if ttl == 0 || ttl > max {
            return Err(ServiceError::bad_request(format!(
                "ttl_seconds must be between 1 and {max}"
            )));
        }

        let mut raw = [0u8; 32];
        OsRng.fill_bytes(&mut raw);
        let token = SecretString::new(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw)));
        zeroize::Zeroize::zeroize(&mut raw);

        let (mut tx, _revision) = self.store.write().await?;
        let at = now();
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(node.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            Some("evicted") => {
                return Err(ServiceError::conflict(format!(
                    "node {node} was evicted; enroll the host under a new node id"
                )));
            }
            Some(_) => {}
            None => {
                sqlx::query("INSERT INTO nodes (id, state, created_at) VALUES ($1, 'pending', $2)")
                    .bind(node.as_str())
                    .bind(to_i64(at))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let expires_at = at + ttl;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, node_id, created_by, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash(token.expose()))
        .bind(node.as_str())
        .bind(actor)
        .bind(to_i64(at))
        .bind(to_i64(expires_at))
        .execute(&mut *tx)
        .await?;
        let details = serde_json::json!({ "expires_at": expires_at });
        audit::append(
            &mut tx,
            at,
            &[NewEntry {
                actor,
                action: "node.token",
                subject: node.as_str(),
                details,
            }],
        )
        .await?;
        tx.commit().await?;

        Ok(TokenResponse {
            node: node.to_string(),
            token,
            expires_at,
            ca_fingerprint: self.ca.fingerprint().to_hex(),
            enroll_url: self.settings.enroll_url.clone(),
            server_url: self.settings.server_url.clone(),
        })
    }

    /// Enrolls a node: consumes its join token and signs its CSR.
    pub async fn enroll(&self, req: EnrollRequest) -> ServiceResult<CertificateResponse> {
        let node = req.node.clone();
        let identity = Identity::Node(node.clone());
        let validity = Validity::for_duration(self.settings.node_cert_validity);
        // Sign first (CPU only); nothing is stored unless the token is consumed below.
        let issued = self
            .ca
            .sign_csr(&req.csr_pem, &identity, validity)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;

        let (mut tx, _revision) = self.store.write().await?;
        let at = now();
        let consumed = sqlx::query(
            "UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND node_id = $3 \
             AND used_at IS NULL AND expires_at > $1",
        )
        .bind(to_i64(at))
        .bind(token_hash(req.token.expose()))
        .bind(node.as_str())
        .execute(&mut *tx)
        .await?;
        if consumed.rows_affected() != 1 {
            return Err(invalid_token());
        }
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(node.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if state.as_deref() == Some("evicted") {
            return Err(invalid_token());
        }
        sqlx::query(
            "UPDATE nodes SET state = 'active', enrolled_at = $1, last_seen = $1 WHERE id = $2",
        )
        .bind(to_i64(at))
        .bind(node.as_str())
        .execute(&mut *tx)
        .await?;
        // Re-enrolling (a reinstalled host) retires the node's earlier certificates.
        let retired: Vec<String> = sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE node_id = $1 AND denied_at IS NULL",
        )
        .bind(node.as_str())
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE certificates SET denied_at = $1 WHERE node_id = $2 AND denied_at IS NULL",
        )
        .bind(to_i64(at))
        .bind(node.as_str())
        .execute(&mut *tx)
        .await?;
        record_node_certificate(&mut tx, &node, &issued, "node.enroll", at).await?;
        tx.commit().await?;
        self.deny.extend(retired);
        Metrics::inc(&self.metrics.enrollments);
        tracing::info!(node = %node, serial = %issued.serial, "node enrolled");
        self.certificate_response(issued.pem, issued.not_after)
    }

    /// Renews the certificate `current` of `node`, presented over mTLS.
    pub async fn renew(
        &self,
        node: &NodeId,
        current: &CertificateDer<'_>,
        req: RenewRequest,
    ) -> ServiceResult<CertificateResponse> {
        let validity = Validity::for_duration(self.settings.node_cert_validity);
        let (identity, issued) = self
            .ca
            .renew(current, &req.csr_pem, &self.deny, validity)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        if identity != Identity::Node(node.clone()) {
            return Err(ServiceError::forbidden(
                "the presented certificate is not this node's",
            ));
        }
        let (mut tx, _revision) = self.store.write().await?;
        // An eviction may have committed since the request was authorized.
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(node.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if state.as_deref() != Some("active") {
            return Err(ServiceError::new(
                ErrorKind::Forbidden,
                "node_evicted",
                format!("node {node} is not active"),
            ));
        }
        let at = now();
        record_node_certificate(&mut tx, node, &issued, "node.renew", at).await?;
        tx.commit().await?;
        Metrics::inc(&self.metrics.renewals);
        tracing::info!(node = %node, serial = %issued.serial, "node certificate renewed");
        self.certificate_response(issued.pem, issued.not_after)
    }

    fn certificate_response(
        &self,
        pem: String,
        not_after: i64,
    ) -> ServiceResult<CertificateResponse> {
        let trust_root =
            String::from_utf8(self.trust_root.to_json()).map_err(|e| ServiceError::internal(&e))?;
        Ok(CertificateResponse {
            certificate_pem: pem,
            ca_pem: self.ca.cert_pem().to_string(),
            trust_root: RawValue::from_string(trust_root)
                .map_err(|e| ServiceError::internal(&e))?,
            trust_domain: self.ca.domain().to_string(),
            not_after,
        })
    }

    /// Evicts a node: denies its certificates, revokes the keys of its containers, and orphans
    /// them. The agent learns it at its next connection, which is refused.
    pub async fn evict_node(&self, actor: &str, id: &str) -> ServiceResult<NodeView> {
        let (mut tx, revision) = self.store.write().await?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            None => return Err(ServiceError::not_found(format!("node {id} does not exist"))),
            Some("evicted") => {
                return Err(ServiceError::conflict(format!(
                    "node {id} is already evicted"
                )));
            }
            Some(_) => {}
        }
        let at = now();
        sqlx::query("UPDATE nodes SET state = 'evicted', evicted_at = $1 WHERE id = $2")
            .bind(to_i64(at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let serials: Vec<String> = sqlx::query_scalar(
            "SELECT serial FROM certificates WHERE node_id = $1 AND denied_at IS NULL",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE certificates SET denied_at = $1 WHERE node_id = $2 AND denied_at IS NULL",
        )
        .bind(to_i64(at))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE join_tokens SET used_at = $1 WHERE node_id = $2 AND used_at IS NULL")
            .bind(to_i64(at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT k.id FROM keys k JOIN containers c ON c.id = k.container_id \
             WHERE c.node_id = $1 AND c.state IN ('active', 'destroying') AND k.state = 'active'",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        super::containers::revoke_keys(&mut tx, &keys, "node evicted", at).await?;
        let orphaned = sqlx::query(
            "UPDATE containers SET state = 'orphaned' WHERE node_id = $1 \
             AND state IN ('active', 'destroying')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let details = serde_json::json!({
            "denied_serials": serials,
            "revoked_keys": keys.len(),
            "orphaned_containers": orphaned,
        });
        audit::append(
            &mut tx,
            at,
            &[NewEntry {
                actor,
                action: "node.evict",
                subject: id,
                details,
            }],
        )
        .await?;
        self.store
            .notify_nodes(&mut tx, &[id.to_string()], revision)
            .await?;
        tx.commit().await?;

        self.deny.extend(serials);
        self.announce(&[id.to_string()], revision);
        tracing::info!(node = %id, "node evicted");
        self.show_node(id).await
    }

    /// Lists nodes.
    pub async fn list_nodes(&self) -> ServiceResult<Vec<NodeView>> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM nodes ORDER BY id")
            .fetch_all(self.store.pool())
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.show_node(&id).await?);
        }
        Ok(out)
    }

    /// Shows one node.
    pub async fn show_node(&self, id: &str) -> ServiceResult<NodeView> {
        let row = sqlx::query(
            "SELECT n.id, n.state, n.enrolled_at, n.last_seen, n.inventory, \
             (SELECT COUNT(*) FROM containers c WHERE c.node_id = n.id AND c.state <> 'destroyed') \
             FROM nodes n WHERE n.id = $1",
        )
        .bind(id)
        .fetch_optional(self.store.pool())
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("node {id} does not exist")))?;
        let inventory: String = row.try_get(4)?;
        Ok(NodeView {
            id: row.try_get(0)?,
            state: row.try_get(1)?,
            enrolled_at: row.try_get::<Option<i64>, _>(2)?.map(to_u64),
            last_seen: row.try_get::<Option<i64>, _>(3)?.map(to_u64),
            containers: to_u64(row.try_get(5)?),
            inventory: serde_json::from_str::<Vec<LocalImage>>(&inventory).unwrap_or_default(),
        })
    }

    /// Whether `node` is active (enrolled and not evicted), for authorizing node requests.
    pub async fn node_state(&self, node: &str) -> ServiceResult<Option<String>> {
        Ok(sqlx::query_scalar("SELECT state FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_optional(self.store.pool())
            .await?)
    }
}

/// Records a certificate issued to `node` by enrollment or renewal, and audits it as `action`
/// by the node itself.
async fn record_node_certificate(
    tx: &mut Tx,
    node: &NodeId,
    issued: &IssuedCert,
    action: &str,
    at: u64,
) -> ServiceResult<()> {
    let identity = Identity::Node(node.clone());
    record_certificate(
        tx,
        &issued.serial,
        &identity,
        Some(node.as_str()),
        at,
        issued.not_after,
    )
    .await?;
    let details = serde_json::json!({ "serial": issued.serial, "not_after": issued.not_after });
    audit::append(
        tx,
        at,
        &[NewEntry {
            actor: &format!("node/{node}"),
            action,
            subject: node.as_str(),
            details,
        }],
    )
    .await?;
    Ok(())
}

async fn record_certificate(
    tx: &mut Tx,
    serial: &str,
    identity: &Identity,
    node: Option<&str>,
    at: u64,
    not_after: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO certificates (serial, subject, node_id, issued_at, not_after) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(serial)
    .bind(identity.to_string())
    .bind(node)
    .bind(to_i64(at))
    .bind(not_after)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates the store at `url` and records the first operator's certificate and the fleet's
/// creation in the audit log (`keyward-server init`).
pub async fn record_init(url: &str, operator: &str, report: &InitReport) -> Result<(), StoreError> {
    let store = Store::open(url).await?;
    let (mut tx, _revision) = store.write().await?;
    let name = OperatorName::new(operator).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let identity = Identity::Operator(name);
    let at = now();
    record_certificate(
        &mut tx,
        &report.operator_serial,
        &identity,
        None,
        at,
        report.operator_not_after,
    )
    .await?;
    let details = serde_json::json!({
        "ca_fingerprint": report.ca_fingerprint,
        "signing_key": report.signing_key_id,
        "operator_serial": report.operator_serial,
    });
    audit::append(
        &mut tx,
        at,
        &[NewEntry {
            actor: "server",
            action: "fleet.init",
            subject: &identity.to_string(),
            details,
        }],
    )
    .await?;
    tx.commit().await?;
    store.close().await;
    Ok(())
}
