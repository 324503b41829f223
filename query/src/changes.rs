//! The Bemi-compatible `changes` view: one row per change of every table, with row images and
//! context as JSON, so audit questions across tables are one query.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{RecordBatch, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use pgtrail_store::segment::PgKind;
use pgtrail_store::{Cell, ChangeRecord, Op, RelationVersion, Row};
use serde_json::{Map, Value};

use crate::archive::ArchiveSnapshot;
use crate::history::Bounds;
use crate::pit::for_each_change_where;

/// The view's schema.
pub fn changes_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("primary_key", DataType::Utf8, true),
        Field::new("table", DataType::Utf8, false),
        Field::new("schema", DataType::Utf8, false),
        Field::new("operation", DataType::Utf8, false),
        Field::new("before", DataType::Utf8, true),
        Field::new("after", DataType::Utf8, true),
        Field::new("context", DataType::Utf8, true),
        Field::new("committed_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        Field::new("transaction_id", DataType::UInt32, false),
        // Named like the history tables' columns so that the same filters prune segments.
        Field::new("lsn", DataType::UInt64, false),
        Field::new("seq", DataType::UInt32, false),
        Field::new("position", DataType::Utf8, false),
    ]))
}

/// A row image as a JSON object: numbers and booleans as JSON numbers and booleans, json and
/// jsonb embedded, everything else as PostgreSQL's text. Unknown values (never sent by
/// PostgreSQL, never seen before) are left out rather than shown as null.
pub fn row_json(version: &RelationVersion, row: &Row) -> Value {
    let mut object = Map::new();
    for (column, cell) in version.columns.iter().zip(row) {
        let value = match cell {
            Cell::Unknown => continue,
            Cell::Null => Value::Null,
            Cell::Text(t) => match PgKind::of(column.type_oid, column.type_modifier) {
                PgKind::Int2 | PgKind::Int4 | PgKind::Int8 => t.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::from(t.clone())),
                PgKind::Float4 | PgKind::Float8 => match t.parse::<f64>() {
                    Ok(f) if f.is_finite() => Value::from(f),
                    _ => Value::from(t.clone()),
                },
                PgKind::Bool => Value::Bool(t == "t"),
                PgKind::Json => serde_json::from_str(t).unwrap_or_else(|_| Value::from(t.clone())),
                _ => Value::from(t.clone()),
            },
        };
        object.insert(column.name.clone(), value);
    }
    Value::Object(object)
}

fn operation(op: Op) -> &'static str {
    match op {
        Op::Insert => "CREATE",
        Op::Update => "UPDATE",
        Op::Delete => "DELETE",
        Op::Truncate => "TRUNCATE",
        Op::Snapshot => "SNAPSHOT",
        Op::Message => "MESSAGE",
    }
}

struct Builders {
    pk: StringBuilder,
    table: StringBuilder,
    schema: StringBuilder,
    op: StringBuilder,
    before: StringBuilder,
    after: StringBuilder,
    context: StringBuilder,
    at: TimestampMicrosecondBuilder,
    xid: UInt32Builder,
    lsn: UInt64Builder,
    seq: UInt32Builder,
    position: StringBuilder,
    rows: usize,
}

impl Builders {
    fn new() -> Builders {
        Builders {
            pk: StringBuilder::new(),
            table: StringBuilder::new(),
            schema: StringBuilder::new(),
            op: StringBuilder::new(),
            before: StringBuilder::new(),
            after: StringBuilder::new(),
            context: StringBuilder::new(),
            at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            xid: UInt32Builder::new(),
            lsn: UInt64Builder::new(),
            seq: UInt32Builder::new(),
            position: StringBuilder::new(),
            rows: 0,
        }
    }

