//! Rollouts: a change that touches many containers becomes new generations released in
//! batches, with at most `max_in_flight` released but unconfirmed, paused once
//! `failure_threshold` containers fail.
//!
//! What a released container gets is derived at release time from the state then current, so a
//! later change never gets overtaken by an earlier rollout's stale view. A container whose
//! derived content did not change is skipped without a new generation.
//!
//! The driver is a loop woken by changes and status reports (and a slow tick). Each step is one
//! write transaction, so several server replicas can drive the same rollout without releasing
//! a container twice.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keyward_common::manifest::Action;
use sqlx::Row as _;

use super::issue::{ContainerRecord, Grants, IfUnchanged, IssueBatch, Issued};
use super::{Service, ServiceError, ServiceResult, new_id, now};
use crate::api::{RolloutOverrides, RolloutPolicy, RolloutView};
use crate::audit::{self, NewEntry};
use crate::store::bulk::{self, Value};
use crate::store::{Tx, to_i64, to_u64};

/// What one rollout step did.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Nodes that got new generations.
    pub nodes: Vec<String>,
    /// Containers released.
    pub released: u64,
    /// Whether the rollout completed.
    pub completed: bool,
    /// Whether the rollout paused at its failure threshold.
    pub paused: bool,
    /// Whether more could be released right away.
    pub room_left: bool,
}

/// How often the driver looks at running rollouts when nothing wakes it.
const DRIVER_TICK: Duration = Duration::from_secs(2);

impl Service {
    /// Creates a rollout over `containers` inside `tx`. Returns its id, or `None` when there is
    /// nothing to roll.
    pub(crate) async fn start_rollout(
        &self,
        tx: &mut Tx,
        actor: &str,
        reason: &str,
        containers: &[String],
        policy: RolloutOverrides,
    ) -> ServiceResult<Option<String>> {
        if containers.is_empty() {
            return Ok(None);
        }
        let policy = policy.resolve(self.settings.rollout);
        if policy.batch_size == 0 || policy.max_in_flight == 0 || policy.failure_threshold == 0 {
            return Err(ServiceError::bad_request(
                "rollout batch_size, max_in_flight and failure_threshold must be above 0",
            ));
        }
        let id = new_id("r");
        let at = now();
        sqlx::query(
            "INSERT INTO rollouts (id, reason, state, batch_size, \
             max_in_flight, failure_threshold, created_by, created_at, resumed_at) \
             VALUES ($1, $2, 'running', $3, $4, $5, $6, $7, $7)",
        )
        .bind(&id)
        .bind(reason)
        .bind(to_i64(policy.batch_size))
        .bind(to_i64(policy.max_in_flight))
        .bind(to_i64(policy.failure_threshold))
        .bind(actor)
        .bind(to_i64(at))
        .execute(&mut **tx)
        .await?;
        let items = containers
            .iter()
            .map(|c| {
                vec![
                    Value::Text(id.clone()),
                    Value::Text(c.clone()),
                    Value::Text("pending".into()),
                ]
            })
            .collect();
        bulk::insert(tx, "rollout_items (rollout_id, container_id, state)", items).await?;
        let details = serde_json::json!({
            "reason": reason,
            "containers": containers.len(),
            "batch_size": policy.batch_size,
            "max_in_flight": policy.max_in_flight,
            "failure_threshold": policy.failure_threshold,
        });
        audit::append(
            tx,
            at,
            &[NewEntry {
                actor,
                action: "rollout.start",
                subject: &id,
                details,
            }],
        )
        .await?;
        Ok(Some(id))
    }

    /// Starts a rollout over `containers` in `tx` (if any), releases its first batch in the
    /// same transaction, and commits. Returns the rollout's id.
    pub(crate) async fn start_rollout_and_commit(
        &self,
        mut tx: Tx,
        revision: u64,
        actor: &str,
        reason: &str,
        containers: &[String],
        policy: RolloutOverrides,
    ) -> ServiceResult<Option<String>> {
        let Some(id) = self
            .start_rollout(&mut tx, actor, reason, containers, policy)
            .await?
        else {
            tx.commit().await?;
            return Ok(None);
        };
        let step = self.step_in(&mut tx, revision, &id).await?;
        self.store
            .notify_nodes(&mut tx, &step.nodes, revision)
            .await?;
        tx.commit().await?;
        self.after_step(&id, revision, &step);
        Ok(Some(id))
    }

