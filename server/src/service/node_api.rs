//! What agents call once enrolled: watch for manifests, fetch file contents, report status.

use std::time::Duration;

use keyward_common::api::{ContainerReport, Outcome, StatusReport, WatchResponse};
use keyward_common::dsse::SNAPSHOT_PAYLOAD_TYPE;
use keyward_common::ids::{NodeId, Sha256Digest};
use keyward_common::manifest::{NodeSnapshot, SnapshotEntry};
use keyward_common::secret::SecretBytes;
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;

use super::issue::file_context;
use super::rollouts::settle_released;
use super::{ErrorKind, Service, ServiceError, ServiceResult, now};
use crate::audit::{self, NewEntry};
use crate::metrics::Metrics;
use crate::store::{Backend, Tx, to_i64, to_u64};

/// Longest reason text kept from an agent's report.
const MAX_REASON_LEN: usize = 1000;

/// Decrements the watcher gauge when a watch ends, however it ends.
struct WatcherGuard<'a>(&'a Metrics);

impl Drop for WatcherGuard<'_> {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One consistent read of a node's current manifests.
struct NodeView {
    revision: u64,
    entries: Vec<(String, u64, String, u64, Vec<u8>)>,
}

impl Service {
    /// Answers a watch: at once if the node has manifests issued after `since`, otherwise when one
    /// is issued or after `wait` (capped by the server), whichever comes first. Every answer
    /// carries a freshly signed snapshot.
    pub async fn watch(
        &self,
        node: &NodeId,
        since: u64,
        wait: Duration,
    ) -> ServiceResult<WatchResponse> {
        let wait = wait.min(self.settings.watch_max_wait);
        let deadline = tokio::time::Instant::now() + wait;
        self.metrics.watchers.fetch_add(1, Ordering::Relaxed);
        let _guard = WatcherGuard(&self.metrics);

        // Subscribe before reading, so a change committed after the read still wakes us.
        let mut changes = self.hub.subscribe(node.as_str());
        let mut shutdown = self.hub.shutdown_signal();
        loop {
            let view = self.read_node(node).await?;
            let newest = view.entries.iter().map(|e| e.3).max().unwrap_or(0);
            if newest > since || *shutdown.borrow() {
                return self.answer(node, since, view);
            }
            let woken = tokio::select! {
                changed = changes.changed() => changed.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
                _ = shutdown.changed() => false,
            };
            if self.node_state(node.as_str()).await?.as_deref() == Some("evicted") {
                return Err(ServiceError::new(
                    ErrorKind::Forbidden,
                    "node_evicted",
                    format!("node {node} was evicted"),
                ));
            }
            if !woken {
                // Timed out or shutting down: answer with a view read now, never with the one
                // read before waiting (a freshly signed snapshot must describe the present).
                let view = self.read_node(node).await?;
                return self.answer(node, since, view);
            }
        }
    }

