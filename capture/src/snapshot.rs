//! The initial snapshot: every captured table read with COPY inside the slot's exported
//! snapshot, streamed row by row to the log writer (bounded memory whatever the table size).

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use pgtrail_store::{IncomingCell, IncomingChange, LogOp, Lsn, Op, TableScope, always_quoted};

use crate::error::CaptureError;
use crate::slot::{self, CapturedTable, relation_from_catalog};
use crate::writer::WriterHandle;

/// Rows sent to the sink per message.
pub(crate) const ROWS_PER_BATCH: usize = 512;

/// Where a snapshot's operations go: the writer (the initial snapshot, straight into the log)
/// or a spool (a table synchronised while the stream runs: stored when the stream reaches the
/// snapshot's point, see `table_sync`).
pub(crate) trait SnapshotSink {
    async fn send(&mut self, ops: Vec<LogOp>) -> Result<(), CaptureError>;
}

impl SnapshotSink for &WriterHandle {
    async fn send(&mut self, ops: Vec<LogOp>) -> Result<(), CaptureError> {
        WriterHandle::send(self, ops).await
    }
}

impl<S: SnapshotSink> SnapshotSink for &mut S {
    async fn send(&mut self, ops: Vec<LogOp>) -> Result<(), CaptureError> {
        (**self).send(ops).await
    }
}

/// A sink that counts the rows passing through it: the progress a copy's watchdog reads
/// (see `liveness::watched`), so that a long COPY whose server waits on a slow sink is not
/// taken for a dead connection.
pub(crate) struct Counted<'a, S> {
    pub inner: S,
    pub rows: &'a AtomicU64,
}

impl<S: SnapshotSink> SnapshotSink for Counted<'_, S> {
    async fn send(&mut self, ops: Vec<LogOp>) -> Result<(), CaptureError> {
        let rows = ops
            .iter()
            .filter(|op| matches!(op, LogOp::Change(_)))
            .count();
        self.inner.send(ops).await?;
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Read every table inside `snapshot_name` and send it to the writer as one transaction of
/// `snapshot` changes keyed just before the consistent point: a transaction that commits
/// exactly at the consistent point then sorts after the snapshot, as it happened after it.
/// `progress` counts the rows sent, for the copy's watchdog.
pub(crate) async fn copy_tables(
    sql: &tokio_postgres::Client,
    snapshot_name: &str,
    consistent_point: Lsn,
    tables: &[CapturedTable],
    writer: &WriterHandle,
    progress: &AtomicU64,
) -> Result<u64, CaptureError> {
    // The archive begins at this date (`ArchiveSnapshot::first_commit_us`): a transaction
    // committed between the point and the dating is streamed after the snapshot with an
    // earlier time, and a moment before the date is refused rather than answered without it.
    let committed_at_us =
        enter_snapshot(sql, snapshot_name, tables, "initial-snapshot-entered").await?;
    writer
        .send(vec![LogOp::Begin {
            final_lsn: Lsn(consistent_point.0 - 1),
            xid: 0,
            committed_at_us,
        }])
        .await?;
    let mut total = 0u64;
    let mut sink = Counted {
        inner: writer,
        rows: progress,
    };
    for table in tables {
        total += copy_table(sql, table, TableScope::whole(table.oid), &mut sink).await?;
    }
    writer
        .send(vec![LogOp::Commit {
            end_lsn: consistent_point,
        }])
        .await?;
    leave_snapshot(sql).await?;
    Ok(total)
}

/// Begin a read-only transaction on `sql` inside the exported snapshot `snapshot_name`, with
/// `tables` locked against DDL until it ends, and return the snapshot's date: the server's
/// clock read once it is entered. Every transaction the snapshot holds committed before its
/// point, so before this reading, whatever this machine's clock says. `pause_point` names the
/// pause point between entering and dating (tests; see `pgtrail_store::crashpoint::pause`).
pub(crate) async fn enter_snapshot(
    sql: &tokio_postgres::Client,
    snapshot_name: &str,
    tables: &[CapturedTable],
    pause_point: &str,
) -> Result<i64, CaptureError> {
    sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| CaptureError::sql("starting the snapshot transaction", e))?;
    sql.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot_name.replace('\'', "''")
    ))
    .await
    .map_err(|e| CaptureError::sql("importing the slot's snapshot", e))?;
    // Hold off DDL on the tables until the copy ends (as pg_dump does): each table's columns
    // are read from the catalog, which is not versioned by the snapshot, and a column dropped
    // between that read and the COPY would fail it (found by pgtrail-torture's ALTER storm).
    if !tables.is_empty() {
        let list = tables
            .iter()
            .map(CapturedTable::sql_name)
            .collect::<Vec<_>>()
            .join(", ");
        sql.batch_execute(&format!("LOCK TABLE {list} IN ACCESS SHARE MODE"))
            .await
            .map_err(|e| match e.code() {
                // Dropped since it was chosen: choose again.
                Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    CaptureError::SnapshotRaced {
                        table: list.clone(),
                        detail: e
                            .as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
                    }
                }
                _ => CaptureError::sql(
                    "locking the captured tables against DDL for the snapshot",
                    e,
                ),
            })?;
    }
    pgtrail_store::crashpoint::pause(pause_point);
    let (_, dated) = crate::table_sync::server_point(sql).await?;
    Ok(dated)
}