    /// Advances every running rollout by one step.
    pub async fn drive_rollouts(&self) -> ServiceResult<()> {
        let running: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM rollouts WHERE state = 'running' ORDER BY created_at, id",
        )
        .fetch_all(self.store.pool())
        .await?;
        for id in running {
            self.step_rollout(&id).await?;
        }
        Ok(())
    }

    /// One step of rollout `id`: settle released items, pause on failures, release the next
    /// batch, complete when everything settled.
    async fn step_rollout(&self, id: &str) -> ServiceResult<()> {
        let (mut tx, revision) = self.store.write().await?;
        let step = self.step_in(&mut tx, revision, id).await?;
        self.store
            .notify_nodes(&mut tx, &step.nodes, revision)
            .await?;
        tx.commit().await?;
        self.after_step(id, revision, &step);
        Ok(())
    }

    /// Logs a step and wakes whoever it concerns, after its transaction committed.
    pub(crate) fn after_step(&self, id: &str, revision: u64, step: &Step) {
        self.announce(&step.nodes, revision);
        if step.paused {
            tracing::warn!(rollout = %id, "rollout paused at its failure threshold");
        }
        if step.released > 0 {
            tracing::info!(rollout = %id, released = step.released, "rollout batch released");
        }
        if step.completed {
            tracing::info!(rollout = %id, "rollout completed");
        } else if step.room_left {
            // Room is left: release more right away instead of waiting for the tick.
            self.rollout_wake.notify_one();
        }
    }

    /// One step of rollout `id` inside `tx`: settle released items, pause on failures, release
    /// the next batch, complete when everything settled. The changes that start a rollout run
    /// its first step in their own transaction, so the first batch is committed together with
    /// the change (a revocation reaches agents without waiting for the driver).
    pub(crate) async fn step_in(
        &self,
        tx: &mut Tx,
        revision: u64,
        id: &str,
    ) -> ServiceResult<Step> {
        let mut step = Step::default();
        let row = sqlx::query(
            "SELECT state, batch_size, max_in_flight, failure_threshold FROM rollouts \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
        let state: String = row.try_get(0)?;
        if state != "running" {
            return Ok(step);
        }
        let policy = RolloutPolicy {
            batch_size: to_u64(row.try_get(1)?),
            max_in_flight: to_u64(row.try_get(2)?),
            failure_threshold: to_u64(row.try_get(3)?),
        };
        let at = now();
        settle_released(tx, id, at).await?;

        let counts = item_counts(tx, id).await?;
        if counts.failed >= policy.failure_threshold {
            sqlx::query("UPDATE rollouts SET state = 'paused' WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
            let details = serde_json::json!({
                "failed": counts.failed,
                "threshold": policy.failure_threshold,
            });
            audit::append(
                tx,
                at,
                &[NewEntry {
                    actor: "server",
                    action: "rollout.pause",
                    subject: id,
                    details,
                }],
            )
            .await?;
            step.paused = true;
            return Ok(step);
        }

        // Release the next batch within the in-flight budget.
        let room = policy
            .max_in_flight
            .saturating_sub(counts.in_flight)
            .min(policy.batch_size);
        let mut nodes = BTreeSet::new();
        let mut released = 0u64;
        if room > 0 && counts.pending > 0 {
            let batch: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(batch), 0) FROM rollout_items WHERE rollout_id = $1",
            )
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
            let batch = batch + 1;
            let pending: Vec<String> = sqlx::query_scalar(
                "SELECT container_id FROM rollout_items WHERE rollout_id = $1 \
                 AND state = 'pending' ORDER BY container_id LIMIT $2",
            )
            .bind(id)
            .bind(to_i64(room))
            .fetch_all(&mut **tx)
            .await?;
            let grants = Grants::load(tx).await?;
            let records: Vec<ContainerRecord> = ContainerRecord::load_many(tx, &pending)
                .await?
                .into_iter()
                .filter(|c| c.state == "active")
                .collect();
            let issue = IssueBatch {
                revision,
                grants: &grants,
                actor: "server",
            };
            let outcomes = self
                .issue_many(tx, &issue, &records, Action::Run, IfUnchanged::Skip)
                .await?;
            let mut issued = Vec::new();
            for (c, outcome) in records.iter().zip(outcomes) {
                if let Issued::New { .. } = outcome {
                    issued.push(c.id.clone());
                    nodes.insert(c.node_id.clone());
                }
            }
            released = issued.len() as u64;

            // Items with nothing to change (or whose container is no longer active) are
            // skipped; the rest target the generation just issued.
            let issued_set: std::collections::HashSet<&String> = issued.iter().collect();
            let skipped: Vec<String> = pending
                .iter()
                .filter(|c| !issued_set.contains(c))
                .cloned()
                .collect();
            let leading = [Value::Int(to_i64(at)), Value::Text(id.to_string())];
            bulk::execute_in_with(
                tx,
                "UPDATE rollout_items SET state = 'skipped', finished_at = $1, \
                 reason = 'nothing to change or container gone' WHERE rollout_id = $2 \
                 AND container_id IN",
                &leading,
                &skipped,
            )
            .await?;
            let leading = [
                Value::Int(batch),
                Value::Int(to_i64(at)),
                Value::Text(id.to_string()),
            ];
            const RELEASE: &str = "UPDATE rollout_items SET state = 'released', \
                                   batch = $1, released_at = $2, \
                                   target_generation = (SELECT c.generation \
                                   FROM containers c WHERE c.id = rollout_items.container_id) \
                                   WHERE rollout_id = $3 AND state = 'pending'";
            if pending.len() as u64 == counts.pending {
                // Every pending item was taken: what is still pending is exactly what was issued,
                // and no list of ids is needed.
                bulk::execute(tx, RELEASE, &leading).await?;
            } else {
                bulk::execute_in_with(
                    tx,
                    &format!("{RELEASE} AND container_id IN"),
                    &leading,
                    &issued,
                )
                .await?;
            }
        }

        let counts = item_counts(tx, id).await?;
        let completed = counts.pending == 0 && counts.in_flight == 0;
        if completed {
            sqlx::query("UPDATE rollouts SET state = 'completed', finished_at = $1 WHERE id = $2")
                .bind(to_i64(at))
                .bind(id)
                .execute(&mut **tx)
                .await?;
            let details = serde_json::json!({
                "applied": counts.applied,
                "skipped": counts.skipped,
                "failed": counts.failed,
            });
            audit::append(
                tx,
                at,
                &[NewEntry {
                    actor: "server",
                    action: "rollout.complete",
                    subject: id,
                    details,
                }],
            )
            .await?;
        }
        step.nodes = nodes.into_iter().collect();
        step.released = released;
        step.completed = completed;
        step.room_left =
            released > 0 && counts.pending > 0 && counts.in_flight < policy.max_in_flight;
        Ok(step)
    }

    /// Resumes a paused rollout: only failures reported after now count toward its threshold.
    /// Failing containers stay in flight; their agents keep retrying with backoff.
    pub async fn resume_rollout(&self, actor: &str, id: &str) -> ServiceResult<RolloutView> {
        let (mut tx, _revision) = self.store.write().await?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        match state.as_deref() {
            None => {
                return Err(ServiceError::not_found(format!(
                    "rollout {id} does not exist"
                )));
            }
            Some("paused") => {}
            Some(other) => {
                return Err(ServiceError::conflict(format!(
                    "rollout {id} is {other}, not paused"
                )));
            }
        }
        let at = now();
        sqlx::query("UPDATE rollouts SET state = 'running', resumed_at = $1 WHERE id = $2")
            .bind(to_i64(at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit::append(
            &mut tx,
            at,
            &[NewEntry {
                actor,
                action: "rollout.resume",
                subject: id,
                details: serde_json::json!({}),
            }],
        )
        .await?;
        let view = rollout_view(&mut tx, id).await?;
        tx.commit().await?;
        self.rollout_wake.notify_one();
        Ok(view)
    }

    /// Lists rollouts, newest first.
    pub async fn list_rollouts(&self) -> ServiceResult<Vec<RolloutView>> {
        let mut tx = self.store.pool().begin().await?;
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM rollouts ORDER BY created_at DESC, id")
                .fetch_all(&mut *tx)
                .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(rollout_view(&mut tx, &id).await?);
        }
        Ok(out)
    }

    /// Shows one rollout.
    pub async fn show_rollout(&self, id: &str) -> ServiceResult<RolloutView> {
        let mut tx = self.store.pool().begin().await?;
        rollout_view(&mut tx, id).await
    }
}

