//! Reading the audit log.

use super::{Service, ServiceResult};
use crate::api::{AuditEntry, AuditPage};
use crate::store::{to_i64, to_u64};

/// An audit row as stored: seq, at, actor, action, subject, details, prev_hash, hash.
type AuditRow = (i64, i64, String, String, String, String, String, String);

/// Most entries one page returns.
pub const MAX_PAGE: u64 = 10_000;

impl Service {
    /// Entries after `after`, at most `limit` (capped at [`MAX_PAGE`]), with the recorded head.
    pub async fn audit_page(&self, after: u64, limit: u64) -> ServiceResult<AuditPage> {
        let mut tx = self.store.pool().begin().await?;
        let (head_seq, head_hash): (i64, String) =
            sqlx::query_as("SELECT audit_head_seq, audit_head_hash FROM meta WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT seq, at, actor, action, subject, details, prev_hash, hash FROM audit \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(to_i64(after))
        .bind(to_i64(limit.clamp(1, MAX_PAGE)))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let entries = rows
            .into_iter()
            .map(
                |(seq, at, actor, action, subject, details, prev_hash, hash)| AuditEntry {
                    seq: to_u64(seq),
                    at: to_u64(at),
                    actor,
                    action,
                    subject,
                    details,
                    prev_hash,
                    hash,
                },
            )
            .collect();
        Ok(AuditPage {
            entries,
            head_seq: to_u64(head_seq),
            head_hash,
        })
    }
}
