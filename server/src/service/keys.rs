//! Keys and revocation progress.
//!
//! A revocation is complete when every container that held the key has confirmed a generation
//! without it (the agent reported that generation applied) or has been wiped. Containers on
//! evicted nodes cannot confirm anything: they are counted separately and keep the revocation
//! incomplete, because the key may still sit on that host.

use std::collections::HashMap;

use sqlx::Row as _;

use super::{Service, ServiceError, ServiceResult, now};
use crate::api::{ChangeOutcome, KeyView, RevocationProgress, RolloutOverrides};
use crate::store::Tx;

impl Service {
    /// Lists keys, optionally only those in `state` (`active` or `revoked`).
    pub async fn list_keys(&self, state: Option<&str>) -> ServiceResult<Vec<KeyView>> {
        let mut tx = self.store.pool().begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM keys WHERE ($1 IS NULL OR state = $1) ORDER BY created_at, id",
        )
        .bind(state)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.key_view(&mut tx, &id).await?);
        }
        Ok(out)
    }

    /// Shows a key by id or by fingerprint.
    pub async fn show_key(&self, id_or_fingerprint: &str) -> ServiceResult<KeyView> {
        let mut tx = self.store.pool().begin().await?;
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM keys WHERE id = $1 OR fingerprint = $1 \
             ORDER BY created_at DESC LIMIT 1",
        )
        .bind(id_or_fingerprint)
        .fetch_optional(&mut *tx)
        .await?;
        let id = id.ok_or_else(|| {
            ServiceError::not_found(format!("key {id_or_fingerprint} does not exist"))
        })?;
        self.key_view(&mut tx, &id).await
    }

    /// Revokes a user's key and rolls the containers that hold it.
    ///
    /// Container access and host keys are not revoked this way: rotating or destroying the
    /// container does it and keeps the container usable.
    pub async fn revoke_key(
        &self,
        actor: &str,
        id: &str,
        policy: RolloutOverrides,
    ) -> ServiceResult<ChangeOutcome> {
        let (mut tx, revision) = self.store.write().await?;
        let row: Option<(String, String, Option<String>, String)> =
            sqlx::query_as("SELECT kind, state, container_id, fingerprint FROM keys WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((kind, state, container, fingerprint)) = row else {
            return Err(ServiceError::not_found(format!("key {id} does not exist")));
        };
        if kind != "user" {
            let container = container.unwrap_or_default();
            return Err(ServiceError::conflict(format!(
                "key {id} is container {container}'s {kind} key; rotate (`keyward container rotate \
                 {container}`) or destroy the container instead"
            )));
        }
        if state != "active" {
            return Err(ServiceError::conflict(format!(
                "key {id} is already revoked"
            )));
        }
        let at = now();
        super::containers::revoke_keys(&mut tx, &[id.to_string()], "revoked by operator", at)
            .await?;
        let holders: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT kh.container_id FROM key_holders kh JOIN containers c \
             ON c.id = kh.container_id WHERE kh.key_id = $1 AND kh.until_generation IS NULL \
             AND c.state = 'active' ORDER BY kh.container_id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let details =
            serde_json::json!({ "reason": "revoked by operator", "fingerprint": fingerprint });
        crate::audit::append(
            &mut tx,
            at,
            &[crate::audit::NewEntry {
                actor,
                action: "key.revoke",
                subject: id,
                details,
            }],
        )
        .await?;
        let count = holders.len() as u64;
        let reason = format!("key {id} revoked");
        let rollout = self
            .start_rollout_and_commit(tx, revision, actor, &reason, &holders, policy)
            .await?;
        Ok(ChangeOutcome {
            rollout,
            containers: count,
        })
    }

    pub(crate) async fn key_view(&self, tx: &mut Tx, id: &str) -> ServiceResult<KeyView> {
        let row = sqlx::query(
            "SELECT id, kind, user_name, container_id, fingerprint, state, revoke_reason \
             FROM keys WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("key {id} does not exist")))?;
        let state: String = row.try_get(5)?;
        let revocation = if state == "revoked" {
            Some(revocation_progress(tx, id).await?)
        } else {
            None
        };
        Ok(KeyView {
            id: row.try_get(0)?,
            kind: row.try_get(1)?,
            user: row.try_get(2)?,
            container: row.try_get(3)?,
            fingerprint: row.try_get(4)?,
            state,
            revoke_reason: row.try_get(6)?,
            revocation,
        })
    }
}

/// Computes how far the revocation of key `id` has got. For each container, only its latest
/// holding of the key counts.
pub(crate) async fn revocation_progress(
    tx: &mut Tx,
    id: &str,
) -> Result<RevocationProgress, sqlx::Error> {
    let rows: Vec<(String, i64, Option<i64>, String, i64)> = sqlx::query_as(
        "SELECT kh.container_id, kh.from_generation, kh.until_generation, \
         c.state, c.applied_generation FROM key_holders kh JOIN containers c \
         ON c.id = kh.container_id WHERE kh.key_id = $1",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    let mut latest: HashMap<String, (i64, Option<i64>, String, i64)> = HashMap::new();
    for (container, from, until, state, applied) in rows {
        let entry = latest
            .entry(container)
            .or_insert((from, until, state.clone(), applied));
        if from > entry.0 {
            *entry = (from, until, state, applied);
        }
    }
    let mut progress = RevocationProgress {
        holders: 0,
        confirmed: 0,
        on_evicted_nodes: 0,
        complete: false,
    };
    for (_, until, state, applied) in latest.values() {
        progress.holders += 1;
        let confirmed = state == "destroyed" || until.is_some_and(|u| *applied >= u);
        if confirmed {
            progress.confirmed += 1;
        } else if state == "orphaned" {
            progress.on_evicted_nodes += 1;
        }
    }
    progress.complete = progress.confirmed == progress.holders;
    Ok(progress)
}