/// A released item with its container's reported state: container, target generation,
/// container state, applied generation, status, status generation, status reason.
type ReleasedRow = (String, i64, String, i64, String, i64, Option<String>);

/// Marks released items applied, or skipped when their container went away. A failure report
/// leaves an item in flight (the agent retries; a later success still counts) and is counted
/// by [`item_counts`].
pub(crate) async fn settle_released(
    tx: &mut Tx,
    rollout: &str,
    at: u64,
) -> Result<(), sqlx::Error> {
    let rows: Vec<ReleasedRow> = sqlx::query_as(
        "SELECT ri.container_id, ri.target_generation, c.state, c.applied_generation, \
         c.status, c.status_generation, c.status_reason FROM rollout_items ri \
         JOIN containers c ON c.id = ri.container_id WHERE ri.rollout_id = $1 \
         AND ri.state = 'released'",
    )
    .bind(rollout)
    .fetch_all(&mut **tx)
    .await?;
    for (container, target, state, applied, status, status_generation, reason) in rows {
        let (new_state, reason) = if applied >= target {
            ("applied", None)
        } else if state != "active" {
            ("skipped", Some(format!("container is {state}")))
        } else {
            let _ = (status, status_generation, reason);
            continue;
        };
        sqlx::query(
            "UPDATE rollout_items SET state = $1, finished_at = $2, reason = $3 \
             WHERE rollout_id = $4 AND container_id = $5",
        )
        .bind(new_state)
        .bind(to_i64(at))
        .bind(reason)
        .bind(rollout)
        .bind(&container)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    pending: u64,
    in_flight: u64,
    applied: u64,
    failed: u64,
    skipped: u64,
}

/// Counts items by state. `failed` counts items in flight whose container reported a failure
/// or refusal of the target generation (or a later one) since the rollout started or was last
/// resumed.
async fn item_counts(tx: &mut Tx, rollout: &str) -> Result<Counts, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, COUNT(*) FROM rollout_items WHERE rollout_id = $1 GROUP BY state",
    )
    .bind(rollout)
    .fetch_all(&mut **tx)
    .await?;
    let failing: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM rollout_items ri JOIN containers c ON c.id = ri.container_id \
         JOIN rollouts r ON r.id = ri.rollout_id \
         WHERE ri.rollout_id = $1 AND ri.state = 'released' AND c.status IN ('failed', 'refused') \
         AND c.status_generation >= ri.target_generation AND c.status_at >= r.resumed_at",
    )
    .bind(rollout)
    .fetch_one(&mut **tx)
    .await?;
    let mut counts = Counts {
        failed: to_u64(failing),
        ..Counts::default()
    };
    for (state, n) in rows {
        let n = to_u64(n);
        match state.as_str() {
            "pending" => counts.pending = n,
            "released" => counts.in_flight = n,
            "applied" => counts.applied = n,
            _ => counts.skipped += n,
        }
    }
    Ok(counts)
}