    fn push(&mut self, version: &RelationVersion, key: pgtrail_store::ChangeKey, rec: &ChangeRecord) {
        let pk = rec.key.as_ref().map(|k| {
            if k.len() == 1 {
                k[0].clone().unwrap_or_default()
            } else {
                Value::from(k.iter().map(|v| v.clone().map_or(Value::Null, Value::from)).collect::<Vec<_>>()).to_string()
            }
        });
        self.pk.append_option(pk);
        self.table.append_value(&version.name);
        self.schema.append_value(&version.schema);
        self.op.append_value(operation(rec.op));
        self.before.append_option(rec.before.as_ref().map(|r| row_json(version, r).to_string()));
        self.after.append_option(rec.after.as_ref().map(|r| row_json(version, r).to_string()));
        self.context.append_option(rec.context.as_deref());
        self.at.append_value(rec.committed_at_us);
        self.xid.append_value(rec.xid);
        self.lsn.append_value(key.commit_lsn.0);
        self.seq.append_value(key.seq);
        self.position.append_value(key.commit_lsn.to_string());
        self.rows += 1;
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.rows = 0;
        Ok(RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(self.pk.finish()),
                Arc::new(self.table.finish()),
                Arc::new(self.schema.finish()),
                Arc::new(self.op.finish()),
                Arc::new(self.before.finish()),
                Arc::new(self.after.finish()),
                Arc::new(self.context.finish()),
                Arc::new(self.at.finish()),
                Arc::new(self.xid.finish()),
                Arc::new(self.lsn.finish()),
                Arc::new(self.seq.finish()),
                Arc::new(self.position.finish()),
            ],
        )?)
    }
}

/// The `changes` view.
pub struct ChangesTable {
    pub archive: Arc<ArchiveSnapshot>,
    schema: SchemaRef,
}

impl ChangesTable {
    pub fn new(archive: Arc<ArchiveSnapshot>) -> ChangesTable {
        ChangesTable { archive, schema: changes_schema() }
    }
}

impl fmt::Debug for ChangesTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChangesTable")
    }
}

#[async_trait]
impl TableProvider for ChangesTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let bounds = Bounds::from_filters(filters);
        let partitions: Vec<Arc<dyn PartitionStream>> = self
            .archive
            .tables
            .keys()
            .map(|t| {
                Arc::new(TablePartition { archive: self.archive.clone(), table: t.clone(), bounds, schema: self.schema.clone() })
                    as Arc<dyn PartitionStream>
            })
            .collect();
        if partitions.is_empty() {
            let empty = datafusion::catalog::MemTable::try_new(self.schema.clone(), vec![vec![]])?;
            return empty.scan(_state, projection, filters, limit).await;
        }
        Ok(Arc::new(StreamingTableExec::try_new(self.schema.clone(), partitions, projection, [], false, limit)?))
    }
}

#[derive(Debug)]
struct TablePartition {
    archive: Arc<ArchiveSnapshot>,
    table: String,
    bounds: Bounds,
    schema: SchemaRef,
}

impl PartitionStream for TablePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStreamBuilder::new(self.schema.clone(), 2);
        let tx = builder.tx();
        let (archive, table, bounds, schema) = (self.archive.clone(), self.table.clone(), self.bounds, self.schema.clone());
        builder.spawn_blocking(move || {
            let Some(history) = archive.tables.get(&table) else { return Ok(()) };
            let mut b = Builders::new();
            for_each_change_where(
                &archive,
                history,
                bounds,
                |seg| bounds.overlaps(seg),
                |key, rec| bounds.contains(key, rec.committed_at_us),
                |version, key, rec| {
                    b.push(version, key, rec);
                    if b.rows >= 8192 {
                        let batch = b.finish(&schema)?;
                        if tx.blocking_send(Ok(batch)).is_err() {
                            return Err(datafusion::error::DataFusionError::Execution("query cancelled".into()));
                        }
                    }
                    Ok(())
                },
            )?;
            if b.rows > 0 {
                let _ = tx.blocking_send(b.finish(&schema));
            }
            Ok(())
        });
        builder.build()
    }
}
