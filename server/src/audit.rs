//! The hash-chained audit log.
//!
//! Each entry's hash covers its own fields and the previous entry's hash, so editing or removing
//! an entry breaks every later link. The chain head (sequence and hash) is also kept in the
//! `meta` row, so removing the newest entries is noticed too. Someone who can write the database
//! can still rebuild a consistent chain from scratch; to detect that, keep the head printed by
//! `keyward audit verify` somewhere the database's writers cannot reach (see README, "Limits").

use sha2::{Digest as _, Sha256};

use crate::api::AuditEntry;
use crate::store::bulk::{self, Value};
use crate::store::{StoreError, Tx, to_i64, to_u64};

/// Hash of the (empty) predecessor of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of one entry: SHA-256 over the JSON array of its fields and its predecessor's
/// hash, which is an unambiguous encoding.
pub fn entry_hash(
    seq: u64,
    at: u64,
    actor: &str,
    action: &str,
    subject: &str,
    details: &str,
    prev_hash: &str,
) -> String {
    let encoded = serde_json::json!([seq, at, actor, action, subject, details, prev_hash]);
    hex::encode(Sha256::digest(encoded.to_string().as_bytes()))
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// An entry is missing: sequence numbers jump.
    #[error("entry {expected} is missing (next entry found is {found})")]
    Gap {
        /// The sequence number expected.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// An entry does not link to its predecessor.
    #[error("entry {0} does not link to the entry before it")]
    BrokenLink(u64),
    /// An entry's hash does not match its content.
    #[error("entry {0} was modified: its hash does not match its content")]
    Modified(u64),
    /// The recorded head is not the last entry.
    #[error(
        "the chain ends at entry {last} but the recorded head is entry {head}: entries were \
         removed or added"
    )]
    HeadMismatch {
        /// Last entry present.
        last: u64,
        /// Head recorded in the database.
        head: u64,
    },
}

/// Verifies a whole chain, from entry 1, against the recorded head.
pub fn verify_chain(
    entries: &[AuditEntry],
    head_seq: u64,
    head_hash: &str,
) -> Result<(), ChainError> {
    let mut prev = GENESIS_HASH.to_string();
    let mut expected = 1;
    for entry in entries {
        if entry.seq != expected {
            return Err(ChainError::Gap {
                expected,
                found: entry.seq,
            });
        }
        if entry.prev_hash != prev {
            return Err(ChainError::BrokenLink(entry.seq));
        }
        let hash = entry_hash(
            entry.seq,
            entry.at,
            &entry.actor,
            &entry.action,
            &entry.subject,
            &entry.details,
            &entry.prev_hash,
        );
        if hash != entry.hash {
            return Err(ChainError::Modified(entry.seq));
        }
        prev = hash;
        expected += 1;
    }
    let last = expected - 1;
    if last != head_seq || prev != head_hash {
        return Err(ChainError::HeadMismatch {
            last,
            head: head_seq,
        });
    }
    Ok(())
}

/// An entry to append.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    /// Who acted.
    pub actor: &'a str,
    /// What happened.
    pub action: &'a str,
    /// On what.
    pub subject: &'a str,
    /// Further facts (JSON); never secrets.
    pub details: serde_json::Value,
}

/// Appends entries inside `tx`. Writers are serialized by the revision bump that starts every
/// write transaction, so reading the head and writing after it cannot race.
pub async fn append(tx: &mut Tx, now: u64, entries: &[NewEntry<'_>]) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let (seq, mut prev): (i64, String) =
        sqlx::query_as("SELECT audit_head_seq, audit_head_hash FROM meta WHERE id = 1")
            .fetch_one(&mut **tx)
            .await?;
    let mut seq = to_u64(seq);
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        seq += 1;
        let details = entry.details.to_string();
        let hash = entry_hash(
            seq,
            now,
            entry.actor,
            entry.action,
            entry.subject,
            &details,
            &prev,
        );
        rows.push(vec![
            Value::Int(to_i64(seq)),
            Value::Int(to_i64(now)),
            Value::Text(entry.actor.to_string()),
            Value::Text(entry.action.to_string()),
            Value::Text(entry.subject.to_string()),
            Value::Text(details),
            Value::Text(prev),
            Value::Text(hash.clone()),
        ]);
        prev = hash;
    }
    bulk::insert(
        tx,
        "audit (seq, at, actor, action, subject, details, prev_hash, hash)",
        rows,
    )
    .await?;
    sqlx::query("UPDATE meta SET audit_head_seq = $1, audit_head_hash = $2 WHERE id = 1")
        .bind(to_i64(seq))
        .bind(&prev)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let hash = entry_hash(seq, 100 + seq, "operator/a", "x", "s", "{}", &prev);
                let e = AuditEntry {
                    seq,
                    at: 100 + seq,
                    actor: "operator/a".into(),
                    action: "x".into(),
                    subject: "s".into(),
                    details: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let c = chain(3);
        assert_eq!(verify_chain(&c, 3, &c[2].hash), Ok(()));
        assert_eq!(verify_chain(&[], 0, GENESIS_HASH), Ok(()));
    }

    #[test]
    fn edits_removals_and_truncation_are_detected() {
        let c = chain(4);
        let head = c[3].hash.clone();

        let mut edited = c.clone();
        edited[1].subject = "other".into();
        assert_eq!(
            verify_chain(&edited, 4, &head),
            Err(ChainError::Modified(2))
        );

        let mut removed = c.clone();
        removed.remove(1);
        assert_eq!(
            verify_chain(&removed, 4, &head),
            Err(ChainError::Gap {
                expected: 2,
                found: 3
            })
        );

        let truncated = &c[..3];
        assert_eq!(
            verify_chain(truncated, 4, &head),
            Err(ChainError::HeadMismatch { last: 3, head: 4 })
        );
    }
}