async fn rollout_view(tx: &mut Tx, id: &str) -> ServiceResult<RolloutView> {
    let row = sqlx::query(
        "SELECT id, reason, state, batch_size, max_in_flight, failure_threshold, created_at \
         FROM rollouts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| ServiceError::not_found(format!("rollout {id} does not exist")))?;
    let counts = item_counts(tx, id).await?;
    let (batches, largest): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(MAX(n), 0) FROM (SELECT batch, COUNT(*) AS n \
         FROM rollout_items WHERE rollout_id = $1 AND batch IS NOT NULL GROUP BY batch) b",
    )
    .bind(id)
    .fetch_one(&mut **tx)
    .await?;
    Ok(RolloutView {
        id: row.try_get(0)?,
        reason: row.try_get(1)?,
        state: row.try_get(2)?,
        policy: RolloutPolicy {
            batch_size: to_u64(row.try_get(3)?),
            max_in_flight: to_u64(row.try_get(4)?),
            failure_threshold: to_u64(row.try_get(5)?),
        },
        total: counts.pending + counts.in_flight + counts.applied + counts.skipped,
        pending: counts.pending,
        in_flight: counts.in_flight,
        applied: counts.applied,
        failed: counts.failed,
        skipped: counts.skipped,
        batches: to_u64(batches),
        largest_batch: to_u64(largest),
        created_at: to_u64(row.try_get(6)?),
    })
}

/// Runs the rollout driver until `shutdown` turns true. A step in progress finishes; the next
/// one is not started.
pub async fn run_driver(service: Arc<Service>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Err(e) = service.drive_rollouts().await {
            tracing::warn!(error = %e, "rollout step failed; retrying at the next tick");
        }
        tokio::select! {
            _ = service.rollout_wake.notified() => {}
            _ = tokio::time::sleep(DRIVER_TICK) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
