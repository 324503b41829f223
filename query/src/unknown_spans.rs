//! `pgtrail.unknown_spans`: the spans of each table's history the archive cannot answer.
//!
//! DDL that changes stored rows without a change in the stream (a rewrite, `ADD COLUMN …
//! DEFAULT`, a column renamed between two looks), a drop, or a table out of the publication for
//! a while leaves the table's rows unknown from the DDL's earliest point until the capture
//! read the table again (or marked it dropped). `as_of` and `diff` refuse a moment inside such
//! a span; the change lists (`row_history`, the `changes` view, the history tables, the
//! `changes` and `cdf` export layouts) list every change the stream brought, each exact, and
//! this table says where the state between them is not known, so a list can be read with it.
//! The spans are `replay::unknown_spans`, the ones `as_of` refuses a moment in.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::error::Result;
use pgtrail_store::TableScope;

use crate::archive::ArchiveSnapshot;
use crate::replay::{UnknownSpan, unknown_spans};

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

/// Every span of every table, in table name and then LSN order: (table, span).
fn spans(archive: &ArchiveSnapshot) -> Vec<(String, UnknownSpan<'_>)> {
    let mut spans: Vec<_> = archive
        .tables
        .values()
        .flat_map(|table| {
            let name = table.qualified_name();
            unknown_spans(archive, table).map(move |span| (name.clone(), span))
        })
        .collect();
    spans.sort_by(|(a, x), (b, y)| (a, x.from).cmp(&(b, y.from)));
    spans
}

/// Its rows.
pub(crate) fn batch(archive: &ArchiveSnapshot, schema: SchemaRef) -> Result<RecordBatch> {
    let mut table = StringBuilder::new();
    let (mut from_lsn, mut to_lsn) = (StringBuilder::new(), StringBuilder::new());
    let at = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let (mut from_at, mut to_at) = (at(), at());
    let mut why = StringBuilder::new();
    for (name, span) in spans(archive) {
        table.append_value(&name);
        from_lsn.append_value(span.from.0.to_string());
        from_at.append_value(span.from.1);
        to_lsn.append_option(span.to.map(|s| s.lsn.to_string()));
        to_at.append_option(span.to.map(|s| s.committed_at_us));
        why.append_value(reason(&span.scope));
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