/// End the snapshot transaction [`enter_snapshot`] began.
pub(crate) async fn leave_snapshot(sql: &tokio_postgres::Client) -> Result<(), CaptureError> {
    sql.batch_execute("COMMIT")
        .await
        .map_err(|e| CaptureError::sql("ending the snapshot transaction", e))
}

/// Copy one table (inside the snapshot transaction, the table locked) to `sink`: its schema
/// version, the mark that the snapshot holds its whole state (`scope`, completed with the
/// table's storage layout), then its rows in batches. Returns the row count.
pub(crate) async fn copy_table(
    sql: &tokio_postgres::Client,
    table: &CapturedTable,
    mut scope: TableScope,
    sink: &mut impl SnapshotSink,
) -> Result<u64, CaptureError> {
    // A table rewritten after the snapshot was taken (and before the lock) looks empty to
    // the snapshot: PostgreSQL's rewrites are not MVCC-safe. The snapshot's own view of the
    // file node then differs from the current one: take the copy again.
    let now =
        slot::storage_layout(sql, table.oid)
            .await?
            .ok_or_else(|| CaptureError::SnapshotRaced {
                table: table.qualified(),
                detail: "created or dropped while the snapshot was taken".into(),
            })?;
    if now.file_node_in_snapshot != now.layout.file_node {
        return Err(CaptureError::SnapshotRaced {
            table: table.qualified(),
            detail: "rewritten while the snapshot was taken".into(),
        });
    }
    scope.layout = Some(now.layout);
    let relation = relation_from_catalog(sql, table.oid).await?;
    let columns = relation
        .columns
        .iter()
        .map(|c| always_quoted(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let width = relation.columns.len();
    sink.send(vec![LogOp::Relation(relation), LogOp::SnapshotOf(scope)])
        .await?;
    let stmt = format!(
        "COPY (SELECT {columns} FROM {}) TO STDOUT",
        table.sql_name()
    );
    let stream = sql.copy_out(&stmt).await.map_err(|e| match e.code() {
        Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => CaptureError::SnapshotRaced {
            table: table.qualified(),
            detail: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        },
        _ => CaptureError::sql(format!("copying {}", table.qualified()), e),
    })?;
    futures_util::pin_mut!(stream);
    let mut pending: Vec<u8> = Vec::new();
    let mut batch = Vec::with_capacity(ROWS_PER_BATCH);
    let mut rows = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| CaptureError::sql(format!("copying {}", table.qualified()), e))?;
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + nl];
            let cells = parse_copy_line(line, width).map_err(|detail| {
                CaptureError::Protocol(format!(
                    "COPY of {} returned a malformed row: {detail}",
                    table.qualified()
                ))
            })?;
            batch.push(LogOp::Change(IncomingChange {
                relation_id: table.oid,
                op: Op::Snapshot,
                old: None,
                new: Some(cells),
            }));
            rows += 1;
            start += nl + 1;
            if batch.len() == ROWS_PER_BATCH {
                sink.send(std::mem::take(&mut batch)).await?;
            }
        }
        pending.drain(..start);
    }
    if !batch.is_empty() {
        sink.send(batch).await?;
    }
    tracing::info!(table = %table.qualified(), rows, "snapshot copied");
    Ok(rows)
}

/// Parse one line of COPY's text format into cells (`\N` is NULL; backslash escapes).
pub fn parse_copy_line(line: &[u8], width: usize) -> Result<Vec<IncomingCell>, String> {
    let mut cells = Vec::with_capacity(width);
    for field in line.split(|&b| b == b'\t') {
        if field == b"\\N" {
            cells.push(IncomingCell::Null);
            continue;
        }
        let mut out = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            let b = field[i];
            if b != b'\\' {
                out.push(b);
                i += 1;
                continue;
            }
            let Some(&e) = field.get(i + 1) else {
                return Err("line ends with a backslash".into());
            };
            i += 2;
            match e {
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut v = u32::from(e - b'0');
                    let mut n = 1;
                    while n < 3 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                        v = v * 8 + u32::from(field[i] - b'0');
                        i += 1;
                        n += 1;
                    }
                    out.push((v & 0xFF) as u8);
                }
                b'x' => {
                    let mut v = 0u32;
                    let mut n = 0;
                    while n < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                        v = v * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                        i += 1;
                        n += 1;
                    }
                    if n == 0 {
                        out.push(b'x');
                    } else {
                        out.push((v & 0xFF) as u8);
                    }
                }
                other => out.push(other),
            }
        }
        let text = String::from_utf8(out).map_err(|_| "a value is not valid UTF-8".to_string())?;
        cells.push(IncomingCell::Text(text));
    }
    if cells.len() != width {
        return Err(format!(
            "{} fields where {width} columns were expected",
            cells.len()
        ));
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_format_escapes_are_decoded() {
        let cells = parse_copy_line(b"1\t\\N\ta\\tb\\nc\\\\d\t\\101\\x42", 4).unwrap();
        assert_eq!(
            cells,
            vec![
                IncomingCell::Text("1".into()),
                IncomingCell::Null,
                IncomingCell::Text("a\tb\nc\\d".into()),
                IncomingCell::Text("AB".into()),
            ]
        );
        assert!(parse_copy_line(b"1\t2", 3).is_err());
        assert!(parse_copy_line(b"1\\", 1).is_err());
    }
}
