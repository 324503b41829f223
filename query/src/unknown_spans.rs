//! `pgtrail.unknown_spans`: the spans of each table's history the archive cannot answer.
//!
//! DDL that changes stored rows without a change in the stream (a rewrite, `ADD COLUMN …
//! DEFAULT`, a column renamed between two looks), a drop, or a table out of the publication for
//! a while leaves the table's rows unknown from the DDL's earliest point until the capture
//! read the table again (or marked it dropped). `as_of` and `diff` refuse a moment inside such
//! a span; the change lists (`row_history`, the `changes` view, the history tables, the
//! `changes` and `cdf` export layouts) list every change the stream brought, each exact, and
//! this table says where the state between them is not known, so a list can be read with it.
//! It reads the same records as `replay::unknown_span`, the rule `as_of` refuses by.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::error::Result;
use pgtrail_store::{Lsn, TableScope};

use crate::archive::ArchiveSnapshot;

/// One span: the table's name, where the rows became unknown, where they are known again
/// (`None`: a read decided on and not stored yet), and why.
struct Span {
    table: String,
    from: (Lsn, i64),
    to: Option<(Lsn, i64)>,
    reason: &'static str,
}

/// The table's columns.
pub(crate) fn schema() -> SchemaRef {
    let at = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("from_lsn", DataType::Utf8, false),
        Field::new("from_at", at(), false),
        Field::new("to_lsn", DataType::Utf8, true),
        Field::new("to_at", at(), true),
        Field::new("reason", DataType::Utf8, false),
    ]))
}

/// Why a table's rows were unknown, as `scope` (the read that ended the span) says.
fn reason(scope: &TableScope) -> &'static str {
    if scope.unpublished {
        "left the publication"
    } else if scope.dropped {
        "dropped"
    } else {
        "rewritten by DDL"
    }
}

/// Every span of every table, in table name and then LSN order.
fn spans(archive: &ArchiveSnapshot) -> Vec<Span> {
    let mut spans = Vec::new();
    for table in archive.tables.values() {
        let name = table.qualified_name();
        for (snapshot, scope) in archive.table_snapshots(table) {
            if let Some(from) = scope.unknown_from {
                spans.push(Span {
                    table: name.clone(),
                    from,
                    to: Some((snapshot.lsn, snapshot.committed_at_us)),
                    reason: reason(&scope),
                });
            }
        }
        let ids: Vec<u32> = table.relation_ids().collect();
        for pending in archive
            .pending_reads
            .iter()
            .filter(|p| ids.contains(&p.relation_id))
        {
            if let Some(from) = pending.unknown_from {
                spans.push(Span {
                    table: name.clone(),
                    from,
                    to: None,
                    reason: reason(pending),
                });
            }
        }
    }
    spans.sort_by(|a, b| (&a.table, a.from).cmp(&(&b.table, b.from)));
    spans
}

/// Its rows.
pub(crate) fn batch(archive: &ArchiveSnapshot, schema: SchemaRef) -> Result<RecordBatch> {
    let mut table = StringBuilder::new();
    let (mut from_lsn, mut to_lsn) = (StringBuilder::new(), StringBuilder::new());
    let at = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let (mut from_at, mut to_at) = (at(), at());
    let mut why = StringBuilder::new();
    for span in spans(archive) {
        table.append_value(&span.table);
        from_lsn.append_value(span.from.0.to_string());
        from_at.append_value(span.from.1);
        to_lsn.append_option(span.to.map(|(lsn, _)| lsn.to_string()));
        to_at.append_option(span.to.map(|(_, at)| at));
        why.append_value(span.reason);
    }
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(table.finish()),
        Arc::new(from_lsn.finish()),
        Arc::new(from_at.finish()),
        Arc::new(to_lsn.finish()),
        Arc::new(to_at.finish()),
        Arc::new(why.finish()),
    ];
    Ok(RecordBatch::try_new(schema, arrays)?)
}
