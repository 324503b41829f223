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

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use pgtrail_store::{Lsn, TableScope};

use crate::archive::ArchiveSnapshot;

pub struct UnknownSpansTable {
    archive: Arc<ArchiveSnapshot>,
    schema: SchemaRef,
}

/// One span: the table's name, where the rows became unknown, where they are known again
/// (`None`: a read decided on and not stored yet), and why.
struct Span {
    pub table: String,
    pub from: (Lsn, i64),
    pub to: Option<(Lsn, i64)>,
    pub reason: &'static str,
}

impl UnknownSpansTable {
    pub fn new(archive: Arc<ArchiveSnapshot>) -> Self {
        let at = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let schema = Schema::new(vec![
            Field::new("table_name", DataType::Utf8, false),
            Field::new("from_lsn", DataType::Utf8, false),
            Field::new("from_at", at(), false),
            Field::new("to_lsn", DataType::Utf8, true),
            Field::new("to_at", at(), true),
            Field::new("reason", DataType::Utf8, false),
        ]);
        UnknownSpansTable {
            archive,
            schema: Arc::new(schema),
        }
    }
}

impl std::fmt::Debug for UnknownSpansTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnknownSpansTable")
    }
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

#[async_trait]
impl TableProvider for UnknownSpansTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut table = StringBuilder::new();
        let (mut from_lsn, mut to_lsn) = (StringBuilder::new(), StringBuilder::new());
        let at = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let (mut from_at, mut to_at) = (at(), at());
        let mut why = StringBuilder::new();
        for span in spans(&self.archive) {
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
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)?;
        MemTable::try_new(self.schema.clone(), vec![vec![batch]])?
            .scan(state, projection, filters, limit)
            .await
    }
}