    /// Reads the server revision and the node's current manifests in one consistent snapshot of
    /// the store.
    async fn read_node(&self, node: &NodeId) -> ServiceResult<NodeView> {
        let mut tx = match self.store.backend() {
            // A deferred transaction in WAL mode reads one snapshot.
            Backend::Sqlite => self.store.pool().begin().await?,
            Backend::Postgres => {
                self.store
                    .pool()
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
        };
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let rows: Vec<(String, i64, String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT c.id, c.generation, m.digest, m.revision, m.envelope FROM containers c \
             JOIN manifests m ON m.container_id = c.id AND m.generation = c.generation \
             WHERE c.node_id = $1 AND c.state IN ('active', 'destroying') ORDER BY c.id",
        )
        .bind(node.as_str())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(NodeView {
            revision: to_u64(revision),
            entries: rows
                .into_iter()
                .map(|(id, generation, digest, revision, envelope)| {
                    (id, to_u64(generation), digest, to_u64(revision), envelope)
                })
                .collect(),
        })
    }

    fn answer(&self, node: &NodeId, since: u64, view: NodeView) -> ServiceResult<WatchResponse> {
        let issued_at = now();
        let mut listed = Vec::with_capacity(view.entries.len());
        let mut manifests = Vec::new();
        for (id, generation, digest, revision, envelope) in view.entries {
            let corrupt =
                |what: &str| ServiceError::internal(&format!("stored manifest of {id} has {what}"));
            listed.push(SnapshotEntry {
                container_id: id.parse().map_err(|_| corrupt("a bad container id"))?,
                generation,
                digest: Sha256Digest::parse_hex(&digest).map_err(|_| corrupt("a bad digest"))?,
            });
            if revision > since {
                let text =
                    String::from_utf8(envelope).map_err(|_| corrupt("a non-UTF-8 envelope"))?;
                manifests
                    .push(RawValue::from_string(text).map_err(|_| corrupt("a non-JSON envelope"))?);
            }
        }
        let snapshot = NodeSnapshot {
            node: node.clone(),
            revision: view.revision,
            issued_at,
            expires_at: issued_at + self.settings.snapshot_ttl.as_secs(),
            manifests: listed,
        };
        let payload = serde_json::to_vec(&snapshot).map_err(|e| ServiceError::internal(&e))?;
        let envelope = self
            .signing
            .sign_envelope(SNAPSHOT_PAYLOAD_TYPE, payload)
            .encode();
        let envelope = String::from_utf8(envelope).map_err(|e| ServiceError::internal(&e))?;
        Metrics::inc(&self.metrics.watch_answers);
        Ok(WatchResponse {
            revision: view.revision,
            snapshot: RawValue::from_string(envelope).map_err(|e| ServiceError::internal(&e))?,
            manifests,
        })
    }

    /// The content of file `idx` of `container` at `generation`, for its own node only.
    pub async fn fetch_file(
        &self,
        node: &NodeId,
        container: &str,
        generation: u64,
        idx: usize,
    ) -> ServiceResult<SecretBytes> {
        let owner: Option<String> =
            sqlx::query_scalar("SELECT node_id FROM containers WHERE id = $1")
                .bind(container)
                .fetch_optional(self.store.pool())
                .await?;
        match owner {
            None => {
                return Err(ServiceError::not_found(format!(
                    "container {container} does not exist"
                )));
            }
            Some(owner) if owner != node.as_str() => {
                return Err(ServiceError::forbidden(format!(
                    "container {container} is not on node {node}"
                )));
            }
            Some(_) => {}
        }
        let sealed: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT content_enc FROM manifest_files WHERE container_id = $1 \
             AND generation = $2 AND idx = $3",
        )
        .bind(container)
        .bind(to_i64(generation))
        .bind(idx as i64)
        .fetch_optional(self.store.pool())
        .await?;
        let sealed = sealed.ok_or_else(|| {
            ServiceError::new(
                ErrorKind::NotFound,
                "gone",
                format!(
                    "file {idx} of container {container} generation {generation} is not \
                     available; a newer generation replaced it"
                ),
            )
        })?;
        self.kek
            .open(&file_context(container, generation, idx), &sealed)
            .map_err(|e| ServiceError::internal(&e))
    }

