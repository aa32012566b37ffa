//! Statements over many rows at once: `IN` lists and multi-row `INSERT`s, chunked to stay
//! within both backends' limits on bound parameters.
//!
//! The SQL text is assembled here from fixed fragments and numbered placeholders only; every
//! value is bound, never spliced into the text.

use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use super::{StoreError, Tx};

/// Ids per `IN` list.
const IN_CHUNK: usize = 200;
/// Bound values per multi-row `INSERT`. Both backends accept far more (SQLite 32766,
/// PostgreSQL 65535), but SQLite resolves each numbered placeholder with a scan over all of the
/// statement's placeholders, so binding costs grow with the square of their number; a few
/// hundred per statement keeps that negligible while still saving most round trips.
const INSERT_PARAMS: usize = 500;

/// A value to bind.
#[derive(Debug, Clone)]
pub enum Value {
    /// TEXT.
    Text(String),
    /// BIGINT.
    Int(i64),
    /// BLOB or BYTEA.
    Blob(Vec<u8>),
}

/// `$first, $first+1, ...` for `count` placeholders.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `prefix (ids...) suffix` for chunks of `ids` and returns all rows. `prefix` ends with
/// `IN`; the list and the parentheses are added here.
pub async fn select_in(
    tx: &mut Tx,
    prefix: &str,
    ids: &[String],
    suffix: &str,
) -> Result<Vec<AnyRow>, StoreError> {
    let mut rows = Vec::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!("{prefix} ({}) {suffix}", placeholders(1, chunk.len()));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id);
        }
        rows.extend(query.fetch_all(&mut **tx).await?);
    }
    Ok(rows)
}

/// Runs `prefix (ids...)` (an `UPDATE` or `DELETE` ending in `IN`) for chunks of `ids`.
pub async fn execute_in(tx: &mut Tx, prefix: &str, ids: &[String]) -> Result<u64, StoreError> {
    execute_in_with(tx, prefix, &[], ids).await
}

/// Like [`execute_in`], with `leading` values bound to `$1..$k` in `prefix` before the list.
pub async fn execute_in_with(
    tx: &mut Tx,
    prefix: &str,
    leading: &[Value],
    ids: &[String],
) -> Result<u64, StoreError> {
    let mut affected = 0;
    for chunk in ids.chunks(IN_CHUNK) {
        let sql = format!(
            "{prefix} ({})",
            placeholders(leading.len() + 1, chunk.len())
        );
        let query = bind_all(sqlx::query(AssertSqlSafe(sql)), leading);
        let query = chunk.iter().fold(query, |q, id| q.bind(id));
        affected += query.execute(&mut **tx).await?.rows_affected();
    }
    Ok(affected)
}

/// Runs one statement with `values` bound to `$1..$n`.
pub async fn execute(tx: &mut Tx, sql: &'static str, values: &[Value]) -> Result<u64, StoreError> {
    let query = bind_all(sqlx::query(sql), values);
    Ok(query.execute(&mut **tx).await?.rows_affected())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

fn bind_all<'q>(query: AnyQuery<'q>, values: &[Value]) -> AnyQuery<'q> {
    values.iter().fold(query, |q, value| match value {
        Value::Text(v) => q.bind(v.clone()),
        Value::Int(v) => q.bind(*v),
        Value::Blob(v) => q.bind(v.clone()),
    })
}

/// Inserts `rows` into `target` (`table (col, ...)`), many rows per statement. Every row has
/// as many values as `target` names columns.
pub async fn insert(tx: &mut Tx, target: &str, rows: Vec<Vec<Value>>) -> Result<(), StoreError> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(());
    };
    let per_statement = (INSERT_PARAMS / width).max(1);
    for chunk in rows.chunks(per_statement) {
        let values: Vec<String> = (0..chunk.len())
            .map(|r| format!("({})", placeholders(r * width + 1, width)))
            .collect();
        let sql = format!("INSERT INTO {target} VALUES {}", values.join(", "));
        let flat: Vec<Value> = chunk.iter().flatten().cloned().collect();
        bind_all(sqlx::query(AssertSqlSafe(sql)), &flat)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Ends the holding of `keys` by `containers` at each container's next generation (runs before
/// the containers' generations move on).
pub async fn end_holdings(
    tx: &mut Tx,
    keys: &[String],
    containers: &[String],
) -> Result<(), StoreError> {
    for chunk in containers.chunks(IN_CHUNK) {
        let sql = format!(
            "UPDATE key_holders SET until_generation = \
             (SELECT c.generation + 1 FROM containers c WHERE c.id = key_holders.container_id) \
             WHERE until_generation IS NULL AND key_id IN ({}) AND container_id IN ({})",
            placeholders(1, keys.len()),
            placeholders(keys.len() + 1, chunk.len())
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for key in keys {
            query = query.bind(key);
        }
        for id in chunk {
            query = query.bind(id);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered_from_the_given_start() {
        assert_eq!(super::placeholders(3, 3), "$3, $4, $5");
        assert_eq!(super::placeholders(1, 0), "");
    }
}