    /// Records an agent's report. Every report must be about the reporting node's containers;
    /// otherwise nothing is recorded.
    pub async fn report_status(&self, node: &NodeId, report: StatusReport) -> ServiceResult<()> {
        let (mut tx, _revision) = self.store.write().await?;
        let at = now();
        let actor = format!("node/{node}");
        // A report about another node's container is refused whole: the reporter is confused
        // or hostile. One about a container the server does not know (its objects outlived a
        // server reset, or the id came from a refused manifest) is only recorded in the audit
        // log, so one such item cannot block the agent's other reports.
        let mut known = Vec::with_capacity(report.containers.len());
        for item in &report.containers {
            let Some(container) = &item.container_id else {
                known.push(item);
                continue;
            };
            let owner: Option<String> =
                sqlx::query_scalar("SELECT node_id FROM containers WHERE id = $1")
                    .bind(container.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            match owner.as_deref() {
                Some(owner) if owner == node.as_str() => known.push(item),
                Some(_) => {
                    return Err(ServiceError::forbidden(format!(
                        "container {container} is not on node {node}; nothing was recorded"
                    )));
                }
                None => {
                    let details = serde_json::json!({
                        "generation": item.generation,
                        "outcome": outcome_name(&item.outcome),
                    });
                    audit::append(
                        &mut tx,
                        at,
                        &[NewEntry {
                            actor: &actor,
                            action: "report.unknown_container",
                            subject: container.as_str(),
                            details,
                        }],
                    )
                    .await?;
                }
            }
        }
        for item in known {
            self.record_outcome(&mut tx, &actor, item, at).await?;
        }
        if let Some(inventory) = &report.inventory {
            let json = serde_json::to_string(inventory).map_err(|e| ServiceError::internal(&e))?;
            sqlx::query("UPDATE nodes SET inventory = $1, inventory_at = $2 WHERE id = $3")
                .bind(json)
                .bind(to_i64(at))
                .bind(node.as_str())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE nodes SET last_seen = $1 WHERE id = $2")
            .bind(to_i64(at))
            .bind(node.as_str())
            .execute(&mut *tx)
            .await?;
        let rollouts: Vec<String> =
            sqlx::query_scalar("SELECT id FROM rollouts WHERE state = 'running'")
                .fetch_all(&mut *tx)
                .await?;
        for rollout in &rollouts {
            settle_released(&mut tx, rollout, at).await?;
        }
        tx.commit().await?;
        if !rollouts.is_empty() {
            self.rollout_wake.notify_one();
        }
        Ok(())
    }

    async fn record_outcome(
        &self,
        tx: &mut Tx,
        actor: &str,
        item: &ContainerReport,
        at: u64,
    ) -> ServiceResult<()> {
        let generation = item.generation.unwrap_or(0);
        let Some(container) = item.container_id.as_ref().map(|c| c.as_str()) else {
            // A refusal before the container was known (for example a bad signature).
            if let Outcome::Refused { reason } = &item.outcome {
                let details = serde_json::json!({ "reason": truncate(reason) });
                audit::append(
                    tx,
                    at,
                    &[NewEntry {
                        actor,
                        action: "manifest.refused",
                        subject: "-",
                        details,
                    }],
                )
                .await?;
            }
            return Ok(());
        };
        match &item.outcome {
            Outcome::Applied => {
                sqlx::query(
                    "UPDATE containers SET applied_generation = CASE \
                     WHEN applied_generation > $1 THEN applied_generation \
                     ELSE $1 END, status = 'applied', status_generation = $1, \
                     status_reason = NULL, status_at = $2 WHERE id = $3 \
                     AND state <> 'destroyed' AND generation >= $1",
                )
                .bind(to_i64(generation))
                .bind(to_i64(at))
                .bind(container)
                .execute(&mut **tx)
                .await?;
            }
            Outcome::Failed { reason } | Outcome::Refused { reason } => {
                let status = if matches!(item.outcome, Outcome::Failed { .. }) {
                    "failed"
                } else {
                    "refused"
                };
                sqlx::query(
                    "UPDATE containers SET status = $1, status_generation = $2, \
                     status_reason = $3, status_at = $4 WHERE id = $5 \
                     AND state <> 'destroyed' AND generation >= $2",
                )
                .bind(status)
                .bind(to_i64(generation))
                .bind(truncate(reason))
                .bind(to_i64(at))
                .bind(container)
                .execute(&mut **tx)
                .await?;
                let details =
                    serde_json::json!({ "generation": generation, "reason": truncate(reason) });
                let action = if status == "failed" {
                    "manifest.failed"
                } else {
                    "manifest.refused"
                };
                audit::append(
                    tx,
                    at,
                    &[NewEntry {
                        actor,
                        action,
                        subject: container,
                        details,
                    }],
                )
                .await?;
            }
            Outcome::Wiped { removed } => {
                let destroy_generation: Option<(String, i64)> =
                    sqlx::query_as("SELECT state, generation FROM containers WHERE id = $1")
                        .bind(container)
                        .fetch_optional(&mut **tx)
                        .await?;
                let confirmed = matches!(
                    &destroy_generation,
                    Some((state, g)) if state == "destroying" && to_i64(generation) >= *g
                );
                if confirmed {
                    sqlx::query(
                        "UPDATE containers SET state = 'destroyed', \
                         destroyed_at = $1, applied_generation = $2, \
                         status = 'wiped', status_generation = $2, \
                         status_reason = NULL, status_at = $1 WHERE id = $3",
                    )
                    .bind(to_i64(at))
                    .bind(to_i64(generation))
                    .bind(container)
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query("DELETE FROM manifest_files WHERE container_id = $1")
                        .bind(container)
                        .execute(&mut **tx)
                        .await?;
                    sqlx::query("DELETE FROM secret_files WHERE container_id = $1")
                        .bind(container)
                        .execute(&mut **tx)
                        .await?;
                    sqlx::query("UPDATE containers SET host_key_enc = $1 WHERE id = $2")
                        .bind(Vec::<u8>::new())
                        .bind(container)
                        .execute(&mut **tx)
                        .await?;
                    tracing::info!(container, "container wiped");
                }
                let details = serde_json::json!({
                    "generation": generation,
                    "removed": removed,
                    "confirmed": confirmed,
                });
                audit::append(
                    tx,
                    at,
                    &[NewEntry {
                        actor,
                        action: "container.wipe",
                        subject: container,
                        details,
                    }],
                )
                .await?;
            }
        }
        Ok(())
    }
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::Failed { .. } => "failed",
        Outcome::Refused { .. } => "refused",
        Outcome::Wiped { .. } => "wiped",
    }
}

fn truncate(reason: &str) -> String {
    reason.chars().take(MAX_REASON_LEN).collect()
}
